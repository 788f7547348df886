"""Conversion from Sesame's original checkpoint (torchtune names, interleaved RoPE) to the reference layout."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_safetensors, read_json, resolve_checkpoint
from .config import CSM_1B_ROPE, CsmConfig, CsmDepthDecoderConfig

# Sesame's config.json names its transformers by flavor; these are the sizes behind the names.
FLAVORS = {
    "llama-1B": dict(
        num_hidden_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
    ),
    "llama-100M": dict(
        num_hidden_layers=4,
        hidden_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=8192,
    ),
}

RENAMES = [
    (r"^backbone\.layers\.(\d+)\.", r"backbone_model.layers.\1."),
    (r"^decoder\.layers\.(\d+)\.", r"depth_decoder.model.layers.\1."),
    (r"\.attn\.output_proj\.", ".self_attn.o_proj."),
    (r"\.attn\.", ".self_attn."),
    (r"\.mlp\.w1\.", ".mlp.gate_proj."),
    (r"\.mlp\.w2\.", ".mlp.down_proj."),
    (r"\.mlp\.w3\.", ".mlp.up_proj."),
    (r"\.sa_norm\.scale$", ".input_layernorm.weight"),
    (r"\.mlp_norm\.scale$", ".post_attention_layernorm.weight"),
    (r"^backbone\.norm\.scale$", "backbone_model.norm.weight"),
    (r"^decoder\.norm\.scale$", "depth_decoder.model.norm.weight"),
    (r"^text_embeddings\.weight$", "embed_text_tokens.weight"),
    (r"^audio_embeddings\.weight$", "backbone_model.embed_tokens.embed_audio_tokens.weight"),
    (r"^codebook0_head\.weight$", "lm_head.weight"),
    (r"^audio_head$", "depth_decoder.codebooks_head.weight"),
    (r"^projection\.weight$", "depth_decoder.model.inputs_embeds_projector.weight"),
]


def interleaved_to_half_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved RoPE pairs (torchtune) to rotate-half order."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def config_from_original(original: dict) -> CsmConfig:
    """Build a CsmConfig from Sesame's config.json (backbone_flavor, decoder_flavor, vocab sizes)."""
    try:
        backbone = FLAVORS[original.get("backbone_flavor", "llama-1B")]
        decoder = FLAVORS[original.get("decoder_flavor", "llama-100M")]
    except KeyError as e:
        raise CheckpointError(f"unknown flavor {e}; known: {', '.join(FLAVORS)}") from None
    rope = dict(CSM_1B_ROPE)
    k = original.get("audio_num_codebooks", 32)
    v = original.get("audio_vocab_size", 2051)
    return CsmConfig(
        **backbone,
        num_codebooks=k,
        vocab_size=v,
        text_vocab_size=original.get("text_vocab_size", 128256),
        rope_parameters=rope,
        depth_decoder_config=CsmDepthDecoderConfig(
            **decoder,
            num_codebooks=k,
            vocab_size=v,
            backbone_hidden_size=backbone["hidden_size"],
            rope_parameters=dict(rope),
        ),
    )


def convert_original_state_dict(
    original: dict[str, torch.Tensor], config: CsmConfig
) -> dict[str, torch.Tensor]:
    """Rename Sesame's tensors to the reference layout and permute q/k for rotate-half RoPE."""
    state = {}
    for name, tensor in original.items():
        new = name.removeprefix("_orig_mod.").removeprefix("model.")
        for pattern, repl in RENAMES:
            new = re.sub(pattern, repl, new)
        if new.endswith(("q_proj.weight", "k_proj.weight")):
            cfg = config if new.startswith("backbone_model") else config.depth_decoder_config
            heads = cfg.num_attention_heads if "q_proj" in new else cfg.num_key_value_heads
            tensor = interleaved_to_half_rope(tensor, heads)
        state[new] = tensor
    state["depth_decoder.model.embed_tokens.weight"] = state.get(
        "backbone_model.embed_tokens.embed_audio_tokens.weight"
    )
    return state


def load_original(path: Path) -> dict[str, torch.Tensor]:
    """Read Sesame's weights: a `.pt` file (weights only, never pickled code) or safetensors."""
    if path.is_dir():
        return load_safetensors(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def convert_original_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    codec: str | os.PathLike = "kyutai/mimi",
    config: CsmConfig | None = None,
) -> Path:
    """Convert Sesame's checkpoint at `src` (ckpt.pt, safetensors, or their hub folder) into `dst`.

    The original carries no codec: its Mimi weights come from `codec` (a Mimi checkpoint in the reference
    layout, such as kyutai/mimi). `dst` must not hold a checkpoint already.
    """
    from .mimi import MimiModel
    from .model import CsmForConditionalGeneration, build_on_meta

    dst = Path(dst)
    if (dst / "model.safetensors").exists():
        raise CheckpointError(f"{dst} already holds a checkpoint; choose an empty folder")
    src_path = Path(src)
    if not src_path.exists():
        src_path = resolve_checkpoint(str(src), allow_patterns=["config.json", "*.safetensors", "*.pt"])
    folder = src_path if src_path.is_dir() else src_path.parent
    if config is None:
        original_config = read_json(folder) if (folder / "config.json").is_file() else {}
        config = config_from_original(original_config)
    if src_path.is_dir():
        pts = sorted(src_path.glob("*.pt"))
        weights = src_path if not pts else pts[0]
    else:
        weights = src_path
    state = convert_original_state_dict(load_original(weights), config)
    codec_model = MimiModel.from_pretrained(codec)
    config.codec_config = codec_model.config
    state.update({f"codec_model.{k}": v for k, v in codec_model.state_dict().items()})
    model = build_on_meta(CsmForConditionalGeneration, config, state, src)
    model.generation_config = {"do_sample": True, "temperature": 0.9, "top_k": 50, "max_new_tokens": 125}
    model.save_pretrained(dst)
    return dst
