"""The Llama block shared by the backbone and the depth decoder: RMSNorm, RoPE, attention with a static KV cache, MLP."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import cpu_kernels, gemm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 and rounded once to x's dtype (rms_norm upcasts inside), then scaled: the
        # reference's order, which matters in bf16, without its two casts.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    """Inverse frequencies for plain RoPE or Llama-3 scaled RoPE, in fp32."""
    theta = float(params.get("rope_theta", 500000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = params.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r} is not supported; CSM uses 'default' or 'llama3'")
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """The rotation of every position (see `apply_rope`), computed once per dtype and looked up per step."""

    def __init__(self, head_dim: int, params: dict, max_positions: int):
        super().__init__()
        self.head_dim, self.params, self.max_positions = head_dim, params, max_positions
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.compute_buffers(self.inv_freq.device)

    def compute_buffers(self, device) -> None:
        """Fill the non-persistent buffer; also called after loading a model built on the meta device."""
        self.inv_freq = rope_inverse_frequencies(self.head_dim, self.params).to(device)
        self.tables: dict[torch.dtype, torch.Tensor] = {}

    def table(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.tables or self.tables[dtype].device != self.inv_freq.device:
            freqs = (
                torch.arange(self.max_positions, device=self.inv_freq.device).float()[:, None] * self.inv_freq
            )
            # fp32 then cast, as the reference does per call
            self.tables[dtype] = rotation(freqs.cos(), freqs.sin()).to(dtype)
        return self.tables[dtype]

    def cover(self, num_positions: int) -> None:
        """Grow the tables to hold positions 0..num_positions-1, past max_position_embeddings if need be
        (the reference computes any position); the frame loop never asks for more than the table holds."""
        if num_positions > self.max_positions:
            self.max_positions = num_positions
            self.tables = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rotations (..., T, 2, 2, head_dim / 2) for `positions` (T,) or (B, T), in `dtype`."""
        return self.table(dtype)[positions]


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos and sin (..., D/2) of each frequency's angle -> its rotation matrix (..., 2, 2, D/2), [out][in]."""
    return torch.stack([torch.stack([cos, -sin], -2), torch.stack([sin, cos], -2)], -3)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by `rot` (T, 2, 2, D/2) or (B, T, 2, 2, D/2) from `rotation`.

    The reference's rotate-half layout pairs x_i with x_{i+D/2}: seen as pairs, x turns with one product
    and one sum of two, the same arithmetic (and roundings) as x * cos + rotate_half(x) * sin without its
    negation and concatenation: two kernels instead of five.
    """
    B, T, H, D = x.shape
    pairs = x.view(B, T, H, 1, 2, D // 2)
    return (pairs * rot.unsqueeze(-4)).sum(-2).view(B, T, H, D)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the 0 / -inf scores attention adds, made once per step
    instead of by every layer's attention."""
    return torch.where(mask, 0.0, float("-inf")).to(dtype)


# ---- prepacked weights for CPU inference ------------------------------------------------------------

PACK_MIN_NUMEL = 1 << 18  # below ~256 x 1024, oneDNN's call overhead eats what faster streaming saves
PACK_BATCH_HINT = 8  # the layout chosen for 8 rows also serves 1 row at full speed (bench/bench_generate.py)
# The frame loop does not pack fp32 weights: oneDNN reads a plain fp32 weight as fast as its prepacked
# copy at one row and within 1.0-1.45x of it at eight (0.98-1.03x with AVX2 only), and the copy would
# double the model's memory (BENCHMARKS.md). `prepack(..., fp32=True)` still packs them on request. bf16
# has no such plain path (oneDNN's plain bf16 product is aten's), so bf16 packs where oneDNN runs it.


# From this many rows (a prompt's prefill), a CPU with bf16 arithmetic (avx512_bf16, AMX) multiplies bf16
# faster in oneDNN's GEMM than csm's kernels, which compute in fp32 (BENCHMARKS.md, "csm's CPU kernels").
NATIVE_BF16_ROWS = 16


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can run this weight prepacked: a CPU fp32 weight, or bf16 where the CPU has bf16."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:  # where csm's kernels run, they stream it without a copy
        return native_bf16() and not cpu_kernels.available()
    return weight.dtype == torch.float32


class PackedWeight:
    """A oneDNN-prepacked copy of `source` (or of matrices derived from it), valid while `source` (a tensor
    or a tuple of them) is neither changed in place nor replaced: an optimizer step, a load or a move makes
    it stale."""

    def __init__(self, source: torch.Tensor | tuple[torch.Tensor, ...], matrices: list[torch.Tensor]):
        self.key = self.version(source)
        self.tensors = [torch.ops.mkldnn._reorder_linear_weight(m, PACK_BATCH_HINT) for m in matrices]

    @staticmethod
    def version(source: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple:
        if isinstance(source, tuple):
            return tuple(PackedWeight.version(t) for t in source)
        if source.is_inference():  # no version counter: made under inference_mode, changed only there
            return source.data_ptr(), None
        return source.data_ptr(), source._version

    def usable(self, source: torch.Tensor | tuple[torch.Tensor, ...], x: torch.Tensor) -> bool:
        dtype = source[0].dtype if isinstance(source, tuple) else source.dtype
        return (
            not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and x.dtype == dtype
            and self.key == self.version(source)
        )


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN, from a prepacked weight or from a plain one (`onednn_reads_plain`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_reads_plain(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `packed_linear` runs on this weight as it is: a large contiguous fp32 CPU weight, inference.

    oneDNN streams a plain fp32 weight at one row 1.2-1.6x faster than `F.linear` and faster than its own
    prepacked copy (and at eight rows 1.7-2.4x faster than `F.linear`), holding no copy (BENCHMARKS.md).
    """
    return (
        weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.numel() >= PACK_MIN_NUMEL
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available()
    )


def sixteen_bit_kernel(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether csm's CPU kernels run this product (csm/cpu_kernels.py): a bf16 or fp16 CPU weight at
    inference, where they are in use (x86 with AVX2, no AMX), except a bf16 prefill where the CPU has bf16
    arithmetic. PyTorch's own bf16 product converts the weight through a slow path at a third of the
    memory's speed without it, and streams ~1.2x slower than these with it (BENCHMARKS.md)."""
    return (
        weight.dtype in (torch.bfloat16, torch.float16)
        and weight.device.type == "cpu"
        and weight.shape[-1] % 16 == 0
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and cpu_kernels.available()
        and not (
            weight.dtype == torch.bfloat16 and x.numel() >= NATIVE_BF16_ROWS * x.shape[-1] and native_bf16()
        )
    )


def linear_16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = cpu_kernels.linear(x, weight, weight.dtype)
    return y if bias is None else y + bias


SIXTEEN_BIT_SCHEMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def fastest_linear(x, weight, bias, packed: PackedWeight | None, source) -> torch.Tensor:
    """x @ weight.T (+ bias) by the fastest path that can run it: a valid prepacked copy (`source` is what
    it stays valid with), oneDNN on the plain fp32 weight, a GEMM for a 16-bit weight's many rows (csm.gemm),
    csm's 16-bit kernels, else `F.linear`."""
    if packed is not None and packed.usable(source, x):
        return packed_linear(x, packed.tensors[0], bias)
    if onednn_reads_plain(weight, x):
        return packed_linear(x, weight, bias)
    scheme = SIXTEEN_BIT_SCHEMES.get(weight.dtype)
    dtype = gemm.many_rows(x, scheme) if scheme is not None and weight.device.type == "cpu" else None
    if dtype is not None:
        return gemm.linear_16bit(x, weight, dtype, bias).to(x.dtype)
    if sixteen_bit_kernel(weight, x):
        return linear_16(x, weight, bias)
    return F.linear(x, weight, bias)


class Packable:
    """Mixin for a module that keeps a PackedWeight in `packed`: copies and pickles leave it out
    (oneDNN tensors can be neither), and the copy packs again when asked."""

    packed: PackedWeight | None = None

    def pack(self) -> None:
        """Pack `self.weight` (as `matrices_to_pack` splits it) unless a valid pack is already there."""
        w, source = self.weight, self.pack_source()
        if packable(w) and (self.packed is None or self.packed.key != PackedWeight.version(source)):
            self.packed = PackedWeight(source, self.matrices_to_pack(w.detach()))

    def pack_source(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What a pack stays valid with (see PackedWeight)."""
        return self.weight

    def matrices_to_pack(self, weight: torch.Tensor) -> list[torch.Tensor]:
        return [weight]

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k != "packed"}


class Linear(Packable, nn.Linear):
    """nn.Linear that can run inference from a oneDNN-prepacked copy of its weight (`pack()`).

    On CPU the matrix-vector products of decoding stream a prepacked weight 2-3x faster than the default
    GEMM (BENCHMARKS.md). The copy costs the weight's memory once more; it is used only with autograd off
    and outside torch.compile, and is ignored as soon as the weight changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fastest_linear(x, self.weight, self.bias, self.packed, self.weight)


def prepack(module: nn.Module, min_numel: int | None = None, fp32: bool = True) -> None:
    """Pack every `Linear` (and anything else with a `pack()`) under `module` whose weight has at least
    `min_numel` (default PACK_MIN_NUMEL) elements, fp32 ones only with `fp32`. Packs that are still valid
    are kept. The layers of a FusedLinear are packed as one."""
    min_numel = PACK_MIN_NUMEL if min_numel is None else min_numel
    fused = {
        id(p)
        for m in module.modules()
        if isinstance(m, FusedLinear) and m.weight is not None
        for p in m.parts
    }
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if hasattr(m, "pack") and weight is not None and weight.numel() >= min_numel and id(m) not in fused:
            if fp32 or weight.dtype != torch.float32:
                m.pack()


def unpack(module: nn.Module) -> None:
    """Drop every prepacked copy under `module`, freeing its memory."""
    for m in module.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = None


# ---- fused projections --------------------------------------------------------------------------------


class FusedLinear(Packable, nn.Module):
    """Linear layers that read the same input (q/k/v, gate/up) run as one matrix product.

    `fuse(parts)` moves the layers' weights (and biases) into one buffer, (sum of N, K), and makes each
    layer's weight a view of its rows: no memory is added, and the layers stay as they were for everything
    else. The buffer is not saved (checkpoints keep one key per layer), LoRA and quantization replace the
    layers as before, and an in-place change of a layer's weight (an optimizer step) is a change of the
    buffer. The fused product stands in only while the layers and their weight parameters are the ones
    fused and no gradient is asked of them (`serves`, checked per call). The owner fuses again after a move,
    a load or a copy (`Fuses`); `fuse_projections` does after layers were replaced, and every frame engine
    runs it, which also catches a weight given other storage by assigning its `.data`.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.clear()

    def clear(self) -> None:
        self.weight = self.bias = self.packed = None
        self.parts: tuple[nn.Module, ...] = ()
        self.weights: tuple[torch.Tensor, ...] = ()  # the layers' weight parameters, as fused
        self.rows: tuple[int, ...] = ()  # the first row of each layer in the buffer

    def fuse(self, parts: tuple[nn.Module, ...]) -> None:
        """Fuse `parts` (plain Linear layers with the same input size), unless they already are; anything
        else (a quantized or LoRA layer among them) unfuses."""
        if self.serves(parts, for_grad=False) and self.aliased():
            return
        self.clear()
        if not all(type(p) is Linear for p in parts) or len({p.bias is None for p in parts}) > 1:
            return
        sizes = [p.out_features for p in parts]
        with torch.no_grad():
            weight = torch.cat([p.weight.detach() for p in parts])
            for p, w in zip(parts, weight.split(sizes)):
                p.weight.data, p.packed = w, None
            if parts[0].bias is not None:
                self.bias = torch.cat([p.bias.detach() for p in parts])
                for p, b in zip(parts, self.bias.split(sizes)):
                    p.bias.data = b
        self.weight, self.parts = weight, tuple(parts)
        self.weights = tuple(p.weight for p in parts)
        self.rows = tuple(sum(sizes[:i]) for i in range(len(sizes)))

    def serves(self, parts: tuple[nn.Module, ...], for_grad: bool = True) -> bool:
        """Whether the fused product stands for `parts` now: they are the layers fused, with the weight
        parameters fused (`for_grad`: and autograd needs no gradient of them). Cheap: it runs per call;
        `aliased` is checked whenever the owner fuses (built, loaded, moved, copied, or an engine made)."""
        if parts != self.parts:  # () when nothing is fused
            return False
        for p, w in zip(parts, self.weights):
            if p._parameters["weight"] is not w:
                return False
        # A gradient would stop at the buffer: layers being trained run on their own.
        return not (for_grad and torch.is_grad_enabled() and any(w.requires_grad for w in self.weights))

    def aliased(self) -> bool:
        """Whether every layer's weight and bias are still views of their rows of the buffer (an assignment
        to `.data` may have given them storage of their own)."""
        w, b = self.weight, self.bias
        for p, row in zip(self.parts, self.rows):
            if p.weight.data_ptr() != w.data_ptr() + row * w.stride(0) * w.element_size():
                return False
            if b is not None and p.bias.data_ptr() != b.data_ptr() + row * b.element_size():
                return False
        return True

    def pack_source(self) -> tuple[torch.Tensor, ...]:
        # Each layer's weight has a version counter of its own; a new buffer gives them new storage too.
        return self.weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fastest_linear(x, self.weight, self.bias, self.packed, self.pack_source())


class Fuses:
    """Mixin for a module owning FusedLinears (`fuse()` fuses them): fused again after a move (`.to()`), a
    load (`load_state_dict`, hooked in by the owner) and a copy or unpickling."""

    def fuse(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        for m in self.children():  # the layers are converted apart; a converted buffer would be thrown away
            if isinstance(m, FusedLinear):
                m.clear()
        super()._apply(fn, recurse)
        self.fuse()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self.fuse()  # a deep copy clones each parameter on its own


_fuse_on_load = True  # off within `fusing_deferred`


def fuse_after_load(module: nn.Module, incompatible_keys) -> None:
    if _fuse_on_load:
        module.fuse()


@contextlib.contextmanager
def fusing_deferred():
    """Within this block `load_state_dict` leaves the projections unfused. A loader that still holds the
    state dict it loaded uses it, drops the dict, then calls `fuse_projections`: fusing then moves each
    layer's weights into its buffer instead of copying them beside the dict's reference (the whole set of
    q/k/v and gate/up weights once more at the load's peak)."""
    global _fuse_on_load
    saved, _fuse_on_load = _fuse_on_load, False
    try:
        yield
    finally:
        _fuse_on_load = saved


def fuse_projections(module: nn.Module) -> None:
    """(Re)fuse every q/k/v and gate/up under `module` whose layers are plain Linears, unfuse the others
    (call after replacing layers, e.g. merging LoRA or quantizing)."""
    for m in module.modules():
        if isinstance(m, Fuses):
            m.fuse()


def unfuse_projections(module: nn.Module) -> None:
    """Give every layer under `module` a weight of its own again (before sharding parameters, e.g. FSDP)."""
    for m in module.modules():
        if isinstance(m, FusedLinear) and m.weight is not None:
            for p in m.parts:
                p.weight.data = p.weight.detach().clone()
                if p.bias is not None:
                    p.bias.data = p.bias.detach().clone()
            m.clear()


class KVCache(nn.Module):
    """Keys and values preallocated once, written in place at each row's positions."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.rows: tuple[int, int] | None = None  # (start, stop): the rows a step runs (csm.engine.kv_rows)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at `input_pos` (T,) shared by all rows, or (B, T) per row; returns the
        caches (of `rows` only, when set)."""
        k_cache, v_cache = self.k_cache, self.v_cache
        if self.rows is not None:
            start, stop = self.rows
            k_cache, v_cache = k_cache[start:stop], v_cache[start:stop]
        if input_pos.dim() == 1:
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        else:
            index = input_pos[:, None, :, None].expand_as(k)
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
        return k_cache, v_cache


class Attention(Fuses, nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(n_heads * head_dim, dim, bias=bias)
        self.qkv = FusedLinear()
        self.fuse()
        self.register_load_state_dict_post_hook(fuse_after_load)
        self.kv_cache: KVCache | None = None

    def fuse(self) -> None:
        self.qkv.fuse((self.q_proj, self.k_proj, self.v_proj))

    def forward(
        self, x, rot, mask=None, input_pos=None, kv=None, weights: list | None = None
    ) -> torch.Tensor:
        """x (B, T, D), rot the RoPE rotations (`RotaryEmbedding`). Keys and values go through
        `kv(k, v) -> (k, v)` when given (a caller's own cache, e.g. the codec's ring), else through this
        layer's KVCache at `input_pos`. `mask`: boolean (True: attend) or additive, over the keys in use.
        A list passed as `weights` receives the attention weights (B, H, T, S), computed eagerly."""
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        m = self._modules  # the layers as they are now, without Module.__getattr__'s cost per call
        if self.qkv.serves((m["q_proj"], m["k_proj"], m["v_proj"])):
            qkv = self.qkv(x).view(B, T, H + 2 * KV, D)
            qk = apply_rope(qkv[:, :, : H + KV], rot)  # queries and keys turn together
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]
        else:
            q = apply_rope(self.q_proj(x).view(B, T, H, D), rot)
            k = apply_rope(self.k_proj(x).view(B, T, KV, D), rot)
            v = self.v_proj(x).view(B, T, KV, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is not None:
            k, v = kv(k, v)
        elif self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if mask is not None and mask.shape[-1] < k.shape[2]:  # the mask says how much of the cache is in use
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if weights is not None:
            y = eager_attention(q, k, v, mask, weights)
        elif T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu" and mask is not None:
            y = one_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def eager_attention(q, k, v, mask, weights: list) -> torch.Tensor:
    """Attention written out (the reference's "eager" path), for callers that ask for its weights: q (B, H,
    T, D), k, v (B, KV, S, D); mask boolean (True: attend), additive, or None (causal). The weights (B, H, T,
    S) are appended to `weights`; a query with no key left (left padding) gets zeros, as SDPA gives it."""
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1).nan_to_num(0.0).to(q.dtype)
    weights.append(probs)
    return probs @ v


def one_query_attention(q, k, v, mask) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, D), over k, v (B, KV, S, D), grouped-query aware;
    mask is boolean (True: attend) or additive, broadcastable to (B, 1, 1, S).

    Decoding in bf16 on CPU, PyTorch's flash attention costs ~1.7 us per key and row, 5-10x these few
    products (scores in fp32, as flash accumulates them).
    """
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    scores = q.reshape(B, n_kv, H // n_kv, D).float() @ k.float().transpose(-1, -2)
    scores = scores * D**-0.5
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)


class MLP(Fuses, nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.gate_up = FusedLinear()
        self.fuse()
        self.register_load_state_dict_post_hook(fuse_after_load)

    def fuse(self) -> None:
        self.gate_up.fuse((self.gate_proj, self.up_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._modules  # as in Attention.forward
        if self.gate_up.serves((m["gate_proj"], m["up_proj"])):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.attention_bias,
        )
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rot, mask=None, input_pos=None, attentions: list | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rot, mask, input_pos, weights=attentions)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """A stack of decoder layers with final norm and RoPE; embeddings are the subclass's business."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_parameters, cfg.max_position_embeddings)
        self.cfg = cfg
        self.gradient_checkpointing = False

    def setup_caches(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Allocate a KV cache per layer, once; later calls with the same sizes keep it."""
        dtype = dtype or self.norm.weight.dtype
        device = device or self.norm.weight.device
        for layer in self.layers:
            c = layer.self_attn.kv_cache
            if c is not None and c.k_cache.shape[0] == batch_size and c.k_cache.shape[2] == max_seq_len:
                if c.k_cache.dtype == dtype and c.k_cache.device == torch.device(device):
                    continue
            layer.self_attn.kv_cache = KVCache(
                batch_size, max_seq_len, self.cfg.num_key_value_heads, self.cfg.head_dim, dtype, device
            )

    def remove_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def run_layers(
        self, h, positions, mask=None, input_pos=None, hidden_states=None, attentions=None
    ) -> torch.Tensor:
        """Apply every layer and the final norm to h (B, T, D); positions (T,) or (B, T) feed RoPE; mask
        is boolean (True: attend) or additive. A list passed as `hidden_states` receives each layer's
        input, then the final normed state; one passed as `attentions`, each layer's attention weights."""
        rot = self.rotary_emb(positions, h.dtype)
        if mask is not None and mask.dtype == torch.bool:
            mask = additive_mask(mask, h.dtype)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(h)
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, rot, mask, input_pos, use_reentrant=False)
            elif attentions is not None:
                h = layer(h, rot, mask, input_pos, attentions)
            else:
                h = layer(h, rot, mask, input_pos)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return h


def padding_causal_mask(attention_mask: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, T) mask, causal and blind to padded keys; None when nothing is padded.

    A padded query sees no padded key, itself included, as in the reference: a row with no key left
    (left padding) is fully masked, and attention gives it zeros (PyTorch's SDPA since 2.5).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]
