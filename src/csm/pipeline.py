"""High-level text-to-speech: `csm.pipeline("text-to-audio", model=...)`, voices, long text.

Long text is split into sentences; each is generated with the sentences before it (their text and the audio
just generated for them) as context, oldest dropped first when the model's context would overflow, and the
pieces are joined with a short crossfade.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLING_RATE
from .frames import FrameRule
from .generate import GenerationConfig, decode_rows
from .model import CsmForConditionalGeneration, resolve_dtype
from .processor import CsmProcessor
from .voice import Voice

TASKS = ("text-to-audio", "text-to-speech")
CROSSFADE_MS = 10.0
MAX_CHUNK_CHARS = 200  # about 10-15 s of speech: what one CSM call says well
MIN_CHUNK_CHARS = 24  # shorter sentences ("Hi.") ride along with the next one
MAX_TEXT_CHARS = 100_000

_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—])\s+")


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


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cut an over-long sentence at clause marks, then between words, into pieces of at most max_chars."""
    pieces: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
        words, current = clause.split(), ""
        for word in words:
            if current and len(current) + 1 + len(word) > max_chars:
                pieces.append(current)
                current = word
            else:
                current = f"{current} {word}" if current else word
        if current:
            pieces.append(current)
    out: list[str] = []  # glue clauses back while they fit
    for piece in pieces:
        if out and len(out[-1]) + 1 + len(piece) <= max_chars:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def split_sentences(
    text: str, max_chars: int = MAX_CHUNK_CHARS, min_chars: int = MIN_CHUNK_CHARS
) -> list[str]:
    """Split text into sentence-sized chunks of at most `max_chars` (long sentences cut at commas, then words);
    a sentence shorter than `min_chars` joins the next one."""
    text = " ".join(text.split())
    if not text:
        return []
    chunks: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if sentence:
            chunks.extend(_split_long(sentence, max_chars) if len(sentence) > max_chars else [sentence])
    merged: list[str] = []
    for chunk in chunks:
        if merged and len(merged[-1]) < min_chars and len(merged[-1]) + 1 + len(chunk) <= max_chars:
            merged[-1] = f"{merged[-1]} {chunk}"
        else:
            merged.append(chunk)
    return merged


def crossfade_join(
    pieces: Sequence[np.ndarray], sampling_rate: int = SAMPLING_RATE, ms: float = CROSSFADE_MS
) -> np.ndarray:
    """Concatenate waveforms, overlapping each join by `ms` with a linear fade so no click is heard."""
    pieces = [np.asarray(p, dtype=np.float32) for p in pieces if len(p)]
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    out = pieces[0]
    for piece in pieces[1:]:
        n = min(int(sampling_rate * ms / 1000), len(out), len(piece))
        if n == 0:
            out = np.concatenate([out, piece])
            continue
        fade = np.linspace(0.0, 1.0, n, dtype=np.float32)
        mixed = out[-n:] * (1 - fade) + piece[:n] * fade
        out = np.concatenate([out[:-n], mixed, piece[n:]])
    return out


class CrossfadeStream:
    """`crossfade_join` for audio that arrives in pieces: call `start_sentence(last)` before each sentence,
    `push` each piece and emit what it returns, and emit `finish()` at the end. Until the last sentence, the
    latest `ms` of audio is held back to fade into the next one."""

    def __init__(self, sampling_rate: int = SAMPLING_RATE, ms: float = CROSSFADE_MS):
        self.sampling_rate, self.ms = sampling_rate, ms
        self.fade = int(sampling_rate * ms / 1000)
        self.held = np.zeros(0, dtype=np.float32)
        self.fading_in = self.last = False

    def start_sentence(self, last: bool = False) -> None:
        self.fading_in, self.last = True, last

    def push(self, piece: np.ndarray) -> np.ndarray:
        piece = np.asarray(piece, dtype=np.float32)
        if not len(piece):
            return piece
        if self.fading_in and len(self.held):
            piece, self.held = crossfade_join([self.held, piece], self.sampling_rate, self.ms), self.held[:0]
        self.fading_in = False
        joined = np.concatenate([self.held, piece])
        cut = len(joined) if self.last else max(len(joined) - self.fade, 0)
        self.held = joined[cut:]
        return joined[:cut]

    def finish(self) -> np.ndarray:
        held, self.held = self.held, self.held[:0]
        return held


@dataclass
class Turn:
    """One context turn: who spoke, what they said, the audio, and its codes (F, K) for this model."""

    speaker: int
    text: str
    audio: np.ndarray
    codes: torch.Tensor

    def as_message(self) -> dict:
        return {
            "role": str(self.speaker),
            "content": [{"type": "text", "text": self.text}, {"type": "audio", "audio": self.audio}],
        }


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

    def _context_turns(self, opts: dict) -> tuple[int, list[Turn]]:
        """The speaker and the fixed context turns (a voice's clips, then given clips), with their codes."""
        voice = opts.get("voice")
        if isinstance(voice, (str, os.PathLike)):
            key = str(voice)
            if key not in self._voice_cache:
                self._voice_cache[key] = Voice.named(key)
            voice = self._voice_cache[key]
        speaker = opts.get("speaker")
        if speaker is None:
            speaker = voice.speaker if voice is not None else 0
        if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
            raise ValueError(f"speaker must be a non-negative integer, got {speaker!r}")
        turns: list[Turn] = []
        if voice is not None:
            turns += [
                Turn(voice.speaker, t, a, c)
                for (a, t), c in zip(voice.clips, voice.codes(self.model), strict=True)
            ]
        context = opts.get("context")
        if context:
            if isinstance(context, Voice):
                clips, ctx_speaker = context.clips, context.speaker
                ctx = context
            else:
                clips, ctx_speaker = [(a, t) for a, t in context], speaker
                ctx = Voice("context", ctx_speaker, clips)
            turns += [
                Turn(ctx.speaker, t, a, c) for (a, t), c in zip(ctx.clips, ctx.codes(self.model), strict=True)
            ]
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

    def _sampling(self, opts: dict) -> dict:
        return {k: opts[k] for k in ("temperature", "top_k", "top_p", "do_sample") if opts.get(k) is not None}

    # ---- one model call ---------------------------------------------------------------------------

    def _inputs(
        self,
        texts: list[str],
        speaker: int,
        fixed: list[Turn],
        carried: list[Turn],
        frames: int,
        fixed_frames: bool,
    ):
        """Model inputs for `texts` (one row each) after the context; drops the oldest carried turns to fit."""
        limit = self.model.config.max_position_embeddings
        carried = list(carried)
        while True:
            context = fixed + carried
            conv = [t.as_message() for t in context]
            batch = [conv + [{"role": str(speaker), "content": [{"type": "text", "text": x}]}] for x in texts]
            try:
                inputs = self.processor.apply_chat_template(batch, tokenize=True, return_dict=True)
                length = inputs["input_ids"].shape[1]
                overflow = None if length + (1 if not fixed_frames else frames) <= limit else length
            except ValueError as e:
                if "context" not in str(e):
                    raise
                overflow, length = str(e), limit
            if overflow is None:
                break
            if carried:
                carried.pop(0)
                continue
            raise ValueError(
                f"the text and its context take {length} tokens and {frames} frames are asked for: more than the "
                f"model's context of {limit}. Shorten the text or the voice clips, or lower max_seconds."
            )
        if not fixed_frames:
            frames = min(frames, limit - length)
        codes = [t.codes for t in context] * len(texts)
        return inputs, codes or None, frames, carried

    def _generate(
        self, texts: list[str], speaker: int, fixed: list[Turn], carried: list[Turn], opts: dict, seed
    ):
        """Generate each text as one chunk: returns ([(audio, codes)] per row, carried turns actually used)."""
        frames, fixed_frames = self._frames(opts, max(texts, key=len))
        inputs, codes, frames, carried = self._inputs(texts, speaker, fixed, carried, frames, fixed_frames)
        out = self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            audio_codes=codes,
            max_new_tokens=frames,
            seed=seed,
            **self._sampling(opts),
        )  # (B, F, K)
        lengths = FrameRule.of(self.model).lengths(out)
        waves = decode_rows(self.model, out)
        rows = [
            (w.float().cpu().numpy(), out[b, :n].clone())
            for b, (w, n) in enumerate(zip(waves, lengths, strict=True))
        ]
        return rows, carried

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
        with torch.inference_mode():
            if all(len(c) == 1 for c in chunked):
                rows, _ = self._generate([c[0] for c in chunked], speaker, fixed, [], opts, opts.get("seed"))
                results = [self._result(w) for w, _ in rows]
            else:
                results = [self._result(self._long(c, speaker, fixed, opts)) for c in chunked]
        return results if isinstance(text, (list, tuple)) else results[0]

    def _result(self, audio: np.ndarray) -> dict:
        return {"audio": np.ascontiguousarray(audio, dtype=np.float32), "sampling_rate": self.sampling_rate}

    def _long(self, chunks: list[str], speaker: int, fixed: list[Turn], opts: dict) -> np.ndarray:
        pieces = [piece for piece in self._iter_chunks(chunks, speaker, fixed, opts)]
        return crossfade_join(pieces, self.sampling_rate, float(opts.get("crossfade_ms", CROSSFADE_MS)))

    def _iter_chunks(
        self, chunks: list[str], speaker: int, fixed: list[Turn], opts: dict
    ) -> Iterator[np.ndarray]:
        """Generate chunk after chunk, carrying what was generated as context; yields each chunk's audio."""
        carried: list[Turn] = []
        seed = opts.get("seed")
        for i, chunk in enumerate(_progress(chunks, opts.get("progress"))):
            rows, carried = self._generate(
                [chunk], speaker, fixed, carried, opts, None if seed is None else seed + i
            )
            audio, codes = rows[0]
            if len(codes):
                carried.append(Turn(speaker, chunk, audio, codes))
            yield audio

    def stream(self, text: str, chunk_frames: int = 4, **options) -> Iterator[np.ndarray]:
        """Yield float32 audio as it is generated, sentence after sentence (joins crossfaded as in `__call__`)."""
        opts = self._options(options)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        speaker, fixed = self._context_turns(opts)
        chunks = split_sentences(text, int(opts.get("max_chunk_chars") or MAX_CHUNK_CHARS))
        joiner = CrossfadeStream(self.sampling_rate, float(opts.get("crossfade_ms", CROSSFADE_MS)))
        carried: list[Turn] = []
        seed = opts.get("seed")
        with torch.inference_mode():
            for i, chunk in enumerate(_progress(chunks, opts.get("progress"))):
                frames, fixed_frames = self._frames(opts, chunk)
                inputs, codes, frames, carried = self._inputs(
                    [chunk], speaker, fixed, carried, frames, fixed_frames
                )
                parts, new_codes = [], []
                joiner.start_sentence(last=i == len(chunks) - 1)
                for audio, frame_codes in self.model.generate_stream(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    audio_codes=codes,
                    max_new_tokens=frames,
                    chunk_frames=chunk_frames,
                    seed=None if seed is None else seed + i,
                    with_codes=True,
                    **self._sampling(opts),
                ):
                    piece = audio[0].float().cpu().numpy()
                    if not len(piece):
                        continue
                    parts.append(piece)
                    new_codes.append(frame_codes[0])
                    out = joiner.push(piece)
                    if len(out):
                        yield out
                if parts:  # carried as `__call__` carries it: the audio and the codes it came from
                    carried.append(Turn(speaker, chunk, np.concatenate(parts), torch.cat(new_codes)))
        tail = joiner.finish()
        if len(tail):
            yield tail


def _progress(items: list, progress: bool | Callable | None):
    if callable(progress):
        return progress(items)
    if progress and len(items) > 1:
        from tqdm.auto import tqdm

        return tqdm(items, desc="sentences", unit="sentence", leave=False)
    return items


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

    quantize: "int8" or "int4" loads the model with quantized weights (`CsmForConditionalGeneration.quantize`).

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
            model, dtype=pick_dtype(dtype, dev), device=dev, quantize=quantize
        )
    if not isinstance(processor, CsmProcessor):
        processor = CsmProcessor.from_pretrained(processor if processor is not None else model)
    return TextToAudioPipeline(loaded, processor, **defaults)
