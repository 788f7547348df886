"""The user-facing frame loop: validate and embed the prompt, prefill, generate frames, stream, decode.

The engine (csm.engine) runs the frames; end-of-audio is checked on the host only every `sync_every` frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch

from ._warnings import warn_at_caller
from .engine import FrameEngine, Sampling, use_compile, use_cuda_graph
from .frames import FrameRule
from .output import ModelOutput

# What generate uses for a setting that generation_config.json leaves out: csm-1b's values.
GENERATION_DEFAULTS = {
    "max_new_tokens": 125,
    **{k: getattr(Sampling(), k) for k in ("do_sample", "temperature", "top_k", "top_p")},
    **{"depth_decoder_" + k: getattr(Sampling(), k) for k in ("do_sample", "temperature", "top_k", "top_p")},
}


class GenerationSettings(dict):
    """`model.generation_config`: generation_config.json's entries, read and written as keys or as
    attributes (`model.generation_config.max_new_tokens = 250`), as the reference's GenerationConfig is.
    A sampling setting the file leaves out reads as the value generate uses (GENERATION_DEFAULTS)."""

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        if name in GENERATION_DEFAULTS:
            return GENERATION_DEFAULTS[name]
        raise AttributeError(f"generation_config has no {name!r}")

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        self.pop(name, None)

    def to_dict(self) -> dict:
        return dict(self)

    def to_diff_dict(self) -> dict:
        return dict(self)


@dataclass
class CsmGenerateOutput(ModelOutput):
    """generate(..., return_dict_in_generate=True): the reference's CsmGenerateOutput, less the caches it
    does not keep."""

    sequences: torch.Tensor | None = None  # (B, frames, K); a code prompt's frames come first
    scores: tuple[torch.Tensor, ...] | None = None  # per frame, codebook 0's processed scores (B, V)
    logits: tuple[torch.Tensor, ...] | None = None  # per frame, codebook 0's raw logits (B, V)
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None  # per frame, per layer (model.generate)
    hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None  # per frame, per layer (model.generate)
    audio: list[torch.Tensor] | None = None  # with output_audio=True


@dataclass
class GenerationConfig:
    """Generation settings; defaults are csm-1b's `generation_config.json`."""

    max_new_tokens: int = 125
    backbone: Sampling = field(default_factory=Sampling)
    depth_decoder: Sampling = field(default_factory=Sampling)

    @classmethod
    def from_model(cls, model, generation_config=None, **overrides) -> GenerationConfig:
        """The checkpoint's generation_config.json, then `generation_config` (a dict of the reference's
        names), then overrides by name (`temperature`, `top_k`, `do_sample`, `top_p`,
        `depth_decoder_temperature`, ..., `max_new_tokens`)."""
        if generation_config is not None and not isinstance(generation_config, dict):
            to_dict = getattr(generation_config, "to_dict", None)
            if to_dict is None:
                raise TypeError(
                    f"generation_config must be a dict of settings, got {type(generation_config).__name__}"
                )
            generation_config = to_dict()
        values = {
            **(getattr(model, "generation_config", None) or {}),
            **(generation_config or {}),
            **{k: v for k, v in overrides.items() if v is not None},
        }
        names = {f.name for f in fields(Sampling)}
        backbone = {k: values[k] for k in names if k in values}
        depth = {k: values["depth_decoder_" + k] for k in names if "depth_decoder_" + k in values}
        config = cls(
            max_new_tokens=int(values.get("max_new_tokens") or cls.max_new_tokens),
            backbone=replace(Sampling(), **backbone),
            depth_decoder=replace(Sampling(), **depth),
        )
        config.backbone.validate("")
        config.depth_decoder.validate("depth_decoder_")
        if config.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
        return config


# ---- the user-facing loop ---------------------------------------------------------------------------


def frames_for(model, max_new_tokens: int | None, max_seconds: float | None) -> int | None:
    if max_seconds is None:
        return max_new_tokens
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    return math.ceil(max_seconds * model.codec_model.frame_rate)


def prepare(model, input_ids, attention_mask, input_values, input_values_cutoffs, max_new_tokens, kwargs):
    """Validate and embed the prompt; returns (embeds, attention_mask, GenerationConfig, code prompt, content:
    what each position holds, for the prefix store).

    kwargs may carry `audio_codes` (per-clip codes encoded beforehand, e.g. a saved voice) in place of
    input_values, `generation_config` (a dict of settings), `num_return_sequences` (each row repeated
    that many times, as the reference does) and `min_new_tokens`; the rest are sampling settings.
    The code prompt is input_ids (B, T, K) when the prompt is audio codes (generate returns it first).
    """
    audio_codes = kwargs.pop("audio_codes", None)
    copies = kwargs.pop("num_return_sequences", None) or 1
    min_new_tokens = kwargs.pop("min_new_tokens", None)
    if input_ids is None:
        raise ValueError("generate needs input_ids (from CsmProcessor)")
    input_ids = input_ids.to(model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    config = GenerationConfig.from_model(model, max_new_tokens=max_new_tokens, **kwargs)
    if not isinstance(copies, int) or copies < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {copies!r}")
    if copies > 1 and not config.backbone.do_sample:
        raise ValueError(
            f"num_return_sequences={copies} needs sampling (do_sample=True): greedy decoding gives the same "
            "frames every time"
        )
    # The reference's CSM has no eos_token_id, so its min_new_tokens never holds back the end of audio;
    # it is checked and, as there, changes nothing.
    if min_new_tokens is not None and (not isinstance(min_new_tokens, int) or min_new_tokens < 0):
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    T = input_ids.shape[1]
    limit = model.config.max_position_embeddings
    if T + config.max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {T} tokens and max_new_tokens is {config.max_new_tokens}: {T + config.max_new_tokens} "
            f"positions, more than the model's {limit}. Shorten the context or ask for fewer frames."
        )
    code_prompt = input_ids if input_ids.dim() == 3 else None
    with torch.inference_mode():
        if input_values is not None:
            input_values = input_values.to(model.device)
            if input_values_cutoffs is not None:
                input_values_cutoffs = input_values_cutoffs.to(model.device)
        embeds, content = model.embed_prompt(input_ids, input_values, input_values_cutoffs, audio_codes)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    if copies > 1:
        embeds = embeds.repeat_interleave(copies, 0)
        content = content.repeat_interleave(copies, 0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(copies, 0)
        code_prompt = None if code_prompt is None else code_prompt.repeat_interleave(copies, 0)
    return embeds, attention_mask, config, code_prompt, content


SAMPLING_KWARGS = {
    "audio_codes",
    "generation_config",
    "num_return_sequences",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "depth_decoder_do_sample",
    "depth_decoder_temperature",
    "depth_decoder_top_k",
    "depth_decoder_top_p",
}


def check_kwargs(kwargs: dict) -> None:
    unknown = set(kwargs) - SAMPLING_KWARGS
    if unknown:
        raise TypeError(f"generate got unknown arguments: {', '.join(sorted(unknown))}")


def start(
    model,
    input_ids,
    attention_mask,
    input_values,
    input_values_cutoffs,
    max_new_tokens,
    max_seconds,
    seed,
    compile,
    cuda_graph,
    kwargs,
):
    """Validate, embed and prefill: returns a ready engine, the settings, the seeded generator and the
    code prompt (input_ids when they are audio codes, else None)."""
    check_kwargs(kwargs)
    max_new_tokens = frames_for(model, max_new_tokens, max_seconds)
    embeds, attention_mask, config, code_prompt, content = prepare(
        model, input_ids, attention_mask, input_values, input_values_cutoffs, max_new_tokens, kwargs
    )
    B, T, _ = embeds.shape
    engine = engine_for(model, B, T + config.max_new_tokens, compile, cuda_graph)
    engine.backbone_sampling.set(slice(None), config.backbone)
    engine.depth_sampling.set(slice(None), config.depth_decoder)
    engine.prefill(embeds, attention_mask, content=content)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    return engine, config, generator, code_prompt


def engine_for(
    model, batch_size: int, max_seq_len: int, compile: bool | None, cuda_graph: bool | None = None
) -> FrameEngine:
    """A fresh engine; a compiled or graphed one is sized to the whole context and kept on the model, so
    later calls with the same batch size reuse its compiled step or captured graphs."""
    compile = use_compile(compile)
    graphed = use_cuda_graph(model.device, cuda_graph)
    if not (compile or graphed):
        return FrameEngine(model, batch_size, max_seq_len)
    size = model.config.max_position_embeddings
    engine = getattr(model, "_kept_engine", None)
    if engine is None or (engine.batch_size, engine.max_seq_len, engine.graphed, engine.compiled) != (
        batch_size,
        size,
        graphed,
        compile,
    ):
        engine = model._kept_engine = FrameEngine(
            model, batch_size, size, compile=compile, cuda_graph=graphed
        )
    return engine


def keep_generated(engine: FrameEngine, codes: torch.Tensor) -> None:
    """Hand each row's turn (codes (B, F, K), up to its end) to the prefix store, so that a next prompt with
    this turn as context does not prefill it again."""
    for row, n in enumerate(engine.rule.lengths(codes)):
        engine.keep_generated(row, codes[row, :n])


def finish(engine: FrameEngine) -> None:
    """Free an engine's caches unless the model keeps it for its compiled step or graphs."""
    if engine is not getattr(engine.model, "_kept_engine", None):
        engine.release()


def iterate_frames(
    engine: FrameEngine, max_frames: int, generator, sync_every: int, logits: list | None = None
) -> Iterator[torch.Tensor]:
    """Yield blocks of frames (B, n, K); stops once every row has finished (checked every block).
    A list passed as `logits` receives each frame's codebook-0 logits (B, V) before it is drawn."""
    done = 0
    head = engine.model.lm_head
    while done < max_frames:
        n = min(sync_every, max_frames - done)
        frames = []
        for _ in range(n):
            if logits is not None:
                logits.append(head(engine.hidden).float())
            frames.append(engine.next_frame(generator))
        block = torch.stack(frames, 1)
        done += n
        yield block
        if bool(engine.finished.all()):
            return


def processed_scores(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Codebook-0 scores (B, V) as the reference reports them with output_scores: the logits when greedy;
    when sampling, divided by the temperature, then -inf outside the top-k and outside the top-p mass."""
    if not s.do_sample:
        return logits
    scores = logits / s.temperature
    if 0 < s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        ascending, order = scores.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False  # the most likely id always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def trim_to_reference(codes: torch.Tensor, rule: FrameRule) -> torch.Tensor:
    """Cut codes (B, F, K) after the frame where the last row ended, as the reference's loop stops there."""
    ended = rule.is_end_of_audio(codes)  # (B, F)
    if not bool(ended.any(-1).all()):
        return codes
    last = int(ended.float().argmax(-1).max())
    return codes[:, : last + 1]


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    input_values: torch.Tensor | None = None,
    input_values_cutoffs: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    output_audio: bool = False,
    seed: int | None = None,
    max_seconds: float | None = None,
    compile: bool | None = None,
    cuda_graph: bool | None = None,
    sync_every: int = 8,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    output_logits: bool = False,
    **kwargs,
):
    """Generate audio frames for the last turn of each row, the reference's way.

    Returns codes (B, frames, K), finished rows padded with the codebook pad id (a prompt of audio codes
    (B, T, K) comes first: (B, T + frames, K)); with `output_audio=True`, a list of 1-D waveforms cut at
    the end-of-audio frame. With `return_dict_in_generate=True`, a CsmGenerateOutput: `sequences` (the
    codes), `scores` / `logits` (codebook 0's, per frame, with output_scores / output_logits) and `audio`.
    Sampling arguments follow the reference: do_sample, temperature, top_k, top_p and the same with a
    `depth_decoder_` prefix, generation_config, num_return_sequences, min_new_tokens; defaults come from the
    checkpoint's generation_config.json.
    `cuda_graph`: replay the frame step as CUDA graphs (None: on CUDA unless CSM_CUDA_GRAPH=0);
    `compile`: torch.compile the frame step (None: only with CSM_COMPILE=1); see csm.engine.
    """
    engine, config, generator, code_prompt = start(
        model,
        input_ids,
        attention_mask,
        input_values,
        input_values_cutoffs,
        max_new_tokens,
        max_seconds,
        seed,
        compile,
        cuda_graph,
        kwargs,
    )
    keep_logits = return_dict_in_generate and (output_scores or output_logits)
    logits = [] if keep_logits else None
    try:
        blocks = list(iterate_frames(engine, config.max_new_tokens, generator, sync_every, logits))
        keep_generated(engine, torch.cat(blocks, 1))
    finally:
        finish(engine)
    rule = engine.rule
    codes = trim_to_reference(torch.cat(blocks, 1), rule)
    if not bool(rule.is_end_of_audio(codes).any(-1).all()):
        warn_at_caller(
            f"generation reached max_new_tokens={config.max_new_tokens} frames without end-of-audio in some rows; "
            "their audio may be cut short (raise max_new_tokens or max_seconds)"
        )
    if logits is not None:
        logits = tuple(logits[: codes.shape[1]])  # one per frame kept
    if code_prompt is not None:
        codes = torch.cat([code_prompt.to(codes.dtype), codes], 1)
    audio = decode_rows(model, codes) if output_audio else None
    if not return_dict_in_generate:
        return audio if output_audio else codes
    return CsmGenerateOutput(
        sequences=codes,
        scores=tuple(processed_scores(x, config.backbone) for x in logits) if output_scores else None,
        logits=logits if output_logits else None,
        audio=audio,
    )


def decode_rows(model, codes: torch.Tensor) -> list[torch.Tensor]:
    """Decode each row's frames up to its end-of-audio frame, in one batched codec call."""
    lengths = FrameRule.of(model).lengths(codes)
    longest = max(lengths)
    if longest == 0:
        return [codes.new_zeros(0, dtype=torch.float32) for _ in lengths]
    frames = codes[:, :longest].clone()
    for row, n in enumerate(lengths):
        frames[row, n:] = 0  # audio past a row's end is cut below; the decoder is causal
    audio = model.codec_model.decode(frames.transpose(1, 2)).audio_values[:, 0]  # (B, samples)
    per_frame = audio.shape[-1] // longest
    return [audio[row, : n * per_frame] for row, n in enumerate(lengths)]


@torch.inference_mode()
def generate_stream(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    input_values: torch.Tensor | None = None,
    input_values_cutoffs: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    chunk_frames: int = 4,
    seed: int | None = None,
    max_seconds: float | None = None,
    compile: bool | None = None,
    cuda_graph: bool | None = None,
    with_codes: bool = False,
    **kwargs,
) -> Iterator[list[torch.Tensor]]:
    """Yield audio as it is generated: every `chunk_frames` frames, a list with each row's new samples.

    Chunks are decoded with the streaming codec decoder; concatenated they equal
    `generate(output_audio=True)` with the same seed. A row that has ended yields empty chunks.
    With `with_codes`, yields (audio, codes) pairs, codes being each row's new frames (n, K).
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    engine, config, generator, _ = start(
        model,
        input_ids,
        attention_mask,
        input_values,
        input_values_cutoffs,
        max_new_tokens,
        max_seconds,
        seed,
        compile,
        cuda_graph,
        kwargs,
    )
    B = engine.batch_size
    ended = torch.zeros(B, dtype=torch.bool)
    decoder = model.codec_model.streaming_decoder(B)
    reached_eos = False
    made = []  # every block, for the prefix store once every row has ended
    try:
        for block in iterate_frames(engine, config.max_new_tokens, generator, chunk_frames):
            made.append(block.cpu())
            block = block.clone()
            keep = []
            ends = engine.rule.ends(block)
            for row in range(B):
                row_end = ends[row]
                n = block.shape[1]
                if ended[row]:
                    n = 0
                elif bool(row_end.any()):
                    n = int(row_end.float().argmax())
                    ended[row] = True
                block[row, n:] = 0
                keep.append(n)
            audio = decoder.step(block.transpose(1, 2))[:, 0]
            per_frame = audio.shape[-1] // block.shape[1]
            rows = [audio[row, : keep[row] * per_frame] for row in range(B)]
            yield (rows, [block[row, : keep[row]] for row in range(B)]) if with_codes else rows
            if bool(ended.all()):
                reached_eos = True
                return
    finally:
        if made:  # a listener that stopped early keeps what was made as context: so does the store
            keep_generated(engine, torch.cat(made, 1))
        finish(engine)
    if not reached_eos:
        warn_at_caller(
            f"generation reached max_new_tokens={config.max_new_tokens} frames without end-of-audio in some rows"
        )
