"""Sesame's original checkpoint format converts into the reference layout with the same outputs."""

import json

import pytest
import torch
from reference_models import write_reference_csm

from csm import CsmConfig, CsmForConditionalGeneration
from csm.checkpoint import CheckpointError
from csm.convert import config_from_original, convert_original_checkpoint

ORIGINAL_NAMES = {
    "embed_text_tokens.weight": "text_embeddings.weight",
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
    "lm_head.weight": "codebook0_head.weight",
    "depth_decoder.codebooks_head.weight": "audio_head",
    "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
    "backbone_model.norm.weight": "backbone.norm.scale",
    "depth_decoder.model.norm.weight": "decoder.norm.scale",
}
LAYER_PARTS = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.output_proj",
    "mlp.gate_proj": "mlp.w1",
    "mlp.down_proj": "mlp.w2",
    "mlp.up_proj": "mlp.w3",
}


def to_interleaved(weight, n_heads):
    """What torchtune stores: each head's rotate-half rows re-ordered into (re, im) pairs."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def sesame_state_dict(ref):
    """Write the reference model's weights the way Sesame's original checkpoint names them."""
    cfg = ref.config
    out = {}
    for name, t in ref.state_dict().items():
        if name.startswith("codec_model.") or name == "depth_decoder.model.embed_tokens.weight":
            continue
        if name in ORIGINAL_NAMES:
            out[ORIGINAL_NAMES[name]] = t.clone()
            continue
        prefix, stack_cfg = (
            ("backbone", cfg) if name.startswith("backbone_model") else ("decoder", cfg.depth_decoder_config)
        )
        layer = name.split(".layers.")[1]
        idx, rest = layer.split(".", 1)
        rest = rest.replace("input_layernorm.weight", "sa_norm.scale").replace(
            "post_attention_layernorm.weight", "mlp_norm.scale"
        )
        for ours, theirs in LAYER_PARTS.items():
            rest = rest.replace(ours, theirs)
        if rest.startswith(("attn.q_proj", "attn.k_proj")):
            heads = stack_cfg.num_attention_heads if "q_proj" in rest else stack_cfg.num_key_value_heads
            t = to_interleaved(t, heads)
        out[f"{prefix}.layers.{idx}.{rest}"] = t.clone()
    return out


def test_original_checkpoint_converts_with_same_logits(tmp_path):
    ref = write_reference_csm(tmp_path / "ref")
    ref.codec_model.save_pretrained(tmp_path / "mimi")
    src = tmp_path / "sesame"
    src.mkdir()
    torch.save(sesame_state_dict(ref), src / "ckpt.pt")
    config = CsmConfig.from_pretrained(tmp_path / "ref")
    convert_original_checkpoint(src / "ckpt.pt", tmp_path / "out", codec=tmp_path / "mimi", config=config)

    ours = CsmForConditionalGeneration.from_pretrained(tmp_path / "out")
    codes = torch.randint(0, 2051, (2, 7, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=codes).logits, ref(input_ids=codes).logits, atol=1e-4, rtol=1e-4
        )
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        convert_original_checkpoint(src / "ckpt.pt", tmp_path / "out", codec=tmp_path / "mimi", config=config)


def test_sesame_flavors_give_csm_1b_sizes():
    config = config_from_original(
        {
            "audio_num_codebooks": 32,
            "audio_vocab_size": 2051,
            "backbone_flavor": "llama-1B",
            "decoder_flavor": "llama-100M",
            "text_vocab_size": 128256,
        }
    )
    default = CsmConfig()
    assert (config.hidden_size, config.num_hidden_layers) == (default.hidden_size, default.num_hidden_layers)
    assert config.depth_decoder_config.hidden_size == 1024
    assert config.rope_parameters["rope_type"] == "llama3"
    with pytest.raises(CheckpointError, match="unknown flavor"):
        config_from_original({"backbone_flavor": "llama-70B"})
    json.dumps(config.to_dict())


def test_convert_command_writes_a_loadable_checkpoint(tmp_path):
    from csm.cli import main

    ref = write_reference_csm(tmp_path / "ref")
    ref.codec_model.save_pretrained(tmp_path / "mimi")
    (tmp_path / "sesame").mkdir()
    torch.save(sesame_state_dict(ref), tmp_path / "sesame" / "ckpt.pt")
    args = ["convert", str(tmp_path / "sesame" / "ckpt.pt"), str(tmp_path / "out")]
    assert main([*args, "--codec", str(tmp_path / "mimi"), "--config", str(tmp_path / "ref")]) == 0
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path / "out")
    codes = torch.randint(0, 2051, (1, 5, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=codes).logits, ref(input_ids=codes).logits, atol=1e-4, rtol=1e-4
        )
    assert main([*args, "--codec", str(tmp_path / "mimi")]) != 0  # refuses to overwrite
