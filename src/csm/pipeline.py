"""High-level text-to-speech: `csm.pipeline("text-to-audio", model=...)`, voices, long text.

Long text is split into sentences; each is generated with the sentences before it (their text and the audio
just generated for them) as context, oldest dropped first when the model's context would overflow, and the
pieces are joined with a short crossfade.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from .chunking import (  # noqa: F401 (CROSSFADE_MS, crossfade_join, CrossfadeStream, progress_bar: kept importable here)
    CROSSFADE_MS,
    MAX_CHUNK_CHARS,
    MAX_TEXT_CHARS,
    MIN_CHUNK_CHARS,
    CrossfadeStream,
    crossfade_join,
    progress_bar,
    split_sentences,
)
from .frames import FrameRule
from .generate import GenerationConfig, decode_rows
from .model import CsmForConditionalGeneration, resolve_dtype
from .planner import Prompt, Turn, TurnError, plan_prompt, voice_turns
from .processor import CsmProcessor
from .voice import Voice

TASKS = ("text-to-audio", "text-to-speech")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """cuda, then mps, then cpu when `device` is None; a clear ValueError for an unknown or absent device."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU usable by torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)"
        )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but Metal is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """'auto': bfloat16 on GPUs that support it, else float16 on CUDA, float32 elsewhere."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return resolve_dtype(dtype)


def pick_quantize(quantize: str | None, dtype: str | torch.dtype | None) -> str | None:
    """With neither asked for, "auto": on a CPU with csm's kernels a bf16 checkpoint's weights stay in 16
    bits under the float32 model, the same numbers read ~2.6x faster (csm.quant.auto_scheme)."""
    return "auto" if quantize is None and dtype in (None, "auto") else quantize


class TextToAudioPipeline:
    """Text in, 24 kHz speech out: `pipe("Hello.")` -> {"audio": np.ndarray, "sampling_rate": 24000}.

    Defaults given here (speaker, voice, context, temperature, top_k, max_seconds, seed, ...) apply to every
    call; keyword arguments of a call override them.
    """

    def __init__(self, model: CsmForConditionalGeneration, processor: CsmProcessor, **defaults):
        self.model, self.processor = model, processor
        self.defaults = self._check_options(defaults)
        self.sampling_rate = model.codec_model.sampling_rate
        self._voice_cache: dict[str, Voice] = {}
        self.store_voice_codes = True  # a saved voice's codes go to its folder's codes.pt (csm batch: False)

    # ---- options ----------------------------------------------------------------------------------

    OPTIONS = (
        "speaker", "voice", "context", "temperature", "top_k", "top_p", "do_sample", "max_seconds",
        "max_new_tokens", "seed", "max_chunk_chars", "crossfade_ms", "progress",
    )  # fmt: skip

    def _check_options(self, options: dict) -> dict:
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(self.OPTIONS)}"
            )
        return options

    def _options(self, overrides: dict) -> dict:
        self._check_options(overrides)
        return {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}

    def _voice(self, voice: Voice | str | os.PathLike | None) -> Voice | None:
        """A Voice, or a saved voice by name or folder (loaded once per pipeline)."""
        if isinstance(voice, (str, os.PathLike)):
            key = str(voice)
            if key not in self._voice_cache:
                self._voice_cache[key] = Voice.named(key, store_codes=self.store_voice_codes)
            voice = self._voice_cache[key]
        return voice

    def _context_turns(self, opts: dict) -> tuple[int, list[Turn]]:
        """The speaker and the fixed context turns (a voice's clips, then given clips), with their codes."""
        voice = self._voice(opts.get("voice"))
        speaker = opts.get("speaker")
        if speaker is None:
            speaker = voice.speaker if voice is not None else 0
        if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
            raise ValueError(f"speaker must be a non-negative integer, got {speaker!r}")
        turns: list[Turn] = []
        if voice is not None:
            turns += voice_turns(voice, voice.codes(self.model))
        context = opts.get("context")
        if context:
            if not isinstance(context, Voice):
                context = Voice("context", speaker, [(a, t) for a, t in context])
            turns += voice_turns(context, context.codes(self.model))
        return speaker, turns

    def _frames(self, opts: dict, text: str) -> tuple[int, bool]:
        """Frames to allow for one chunk, and whether the user fixed that number."""
        rate = self.model.codec_model.frame_rate
        if opts.get("max_new_tokens") is not None:
            return int(opts["max_new_tokens"]), True
        if opts.get("max_seconds") is not None:
            if not opts["max_seconds"] > 0:
                raise ValueError(f"max_seconds must be > 0, got {opts['max_seconds']}")
            return math.ceil(opts["max_seconds"] * rate), True
        default = GenerationConfig.from_model(self.model).max_new_tokens
        return max(default, math.ceil(rate * (3.0 + 0.1 * len(text)))), False  # ~15 chars/s, with room

    def frame_budget(self, text: str, **options) -> int:
        """The most frames one sentence `text` may take with these options (max_seconds, max_new_tokens, or
        from its length): what a progress display counts up to."""
        return self._frames(self._options(options), text)[0]

    def _sampling(self, opts: dict) -> dict:
        return {k: opts[k] for k in ("temperature", "top_k", "top_p", "do_sample") if opts.get(k) is not None}

    # ---- one model call ---------------------------------------------------------------------------

    def _prompt(
        self,
        texts: list[str],
        speaker: int,
        fixed: list[Turn],
        carried: list[Turn],
        opts: dict,
        policy: str = "keep",
    ) -> Prompt:
        """The planned prompt for `texts` (one row each) after the context, oldest carried turns dropped to fit;
        `policy` for a frame budget guessed from the text ("fit" or "keep": see csm.planner), a budget the user
        fixed (max_seconds, max_new_tokens) must fit whole."""
        frames, fixed_frames = self._frames(opts, max(texts, key=len))
        limit = self.model.config.max_position_embeddings
        policy = "exact" if fixed_frames else policy
        return plan_prompt(self.processor, fixed, carried, speaker, texts, frames, limit, policy)

    def _generate(
        self, prompt: Prompt, opts: dict, seed: int | None
    ) -> list[tuple[np.ndarray, torch.Tensor]]:
        """Generate every row of a prompt: [(audio, codes (F, K))] per row, cut at its end of audio."""
        out = self.model.generate(
            input_ids=prompt.input_ids,
            attention_mask=prompt.attention_mask,
            audio_codes=prompt.audio_codes,
            max_new_tokens=prompt.frames,
            seed=seed,
            **self._sampling(opts),
        )  # (B, F, K)
        lengths = FrameRule.of(self.model).lengths(out)
        waves = decode_rows(self.model, out)
        return [
            (w.float().cpu().numpy(), out[b, :n].clone())
            for b, (w, n) in enumerate(zip(waves, lengths, strict=True))
        ]

    def _stream(
        self, prompt: Prompt, opts: dict, seed: int | None, chunk_frames: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Generate a one-row prompt chunk by chunk: yields (audio, codes (n, K)) as they are made."""
        for audio, codes in self.model.generate_stream(
            input_ids=prompt.input_ids,
            attention_mask=prompt.attention_mask,
            audio_codes=prompt.audio_codes,
            max_new_tokens=prompt.frames,
            chunk_frames=chunk_frames,
            seed=seed,
            with_codes=True,
            **self._sampling(opts),
        ):
            piece = audio[0].float().cpu().numpy()
            if len(piece):
                yield piece, codes[0]

    # ---- public -----------------------------------------------------------------------------------

    def __call__(self, text: str | list[str], **options) -> dict | list[dict]:
        """Speak `text` (a string, or a list of strings as a batch). Options: speaker, voice (a Voice, a saved
        voice's name or folder), context ([(audio, transcript), ...]), temperature, top_k, top_p, do_sample,
        max_seconds / max_new_tokens (per sentence), seed, max_chunk_chars, crossfade_ms, progress."""
        opts = self._options(options)
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts:
            raise ValueError("text must be a non-empty string or a non-empty list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i} is empty or not a string: there is nothing to say")
            if len(t) > MAX_TEXT_CHARS:
                raise ValueError(
                    f"text {i} has {len(t)} characters, more than {MAX_TEXT_CHARS}; split it into files"
                )
        speaker, fixed = self._context_turns(opts)
        max_chars = int(opts.get("max_chunk_chars") or MAX_CHUNK_CHARS)
        chunked = [split_sentences(t, max_chars) for t in texts]
        if all(len(c) == 1 for c in chunked):  # one sentence each: one batched call
            with torch.inference_mode():
                prompt = self._prompt([c[0] for c in chunked], speaker, fixed, [], opts)
                results = [self._result(w) for w, _ in self._generate(prompt, opts, opts.get("seed"))]
        else:  # long text: sentence by sentence, each in the context of those before it
            try:
                results = [self._result(self._monologue(fixed, opts).say(speaker, t)) for t in texts]
            except TurnError as e:  # one turn: no turn number to name
                raise ValueError(e.message) from None
        return results if isinstance(text, (list, tuple)) else results[0]

    def _result(self, audio: np.ndarray) -> dict:
        return {"audio": np.ascontiguousarray(audio, dtype=np.float32), "sampling_rate": self.sampling_rate}

    def _monologue(self, fixed: list[Turn], opts: dict):
        """Long text is a one-turn conversation (sentence by sentence, each in the context of those before).
        Like a dialogue, a sentence keeps its whole frame budget: the oldest sentences leave the context
        rather than a late sentence being cut short when minutes of speech fill the window."""
        from .conversation import Conversation

        options = {k: v for k, v in opts.items() if k not in ("speaker", "voice", "context", "seed")}
        return Conversation(self, seed=opts.get("seed"), fixed=fixed, **options)

    def stream(self, text: str, chunk_frames: int = 4, **options) -> Iterator[np.ndarray]:
        """Yield float32 audio as it is generated, sentence after sentence (joins crossfaded as in `__call__`)."""
        opts = self._options(options)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        speaker, fixed = self._context_turns(opts)
        try:
            yield from self._monologue(fixed, opts).stream(speaker, text, chunk_frames)
        except TurnError as e:
            raise ValueError(e.message) from None

    # ---- conversations ----------------------------------------------------------------------------

    def conversation(self, voices: dict | None = None, seed: int | None = None, **options):
        """A `Conversation` kept across calls: `conv.add(speaker, text, audio)` for a turn that was spoken,
        `conv.say(speaker, text)` (or `conv.stream`) for the reply spoken in the context of every turn so far.

        voices: {speaker: Voice or saved voice name}, whose clips stay in the context of every turn; seed: turn
        i (counting every turn) uses seed + i. Options as for a call (temperature, top_k, max_seconds, ...)."""
        from .conversation import Conversation

        return Conversation(self, voices=voices, seed=seed, **options)

    def converse(
        self, turns, voices: dict | None = None, seed: int | None = None, pause: float = 0.3, **options
    ):
        """Speak a dialogue: every turn without audio, in order, each in the context of the turns before it.

        turns: dicts {"speaker", "text", "audio" (optional: a turn already spoken, context only)} or
        `csm.dialogue.ScriptTurn`s. Returns a `DialogueAudio`: the spoken turns joined with `pause` seconds of
        silence (`.audio`), each turn's audio (`.turns`) and the manifest (`.manifest`: per turn speaker,
        text, start and end seconds in the mix, seed, frames)."""
        from .conversation import converse

        return converse(self, turns, voices=voices, seed=seed, pause=pause, **options)


def pipeline(
    task: str = "text-to-audio",
    model: str | os.PathLike | CsmForConditionalGeneration | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    processor: CsmProcessor | str | os.PathLike | None = None,
    quantize: str | None = None,
    **defaults,
) -> TextToAudioPipeline:
    """Build a text-to-speech pipeline from a checkpoint folder or hub repo id (e.g. "sesame/csm-1b").

    quantize: "int8", "int4", "bf16" or "fp16" loads the model with quantized weights
    (`CsmForConditionalGeneration.quantize`); with neither it nor dtype given, a CPU model keeps a bf16
    checkpoint's weights in 16 bits where csm's kernels run (`pick_quantize`).

    defaults: options every call uses unless it overrides them (speaker, voice, context, temperature, top_k,
    max_seconds, seed, ...).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; csm does {' or '.join(TASKS)}")
    if model is None:
        raise ValueError("pass model=, a checkpoint folder or hub repo id such as 'sesame/csm-1b'")
    dev = pick_device(device)
    if isinstance(model, CsmForConditionalGeneration):
        if processor is None:
            raise ValueError("a loaded model needs processor= too (a CsmProcessor or its folder)")
        if quantize is not None and quantize != getattr(model.quantization, "scheme", None):
            raise ValueError(
                f"quantize={quantize!r} is for loading; quantize a loaded model with model.quantize()"
            )
        loaded = model
    else:
        loaded = CsmForConditionalGeneration.from_pretrained(
            model, dtype=pick_dtype(dtype, dev), device=dev, quantize=pick_quantize(quantize, dtype)
        )
    if not isinstance(processor, CsmProcessor):
        processor = CsmProcessor.from_pretrained(processor if processor is not None else model)
    return TextToAudioPipeline(loaded, processor, **defaults)
