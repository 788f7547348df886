"""Many-row products on the CPU (a prompt's prefill) as matrix products: 16-bit and quantized weights are
widened tile by tile to the GEMM's dtype and multiplied by torch's GEMM (oneDNN, MKL).

csm's weight-streaming kernels (cpu_kernels.py) convert each weight in registers once per block of 4 rows:
right for a frame's 1-4 rows, bound by that conversion for a prompt's hundreds (csm-1b's backbone over 512
positions, one thread: 56 GFLOP/s streamed, 127 here, torch.mm 166 in fp32; BENCHMARKS.md "Prefill as a
matrix product"). From `threshold(scheme, arithmetic)` rows on, a layer widens its weight `TILE_BYTES` at a
time (a bounded temporary, no second copy of the model) and multiplies each tile with torch.mm. int8 and
int4 streams multiply in 8-bit integers and stay ahead longer (int4 on a bf16 model always streams).

The arithmetic follows the activations:
- a float32 model (16-bit weights under fp32, the CPU default; int8 or int4 on an fp32 model) multiplies in
  fp32: widening bf16 (or fp16, int8, int4) to fp32 is exact, so the numbers are the streaming path's up to
  summation order, and a prompt prefilled here and a frame decoded by the kernels agree (the prefix cache's
  1e-4 rests on it);
- a bfloat16 model multiplies in bf16 where the CPU has bf16 arithmetic (avx512_bf16, AMX) and torch is not
  held below it (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), else in fp32 with the result rounded to bf16
  (AVX2 only).
CSM_PREFILL_BF16=1 multiplies a float32 model's prefill in bf16 too (activations rounded to bf16: faster,
not the same numbers; measured in BENCHMARKS.md). CSM_PREFILL_GEMM=0 turns this path off (the weight
stream for every row count, as before).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from . import cpu_kernels

# Rows (B x T, all positions of a call) from which the GEMM beats csm's weight-streaming kernels, per weight
# scheme and arithmetic, with AVX-512 and with AVX2 only: the fewest rows from which the GEMM path was faster
# on every csm-1b shape, backbone's and depth decoder's, measured by bench/bench_prefill.py --rows (1 thread,
# CPU time: the machine was shared; 2026-12-08; AVX-512: oneDNN held to avx512_bf16, as on a Zen 4; AVX2:
# torch and oneDNN held to AVX2; BENCHMARKS.md "Prefill as a matrix product"). Stream / GEMM time, AVX-512:
# bf16 weights in fp32 0.54 at 16 rows, 1.01-1.12 at 32; fp16 0.84-0.86 at 32, 1.01-1.09 at 48; int8 0.88-0.91
# at 32, 1.01-1.12 at 48; int4 0.95-1.03 at 256, 1.14-1.17 at 512; the bf16 model (bf16) 1.06-1.32 at 8; int8
# in bf16 0.99-1.03 at 64, 1.03-1.09 at 96; int4 in bf16 0.82 at 512 (never: it streams). AVX2: bf16 0.85 at
# 32, 1.01-1.35 at 48; int8 0.99-1.09 at 48, 1.16-1.27 at 64; int4 1.00-1.02 at 256.
NEVER = 1 << 62
THRESHOLDS = {
    "avx512": {
        ("bf16", "fp32"): 32,
        ("fp16", "fp32"): 48,
        ("int8", "fp32"): 48,
        ("int4", "fp32"): 512,
        ("bf16", "bf16"): 8,
        ("int8", "bf16"): 96,
        ("int4", "bf16"): NEVER,
    },
    "avx2": {("bf16", "fp32"): 48, ("fp16", "fp32"): 48, ("int8", "fp32"): 64, ("int4", "fp32"): 256},
}
# Where csm's kernels are not in use, the stream is PyTorch's (oneDNN bf16, aten's int8/int4 products):
# dequantizing first won from 256 rows on an AVX2 machine (csm.quant's earlier measurement).
THRESHOLD_WITHOUT_KERNELS = 256
TILE_BYTES = 8 << 20  # one widened tile: 1024 x 2048 fp32, within L2 + L3 reach, ~1% of csm-1b's layer time

_off = os.environ.get("CSM_PREFILL_GEMM", "").strip().lower() in ("0", "false", "no", "off")
_bf16_for_fp32 = os.environ.get("CSM_PREFILL_BF16", "").strip().lower() in ("1", "true", "yes", "on")

# oneDNN ISAs below avx512_bf16 (ONEDNN_MAX_CPU_ISA): its bf16 product is emulated there
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@functools.lru_cache(maxsize=1)
def bf16_arithmetic() -> bool:
    """Whether torch's GEMM multiplies bf16 natively here: the CPU has avx512_bf16 or AMX (oneDNN's test),
    and neither ATEN_CPU_CAPABILITY nor ONEDNN_MAX_CPU_ISA holds torch below it."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if isa in _NO_BF16_ISAS:
        return False
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2", "ZVECTOR", "VSX")


def arithmetic(x: torch.Tensor) -> torch.dtype:
    """The dtype a many-row product of activations `x` multiplies in (module docstring)."""
    wants_bf16 = x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and _bf16_for_fp32)
    return torch.bfloat16 if wants_bf16 and bf16_arithmetic() else torch.float32


def threshold(scheme: str, dtype: torch.dtype) -> int:
    """Rows from which `scheme`'s weights ("bf16", "fp16", "int8", "int4") multiply as a GEMM in `dtype`."""
    if not cpu_kernels.available():
        return THRESHOLD_WITHOUT_KERNELS
    isa = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX") else "avx512"
    table = THRESHOLDS[isa]
    return table.get((scheme, "bf16" if dtype == torch.bfloat16 else "fp32"), NEVER)


def many_rows(x: torch.Tensor, scheme: str) -> torch.dtype | None:
    """The arithmetic (`arithmetic`) when a product of `x` (..., K) with `scheme`'s weights runs as a GEMM
    here: on the CPU, at inference, outside torch.compile, with at least `threshold` rows; else None."""
    if _off or x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    dtype = torch.float32 if scheme == "fp16" else arithmetic(x)  # fp16 -> bf16 would round the weights
    return dtype if x.numel() >= threshold(scheme, dtype) * x.shape[-1] else None


def tiled_linear(x: torch.Tensor, out_features: int, tile, dtype: torch.dtype) -> torch.Tensor:
    """x (..., K) @ W^T in `dtype`, W (N, K) given by `tile(start, stop, dtype)` -> its rows start..stop
    widened to `dtype`; the result in `dtype`, (..., N)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).to(dtype)
    columns = getattr(tile, "columns", None)  # the order of k the tiles come in, when not the weight's own
    if columns is not None:
        x2 = x2.index_select(1, columns)
    step = max(64, TILE_BYTES // (K * torch.finfo(dtype).bits // 8)) // 64 * 64  # whole blocks of int4 rows
    if step >= out_features:
        y = F.linear(x2, tile(0, out_features, dtype))
    else:
        y = torch.empty(x2.shape[0], out_features, dtype=dtype)
        for start in range(0, out_features, step):
            stop = min(start + step, out_features)
            torch.mm(x2, tile(start, stop, dtype).t(), out=y[:, start:stop])
    return y.view(*x.shape[:-1], out_features)


def linear_16bit(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, bias=None) -> torch.Tensor:
    """x @ weight^T (+ bias) for a bf16 or fp16 weight (N, K) in `dtype`: one GEMM on the weight itself where
    it is already in `dtype`, else tile by tile."""
    bias = None if bias is None else bias.to(dtype)
    if weight.dtype == dtype:
        return F.linear(x.to(dtype), weight, bias)
    y = tiled_linear(x, weight.shape[0], sixteen_bit(weight), dtype)
    return y if bias is None else y.add_(bias)


def sixteen_bit(weight: torch.Tensor):
    """`tiled_linear`'s tile of a bf16 or fp16 weight (N, K): its rows, converted (exact)."""
    return lambda start, stop, dtype: weight[start:stop].to(dtype)


def int8(qweight: torch.Tensor):
    """The tile of int8 weights (N, K) before their scales (exact in bf16 and fp32: |q| <= 128)."""
    return lambda start, stop, dtype: qweight[start:stop].to(dtype)


def int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, unpack=None):
    """The tile of int4 weights: packed (N, K/2) nibbles, portable (even k low) or, with `unpack(rows) -> q
    (n, K)`, in PyTorch's packed layout; scales and zeros (N, K/g): w = (q - 8) * scale + zero, computed in
    fp32 (bf16: rounded once).

    The portable tile comes with its inputs reordered (`tile.columns`, for x): each row's even k (the low
    nibbles) first, then its odd k. Unpacking is then two contiguous conversions instead of interleaving, and
    the scales broadcast over runs of g/2 (a third of the time per tile; the GEMM does not mind the order)."""
    half = group_size // 2

    def tile(start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        p = packed[start:stop]
        n, K = p.shape[0], 2 * p.shape[1]
        G = K // group_size
        s = scales[start:stop].float()
        z = zeros[start:stop].float() - 8 * s
        if unpack is not None:  # (n, K) in order
            q = unpack(p).float().view(n, G, group_size)
            s, z = s[..., None], z[..., None]
        else:
            q = torch.empty(n, 2, K // 2)
            q[:, 0] = p & 15
            q[:, 1] = p >> 4
            q = q.view(n, 2, G, half)
            s, z = s[:, None, :, None], z[:, None, :, None]
        return q.mul_(s).add_(z).view(n, K).to(dtype)

    if unpack is None:
        K = 2 * packed.shape[1]
        tile.columns = torch.cat([torch.arange(0, K, 2), torch.arange(1, K, 2)])
    return tile


@contextlib.contextmanager
def streaming_only():
    """Within this block every product streams its weights, whatever its rows (the path before this module):
    benchmarks and tests of both on one machine."""
    global _off
    saved, _off = _off, True
    try:
        yield
    finally:
        _off = saved


@contextlib.contextmanager
def bf16_for_fp32(on: bool = True):
    """Within this block a float32 model's many-row products multiply in bf16 where the CPU has it
    (CSM_PREFILL_BF16=1's choice)."""
    global _bf16_for_fp32
    saved, _bf16_for_fp32 = _bf16_for_fp32, on
    try:
        yield
    finally:
        _bf16_for_fp32 = saved
