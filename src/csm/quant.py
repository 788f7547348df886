"""Weight-only quantization for inference: int8 per output channel, int4 group-wise, and 16-bit weights
(bf16 or fp16) under a float32 model.

Decoding csm-1b on a CPU is bound by streaming its weights from memory, so reading 2 (bf16, fp16), 1 (int8)
or ~0.6 (int4) bytes per weight instead of 4 (fp32) is the speed-up. On x86 CPUs with AVX2 (and no AMX) the
products run csm's own kernels (csm/cpu_kernels.py): 16-bit weights are converted in registers as they are
read; int8 and int4 weights meet the activations quantized to int8 per block of 32 (llama.cpp's q8_0) in
integer multiply-adds, ~0.5% of each product's size in error; elsewhere, and when those cannot be built, PyTorch's
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`: on x86 vectorized for bf16 activations
only, so activations enter them in bf16).

What is quantized (every scheme): the linear layers of the backbone's and the depth decoder's transformer blocks and the
depth decoder's input projector (BENCHMARKS.md, "Quantized weights"); under int8 and int4 also the
codebook-0 head (`lm_head`) and the depth decoder's codebook heads (one layer `heads.{i}` per codebook, read
once per depth pass: 8x fewer bytes than fp32 under int4), as llama.cpp's q8_0/q4_0 do. Embeddings
(gathered, not streamed) and the codec stay as they are; 16-bit schemes keep the heads in the model's dtype.

Serialized layout (safetensors, next to `config.json`'s `quantization` entry), for a linear `name` with a
weight (N, K):
- int8: `name.qweight` int8 (N, K) and `name.scales` bf16 (N,): w = qweight * scales.
- int4: `name.qweight` uint8 (N, K/2), the even k in the low nibble and the odd k in the high one, q in
  0..15; `name.scales` and `name.zeros` bf16 (N, K/group_size): w = (q - 8) * scales + zeros per group of
  `group_size` consecutive k. In memory it stays in this layout for csm's kernels, or is kept in PyTorch's
  packed layout, which depends on the machine's vector width; the file keeps the portable one.
- bf16 / fp16: `name.weight` in that dtype (N, K), the ordinary layout, whatever the model's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels, gemm
from .checkpoint import CheckpointError

SIXTEEN_BIT = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCHEMES = ("int8", "int4", *SIXTEEN_BIT)
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel takes
DEFAULT_GROUP_SIZE = 32
FORMAT = "csm-weight-only-1"
ALIGN = 64
aten = torch.ops.aten


@dataclass
class QuantConfig:
    """A quantization scheme and the modules it applies to (recorded in config.json as `quantization`)."""

    scheme: str
    group_size: int | None = None
    modules: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.scheme != "int4":
            if self.group_size is not None:
                raise ValueError(f"group_size is for int4; {self.scheme} has no groups")
        elif self.group_size is None:
            self.group_size = DEFAULT_GROUP_SIZE
        elif self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}"
            )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "scheme": self.scheme,
            "group_size": self.group_size,
            "modules": self.modules,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> QuantConfig:
        if d.get("format") != FORMAT:
            raise ValueError(
                f"{source}: quantization format {d.get('format')!r} is not one this csm reads ({FORMAT!r})"
            )
        return cls(d["scheme"], d.get("group_size"), list(d.get("modules", [])))


def check_supported(scheme: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Raise a ValueError naming what to change when `scheme` cannot run on `device` with `dtype` (None:
    not known yet)."""
    device = torch.device(device)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme in SIXTEEN_BIT and device.type != "cpu":
        raise ValueError(
            f"{scheme} weights under a float32 model are a CPU layout; on {device.type} load the model with "
            f"dtype=torch.{SIXTEEN_BIT[scheme]} instead"
        )
    if device.type == "cpu":
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                f"quantized weights on CPU need a float32 or bfloat16 model, not {dtype}; pass dtype=torch.bfloat16"
            )
        op = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}.get(scheme)
        if op is not None and not hasattr(aten, op):
            raise ValueError(
                f"{scheme} on CPU needs torch >= 2.6 (aten.{op}); this is torch {torch.__version__}"
            )
        return
    if device.type == "cuda" and scheme == "int8":
        raise ValueError(
            "int8 weights are refused on CUDA: there bfloat16 is faster (an H200 graphed step took 30.3 ms a "
            "frame with int8 against 15.7 with bf16, BENCHMARKS.md); load without quantize and with "
            "dtype=torch.bfloat16, or quantize for the CPU"
        )
    raise ValueError(
        f"{scheme} weights are not supported on {device.type}: int8 and int4 run on the CPU; load without "
        "quantize, or on the CPU"
    )


def _inference_only(module: nn.Module) -> None:
    """Refuse training: quantized weights are buffers, so an optimizer would silently leave them as they are."""
    if module.training and torch.is_grad_enabled():
        raise RuntimeError(
            "quantized weights are for inference only: they have no gradients and cannot be fine-tuned; "
            "fine-tune the full-precision checkpoint, then quantize it (or call model.eval())"
        )


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the CPU kernels read it: 2-D, contiguous, bf16, 64-byte aligned (the int8 kernel uses aligned
    vector loads)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    if torch.compiler.is_compiling() or x.data_ptr() % ALIGN == 0:  # compiled code allocates aligned
        return x
    return x.clone()


def _use_kernels(x: torch.Tensor) -> bool:
    """Whether csm's CPU kernels run this product: on the CPU, outside torch.compile (which traces PyTorch's
    ops instead of calling into the extension)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and cpu_kernels.available()


# ---- quantizing a matrix ------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric int8 per output channel: {"qweight": int8 (N, K), "scales": bf16 (N,)}."""
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).to(torch.bfloat16)  # rounded first, so q is chosen for the scale used
    s = scales.float().where(scales > 0, 1.0)[:, None]
    q = (w / s).round_().clamp_(-128, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def quantize_int4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input channels (the kernel's convention: w = (q - 8) * s + z).
    Returns {"qweight": uint8 (N, K/2), "scales": bf16 (N, K/g), "zeros": bf16 (N, K/g)}."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    s = scales.float().where(scales > 0, 1.0)[..., None]
    q = ((w - zeros.float()[..., None]) / s + 8).round_().clamp_(0, 15).to(torch.uint8).view(N, K)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales, "zeros": zeros}


def dequantize(tensors: dict[str, torch.Tensor], group_size: int | None = None) -> torch.Tensor:
    """The fp32 weight (N, K) the serialized tensors stand for (tests and accuracy reports)."""
    q = tensors["qweight"]
    if q.dtype == torch.int8:
        return q.float() * tensors["scales"].float()[:, None]
    nibbles = torch.stack([q & 15, q >> 4], -1).view(q.shape[0], -1).float()  # (N, K)
    expand = lambda t: t.float().repeat_interleave(group_size, 1)  # noqa: E731
    return (nibbles - 8) * expand(tensors["scales"]) + expand(tensors["zeros"])


# ---- the int4 kernel's packed layout --------------------------------------------------------------------

PROBE_ROWS = 64  # a multiple of every packing block torch uses (64 AVX-512, 32 AVX2, 2 otherwise)


def pack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Portable nibbles (N, K/2) -> the CPU kernel's packed layout (N, K/2), via torch's own converter."""
    N = qweight.shape[0]
    q = torch.stack([qweight & 15, qweight >> 4], -1).view(N, -1).int()
    return aten._convert_weight_to_int4pack_for_cpu(q, 1)


@functools.lru_cache(maxsize=8)
def _nibble_sources(rows: int, K: int) -> torch.Tensor:
    """For each nibble of torch's packed layout of a (rows, K) matrix, the row-major index of the weight it
    holds. Learnt by packing probe matrices whose entries spell out their own index, 4 bits at a time, so
    it follows whatever layout this torch and CPU use."""
    index = torch.arange(rows * K)
    source = torch.zeros(rows * K, dtype=torch.long)
    for shift in range(0, max(1, (rows * K - 1).bit_length()), 4):
        packed = aten._convert_weight_to_int4pack_for_cpu(((index >> shift) & 15).int().view(rows, K), 1)
        source |= torch.stack([packed & 15, packed >> 4], -1).view(-1).long() << shift
    return source


@functools.lru_cache(maxsize=8)
def _block_layout(rows: int, K: int) -> tuple[int, torch.Tensor] | None:
    """(R, order) when torch packs blocks of R rows k by k, nibble j of each k holding row order[j] of its
    block (what its AVX2, AVX-512 and plain layouts do): unpacking is then a transpose and a row reorder."""
    source = _nibble_sources(rows, K)
    for R in (64, 32, 16, 8, 4, 2):
        if rows % R:
            continue
        grid = source.view(rows // R, K, R)
        order = grid[0, 0] // K
        blocks = torch.arange(rows // R)[:, None, None] * R
        if sorted(order.tolist()) == list(range(R)) and torch.equal(
            grid, (blocks + order) * K + torch.arange(K)[None, :, None]
        ):
            return R, torch.argsort(order)
    return None


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The CPU kernel's packed layout (N, K/2) -> q (N, K), values 0..15."""
    N = packed.shape[0]
    rows = PROBE_ROWS if N % PROBE_ROWS == 0 else N  # torch packs block by block of rows
    nibbles = torch.stack([packed & 15, packed >> 4], -1)
    layout = _block_layout(rows, K)
    if layout is not None:
        R, rows_of = layout  # nibble j of block b at k holds row order[j]: row r is nibble argsort(order)[r]
        return nibbles.view(N // R, K, R).transpose(1, 2).index_select(1, rows_of).reshape(N, K)
    nibbles = nibbles.view(N // rows, -1)
    return torch.empty_like(nibbles).index_copy_(1, _nibble_sources(rows, K), nibbles).view(N, K)


# ---- modules --------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one bf16 scale per output channel (inference only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        t = quantize_int8(weight)
        self.qweight, self.scales = t["qweight"].to(weight.device), t["scales"].to(weight.device)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K) this layer stands for."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _inference_only(self)
        dtype = gemm.many_rows(x, "int8")
        if dtype is not None:  # a prompt's rows: a GEMM on the weights widened tile by tile
            y = gemm.tiled_linear(x, self.out_features, gemm.int8(self.qweight), dtype)
            y = (y * self.scales.to(dtype)).to(x.dtype)
        elif _use_kernels(x):
            y = cpu_kernels.linear(x, self.qweight, "int8", self.scales.to(torch.bfloat16))
        elif x.device.type == "cpu":
            y = aten._weight_int8pack_mm(_kernel_input(x), self.qweight, self.scales.to(torch.bfloat16))
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # CUDA: gpt-fast's formulation, which torch.compile fuses into one kernel (untested here)
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """A linear layer with int4 weights, a bf16 scale and zero per group of input channels (CPU, inference
    only). For csm's kernels it keeps the portable layout (`packed` the portable nibbles, `scales_and_zeros`
    (2, N, K/g)); for PyTorch's, that kernel's packed layout and (K/g, N, 2). Its state dict holds the
    portable one (module docstring)."""

    portable_layout = False  # which of the two layouts `packed` and `scales_and_zeros` hold

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        kw = dict(device=device)
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, **kw))
        self.register_buffer(
            "scales_and_zeros", torch.empty(groups, out_features, 2, dtype=torch.bfloat16, **kw)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        self.set_portable(quantize_int4(weight, self.group_size))

    def set_portable(self, t: dict[str, torch.Tensor]) -> None:
        """Adopt portable tensors (see `quantize_int4`), in the layout of the kernel this machine runs."""
        # PyTorch's int4 packing takes N a multiple of 16 only (a 2051-row head is not): others keep the
        # portable layout and, without csm's kernels, the product with the dequantized weight
        self.portable_layout = cpu_kernels.available() or self.out_features % 16 != 0
        if self.portable_layout:
            self.packed = t["qweight"].contiguous()
            self.scales_and_zeros = torch.stack([t["scales"], t["zeros"]]).to(torch.bfloat16)
        else:
            self.packed = pack_int4(t["qweight"])
            self.scales_and_zeros = torch.stack([t["scales"], t["zeros"]], -1).transpose(0, 1).contiguous()

    def portable(self) -> dict[str, torch.Tensor]:
        if self.packed.is_meta:
            N, G = self.out_features, self.in_features // self.group_size
            meta = lambda shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
            return {"qweight": meta((N, self.in_features // 2), torch.uint8),
                    "scales": meta((N, G), torch.bfloat16), "zeros": meta((N, G), torch.bfloat16)}  # fmt: skip
        if self.portable_layout:
            return {
                "qweight": self.packed,
                "scales": self.scales_and_zeros[0],
                "zeros": self.scales_and_zeros[1],
            }
        q = unpack_int4(self.packed, self.in_features)
        qweight = q[:, 0::2] | (q[:, 1::2] << 4)
        if not torch.equal(pack_int4(qweight), self.packed):
            raise RuntimeError(
                "could not read back torch's int4 packed layout; please report this torch version"
            )
        sz = self.scales_and_zeros.transpose(0, 1)
        return {
            "qweight": qweight,
            "scales": sz[..., 0].contiguous(),
            "zeros": sz[..., 1].contiguous(),
        }

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K) this layer stands for."""
        N, K, g = self.out_features, self.in_features, self.group_size
        if self.portable_layout:
            q = torch.stack([self.packed & 15, self.packed >> 4], -1).view(N, K // g, g).float()
            scales, zeros = self.scales_and_zeros.float()[..., None]  # (N, K/g, 1) each
            return q.mul_(scales).add_(zeros - 8 * scales).view(N, K)
        w = unpack_int4(self.packed, K).view(N, K // g, g).float()
        sz = self.scales_and_zeros.float().transpose(0, 1)  # (N, K/g, 2)
        scales, zeros = sz[..., :1], sz[..., 1:]
        return w.mul_(scales).add_(zeros - 8 * scales).view(N, K)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.portable().items():
            destination[prefix + name] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        names = ("qweight", "scales", "zeros") + (("bias",) if self.bias is not None else ())
        absent = [prefix + n for n in names if prefix + n not in state_dict]
        if absent:
            missing.extend(absent)
            return
        self.set_portable({n: state_dict[prefix + n] for n in names[:3]})
        if self.bias is not None:
            self.bias = nn.Parameter(state_dict[prefix + "bias"], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _inference_only(self)
        if x.device.type != "cpu":
            raise RuntimeError("int4 weights run on the CPU only; move the model to the CPU or use int8")
        dtype = gemm.many_rows(x, "int4")
        if dtype is not None:  # a prompt's rows: a GEMM on the weights widened tile by tile
            if self.portable_layout:
                (scales, zeros), unpack = self.scales_and_zeros, None
            else:
                sz = self.scales_and_zeros.transpose(0, 1)  # (N, K/g, 2)
                scales, zeros = sz[..., 0], sz[..., 1]
                unpack = functools.partial(unpack_int4, K=self.in_features)
            tile = gemm.int4(self.packed, scales, zeros, self.group_size, unpack)
            y = gemm.tiled_linear(x, self.out_features, tile, dtype).to(x.dtype)
        elif self.portable_layout and _use_kernels(x):
            sz = self.scales_and_zeros.to(torch.bfloat16)
            y = cpu_kernels.linear(x, self.packed, "int4", sz[0], sz[1], self.group_size)
        elif self.portable_layout:  # csm's kernels turned off after loading
            y = F.linear(x.float(), self.dequantized()).to(x.dtype)
        else:
            sz = self.scales_and_zeros.to(torch.bfloat16)
            y = aten._weight_int4pack_mm_for_cpu(_kernel_input(x), self.packed, self.group_size, sz)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group_size={self.group_size}"


class Linear16(nn.Module):
    """A linear layer whose weight is kept in 16 bits (bf16 or fp16) under a float32 or bfloat16 model: csm's
    CPU kernels convert it in registers as they read it, so a float32 model reads half its bytes and keeps
    float32 activations (inference only)."""

    def __init__(
        self, in_features: int, out_features: int, weight_dtype, bias: bool = False, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=weight_dtype, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach().to(self.weight.dtype, copy=True).contiguous()

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _inference_only(self)
        w = self.weight
        dtype = gemm.many_rows(x, "fp16" if w.dtype == torch.float16 else "bf16")
        if dtype is not None:  # a prompt's rows: a GEMM (on the weights widened tile by tile to fp32)
            return gemm.linear_16bit(x, w, dtype, self.bias).to(x.dtype)
        elif w.dtype in (torch.bfloat16, torch.float16) and _use_kernels(x):
            y = cpu_kernels.linear(x, w, w.dtype)
        elif w.dtype == torch.float16:
            y = F.linear(x.float(), w.float()).to(x.dtype)
        else:  # a few rows without csm's kernels: oneDNN's bf16 product
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}"


class QuantizedHeads(nn.Module):
    """The depth decoder's codebook heads (CsmCodebooksHead, a (K-1, D, V) weight) quantized: one int8 or
    int4 linear layer (V, D) per codebook, `heads.{i}`, each read through csm's kernels in a frame's pass
    (inference only). Its state dict holds each head's quantized tensors (module docstring)."""

    def __init__(
        self, hidden_size: int, num_codebooks: int, vocab_size: int, config: QuantConfig, device=None
    ):
        super().__init__()
        self.heads = nn.ModuleList(
            make_linear(nn.Linear(hidden_size, vocab_size, bias=False, device="meta"), config)
            for _ in range(num_codebooks - 1)
        )
        if device is not None and torch.device(device).type != "meta":
            self.heads.to_empty(device=device)

    def logits(self, h: torch.Tensor, codebook: int) -> torch.Tensor:
        """Logits (N, V) of one codebook (1..K-1) from h (N, D)."""
        return self.heads[codebook - 1](h)

    def forward(self, h: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """h (N, T, D), codebooks (T,) in 1..K-1 -> logits (N, T, V)."""
        return torch.stack([self.heads[int(c) - 1](h[:, t]) for t, c in enumerate(codebooks.tolist())], 1)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (K-1, D, V) these heads stand for, in CsmCodebooksHead's layout."""
        return torch.stack([head.dequantized().t() for head in self.heads])


def make_heads(module: nn.Module, config: QuantConfig) -> QuantizedHeads:
    """Quantized heads standing in for a CsmCodebooksHead: empty on the meta device, else from its weight."""
    w = module.weight  # (K-1, D, V)
    q = QuantizedHeads(w.shape[1], w.shape[0] + 1, w.shape[2], config)
    q.train(module.training)
    if not w.is_meta:
        q.heads.to_empty(device=w.device)
        with torch.no_grad():
            for head, weight in zip(q.heads, w):
                head.set_weight(weight.t().contiguous())
    return q


def make_linear(linear: nn.Linear, config: QuantConfig) -> nn.Module:
    """A quantized module standing in for `linear`: empty on the meta device, else from its weight."""
    w = linear.weight
    kw = dict(bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    if config.scheme in SIXTEEN_BIT:
        q = Linear16(linear.in_features, linear.out_features, SIXTEEN_BIT[config.scheme], **kw)
    elif config.scheme == "int8":
        q = Int8Linear(linear.in_features, linear.out_features, **kw)
    else:
        q = Int4Linear(linear.in_features, linear.out_features, config.group_size, **kw)
    q.train(linear.training)
    if not w.is_meta:
        with torch.no_grad():
            q.set_weight(w)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q


# ---- which modules ----------------------------------------------------------------------------------------


def fits_kernel(out_features: int, in_features: int, config: QuantConfig) -> bool:
    """Whether the CPU kernels take this shape (the int8 one reads 16 input channels at a time, the int4 one
    packs blocks of 16 output channels and groups of `group_size` inputs; csm's read 16 inputs at a time)."""
    if config.scheme != "int4":
        return in_features % 16 == 0
    return out_features % 16 == 0 and in_features % config.group_size == 0


HEADS = ("lm_head", "depth_decoder.codebooks_head")  # quantized under int8 and int4 (read every frame)


def choose_modules(model: nn.Module, config: QuantConfig) -> list[str]:
    """The linear layers `config.scheme` quantizes in a CsmForConditionalGeneration (module docstring)."""
    scopes = ("backbone_model.layers.", "depth_decoder.model.")
    chosen = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and name.startswith(scopes)
        and fits_kernel(m.out_features, m.in_features, config)
    ]
    if config.scheme in ("int8", "int4"):  # the heads too: their rows need not be a multiple of 16
        for name in HEADS:
            m = model.get_submodule(name) if hasattr(model, name.split(".")[0]) else None
            w = getattr(m, "weight", None)  # lm_head (V, D), the codebook heads (K-1, D, V)
            k = None if w is None else w.shape[1]
            if k is not None and k % 16 == 0 and (config.scheme == "int8" or k % config.group_size == 0):
                chosen.append(name)
    return chosen


def quantize_modules(model: nn.Module, config: QuantConfig) -> None:
    """Replace each module named in `config.modules` by its quantized form, one at a time (so only one
    full-precision matrix is ever copied), dropping its full-precision weight and any prepacked copy."""
    for name in config.modules:
        m = model.get_submodule(name)
        model.set_submodule(name, make_heads(m, config) if m.weight.dim() == 3 else make_linear(m, config))


# ---- loading --------------------------------------------------------------------------------------------


def auto_scheme(stored: dict | None, stored_dtype: torch.dtype | None, device, dtype) -> str | None:
    """What quantize="auto" loads: where csm's CPU kernels run, a float32 model of a checkpoint stored in bf16
    or fp16 keeps those weights in 16 bits ("bf16", "fp16"): the same numbers, half the bytes to read, ~2.6x
    fp32's frames (BENCHMARKS.md); anything else (another device or dtype, a quantized checkpoint, no
    kernels) loads as asked, with None."""
    if stored is not None or torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    scheme = {v: k for k, v in SIXTEEN_BIT.items()}.get(stored_dtype)
    return scheme if scheme is not None and cpu_kernels.available() else None


def quant_config(
    cls, config, stored: dict | None, scheme: str | None, group_size, source
) -> QuantConfig | None:
    """The quantization a load ends with: the checkpoint's own, or the one asked for (its modules chosen on
    a model built on the meta device)."""
    if stored is not None:
        quant = QuantConfig.from_dict(stored, str(source))
        if scheme is not None and (scheme, group_size or quant.group_size) != (
            quant.scheme,
            quant.group_size,
        ):
            asked = scheme + (f" (group_size {group_size})" if group_size else "")
            raise CheckpointError(
                f"{source.parent} is already quantized ({quant.scheme}, group_size {quant.group_size}); it cannot "
                f"be loaded as {asked}: load it without quantize=, or quantize its full-precision checkpoint"
            )
        return quant
    if scheme is None:
        if group_size is not None:
            raise ValueError("group_size is for int4 quantization: pass quantize='int4' too")
        return None
    quant = QuantConfig(scheme, group_size)
    with torch.device("meta"):
        quant.modules = choose_modules(cls(config), quant)
    return quant


def quantizing_transform(quant: QuantConfig, dtype: torch.dtype | None = None):
    """A load_safetensors transform that replaces each chosen module's weight by its quantized tensors as
    it is read. Every other tensor gets memory of its own (in `dtype` when given), so that nothing keeps the
    file's mapping, and with it the full-precision weights read through it, resident."""
    targets = set(quant.modules)

    def transform(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        module = name.removesuffix(".weight")
        if module == name or module not in targets:
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                return {name: tensor.to(dtype)}
            return {name: tensor.clone()}
        if quant.scheme in SIXTEEN_BIT:
            return {name: tensor.to(SIXTEEN_BIT[quant.scheme], copy=True)}

        def quantized(w):
            return quantize_int8(w) if quant.scheme == "int8" else quantize_int4(w, quant.group_size)

        if tensor.dim() == 3:  # codebook heads (K-1, D, V): one (V, D) layer each
            return {
                f"{module}.heads.{i}.{k}": v
                for i, head in enumerate(tensor)
                for k, v in quantized(head.t().contiguous()).items()
            }
        return {f"{module}.{k}": v for k, v in quantized(tensor).items()}

    return transform
