"""The core model against the reference (transformers) on the same random weights."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from reference_models import BOS, PAD, TEXT_VOCAB, write_reference_csm

from csm import CsmConfig, CsmForConditionalGeneration, cpu_kernels
from csm.checkpoint import CheckpointError
from csm.llama import (
    FusedLinear,
    Linear,
    Packable,
    native_bf16,
    one_query_attention,
    packable,
    unfuse_projections,
)


@pytest.fixture(scope="module")
def pair(csm_checkpoint):
    path, ref = csm_checkpoint
    return CsmForConditionalGeneration.from_pretrained(path), ref


def text_batch(lengths, T):
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(4, TEXT_VOCAB, (n,))
        ids[i, T - n] = BOS
        mask[i, T - n :] = 1
    return ids, mask


def test_text_logits_match_reference_with_left_padding(pair):
    ours, ref = pair
    ids, mask = text_batch([12, 7, 3], 12)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_audio_code_logits_match_reference(pair):
    ours, ref = pair
    codes = torch.randint(0, 2051, (2, 9, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=codes).logits, ref(input_ids=codes).logits, atol=1e-4, rtol=1e-4
        )


def code_labels(B, T, K):
    labels = torch.randint(0, 2051, (B, T, K))
    labels[0, :2] = -100  # a prompt the model does not learn
    labels[1, 3, 1:] = -100  # a frame only the backbone learns
    labels[1, T - 1, 1:] = -100
    return labels


def test_losses_and_gradients_match_reference(pair):
    ours, ref = pair
    ours.train(), ref.train()
    try:
        codes = torch.randint(0, 2051, (2, 8, 8))
        labels = code_labels(2, 8, 8)
        a, b = ours(input_ids=codes, labels=labels), ref(input_ids=codes, labels=labels)
        for name in ("loss", "backbone_loss", "depth_decoder_loss"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.depth_decoder_logits, b.depth_decoder_logits, atol=1e-4, rtol=1e-4)
        a.loss.backward()
        b.loss.backward()
        ref_params = dict(ref.named_parameters())
        checked = 0
        for name, p in ours.named_parameters():
            if name.startswith("codec_model."):  # no gradient reaches the codec
                assert p.grad is None
                continue
            if p.grad is None:
                assert ref_params[name].grad is None or not ref_params[name].grad.any(), name
                continue
            torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
            checked += 1
        assert checked > 30
    finally:
        ours.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
        ours.eval(), ref.eval()


def test_saved_checkpoint_loads_in_reference(pair, tmp_path):
    from transformers import CsmForConditionalGeneration as Reference

    ours, _ = pair
    ours.save_pretrained(tmp_path)
    theirs = Reference.from_pretrained(tmp_path).eval()
    codes = torch.randint(0, 2051, (1, 6, 8))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=codes).logits, ours(input_ids=codes).logits)


def test_bfloat16_load_matches_reference_in_bfloat16(csm_checkpoint):
    from transformers import CsmForConditionalGeneration as Reference

    path, _ = csm_checkpoint
    ours = CsmForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    theirs = Reference.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert ours.dtype == torch.bfloat16
    codes = torch.randint(0, 2051, (1, 6, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=codes).logits, theirs(input_ids=codes).logits, atol=2e-2, rtol=2e-2
        )


def test_config_round_trips_and_reads_rope_scaling(csm_checkpoint, tmp_path):
    path, _ = csm_checkpoint
    raw = json.loads((path / "config.json").read_text())
    config = CsmConfig.from_pretrained(path)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.depth_decoder_config.hidden_size == 48
    assert config.codec_config.num_quantizers == 8
    config.save_pretrained(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    for key, value in raw.items():
        if key not in ("depth_decoder_config", "codec_config"):
            assert again[key] == value, key
    assert CsmConfig.from_pretrained(tmp_path) == config

    old_style = dict(raw)
    old_style["rope_scaling"] = {k: v for k, v in raw["rope_parameters"].items() if k != "rope_theta"}
    old_style["rope_theta"] = 500000.0
    del old_style["rope_parameters"]
    assert CsmConfig.from_dict(old_style).rope_parameters == config.rope_parameters


def test_default_config_is_csm_1b():
    c = CsmConfig()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        16,
        2048,
        32,
        8,
    )
    assert (c.intermediate_size, c.text_vocab_size, c.num_codebooks, c.vocab_size) == (8192, 128256, 32, 2051)
    d = c.depth_decoder_config
    assert (d.num_hidden_layers, d.hidden_size, d.num_attention_heads, d.num_key_value_heads) == (
        4,
        1024,
        8,
        2,
    )
    assert (d.intermediate_size, d.max_position_embeddings) == (8192, 33)
    assert (c.codebook_pad_token_id, c.codebook_eos_token_id) == (2050, 0)


def test_32_codebook_model_matches_reference(tmp_path):
    ref = write_reference_csm(tmp_path, seed=3, num_codebooks=32)
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path)
    codes = torch.randint(0, 2051, (2, 5, 32))
    labels = code_labels(2, 5, 32)
    with torch.no_grad():
        a, b = ours(input_ids=codes, labels=labels), ref(input_ids=codes, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def test_tied_audio_embedding_is_shared(pair):
    ours, _ = pair
    assert (
        ours.depth_decoder.model.embed_tokens.weight
        is ours.backbone_model.embed_tokens.embed_audio_tokens.weight
    )


def test_sharded_checkpoint_loads(csm_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path, ref = csm_checkpoint
    state = load_file(path / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path)
    codes = torch.randint(0, 2051, (1, 4, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=codes).logits, ref(input_ids=codes).logits, atol=1e-4, rtol=1e-4
        )


def copy_checkpoint(src, dst, drop=None, reshape=None):
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = state[reshape][:-1].clone()
    save_file(state, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_tensor_is_named(csm_checkpoint, tmp_path):
    path, _ = csm_checkpoint
    copy_checkpoint(path, tmp_path, drop="lm_head.weight")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        CsmForConditionalGeneration.from_pretrained(tmp_path)


def test_wrong_shape_is_named(csm_checkpoint, tmp_path):
    path, _ = csm_checkpoint
    copy_checkpoint(path, tmp_path, reshape="embed_text_tokens.weight")
    with pytest.raises(CheckpointError, match=r"embed_text_tokens.weight has shape \(299, 64\)"):
        CsmForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_config_and_weights_are_named(csm_checkpoint, tmp_path):
    path, _ = csm_checkpoint
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.json is missing"):
        CsmForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CsmForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a hub repo id"):
        CsmForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


def test_labels_without_audio_are_a_clear_error(pair):
    ours, _ = pair
    ids, _ = text_batch([5], 5)
    with pytest.raises(ValueError, match="input_values"):
        ours(input_ids=ids, labels=ids)


def test_loss_with_audio_context_matches_reference(csm_checkpoint, tmp_path):
    """Labels from the processor (output_labels=True), audio encoded by each side's own codec."""
    from fixtures import write_reference_processor

    from csm import CsmProcessor

    path, ref = csm_checkpoint
    write_reference_processor(tmp_path)
    processor = CsmProcessor.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    clip = lambda n: (0.1 * torch.randn(n, generator=g)).numpy()  # noqa: E731
    conversation = [
        {
            "role": "0",
            "content": [{"type": "text", "text": "Hello there."}, {"type": "audio", "audio": clip(9000)}],
        },
        {
            "role": "1",
            "content": [{"type": "text", "text": "How are you?"}, {"type": "audio", "audio": clip(12000)}],
        },
    ]
    inputs = processor.apply_chat_template(
        [conversation, conversation[:1]],
        tokenize=True,
        return_dict=True,
        output_labels=True,
        depth_decoder_labels_ratio=0.5,
    )
    ours = CsmForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        a = ours(**inputs)
        b = ref(
            **{
                k: inputs[k]
                for k in ("input_ids", "attention_mask", "input_values", "input_values_cutoffs", "labels")
            }
        )
    for name in ("loss", "backbone_loss", "depth_decoder_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    real = inputs["attention_mask"].bool()  # padded positions hold garbage on both sides
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-4, rtol=1e-4)


def test_configs_we_cannot_run_are_refused():
    with pytest.raises(CheckpointError, match="hidden_act 'gelu' is not supported"):
        CsmConfig(hidden_act="gelu")
    with pytest.raises(CheckpointError, match="num_codebooks differs"):
        CsmConfig(num_codebooks=16)
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        CsmForConditionalGeneration(CsmConfig(num_hidden_layers=0, rope_parameters={"rope_type": "yarn"}))


needs_onednn = pytest.mark.skipif(not packable(torch.zeros(1)), reason="oneDNN is not available")


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, FusedLinear)]


def test_fused_projections_keep_the_checkpoint_layout_and_follow_their_layers(pair):
    ours = copy.deepcopy(pair[0])
    assert not [k for k in ours.state_dict() if ".qkv." in k or ".gate_up." in k]
    attn = ours.backbone_model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == (32, 64)
    assert attn.k_proj.weight.data_ptr() == attn.qkv.weight[64:].data_ptr()  # a view: no second copy
    separate = copy.deepcopy(ours)
    unfuse_projections(separate)
    assert all(m.weight is None for m in fused_layers(separate))
    ids, mask = text_batch([9, 5], 9)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    for model in (ours, separate):  # an optimizer step on one layer's weight reaches the fused product
        with torch.no_grad():
            model.backbone_model.layers[1].self_attn.k_proj.weight.mul_(1.5)
            model.depth_decoder.model.layers[0].mlp.up_proj.weight.add_(0.01)
    torch.testing.assert_close(logits(ours), logits(separate), rtol=1e-5, atol=1e-5)
    ours.to(torch.float64).to(torch.float32)  # a move fuses again
    assert (
        all(m.serves(m.parts, for_grad=False) for m in fused_layers(ours))
        and len(fused_layers(ours)) == 2 * 2 + 2 * 2 + 4
    )
    torch.testing.assert_close(logits(ours), logits(separate), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_fused_prepacked_product_follows_its_layers_weights(pair):
    ours = copy.deepcopy(pair[0])
    ours.prepack(min_numel=0)
    mlp = ours.backbone_model.layers[0].mlp
    x = torch.randn(2, 64)
    with torch.inference_mode():
        assert mlp.gate_up.packed.usable(mlp.gate_up.pack_source(), x)
    with torch.no_grad():
        mlp.up_proj.weight.mul_(2.0)  # its own version counter moves, not the buffer's
    with torch.inference_mode():
        assert not mlp.gate_up.packed.usable(mlp.gate_up.pack_source(), x)
        expected = mlp.down_proj(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight))
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_and_quantized_layers_run_on_their_own_and_merging_fuses_again(pair):
    from csm.train.lora import LoraConfig, apply_lora, merge_lora

    ours = copy.deepcopy(pair[0])
    ids, mask = text_batch([9, 5], 9)
    apply_lora(ours, LoraConfig(rank=2, target_modules=["k_proj", "up_proj"]))
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.normal_(0, 0.5)
        adapted = ours(input_ids=ids, attention_mask=mask).logits
        base = pair[0](input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(adapted, base, atol=1e-3)  # the adapters ran: the fused product stood aside
        merge_lora(ours)
        assert all(m.serves(m.parts, for_grad=False) for m in fused_layers(ours))
        torch.testing.assert_close(
            ours(input_ids=ids, attention_mask=mask).logits, adapted, rtol=1e-4, atol=1e-4
        )
    quantized = copy.deepcopy(pair[0]).quantize("int8")
    transformer = [*quantized.backbone_model.modules(), *quantized.depth_decoder.modules()]
    # the full-precision weights of quantized layers are not kept alive by a fused buffer
    assert all(m.weight is None for m in transformer if isinstance(m, FusedLinear))


@needs_onednn
def test_prepacked_linear_follows_its_weight():
    lin, x = Linear(256, 96), torch.randn(3, 256)
    lin.pack()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.mul_(2)  # in place: the pack is stale and must not be served
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
        lin.pack()
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.data = torch.randn(96, 256)  # replaced
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
    lin.pack()
    lin(x).sum().backward()  # with autograd on the weight itself is used, so it gets its gradient
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(96, -1))
    copied = copy.deepcopy(lin)  # oneDNN tensors cannot be copied: the copy comes without the pack
    assert lin.packed is not None and copied.packed is None


@needs_onednn
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(not native_bf16(), reason="this CPU has no oneDNN bf16"),
        ),
    ],
)
@cpu_kernels.disabled()  # where they run, bf16 weights stream through csm's kernels and are not packed
def test_prepacked_model_gives_the_same_logits(pair, dtype):
    ours = copy.deepcopy(pair[0]).to(dtype)
    ids, mask = text_batch([5, 9], 9)
    with torch.inference_mode():
        plain = ours(input_ids=ids, attention_mask=mask)
        ours.prepack(min_numel=0)
        fused = {id(p) for m in ours.modules() if isinstance(m, FusedLinear) for p in m.parts}
        packables = [m for m in ours.modules() if isinstance(m, Packable) and id(m) not in fused]
        unpacked = [m for m in packables if m.packed is None]
        got = ours(input_ids=ids, attention_mask=mask)
    # every layer's 4 matrices (q/k/v fused, o, gate/up fused, down), lm_head, the projector, the codebook
    # heads, the codec's transformers; a fused layer is packed once, as a whole
    assert len(fused) == 2 * 5 + 2 * 5 + 4 * 3  # backbone, depth decoder, the codec's encoder and decoder
    assert len(packables) > 2 * 4 + 2 * 4 + 3 and not unpacked
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], plain.logits[real], **tol)
    ours.unpack()
    assert not any(getattr(m, "packed", None) is not None for m in ours.modules())


def test_one_query_attention_matches_sdpa_with_groups_and_padding():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., :5] = False  # a left-padded row
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = one_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(one_query_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


# Loads a bf16 checkpoint of ~230 MB as fp32 (~460 MB) in a process of its own, after a tiny one (so that lazy
# imports and allocator pools are not counted): prints the model's bytes and how far RSS peaked above its
# level before the load.
PEAK_DURING_LOAD = """
import sys, torch
from csm import CsmForConditionalGeneration

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

CsmForConditionalGeneration.from_pretrained(sys.argv[2], dtype=torch.float32)  # imports, pools: warmed
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the RSS now
before = status("VmRSS")
model = CsmForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32)
tensors = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
print(sum(t.untyped_storage().nbytes() for t in tensors.values()), status("VmHWM") - before)
"""


def test_loading_converts_and_fuses_without_a_second_copy_of_the_weights(tmp_path):
    """Peak RSS of an fp32 load of a bf16 checkpoint stays near the loaded model's size: each tensor is
    converted as it is read (not the whole file, mapped, beside the whole converted model), and q/k/v and
    gate/up are fused after the loader let go of its tensors (a move, not a copy)."""
    import subprocess
    import sys

    from reference_models import tiny_csm_config

    from csm.config import CsmConfig

    torch.manual_seed(0)
    config = tiny_csm_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                             num_attention_heads=16, num_key_value_heads=4, head_dim=64)  # fmt: skip
    config["depth_decoder_config"].update(backbone_hidden_size=1024, hidden_size=1024, intermediate_size=2048,
                                          num_attention_heads=16, num_key_value_heads=4, head_dim=64)  # fmt: skip
    CsmForConditionalGeneration(CsmConfig(**config)).to(torch.bfloat16).save_pretrained(tmp_path / "large")
    CsmForConditionalGeneration(CsmConfig(**tiny_csm_config())).to(torch.bfloat16).save_pretrained(
        tmp_path / "tiny"
    )
    done = subprocess.run(
        [sys.executable, "-c", PEAK_DURING_LOAD, str(tmp_path / "large"), str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    model, growth = map(int, done.stdout.split())
    assert model > 250e6
    # 1.28x here (freed bf16 buffers of a few MB stay in malloc's heap), 1.08x at csm-1b's size, 2.16x before
    assert growth < 1.5 * model, (growth / 1e6, model / 1e6)
