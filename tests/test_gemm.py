"""Many-row products as matrix products (csm.gemm): the same numbers as the weight stream where the
arithmetic is the same, each scheme against its exact product, the dispatch at the threshold, and a tiny
model's prefill and greedy codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from reference_models import write_reference_csm

from csm import CsmForConditionalGeneration, cpu_kernels, gemm
from csm.llama import Linear
from csm.quant import QuantConfig, make_linear

GREEDY = dict(do_sample=False, depth_decoder_do_sample=False)
DEPTH = dict(num_codebooks=8, backbone_hidden_size=64, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
SCHEMES = [("bf16", None), ("fp16", None), ("int8", None), ("int4", 32)]


@pytest.fixture
def every_row_count(monkeypatch):
    """The GEMM path from one row on, whatever the measured thresholds."""
    monkeypatch.setattr(gemm, "threshold", lambda scheme, dtype: 1)


def kernels_or_skip():
    if not cpu_kernels.runnable() or cpu_kernels.kernels() is None:
        pytest.skip("csm's CPU kernels cannot run here")


def layer(scheme, group_size, n=320, k=256, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias).eval()
    nn.init.normal_(lin.weight, std=0.02)
    return lin, make_linear(lin, QuantConfig(scheme, group_size))


def exact(x, q, bias):
    return x.double() @ q.dequantized().double().t() + (0 if bias is None else bias.double())


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_a_float32_models_many_rows_multiply_its_exact_weights_in_fp32(scheme, group_size, every_row_count):
    """Widening 16-bit, int8 and int4 weights to fp32 is exact: the GEMM path is the product with the
    dequantized weight up to fp32 summation (int8 and int4 streams quantize activations to int8 as well)."""
    lin, q = layer(scheme, group_size)
    x = torch.randn(2, 80, 256)
    with torch.inference_mode():
        assert gemm.many_rows(x, scheme) == torch.float32
        y = q(x)
    ref = exact(x, q, lin.bias)
    assert y.dtype == torch.float32
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_sixteen_bit_weights_under_fp32_give_the_kernels_numbers_up_to_summation_order(
    scheme, every_row_count
):
    kernels_or_skip()
    lin, q = layer(scheme, None, bias=False)
    x = torch.randn(200, 256)
    with cpu_kernels.forced(True), torch.inference_mode():
        y = q(x)
        with gemm.streaming_only():
            streamed = q(x)
    torch.testing.assert_close(y, streamed, rtol=1e-5, atol=1e-6)


def test_tiles_give_the_whole_products_numbers(monkeypatch):
    for scheme, group_size in SCHEMES:
        _, q = layer(scheme, group_size, n=512, bias=False)
        x = torch.randn(64, 256)
        if scheme == "int4" and not q.portable_layout:
            continue  # PyTorch's packed layout (csm's kernels off): dequantized whole, not tile by tile
        if scheme == "int8":  # the scales come after the GEMM
            tile = gemm.int8(q.qweight)
        elif scheme == "int4":
            tile = gemm.int4(q.packed, *q.scales_and_zeros, 32)
        else:
            tile = gemm.sixteen_bit(q.weight)
        whole = gemm.tiled_linear(x, 512, tile, torch.float32)
        monkeypatch.setattr(gemm, "TILE_BYTES", 16 * 256 * 4)  # 16 rows a tile: 32 tiles
        tiled = gemm.tiled_linear(x, 512, tile, torch.float32)
        monkeypatch.undo()
        torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)
        w = q.qweight if scheme == "int8" else q.dequantized()
        ref = x.double() @ w.double().t()
        assert float((tiled.double() - ref).norm() / ref.norm()) < 1e-6


def test_the_path_switches_at_the_threshold_and_never_under_autograd_or_off_the_cpu():
    for scheme in ("bf16", "int8", "int4"):
        for dtype in (torch.float32, torch.bfloat16):
            arith = gemm.arithmetic(torch.empty(0, dtype=dtype))
            rows = gemm.threshold(scheme, arith)
            if rows == gemm.NEVER:
                continue  # measured slower than the stream at every row count
            with torch.inference_mode():
                assert gemm.many_rows(torch.zeros(rows - 1, 64, dtype=dtype), scheme) is None
                assert gemm.many_rows(torch.zeros(rows, 64, dtype=dtype), scheme) == arith
                assert gemm.many_rows(torch.zeros(1, rows, 64, dtype=dtype), scheme) == arith  # B x T rows
                with gemm.streaming_only():
                    assert gemm.many_rows(torch.zeros(rows, 64, dtype=dtype), scheme) is None
            x = torch.zeros(rows, 64, dtype=dtype)
            assert gemm.many_rows(x, scheme) is None  # autograd on
            with torch.inference_mode():
                assert gemm.many_rows(x.to("meta"), scheme) is None
    with torch.inference_mode():  # fp16 would lose bits as bf16: always fp32
        assert gemm.many_rows(torch.zeros(512, 64, dtype=torch.bfloat16), "fp16") == torch.float32


def test_arithmetic_follows_the_activations_and_what_the_cpu_can_do(monkeypatch):
    fp32, bf16 = torch.empty(0), torch.empty(0, dtype=torch.bfloat16)
    assert gemm.arithmetic(fp32) == torch.float32  # a float32 model keeps fp32 arithmetic by default
    with gemm.bf16_for_fp32():
        assert gemm.arithmetic(fp32) == (torch.bfloat16 if gemm.bf16_arithmetic() else torch.float32)
    gemm.bf16_arithmetic.cache_clear()
    try:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # held to AVX2: fp32 products, rounded to bf16
        assert not gemm.bf16_arithmetic() and gemm.arithmetic(bf16) == torch.float32
        with gemm.bf16_for_fp32():
            assert gemm.arithmetic(fp32) == torch.float32
    finally:
        monkeypatch.undo()
        gemm.bf16_arithmetic.cache_clear()


def test_a_bf16_models_many_rows_are_one_gemm_on_its_weights(every_row_count):
    lin = Linear(256, 320, bias=True).to(torch.bfloat16).eval()
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = lin(x)
        if gemm.bf16_arithmetic():
            assert torch.equal(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
        ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


# ---- a tiny model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    fp32 = tmp_path_factory.mktemp("gemm") / "fp32"
    write_reference_csm(fp32, seed=5, depth_decoder_config=DEPTH)
    path = fp32.parent / "bf16"
    CsmForConditionalGeneration.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(path)
    return path


def prompt(batch=2, length=40, seed=0):
    return torch.randint(4, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_prefill_logits_match_the_plain_fp32_model_of_the_same_weights(
    bf16_checkpoint, scheme, every_row_count
):
    """The CPU default (bf16 weights under fp32) against the plain fp32 model of those weights: the same
    numbers up to summation order; int8 and int4 against the fp32 model of their dequantized weights."""
    load = CsmForConditionalGeneration.from_pretrained
    model = load(bf16_checkpoint, dtype=torch.float32, quantize=scheme)
    plain = load(bf16_checkpoint, dtype=torch.float32)
    if scheme != "bf16":
        with torch.no_grad():
            for name in model.quantization.modules:
                plain.get_submodule(name).weight.copy_(model.get_submodule(name).dequantized())
    ids = prompt()
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        ref = plain(input_ids=ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_greedy_codes_of_the_cpu_default_are_unchanged_by_the_gemm_path(bf16_checkpoint, every_row_count):
    """bf16 weights under fp32, stream against GEMM: the same arithmetic, so the same greedy codes (prefill
    of a batch of prompts, and the frames' few rows)."""
    with cpu_kernels.forced(True):
        model = CsmForConditionalGeneration.from_pretrained(
            bf16_checkpoint, dtype=torch.float32, quantize="bf16"
        )
        ids = prompt()
        with gemm.streaming_only():
            before = model.generate(input_ids=ids, max_new_tokens=6, **GREEDY)
        after = model.generate(input_ids=ids, max_new_tokens=6, **GREEDY)
    assert torch.equal(after, before)
