"""csm's CPU kernels (csm/cpu_kernels.cpp): each weight format against the product with its dequantized
weight (for int8 and int4 also with x quantized as the integer products do), the layers that run them against PyTorch's kernels, and the fallback when they cannot be built.

The first test to need the kernels builds them (~40 s on 2 cores); later runs load them from torch's
extension cache."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from csm import cpu_kernels
from csm.quant import Int4Linear, Linear16, QuantConfig, dequantize, make_linear, quantize_int4, quantize_int8

needs_kernels = pytest.mark.skipif(
    cpu_kernels.kernels() is None,
    reason="csm's CPU kernels cannot run here (no AVX2/FMA/F16C or no compiler)",
)


VARIANTS = cpu_kernels.runnable_variants()  # each variant this CPU can run is tested against the same math


@pytest.fixture(autouse=True)
def kernels_on():
    """The kernels wherever they can run, also where csm would not use them by default (AMX)."""
    with cpu_kernels.forced(True):
        yield


@pytest.fixture(params=VARIANTS or ["avx2"])
def variant(request):
    """Each variant the CPU can run (AVX2 code on an AVX-512 CPU too)."""
    with cpu_kernels.using(request.param):
        yield request.param


FORMATS = ["fp16", "bf16", "int8", "int4-g32", "int4-g128"]


def weight_in(fmt: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """(the kernel's arguments, the fp32 weight they stand for)."""
    if fmt in ("fp16", "bf16"):
        dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
        return dict(weight=w.to(dtype), fmt=dtype), w.to(dtype).float()
    if fmt == "int8":
        t = quantize_int8(w)
        return dict(weight=t["qweight"], fmt="int8", scales=t["scales"]), dequantize(t)
    group = int(fmt.rsplit("g", 1)[1])
    t = quantize_int4(w, group)
    args = dict(weight=t["qweight"], fmt="int4", scales=t["scales"], zeros=t["zeros"], group_size=group)
    return args, dequantize(t, group)


def blocks_of_32(x: torch.Tensor) -> torch.Tensor:
    """x as the integer products see it: each block of 32 along the last dimension rounded to int8 steps of
    max|x| / 127, in fp32 (the kernels' q8_0 rounding)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    top = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, top.new_tensor(127.0) / top, 0)  # not `127 / top`: that is 127 * (1 / top)
    q = (xb * inv).round()
    return (q * (top / 127)).reshape(x.shape)


def integer_product(fmt: str, x: torch.Tensor, args: dict, deq: torch.Tensor) -> torch.Tensor:
    """What the integer kernels compute, in fp64: int8 x quantized x; for int4 the zeros meet x itself."""
    xq = blocks_of_32(x).double()
    if fmt == "int8":
        return (xq @ deq.double().t()).float()
    g = args["group_size"]
    zeros = args["zeros"].double().repeat_interleave(g, 1)
    return (xq @ (deq.double() - zeros).t() + x.double() @ zeros.t()).float()


def takes_integer_path(fmt: str, k: int) -> bool:
    return fmt == "int8" and k % 32 == 0 or fmt.startswith("int4") and k % 256 == 0


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 8, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n,k", [(256, 512), (37, 384), (19, 400), (37, 4096)]
)  # 37, 19: no multiple of a block; 4096: fp32 x past L1
def test_kernel_equals_the_product_with_the_dequantized_weight(fmt, rows, dtype, n, k, variant):
    if fmt.startswith("int4") and k % int(fmt.rsplit("g", 1)[1]):
        pytest.skip("the groups do not divide k")
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=g) * 0.02
    args, deq = weight_in(fmt, w)
    x = torch.randn(2, rows, k, generator=g).to(dtype)  # 3-D: rows of 2 sequences
    expected = x.float() @ deq.t()
    scale = expected.abs().max().item()
    atol = 1e-5 * scale if dtype == torch.float32 else 1e-2 * scale  # fp32 sums; a bf16 result
    if fmt.startswith("int"):  # the weight-only product, each weight converted to fp32
        exact = cpu_kernels.linear(x, **args, integer=False)
        assert exact.dtype == dtype and exact.shape == (2, rows, n)
        torch.testing.assert_close(exact.float(), expected, rtol=0, atol=atol)
        if takes_integer_path(fmt, k):
            expected = integer_product(fmt, x, args, deq)
    got = cpu_kernels.linear(x, **args)
    assert got.dtype == dtype and got.shape == (2, rows, n)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=atol)


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64", "int4-g256"])
def test_integer_products_stay_within_a_percent_of_the_weight_only_product(fmt, variant):
    """Quantizing x costs ~0.5% of the product (llama.cpp's q8_0 activations); an outlier costs its own
    block's precision, all-zero blocks give zeros."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(512, 1024, generator=g) * 0.02
    args, deq = weight_in(fmt, w)
    x = torch.randn(5, 1024, generator=g)
    x[0, 17] = 300.0  # an outlier widens its block's steps only
    x[1, :64] = 0.0  # all-zero blocks
    x[2] = 0.0
    got = cpu_kernels.linear(x, **args)
    expected = x @ deq.t()
    assert torch.equal(got[2], torch.zeros(512)) and not torch.equal(got, expected)
    for row, bound in (
        (0, 3e-2),
        (1, 1e-2),
        (3, 1e-2),
        (4, 1e-2),
    ):  # row 0: 31 values rounded in steps of 2.4
        err = (got[row] - expected[row]).norm() / expected[row].norm()
        assert err < bound, (row, err)


@needs_kernels
def test_kernel_reads_strided_activations_and_refuses_bad_shapes(variant):
    w = torch.randn(64, 128).bfloat16()
    x = torch.randn(128, 5).t()  # (5, 128), not contiguous
    torch.testing.assert_close(
        cpu_kernels.linear(x, w, torch.bfloat16), x @ w.float().t(), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_kernels.linear(torch.randn(1, 40), torch.randn(8, 40).bfloat16(), torch.bfloat16)
    with pytest.raises(RuntimeError, match="w must be bf16"):
        cpu_kernels.linear(torch.randn(1, 64), torch.randn(8, 64).half(), torch.bfloat16)


def layer(n=96, k=256, seed=0, bias=False):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)
    return linear.eval()


CONFIGS = [("int8", None), ("int4", 32), ("int4", 64), ("bf16", None), ("fp16", None)]


@needs_kernels
@pytest.mark.parametrize("scheme,group_size", CONFIGS)
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_layers_with_the_kernels_give_pytorchs_product(scheme, group_size, rows, variant):
    config = QuantConfig(scheme, group_size)
    source = layer(bias=True)
    fast = make_linear(source, config)
    with cpu_kernels.disabled():
        slow = make_linear(source, config)
        x = torch.randn(rows, 256)
        expected = slow(x)
    assert isinstance(fast, Int4Linear) == (scheme == "int4")
    if scheme == "int4":
        assert fast.portable_layout and not slow.portable_layout
    torch.testing.assert_close(fast.dequantized(), slow.dequantized(), rtol=0, atol=0)
    # PyTorch's int kernels take bf16 activations: ~2^-8 relative
    torch.testing.assert_close(fast(x), expected, rtol=0, atol=1e-2 * expected.abs().max().item())
    with cpu_kernels.disabled():  # a layer made for the kernels still runs without them
        torch.testing.assert_close(fast(x), expected, rtol=0, atol=1e-2 * expected.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_state_dict_is_the_portable_layout_with_or_without_the_kernels(group_size):
    w = layer(n=64, k=256).weight
    fast = Int4Linear(256, 64, group_size)
    fast.set_weight(w)
    with cpu_kernels.disabled():
        slow = Int4Linear(256, 64, group_size)
        slow.set_weight(w)
        slow_state = slow.state_dict()
        reloaded = Int4Linear(256, 64, group_size)
        reloaded.load_state_dict(fast.state_dict())  # written by one layout, read into the other
    for name, t in fast.state_dict().items():
        assert torch.equal(t, slow_state[name]) and torch.equal(t, reloaded.state_dict()[name]), name
    assert set(fast.state_dict()) == {"qweight", "scales", "zeros"}


@needs_kernels
def test_each_variant_is_the_code_it_names(variant):
    assert cpu_kernels.kernels().variant == variant
    folder = cpu_kernels.build_dir(variant)
    assert (folder / "built").exists() and cpu_kernels.build_key(variant) in folder.name


def test_a_failed_build_falls_back_to_pytorchs_kernels_with_one_warning(monkeypatch, caplog, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'csm_cpu_kernels_v1': c++: not found\nmore lines")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "runnable_variants", lambda: ["avx2"])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there
    cpu_kernels.kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="csm.cpu_kernels"):
            assert not cpu_kernels.available() and not cpu_kernels.available()
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
            "csm: building csm's CPU kernels",  # said before the build, which then fails once
            "csm: CPU kernels unavailable, using PyTorch's",
        ]
        assert "CPU kernels unavailable, using PyTorch's" in caplog.text and "c++: not found" in caplog.text
        assert "more lines" not in caplog.text
        for scheme, group_size in CONFIGS:
            q = make_linear(layer(), QuantConfig(scheme, group_size))
            x = torch.randn(3, 256)
            expected = x @ q.dequantized().t()
            torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-2 * expected.abs().max().item())
            if scheme == "int4":
                assert not q.portable_layout  # PyTorch's packed layout
    finally:
        monkeypatch.undo()
        cpu_kernels.kernels.cache_clear()


def test_the_kernels_are_wanted_on_x86_cpus_with_avx2_and_without_amx_unless_the_environment_says_otherwise(
    monkeypatch,
):
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("CSM_CPU_KERNELS", raising=False)

    def wanted_with(*flags):
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(flags))
        return cpu_kernels.wanted()

    assert wanted_with("avx2", "fma", "f16c")
    assert wanted_with("avx2", "fma", "f16c", "avx512f", "avx512bw")  # faster than PyTorch's there too
    assert not wanted_with("avx2", "fma", "f16c", "amx_tile")  # oneDNN's AMX paths stay
    assert not wanted_with("avx", "fma", "f16c") and not wanted_with()
    monkeypatch.setenv("CSM_CPU_KERNELS", "1")
    assert wanted_with("avx2", "fma", "f16c", "amx_tile") and not wanted_with("avx", "fma", "f16c")
    monkeypatch.setenv("CSM_CPU_KERNELS", "0")
    assert not wanted_with("avx2", "fma", "f16c")
    monkeypatch.setenv("CSM_CPU_KERNELS", "")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    assert not wanted_with("avx2", "fma", "f16c")


def test_sixteen_bit_layers_keep_their_weight_in_sixteen_bits():
    source = layer()
    for scheme, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        q = make_linear(source, QuantConfig(scheme))
        assert isinstance(q, Linear16) and q.weight.dtype == dtype and not list(q.parameters())
        assert q.state_dict()["weight"].dtype == dtype


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_models_run_their_linear_layers_on_the_kernels(dtype, monkeypatch):
    """A model loaded in bf16 (the checkpoint's dtype, what from_pretrained gives by default) streams its
    weights through the kernels as quantize="bf16" does; training and other devices keep PyTorch's."""
    from csm.llama import FusedLinear, Linear

    calls = []
    real = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    torch.manual_seed(0)
    parts = [Linear(256, n, bias=True).to(dtype) for n in (64, 32)]
    fused = FusedLinear()
    fused.fuse(tuple(parts))
    x = torch.randn(3, 256).to(dtype)
    with torch.no_grad():
        expected = [F.linear(x.float(), p.weight.float(), p.bias.float()) for p in parts]
        got = [parts[0](x), fused(x)]
    assert calls == [dtype, dtype]
    for y, e in zip(got, [expected[0], torch.cat(expected, -1)]):
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), e, rtol=0, atol=1e-2 * e.abs().max().item())
    parts[0](x)  # autograd on: PyTorch's product, which it can differentiate
    with torch.no_grad(), cpu_kernels.disabled():
        parts[0](x)
    assert len(calls) == 2

    from csm.model import CsmCodebooksHead

    head = CsmCodebooksHead(256, 4, 100)  # codebooks 1..3, stored (3, D, V) as the checkpoint has it
    torch.nn.init.normal_(head.weight, std=0.02)
    head = head.to(dtype)
    with torch.no_grad():
        for codebook in (1, 3, 2):
            expected = x.float() @ head.weight[codebook - 1].float()
            got = head.logits(x, codebook)
            assert got.dtype == dtype and got.shape == (3, 100)
            torch.testing.assert_close(got.float(), expected, rtol=0, atol=1e-2 * expected.abs().max().item())
        head.weight.mul_(2)  # a changed weight: the kernels' transposed copy is made again
        torch.testing.assert_close(
            head.logits(x, 1).float(),
            x.float() @ head.weight[0].float(),
            rtol=0,
            atol=2e-2 * expected.abs().max().item(),
        )
    assert calls[2:] == [dtype] * 4


def test_the_variant_is_the_most_capable_the_cpu_runs_unless_the_environment_names_one(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    avx2 = {"avx2", "fma", "f16c"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}

    def variant_with(flags, isa=None):
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(flags))
        if isa is None:
            monkeypatch.delenv("CSM_CPU_KERNELS_ISA", raising=False)
        else:
            monkeypatch.setenv("CSM_CPU_KERNELS_ISA", isa)
        cpu_kernels._default_variant.cache_clear()
        return cpu_kernels.variant()

    try:
        assert variant_with(avx2) == "avx2"
        assert variant_with(avx2 | {"avx512f", "avx512bw", "avx512vl"}) == "avx2"  # no VNNI: Skylake-X
        assert variant_with(avx512) == "avx512"  # Ice Lake, Cascade Lake
        assert variant_with(avx512 | {"avx512_bf16"}) == "avx512bf16"  # Zen 4, Sapphire Rapids
        assert variant_with({"avx", "fma"}) is None
        assert variant_with(avx512 | {"avx512_bf16"}, "avx2") == "avx2"  # held to AVX2 for comparisons
        assert variant_with(avx512 | {"avx512_bf16"}, "auto") == "avx512bf16"
        with caplog.at_level(logging.WARNING, logger="csm.cpu_kernels"):
            assert variant_with(avx2, "avx512bf16") == "avx2"
            assert variant_with(avx2, "sse9") == "avx2"
        assert "cannot run on this CPU" in caplog.text and "is not a variant" in caplog.text
        with cpu_kernels.using("avx512"):
            assert cpu_kernels.variant() == "avx512"
    finally:
        monkeypatch.undo()
        cpu_kernels._default_variant.cache_clear()


def test_the_build_folder_is_keyed_by_what_changes_the_binary(monkeypatch):
    """One build per source, flags, torch and compiler: not per virtual environment (include paths)."""
    key = cpu_kernels.build_key("avx2")
    assert key != cpu_kernels.build_key("avx512") and cpu_kernels.module_name("avx2").endswith(key)
    cpu_kernels.build_key.cache_clear()
    try:
        monkeypatch.setattr(cpu_kernels.sys, "prefix", "/somewhere/else/.venv")  # another venv
        monkeypatch.setenv("VIRTUAL_ENV", "/somewhere/else/.venv")
        assert cpu_kernels.build_key("avx2") == key
        cpu_kernels.build_key.cache_clear()
        monkeypatch.setattr(cpu_kernels.torch, "__version__", "0.0.1")
        assert cpu_kernels.build_key("avx2") != key
        cpu_kernels.build_key.cache_clear()
        monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "c++: clang 99")
        assert cpu_kernels.build_key("avx2") != key
    finally:
        monkeypatch.undo()
        cpu_kernels.build_key.cache_clear()


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write("pid %d since now\\n" % __import__("os").getpid()); f.flush()
print("held", flush=True)
time.sleep(600)
"""


def lock_holder(lock):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_build_killed_with_sigkill_blocks_no_one(tmp_path, monkeypatch, caplog):
    """The lock is the kernel's (flock): it goes with its holder, and torch's own lock file, left behind by
    the killed build, is removed before the next build (torch's builder would wait on it for ever)."""
    import signal

    from torch.utils import cpp_extension

    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, *a, **k: built.append(name) or "module")
    holder = lock_holder(tmp_path / "csm.lock")
    (tmp_path / "lock").touch()  # torch's FileBaton, as a killed build leaves it
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="csm.cpu_kernels"):
        assert cpu_kernels._locked_build("avx2", tmp_path, wait=30) == "module"
    assert built == [cpu_kernels.module_name("avx2")] and not (tmp_path / "lock").exists()
    assert "building csm's CPU kernels (avx2)" in caplog.text and "built in" in caplog.text
    assert (tmp_path / "built").exists()


def test_a_live_build_is_waited_for_then_pytorchs_kernels_are_used(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setattr(
        cpp_extension, "load", lambda *a, **k: pytest.fail("built while another process held the lock")
    )
    holder = lock_holder(tmp_path / "csm.lock")
    try:
        with caplog.at_level(logging.WARNING, logger="csm.cpu_kernels"):
            assert cpu_kernels._locked_build("avx2", tmp_path, wait=0.5) is None
    finally:
        holder.kill()
        holder.wait()
    assert f"waiting for pid {holder.pid}" in caplog.text and "gave up waiting" in caplog.text
    assert "using PyTorch's (slower) kernels" in caplog.text


@needs_kernels
def test_csm_build_kernels_builds_ahead_of_first_use_and_says_where(capsys):
    from csm.cli.main import main

    assert main(["build-kernels", "--isa", "avx2"]) == 0
    err = capsys.readouterr().err
    assert f"CPU kernels (avx2) ready in {cpu_kernels.build_dir('avx2')}" in err
    assert (cpu_kernels.build_dir("avx2") / "built").exists()
    with pytest.raises(SystemExit) as refused:  # argparse's refusal, with the choices
        main(["build-kernels", "--isa", "sse9"])
    assert refused.value.code == 2 and "choose from" in capsys.readouterr().err
    unknown = next((v for v in ("avx512bf16", "avx512") if v not in cpu_kernels.runnable_variants()), None)
    if unknown:
        assert main(["build-kernels", "--isa", unknown]) == 2
        assert "this CPU runs only" in capsys.readouterr().err
