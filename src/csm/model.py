"""CSM: a backbone over text and audio frames, a depth decoder for the codebooks of a frame, and the codec."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    load_into,
    load_safetensors,
    loading_device,
    loading_dtype,
    read_json,
    resolve_checkpoint,
    save_safetensors,
    stored_float_dtype,
    tensor_names,
)
from .config import CsmConfig, CsmDepthDecoderConfig, check_layers
from .generate import (
    GENERATION_DEFAULTS,
    CsmGenerateOutput,
    GenerationSettings,
    generate,
    generate_stream,
)
from .llama import (
    Linear,
    Packable,
    Transformer,
    fuse_projections,
    fusing_deferred,
    linear_16,
    packed_linear,
    padding_causal_mask,
    prepack,
    sixteen_bit_kernel,
    unpack,
)
from .mimi import MimiModel
from .mimi.derived import derived
from .output import ModelOutput
from .prefix_cache import content_of
from .quant import (
    QuantConfig,
    auto_scheme,
    check_supported,
    choose_modules,
    quant_config,
    quantize_modules,
    quantizing_transform,
)

GENERATION_CONFIG_NAME = "generation_config.json"
# Tied in the reference: the backbone's audio embedding is the depth decoder's input embedding.
TIED_AUDIO_EMBEDDING = (
    "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "depth_decoder.model.embed_tokens.weight",
)


@dataclass
class BackboneOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # (B, T, D)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each layer's output
    attentions: tuple[torch.Tensor, ...] | None = None  # each layer's weights (B, H, T, T)


@dataclass
class DepthDecoderOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (N, T, V)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CsmOutput(ModelOutput):
    """The reference's CsmOutputWithPast, less the caches this forward does not keep."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V) codebook-0 logits
    hidden_states: tuple[torch.Tensor, ...] | None = None  # backbone, with output_hidden_states=True
    attentions: tuple[torch.Tensor, ...] | None = None  # backbone (B, H, T, T), with output_attentions=True
    depth_decoder_loss: torch.Tensor | None = None
    depth_decoder_logits: torch.Tensor | None = (
        None  # (N, K-1, V) for the N frames the depth decoder trained on
    )
    depth_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    depth_decoder_attentions: tuple[torch.Tensor, ...] | None = None
    backbone_loss: torch.Tensor | None = None


def as_tuple(values: list | None) -> tuple | None:
    return tuple(values) if values is not None else None


def rope_positions(rotary, position_ids: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """position_ids, or 0..T-1 for h (B, T, D); RoPE's tables grown to cover them (past the config's limit)."""
    if position_ids is None:
        positions = torch.arange(h.shape[1], device=h.device)
        rotary.cover(h.shape[1])
    else:
        positions = position_ids.to(h.device)
        if positions.numel():
            rotary.cover(int(positions.max()) + 1)
    return positions


def packed_causal_mask(positions: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """As the reference reads position_ids without an attention mask: a step other than +1 starts another
    sequence packed into the same row, and each sequence attends only within itself. None if none is."""
    positions = positions.reshape(-1, positions.shape[-1]).expand(batch_size, -1)
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    sequence = (step != 1).cumsum(-1)  # (B, T)
    if not bool(sequence[:, -1].any()):
        return None
    T = positions.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return (causal & (sequence[:, :, None] == sequence[:, None, :]))[:, None]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Mean cross entropy in fp32 ignoring -100; with `shift`, position t predicts label t+1."""
    if shift:
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


class CsmBackboneModelEmbeddings(nn.Module):
    """One table for all codebooks; a frame's embedding is the sum of its K code embeddings."""

    def __init__(self, config: CsmConfig):
        super().__init__()
        self.num_codebooks, self.vocab_size = config.num_codebooks, config.vocab_size
        self.embed_audio_tokens = nn.Embedding(config.num_codebooks * config.vocab_size, config.hidden_size)
        self.register_buffer(
            "audio_tokens_offsets", torch.empty(config.num_codebooks, dtype=torch.long), persistent=False
        )
        self.compute_buffers(self.audio_tokens_offsets.device)

    def compute_buffers(self, device) -> None:
        self.audio_tokens_offsets = torch.arange(self.num_codebooks, device=device) * self.vocab_size

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, K) -> (B, T, D)."""
        return self.embed_audio_tokens(codes + self.audio_tokens_offsets).sum(dim=2)


class CsmBackboneModel(Transformer):
    """The Llama-3.2-1B-shaped backbone over a sequence of text tokens and audio frames."""

    def __init__(self, config: CsmConfig):
        super().__init__(config)
        self.config = config
        self.embed_tokens = CsmBackboneModelEmbeddings(config)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        position_ids=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BackboneOutput:
        """input_ids: audio codes (B, T, K); or pass inputs_embeds (B, T, D). Positions count from 0 unless
        position_ids (T,) or (B, T) say otherwise; any position is computed, also past the config's limit.
        output_attentions runs attention eagerly, to return its weights."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (audio codes, B x T x K) or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        positions = rope_positions(self.rotary_emb, position_ids, h)
        mask = padding_causal_mask(attention_mask, h.shape[1], h.device)
        if attention_mask is None and position_ids is not None:
            mask = packed_causal_mask(positions, h.shape[0])
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        h = self.run_layers(h, positions, mask, hidden_states=hidden_states, attentions=attentions)
        return BackboneOutput(h, as_tuple(hidden_states), as_tuple(attentions))


class CsmDepthDecoderModel(Transformer):
    """The depth decoder's transformer: position 0 is the backbone state, position i >= 1 is codebook i-1."""

    def __init__(self, config: CsmDepthDecoderConfig):
        super().__init__(config)
        self.config = config
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(
            config.num_codebooks * config.vocab_size, config.backbone_hidden_size
        )
        self.inputs_embeds_projector = Linear(config.backbone_hidden_size, config.hidden_size, bias=False)

    def embed(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embed codes (N, T) sitting at depth positions (T,): codebook index is position - 1."""
        return self.embed_tokens(codes + (positions - 1).clamp(min=0) * self.vocab_size)

    def forward(
        self,
        input_ids=None,
        backbone_last_hidden_state=None,
        inputs_embeds=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BackboneOutput:
        """input_ids (N, T) from position 0; backbone_last_hidden_state (N, D_backbone) replaces position 0."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            inputs_embeds = self.embed(input_ids, positions)
            if backbone_last_hidden_state is not None:
                inputs_embeds = torch.cat(
                    [backbone_last_hidden_state[:, None].to(inputs_embeds.dtype), inputs_embeds[:, 1:]], 1
                )
        h = self.inputs_embeds_projector(inputs_embeds)
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        positions = rope_positions(self.rotary_emb, None, h)
        h = self.run_layers(h, positions, hidden_states=hidden_states, attentions=attentions)
        return BackboneOutput(h, as_tuple(hidden_states), as_tuple(attentions))


class CsmCodebooksHead(Packable, nn.Module):
    """One linear head per codebook 1..K-1, stored as a (K-1, D, V) tensor."""

    def __init__(self, hidden_size: int, num_codebooks: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_codebooks - 1, hidden_size, vocab_size))

    def forward(self, h: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """h (N, T, D), codebooks (T,) in 1..K-1 -> logits (N, T, V)."""
        return torch.einsum("ntd,tdv->ntv", h, self.weight[codebooks - 1])

    def logits(self, h: torch.Tensor, codebook: int) -> torch.Tensor:
        """Logits (N, V) of one codebook (1..K-1) from h (N, D): the generation step's head."""
        if self.packed is not None and self.packed.usable(self.weight, h):
            return packed_linear(h, self.packed.tensors[codebook - 1])
        w = self.weight
        if sixteen_bit_kernel(w[0].t(), h):  # csm's kernels read (V, D) rows: a transposed copy, made once
            heads = derived(self, "rows", [w], lambda: self.matrices_to_pack(w.detach()))
            return linear_16(h, heads[codebook - 1], None)
        return h @ w[codebook - 1]

    def matrices_to_pack(self, weight: torch.Tensor) -> list[torch.Tensor]:
        return [head.t().contiguous() for head in weight]  # (V, D) per codebook


class CsmDepthDecoderForCausalLM(nn.Module):
    def __init__(self, config: CsmDepthDecoderConfig):
        super().__init__()
        self.config = config
        self.model = CsmDepthDecoderModel(config)
        self.codebooks_head = CsmCodebooksHead(config.hidden_size, config.num_codebooks, config.vocab_size)

    def forward(
        self,
        input_ids,
        backbone_last_hidden_state=None,
        labels=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> DepthDecoderOutput:
        """input_ids (N, T): [anything, c0, c1, ...]; logits for codebooks 1..T-1 from positions 1..T-1.

        labels (N, T) are codes c0..c_{T-1}; codebook i >= 1 is scored, -100 ignored.
        """
        out = self.model(
            input_ids,
            backbone_last_hidden_state,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        h = out.last_hidden_state
        codebooks = torch.arange(1, h.shape[1], device=h.device)
        logits = self.codebooks_head(h[:, 1:], codebooks)
        loss = causal_lm_loss(logits, labels[:, 1:], shift=False) if labels is not None else None
        return DepthDecoderOutput(loss, logits, out.hidden_states, out.attentions)


class CsmForConditionalGeneration(nn.Module):
    """Text and audio context in, codebook logits (and losses) out; `generate` lives in csm.generate."""

    def __init__(self, config: CsmConfig):
        super().__init__()
        self.config = config
        self.embed_text_tokens = nn.Embedding(config.text_vocab_size, config.hidden_size)
        self.backbone_model = CsmBackboneModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.depth_decoder = CsmDepthDecoderForCausalLM(config.depth_decoder_config)
        self.codec_model = MimiModel(config.codec_config)
        self.generation_config = GenerationSettings()
        self.tie_weights()

    @property
    def generation_config(self) -> GenerationSettings:
        """generation_config.json's settings, as keys or attributes; generate's defaults come from here."""
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: dict | None) -> None:
        if value is not None and not isinstance(value, dict):
            value = value.to_dict()  # the reference's GenerationConfig
        self._generation_config = GenerationSettings(value or {})

    @classmethod
    def can_generate(cls) -> bool:
        """True: this model has `generate` (as transformers' PreTrainedModel.can_generate reports)."""
        return True

    def tie_weights(self) -> None:
        if self.config.tie_codebooks_embeddings:
            self.depth_decoder.model.embed_tokens.weight = (
                self.backbone_model.embed_tokens.embed_audio_tokens.weight
            )

    @property
    def device(self) -> torch.device:
        return self.embed_text_tokens.weight.device  # never quantized (lm_head is under int8 and int4)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_text_tokens.weight.dtype

    # ---- inputs -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_audio_context(self, input_values: torch.Tensor, input_values_cutoffs: torch.Tensor):
        """Encode every clip of every row in one codec call.

        input_values (B, 1, S) holds each row's clips end to end; input_values_cutoffs (B, N) their end
        offsets, padded with -1. Returns codes (C, F, K) for the C clips in row-major order, padded to the
        longest, and a mask (C, F) of real frames.
        """
        clips = []
        for row, cutoffs in zip(input_values, input_values_cutoffs.tolist()):
            start = 0
            for end in cutoffs:
                if end < 0:
                    break
                if end > start:
                    clips.append(row[0, start:end])
                start = end
        lengths = [len(c) for c in clips]
        batch = torch.zeros(len(clips), 1, max(lengths), dtype=input_values.dtype, device=input_values.device)
        padding_mask = torch.zeros(len(clips), max(lengths), dtype=torch.long, device=input_values.device)
        for i, clip in enumerate(clips):
            batch[i, 0, : len(clip)] = clip
            padding_mask[i, : len(clip)] = 1
        codes = self.codec_model.encode(batch.to(self.codec_dtype), padding_mask).audio_codes
        codes = codes.transpose(1, 2)  # (C, F, K)
        frames = torch.tensor([self.codec_model.encoded_length(n) for n in lengths], device=codes.device)
        mask = torch.arange(codes.shape[1], device=codes.device)[None] < frames[:, None]
        return codes, mask

    @property
    def codec_dtype(self) -> torch.dtype:
        return next(self.codec_model.parameters()).dtype

    def embed_prompt(self, input_ids, input_values=None, input_values_cutoffs=None, audio_codes=None):
        """A prompt for generation: its embeds (B, T, D) and its content (B, T, 1 + K), what each position
        holds, which keys the prefix store (csm.prefix_cache). Clips given as input_values are encoded here."""
        if input_ids.dim() == 3:  # a prompt of codes
            return self.backbone_model.embed_tokens(input_ids), content_of(self.config, input_ids, None)
        if audio_codes is None and input_values is not None:
            if input_values_cutoffs is None:
                raise ValueError(
                    "input_values needs input_values_cutoffs (each clip's end offset per row, -1 padded)"
                )
            codes, frame_mask = self.encode_audio_context(input_values, input_values_cutoffs)
            audio_codes = [codes[frame_mask]]  # (total frames, K), in sequence order
        embeds, _ = self.embed_inputs(input_ids, audio_codes=audio_codes)
        frames = torch.cat(list(audio_codes)) if audio_codes else None
        return embeds, content_of(self.config, input_ids, frames)

    def embed_inputs(
        self, input_ids, input_values=None, input_values_cutoffs=None, labels=None, audio_codes=None
    ):
        """Embed text ids (B, T), placing encoded audio frames at audio tokens and the end-of-audio frame
        at audio-eos tokens. Returns (inputs_embeds, labels expanded to (B, T, K) when given).

        `audio_codes`, a list of per-clip codes (F_i, K) in row-major clip order, stands in for
        input_values when the audio was encoded beforehand (fine-tuning caches codes).
        """
        cfg = self.config
        h = self.embed_text_tokens(input_ids)
        if audio_codes is not None:
            frames = torch.cat(list(audio_codes)).to(input_ids.device)
        elif input_values is not None:
            if input_values_cutoffs is None:
                raise ValueError(
                    "input_values needs input_values_cutoffs (each clip's end offset per row, -1 padded)"
                )
            codes, frame_mask = self.encode_audio_context(input_values, input_values_cutoffs)
            frames = codes[frame_mask]  # (total frames, K), in sequence order
        else:
            if labels is not None:
                raise ValueError(
                    "labels need the audio they score: pass input_values and input_values_cutoffs too"
                )
            return h, None
        audio = input_ids == cfg.audio_token_id
        audio_eos = input_ids == cfg.audio_eos_token_id
        if int(audio.sum()) != len(frames):
            raise ValueError(
                f"the text has {int(audio.sum())} audio tokens but the audio encodes to {len(frames)} frames; "
                "build inputs with CsmProcessor so the counts agree"
            )
        eos_frame = torch.full((1, 1, cfg.num_codebooks), cfg.codebook_eos_token_id, device=h.device)
        embed = self.backbone_model.embed_tokens
        h = h.clone()
        h[audio] = embed(frames[None])[0].to(h.dtype)
        h[audio_eos] = embed(eos_frame)[0, 0].to(h.dtype)
        if labels is not None:
            expanded = labels[..., None].repeat(1, 1, cfg.num_codebooks)
            expanded[audio] = frames
            expanded[audio_eos] = eos_frame[0, 0]
            # -101: a frame the backbone learns but the depth decoder skips (compute amortization).
            expanded[..., 1:][labels == -101] = -100
            labels = expanded
        return h, labels

    # ---- forward ------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_values_cutoffs: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        audio_codes: list[torch.Tensor] | None = None,
        output_attentions: bool | None = None,
    ) -> CsmOutput | tuple:
        """Codebook-0 logits for every position, and the reference's losses when `labels` are given.

        input_ids are text ids (B, T) (audio merged in from input_values) or audio codes (B, T, K).
        labels: (B, T) with -100 ignored and -101 for backbone-only frames, or (B, T, K) codes.
        position_ids: RoPE positions (B, T) or (T,), by default 0..T-1 (padding included, as the reference).
        output_hidden_states: also return the backbone's (and the depth decoder's) hidden states.
        output_attentions: also return each layer's attention weights (B, H, T, T), computed eagerly as
        the reference's attn_implementation="eager" computes them.
        return_dict=False returns `CsmOutput.to_tuple()`. use_cache is accepted and has no effect: this
        forward keeps no cache (generate has its own), so past_key_values must be None.
        audio_codes: pre-encoded clips instead of input_values (see `embed_inputs`).
        """
        if past_key_values is not None:
            raise ValueError(
                "past_key_values is not supported: forward runs the whole sequence; use generate for decoding"
            )
        if input_ids is not None and input_ids.dim() == 2:
            inputs_embeds, labels = self.embed_inputs(
                input_ids, input_values, input_values_cutoffs, labels, audio_codes
            )
            input_ids = None
        backbone = self.backbone_model(
            input_ids,
            attention_mask,
            inputs_embeds,
            position_ids=position_ids,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
        )
        hidden = backbone.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        out = CsmOutput(logits=logits, hidden_states=backbone.hidden_states, attentions=backbone.attentions)
        if labels is not None:
            out.backbone_loss = causal_lm_loss(logits, labels[..., 0])
            train = ~(labels[..., 1:] == -100).all(dim=-1)  # (B, T) frames the depth decoder learns
            rows, cols = train.nonzero(as_tuple=True)
            if len(rows) == 0:
                out.depth_decoder_loss = logits.new_zeros(())
            else:
                target = labels[rows, cols]  # (N, K)
                codes_in = F.pad(target[:, :-1], (1, 0), value=0)
                depth = self.depth_decoder(
                    codes_in,
                    hidden[rows, cols - 1],
                    labels=target,
                    output_hidden_states=bool(output_hidden_states),
                    output_attentions=bool(output_attentions),
                )
                out.depth_decoder_loss, out.depth_decoder_logits = depth.loss, depth.logits
                out.depth_decoder_hidden_states = depth.hidden_states
                out.depth_decoder_attentions = depth.attentions
            out.loss = out.backbone_loss + out.depth_decoder_loss
        return out.returned(return_dict)

    # ---- generation ---------------------------------------------------------------------------------

    def generate(
        self,
        *args,
        num_beams: int | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs,
    ):
        """Generate frames (or audio with output_audio=True); see `csm.generate.generate`.

        Also takes the reference's common arguments: `num_beams` (1: CSM draws one frame at a time, as the
        reference does; beam search is refused), `use_cache` (the frame loop always keeps its KV cache; the
        codes are the same either way), and, with `return_dict_in_generate=True`, `output_attentions` and
        `output_hidden_states`: per generated frame, the backbone's attention weights (eager) and hidden
        states as the reference returns them (the prompt's for the first frame, then one position per
        frame), computed by running the finished sequence once more through the backbone.
        """
        if num_beams is not None and num_beams != 1:
            raise ValueError(
                f"num_beams={num_beams}: beam search is not supported: CSM "
                "draws one frame at a time: use num_beams=1, or num_return_sequences with sampling"
            )
        if use_cache is not None and not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be True or False, got {use_cache!r}")
        introspect = kwargs.get("return_dict_in_generate") and (output_attentions or output_hidden_states)
        out = generate(self, *args, **kwargs)
        if introspect:
            steps = self.generation_steps(out.sequences, *args, **kwargs)
            out.hidden_states = steps.hidden_states if output_hidden_states else None
            out.attentions = steps.attentions if output_attentions else None
        return out

    @torch.inference_mode()
    def generation_steps(
        self,
        sequences: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        input_values_cutoffs: torch.Tensor | None = None,
        **kwargs,
    ) -> CsmGenerateOutput:
        """The backbone's hidden states and attention weights at each of generate's steps, as the reference's
        generate reports them: step 0 covers the prompt (B, T, ...), step i >= 1 the frame fed back (B, 1, ...)
        attending to the T + i positions so far. One forward over prompt and frames, split by step."""
        from .generate import prepare

        keep = {k: kwargs[k] for k in ("audio_codes", "num_return_sequences") if k in kwargs}
        embeds, mask, _, code_prompt, _ = prepare(
            self, input_ids, attention_mask, input_values, input_values_cutoffs, 1, keep
        )
        B, T, _ = embeds.shape
        frames = sequences[:, (T if code_prompt is not None else 0) :]  # (B, F, K) generated
        F_ = frames.shape[1]
        fed = self.backbone_model.embed_tokens(frames[:, :-1].to(self.device)).to(embeds.dtype)
        h = torch.cat([embeds, fed], 1)  # (B, T + F - 1, D)
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.long, device=h.device)
        # The frame loop's positions (csm.engine, as the reference's): real prompt tokens count from 0,
        # padding sits at 0, and each frame fed back comes one after the prompt's last position.
        prompt = torch.where(mask.bool(), mask.long().cumsum(-1) - 1, 0)
        positions = torch.cat([prompt, prompt[:, -1:] + torch.arange(1, F_, device=h.device)], 1)
        mask = torch.cat([mask, mask.new_ones(B, F_ - 1)], 1)
        out = self.backbone_model(
            inputs_embeds=h,
            attention_mask=mask,
            position_ids=positions,
            output_hidden_states=True,
            output_attentions=True,
        )
        spans = [slice(0, T)] + [slice(T + i - 1, T + i) for i in range(1, F_)]
        return CsmGenerateOutput(
            sequences=sequences,
            hidden_states=tuple(tuple(x[:, s] for x in out.hidden_states) for s in spans),
            attentions=tuple(tuple(a[:, :, s, : s.stop] for a in out.attentions) for s in spans),
        )

    def generate_stream(self, *args, **kwargs):
        """Yield audio chunks as they are generated; see `csm.generate.generate_stream`."""
        return generate_stream(self, *args, **kwargs)

    # Generation on CPU keeps oneDNN-prepacked copies of the large bf16 weights of the backbone, the depth
    # decoder and the codec's transformers where oneDNN runs bf16 and csm's kernels do not (faster
    # matrix-vector products, at the cost of those weights' memory once more); fp32 weights are read as
    # they are (csm.llama, above `packable`). Set this to False, or call `unpack()`, to give the memory back.
    prepack_weights: bool = True

    def prepack(self, min_numel: int | None = None, fp32: bool = True) -> None:
        """Prepack the weights the frame loop reads (CPU, bf16, and fp32 with `fp32`; elsewhere a no-op)."""
        for part in (self.backbone_model, self.lm_head, self.depth_decoder, self.codec_model):
            prepack(part, min_numel, fp32)

    def unpack(self) -> None:
        """Free the prepacked copies (they are made again by the next CPU generate)."""
        unpack(self)

    # ---- checkpoints --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device=None,
        quantize: str | None = None,
        group_size: int | None = None,
        *,
        device_map=None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> CsmForConditionalGeneration:
        """Load a checkpoint in the reference's layout (local folder or hub repo id).

        device_map: as the reference's model card uses it ("cuda", "cpu", "auto" for the best device here,
        a GPU index, or a dict sending every module to one device); or pass `device`.
        dtype (or its older name torch_dtype): torch.bfloat16, "bfloat16", "auto" or None keep the stored one.
        quantize: "int8", "int4" (with `group_size`, default 32), "bf16" or "fp16" quantizes the weights as
        they are read, never holding the full-precision model; a checkpoint saved quantized loads as it was
        saved. "auto" (what csm's pipeline, CLI and server pass when no dtype is asked for): a float32 CPU
        model of a bf16 or fp16 checkpoint keeps those weights in 16 bits, where csm's kernels run
        (`csm.quant.auto_scheme`).
        """
        started = time.perf_counter()
        device = loading_device(device, device_map)
        dtype = loading_dtype(dtype, torch_dtype)
        resolved = resolve_dtype(dtype)  # a bad name fails before the download
        folder = resolve_checkpoint(
            path_or_repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        )
        raw = read_json(folder, CONFIG_NAME)
        stored = raw.pop("quantization", None)
        config = CsmConfig.from_dict(raw)  # its sizes bounded (config._check_bounds)
        check_layers(config, tensor_names(folder))  # headers checked; before anything is built or read
        if quantize == "auto":
            quantize = auto_scheme(stored, stored_float_dtype(folder), device or "cpu", resolved)
        quant = quant_config(cls, config, stored, quantize, group_size, folder / CONFIG_NAME)
        transform = converting_transform(resolved)  # one tensor at a time: no second copy at the peak
        if quant is not None:
            check_supported(quant.scheme, torch.device(device or "cpu"), resolved)
            if stored is None:
                transform = quantizing_transform(quant, resolved)
        state = load_safetensors(folder, device or "cpu", transform)
        for a, b in (TIED_AUDIO_EMBEDDING, TIED_AUDIO_EMBEDDING[::-1]):
            if a not in state and b in state and config.tie_codebooks_embeddings:
                state[a] = state[b]
        model = build_on_meta(cls, config, state, folder, dtype, device, quant)
        if quant is not None:
            check_supported(quant.scheme, model.device, model.dtype)
        gen = folder / GENERATION_CONFIG_NAME
        if gen.is_file():
            model.generation_config = json.loads(gen.read_text())
        model.load_seconds = time.perf_counter() - started  # for the start-up log (csm.engine.StartTimings)
        return model

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json, generation_config.json and model.safetensors that the reference loads (a
        quantized model's only csm loads; config.json's `quantization` entry records its scheme)."""
        folder = Path(folder)
        self.config.save_pretrained(folder)
        config = read_json(folder, CONFIG_NAME)
        config.pop("quantization", None)
        if self.quantization is not None:
            config["quantization"] = self.quantization.to_dict()
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_safetensors(self.state_dict(), folder)
        # Every setting generate uses, so the reference loading this folder samples the same way.
        settings = {
            "bos_token_id": self.config.bos_token_id,
            "pad_token_id": self.config.pad_token_id,
            **GENERATION_DEFAULTS,
            **self.generation_config,
        }
        (folder / GENERATION_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")

    # ---- quantization -------------------------------------------------------------------------------

    quantization: QuantConfig | None = None

    def quantize(self, scheme: str, group_size: int | None = None) -> CsmForConditionalGeneration:
        """Quantize in place the transformer weights read per frame: "int8" (per output channel), "int4"
        (groups of `group_size` inputs, default 32), or "bf16"/"fp16" (16-bit weights under a float32
        model, CPU). Inference only; see csm/quant.py for what is kept."""
        if self.quantization is not None:
            raise ValueError(
                f"the model is already quantized ({self.quantization.scheme}); load it again to change"
            )
        config = QuantConfig(scheme, group_size)
        check_supported(scheme, self.device, self.dtype)
        config.modules = choose_modules(self, config)
        self.__dict__.pop(
            "_kept_engine", None
        )  # its compiled step or graphs traced the modules replaced here
        quantize_modules(self, config)
        fuse_projections(self)  # the quantized layers run on their own: their fused weights go
        self.quantization = config
        return self


def converting_transform(dtype: torch.dtype | None):
    """A load_safetensors transform giving each floating tensor in `dtype` (None: as stored) as it is read."""

    def transform(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return {name: tensor}

    return transform


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes, their names ("bfloat16", "float16", "float32", or "bf16", "fp16", "fp32") and
    "auto"/None (keep stored)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(name, name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use bfloat16, float16, float32 or auto")
    return value


def build_on_meta(cls, config, state: dict, source, dtype=None, device=None, quant=None) -> nn.Module:
    """Build `cls(config)` without allocating, adopt the loaded tensors, fill computed buffers. With `quant`,
    its modules are quantized ones and their tensors keep the dtypes the quantized format fixes. `state` is
    consumed (emptied), so that no tensor outlives its use at the load's peak."""
    dtype = resolve_dtype(dtype)
    quantized = tuple(m + "." for m in quant.modules) if quant is not None else ()
    for k, v in state.items():  # in place: each replaced tensor is freed as the next one is made
        if dtype is not None and v.is_floating_point() and not k.startswith(quantized):
            v = state[k] = v.to(dtype)
        # safetensors hands out views of its file buffer at any byte offset; CPU GEMMs on weights that are
        # not 64-byte aligned run ~8% slower, so such a tensor gets an allocation of its own.
        if v.device.type == "cpu" and v.data_ptr() % 64:
            state[k] = v.clone()
    with torch.device("meta"):
        model = cls(config)
    if quant is not None:
        quantize_modules(model, quant)
        model.quantization = quant
    with fusing_deferred():
        load_into(model, state, str(source))
    state.clear()  # the model holds the only reference to each tensor now,
    fuse_projections(model)  # so fusing moves the projections' weights rather than copying them
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    device = torch.device(device or "cpu")
    for module in model.modules():
        if hasattr(module, "compute_buffers"):
            module.compute_buffers(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no value for {', '.join(left[:5])}")
    return model.eval()
