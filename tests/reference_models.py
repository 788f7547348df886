"""Tiny CSM checkpoints written by the reference (transformers), for parity tests.

Every parity test builds its reference model here, saves it to a temp dir, and loads it with ours.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    high_freq_factor=4.0,
    low_freq_factor=1.0,
    original_max_position_embeddings=8192,
)

TEXT_VOCAB = 300
BOS, PAD, AUDIO, AUDIO_EOS = 1, 2, 2, 3


def tiny_codec_config(num_quantizers: int = 8) -> dict:
    """A small Mimi with the real frame geometry (24 kHz, 1920 samples per frame)."""
    return dict(
        hidden_size=32,
        num_filters=8,
        num_residual_layers=1,
        upsampling_ratios=[8, 6, 5, 4],
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        codebook_size=2048,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=num_quantizers,
        num_semantic_quantizers=1,
        sliding_window=250,
    )


def tiny_csm_config(num_codebooks: int = 8, **overrides) -> dict:
    """Keyword arguments for transformers.CsmConfig: a two-layer backbone and depth decoder."""
    cfg = dict(
        num_codebooks=num_codebooks,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        text_vocab_size=TEXT_VOCAB,
        bos_token_id=BOS,
        pad_token_id=PAD,
        audio_token_id=AUDIO,
        audio_eos_token_id=AUDIO_EOS,
        rope_parameters=dict(LLAMA3_ROPE),
        depth_decoder_config=dict(
            num_codebooks=num_codebooks,
            backbone_hidden_size=64,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=dict(LLAMA3_ROPE),
        ),
        codec_config=tiny_codec_config(num_codebooks),
    )
    cfg.update(overrides)
    return cfg


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")


def reference_csm(seed: int = 0, num_codebooks: int = 8, decodable_heads: bool = True, **overrides):
    """A random-weight reference CsmForConditionalGeneration in eval mode.

    With `decodable_heads=False` the heads keep random scores for the ids past the codec's entries too, as a
    user's randomly initialised or badly trained model would: sampling can then reach them."""
    from transformers import CsmConfig, CsmForConditionalGeneration

    quiet_transformers()
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(CsmConfig(**tiny_csm_config(num_codebooks, **overrides))).eval()
    if not decodable_heads:
        return model
    # Like a trained model, never pick the ids past the codec's 2048 entries: zero logits never win
    # against 2048 random ones, so the reference's greedy codes stay decodable for parity tests.
    with torch.no_grad():
        model.lm_head.weight[2048:] = 0
        model.depth_decoder.codebooks_head.weight[..., 2048:] = 0
    return model


def write_reference_csm(
    path: Path, seed: int = 0, num_codebooks: int = 8, decodable_heads: bool = True, **overrides
):
    """Save a random reference CSM checkpoint to `path` and return the reference model."""
    model = reference_csm(seed, num_codebooks, decodable_heads, **overrides)
    model.save_pretrained(path)
    return model
