"""Quantized weights (int8, int4): each layer against its dequantized weight, generation end to end, save and
load, memory, and the errors users meet."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fixtures import write_reference_processor
from reference_models import write_reference_csm

import csm
from csm import CsmForConditionalGeneration
from csm.batching import BatchCore, RowJob
from csm.checkpoint import CheckpointError
from csm.gemm import THRESHOLD_WITHOUT_KERNELS
from csm.generate import GenerationConfig, decode_rows
from csm.quant import (
    Int4Linear,
    Int8Linear,
    Linear16,
    QuantConfig,
    QuantizedHeads,
    check_supported,
    dequantize,
    make_linear,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

GREEDY = dict(do_sample=False, depth_decoder_do_sample=False)
SCHEMES = ["int8", "int4"]
# The depth decoder at width 64, so that int4's groups of 32 fit its every layer.
DEPTH = dict(
    num_codebooks=8,
    backbone_hidden_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "fp32"
    write_reference_csm(path, seed=3, depth_decoder_config=DEPTH)
    write_reference_processor(path)
    return path


def prompt(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 300, (batch, length), generator=g)


def linear(n, k, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=False)
    nn.init.normal_(layer.weight, std=0.02)
    return layer.eval()


# ---- one layer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme,group_size", [("int8", None), ("int4", 32), ("int4", 128), ("bf16", None), ("fp16", None)]
)
@pytest.mark.parametrize("rows", [1, 3, 8, THRESHOLD_WITHOUT_KERNELS])  # decoding, and prefill (a GEMM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_equals_the_product_with_its_dequantized_weight(scheme, group_size, rows, dtype):
    config = QuantConfig(scheme, group_size)
    layer = linear(256, 512)
    q = make_linear(layer, config)
    x = torch.randn(rows, 512, dtype=dtype)
    w = dequantize(q.state_dict()) if scheme == "int8" else q.dequantized()
    expected = x.float() @ w.t()
    got = q(x)
    assert got.dtype == dtype and got.shape == (rows, 256)
    # bf16 activations (what the kernels read) and a bf16 result: ~2^-8 relative
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    weight_error = (w - layer.weight).norm() / layer.weight.norm()
    assert weight_error < (0.12 if scheme == "int4" else 0.01)  # Gaussian weights: ~0.08 at 32, ~0.1 at 128


def test_quantized_linear_takes_three_dimensional_input_and_a_bias():
    layer = nn.Linear(64, 32, bias=True).eval()
    for scheme in SCHEMES:
        q = make_linear(layer, QuantConfig(scheme))
        w = dequantize(q.state_dict()) if scheme == "int8" else q.dequantized()
        x = torch.randn(2, 5, 64)
        torch.testing.assert_close(q(x), F.linear(x, w, layer.bias), rtol=0, atol=0.02)


def test_int4_file_layout_is_the_portable_one_and_survives_the_kernels_packing():
    w = linear(128, 64).weight
    portable = quantize_int4(w, 32)
    q = Int4Linear(64, 128, 32)
    q.set_portable(portable)
    saved = q.state_dict()
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(saved[name], portable[name])
    assert saved["qweight"].shape == (128, 32) and saved["scales"].shape == (128, 2)
    low = saved["qweight"][:, 0] & 15  # weight k = 0 in the low nibble, k = 1 in the high one
    assert torch.equal(low.long(), unpack_int4(pack_int4(portable["qweight"]), 64)[:, 0].long())
    torch.testing.assert_close(q.dequantized(), dequantize(portable, 32))


def test_quantized_layers_refuse_training():
    for scheme in SCHEMES:
        q = make_linear(linear(64, 64).train(), QuantConfig(scheme))
        assert not list(q.parameters())  # nothing an optimizer could train
        x = torch.randn(2, 64, requires_grad=True)
        with pytest.raises(RuntimeError, match="inference only.*fine-tune the full-precision"):
            q(x)
        with torch.no_grad():
            q(x)
        q.eval()
        q(x)  # evaluating with autograd on is fine: the weights take no part in it


# ---- the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [*SCHEMES, "bf16"])
def test_quantize_replaces_the_transformer_linears_and_heads_and_keeps_embeddings_and_codec(
    checkpoint, scheme
):
    model = CsmForConditionalGeneration.from_pretrained(checkpoint).quantize(scheme)
    kinds = {name: type(m) for name, m in model.named_modules()}
    q = {"int8": Int8Linear, "int4": Int4Linear, "bf16": Linear16}[scheme]
    assert kinds["backbone_model.layers.0.mlp.down_proj"] is q
    assert kinds["depth_decoder.model.layers.1.self_attn.k_proj"] is q
    assert kinds["depth_decoder.model.inputs_embeds_projector"] is q
    heads = scheme in ("int8", "int4")  # the heads too, as llama.cpp's q8_0/q4_0 (16-bit: as they are)
    assert len(model.quantization.modules) == 2 * 7 + 2 * 7 + 1 + 2 * heads
    assert isinstance(model.lm_head, q) == heads
    assert isinstance(model.depth_decoder.codebooks_head, QuantizedHeads) == heads
    assert not any(isinstance(m, q) for m in model.codec_model.modules())
    if not heads:
        assert model.lm_head.weight.dtype == model.depth_decoder.codebooks_head.weight.dtype == torch.float32
    assert model.embed_text_tokens.weight.dtype == torch.float32 and model.dtype == torch.float32


@pytest.fixture(scope="module")
def quantized(checkpoint):
    """Each scheme's model, quantized as it loads."""
    return {
        scheme: CsmForConditionalGeneration.from_pretrained(checkpoint, quantize=scheme) for scheme in SCHEMES
    }


@pytest.mark.parametrize("scheme", SCHEMES)
def test_greedy_generation_with_quantized_weights_returns_decodable_audio(quantized, scheme):
    model = quantized[scheme]
    with pytest.warns(UserWarning, match="without end-of-audio"):
        audio = model.generate(input_ids=prompt(), max_new_tokens=4, output_audio=True, **GREEDY)
    assert [a.shape[0] for a in audio] == [4 * 1920] * 2 and all(torch.isfinite(a).all() for a in audio)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sampling_with_quantized_weights_streams_decodable_audio_that_follows_the_seed(quantized, scheme):
    model = quantized[scheme]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights rarely end the audio
        codes = [model.generate(input_ids=prompt(), max_new_tokens=4, seed=s) for s in (1, 2)]
        chunks = list(model.generate_stream(input_ids=prompt(), max_new_tokens=4, chunk_frames=2, seed=1))
    assert not torch.equal(codes[0], codes[1])
    assert codes[0].shape == (2, 4, 8) and int(codes[0].max()) < 2048
    audio = decode_rows(model, codes[0])
    for row in range(2):  # the same seed gives the same codes, hence the same audio, streamed
        streamed = torch.cat([c[row] for c in chunks])
        assert torch.isfinite(streamed).all() and streamed.shape == (4 * 1920,)
        torch.testing.assert_close(streamed, audio[row], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_runs_in_the_servers_batching_core(quantized, scheme):
    model = quantized[scheme]
    config = GenerationConfig.from_model(model)
    core = BatchCore(model, max_batch_size=2, chunk_frames=2)
    jobs = [
        RowJob(
            embed=lambda i=i: model.embed_inputs(prompt(1, 8 + i, seed=i))[0],
            max_frames=3,
            backbone=config.backbone,
            depth_decoder=config.depth_decoder,
            seed=i,
        )
        for i in range(2)
    ]
    for job in jobs:
        core.add(job)
    kinds = []
    while core.live_rows():
        kinds += [e.kind for e in core.step()]
    core.close()
    assert kinds.count("done") == 2 and "error" not in kinds


@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 64), ("bf16", None)])
def test_a_saved_quantized_model_loads_with_identical_outputs(checkpoint, tmp_path, scheme, group_size):
    model = CsmForConditionalGeneration.from_pretrained(checkpoint).quantize(scheme, group_size=group_size)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"]["scheme"] == scheme and config["quantization"]["group_size"] == group_size
    loaded = CsmForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.quantization == model.quantization
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = prompt()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(
        loaded.generate(input_ids=ids, max_new_tokens=5, seed=3),
        model.generate(input_ids=ids, max_new_tokens=5, seed=3),
    )
    assert (
        CsmForConditionalGeneration.from_pretrained(tmp_path, quantize=scheme).quantization
        == model.quantization
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_while_loading_equals_quantizing_after(checkpoint, quantized, scheme):
    loaded = quantized[scheme]
    after = CsmForConditionalGeneration.from_pretrained(checkpoint).quantize(scheme)
    ids = prompt()
    assert torch.equal(loaded(ids).logits, after(ids).logits)
    assert torch.equal(
        loaded.generate(input_ids=ids, max_new_tokens=4, **GREEDY),
        after.generate(input_ids=ids, max_new_tokens=4, **GREEDY),
    )


def test_a_quantized_model_holds_no_full_precision_or_prepacked_copy_of_its_quantized_weights(
    checkpoint, quantized
):
    model = quantized["int8"]
    model.generate(input_ids=prompt(), max_new_tokens=2, **GREEDY)  # prepacks what it prepacks on CPU
    for name in model.quantization.modules:
        m = model.get_submodule(name)
        tensors = [*m.parameters(), *m.buffers()]
        assert all(not t.is_floating_point() or t.dim() < 2 for t in tensors), name  # int8 matrix, 1-D scales
        assert getattr(m, "packed", None) is None
    full = CsmForConditionalGeneration.from_pretrained(checkpoint)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    for name in model.quantization.modules:  # int8: 1 byte per weight and a scale per row, against 4
        m = model.get_submodule(name)
        assert nbytes(m.buffers()) < nbytes(full.get_submodule(name).parameters()) / 3.5, name
    assert nbytes([*model.parameters(), *model.buffers()]) < nbytes([*full.parameters(), *full.buffers()])


def test_quantized_checkpoint_cannot_be_fine_tuned(checkpoint, tmp_path):
    from csm.train import FinetuneConfig, finetune

    CsmForConditionalGeneration.from_pretrained(checkpoint, quantize="int8").save_pretrained(tmp_path / "q")
    write_reference_processor(tmp_path / "q")
    data = tmp_path / "train.jsonl"
    data.write_text('{"audio": "a.wav", "text": "hi"}\n')
    with pytest.raises(ValueError, match="int8-quantized weights, which cannot be trained"):
        finetune(
            FinetuneConfig(model=str(tmp_path / "q"), data=str(data), out=str(tmp_path / "out"), steps=1)
        )


def test_pipeline_takes_quantize(checkpoint):
    tts = csm.pipeline("text-to-audio", model=str(checkpoint), device="cpu", quantize="int8")
    assert tts.model.quantization.scheme == "int8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights rarely end the audio
        out = tts("Hello there.", seed=0, max_seconds=0.3)
    assert out["audio"].ndim == 1 and out["sampling_rate"] == 24000


@pytest.fixture(scope="module")
def bf16_checkpoint(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "bf16"
    CsmForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(path)
    write_reference_processor(path)
    return path


def test_auto_keeps_a_sixteen_bit_checkpoints_weights_in_sixteen_bits_under_a_float32_cpu_model(
    checkpoint, bf16_checkpoint
):
    """What the pipeline, CLI and server load on a CPU when no dtype is asked for: the checkpoint's own
    numbers with float32 arithmetic, read at half fp32's bytes where csm's kernels run."""
    from csm import cpu_kernels

    load = CsmForConditionalGeneration.from_pretrained
    with cpu_kernels.forced(True):
        auto = load(bf16_checkpoint, dtype=torch.float32, quantize="auto")
        if cpu_kernels.kernels() is None:
            pytest.skip("csm's CPU kernels cannot run here")
        assert auto.quantization.scheme == "bf16" and auto.dtype == torch.float32
        plain = load(bf16_checkpoint, dtype=torch.float32)
        assert plain.quantization is None
        ids = prompt()
        assert torch.equal(auto.generate(input_ids=ids, max_new_tokens=4, **GREEDY),
                           plain.generate(input_ids=ids, max_new_tokens=4, **GREEDY))  # fmt: skip
        assert load(checkpoint, dtype=torch.float32, quantize="auto").quantization is None  # stored fp32
        assert load(bf16_checkpoint, dtype=torch.bfloat16, quantize="auto").quantization is None
        assert load(bf16_checkpoint, quantize="auto").dtype == torch.bfloat16  # "auto" dtype: as stored
        tts = csm.pipeline("text-to-audio", model=str(bf16_checkpoint), device="cpu")
        assert tts.model.quantization.scheme == "bf16"
        assert (
            csm.pipeline(
                "text-to-audio", model=str(bf16_checkpoint), device="cpu", dtype="float32"
            ).model.quantization
            is None
        )
    with cpu_kernels.disabled():  # no kernels (another CPU, no compiler): the float32 model as before
        assert load(bf16_checkpoint, dtype=torch.float32, quantize="auto").quantization is None


# ---- errors -------------------------------------------------------------------------------------------


def test_unknown_scheme_and_bad_group_sizes_are_refused(checkpoint):
    model = CsmForConditionalGeneration.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; use one of int8, int4"):
        model.quantize("int3")
    with pytest.raises(ValueError, match="group_size is for int4"):
        model.quantize("int8", group_size=32)
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128, 256, got 48"):
        model.quantize("int4", group_size=48)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        CsmForConditionalGeneration.from_pretrained(checkpoint, quantize="fp4")
    with pytest.raises(ValueError, match="pass quantize='int4' too"):
        CsmForConditionalGeneration.from_pretrained(checkpoint, group_size=64)
    model.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int4")


def test_unsupported_devices_and_dtypes_are_refused(checkpoint):
    with pytest.raises(ValueError, match="int4 weights are not supported on cuda"):
        check_supported("int4", torch.device("cuda"))
    with pytest.raises(ValueError, match="not supported on mps"):
        check_supported("int8", torch.device("mps"))
    with pytest.raises(ValueError, match="int8 weights are refused on CUDA: there bfloat16 is faster"):
        check_supported("int8", torch.device("cuda"))  # slower than bf16 on an H200 (BENCHMARKS.md)
    with pytest.raises(ValueError, match="float32 or bfloat16 model, not torch.float16"):
        CsmForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float16, quantize="int8")
    with pytest.raises(RuntimeError, match="int4 weights run on the CPU only"):
        make_linear(linear(64, 64), QuantConfig("int4"))(torch.randn(1, 64, device="meta"))


def test_a_quantized_checkpoint_is_not_loaded_as_another_scheme(checkpoint, tmp_path):
    CsmForConditionalGeneration.from_pretrained(checkpoint, quantize="int8").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"already quantized \(int8.*cannot be loaded as int4"):
        CsmForConditionalGeneration.from_pretrained(tmp_path, quantize="int4")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization"]["format"] = "something-else"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization format 'something-else' is not one this csm reads"):
        CsmForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.slow  # a cold CPU compile takes minutes per scheme
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_generation_with_quantized_weights_gives_the_eager_codes(checkpoint, scheme):
    model = CsmForConditionalGeneration.from_pretrained(checkpoint, quantize=scheme)
    greedy = dict(max_new_tokens=4, do_sample=False, depth_decoder_do_sample=False)
    eager = model.generate(input_ids=prompt(), **greedy)
    torch.testing.assert_close(
        model.generate(input_ids=prompt(), compile=True, **greedy), eager, rtol=0, atol=0
    )


def test_a_quantizing_load_reads_each_tensor_into_memory_of_its_own_and_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    from csm.checkpoint import load_safetensors

    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.arange(7, dtype=torch.int8),
        "c": torch.randn(4, 2),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    seen = {}
    state = load_safetensors(tmp_path, transform=lambda name, t: seen.setdefault(name, {name: t}))
    for name, t in tensors.items():
        assert torch.equal(state[name], t) and state[name].dtype == t.dtype, name
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor .a. has data_offsets \[32, 62\] outside the file.s data",
    ):
        load_safetensors(tmp_path, transform=lambda name, t: {name: t})


@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 32), ("int4", 64)])
def test_quantized_heads_give_the_product_with_their_dequantized_weights_and_stay_close_to_the_float_heads(
    scheme, group_size
):
    """The codebook heads (K-1, D, V) as one quantized layer per codebook: each codebook's logits are the
    product with that head's dequantized weight (to the kernels' int8 rounding of h), the batched forward
    (teacher forcing, evaluation) agrees with them, and the logits stay close to the float heads'."""
    from csm.model import CsmCodebooksHead

    torch.manual_seed(0)
    head = CsmCodebooksHead(256, 5, 2051).eval()  # a vocabulary that is no multiple of 16, as csm-1b's
    torch.nn.init.normal_(head.weight, std=0.02)
    config = QuantConfig(scheme, group_size)
    from csm.quant import make_heads

    q = make_heads(head, config)
    assert len(q.heads) == 4 and all(
        isinstance(h, Int8Linear if scheme == "int8" else Int4Linear) for h in q.heads
    )
    deq = q.dequantized()  # (K-1, D, V)
    assert deq.shape == head.weight.shape
    h = torch.randn(3, 256)
    for codebook in (1, 4):
        got = q.logits(h, codebook)
        exact = h @ deq[codebook - 1]
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-2 * exact.abs().max().item())
        full = h @ head.weight[codebook - 1].detach()
        err = ((got - full).norm() / full.norm()).item()
        assert err < (0.01 if scheme == "int8" else 0.1), err  # the heads' accuracy, as the layers'
        assert (got.argmax(-1) == full.argmax(-1)).float().mean() >= 2 / 3
    batched = q(h[:, None].expand(3, 2, 256), torch.tensor([2, 3]))
    torch.testing.assert_close(batched[:, 0], q.logits(h, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[:, 1], q.logits(h, 3), rtol=0, atol=1e-5)
