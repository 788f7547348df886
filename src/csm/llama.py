"""The Llama block shared by the backbone and the depth decoder: RMSNorm, RoPE, attention with a static KV cache, MLP."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the reference's order, which matters in bf16.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


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
    """cos/sin tables for every position, computed once per dtype and looked up per step."""

    def __init__(self, head_dim: int, params: dict, max_positions: int):
        super().__init__()
        self.head_dim, self.params, self.max_positions = head_dim, params, max_positions
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.compute_buffers(self.inv_freq.device)

    def compute_buffers(self, device) -> None:
        """Fill the non-persistent buffer; also called after loading a model built on the meta device."""
        self.inv_freq = rope_inverse_frequencies(self.head_dim, self.params).to(device)
        self.tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self.tables or self.tables[dtype][0].device != self.inv_freq.device:
            freqs = (
                torch.arange(self.max_positions, device=self.inv_freq.device).float()[:, None] * self.inv_freq
            )
            emb = torch.cat((freqs, freqs), dim=-1)  # fp32 then cast, as the reference does per call
            self.tables[dtype] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self.tables[dtype]

    def cover(self, num_positions: int) -> None:
        """Grow the tables to hold positions 0..num_positions-1, past max_position_embeddings if need be
        (the reference computes any position); the frame loop never asks for more than the table holds."""
        if num_positions > self.max_positions:
            self.max_positions = num_positions
            self.tables = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` (T,) or (B, T), shaped (..., T, head_dim), in `dtype`."""
        cos, sin = self.table(dtype)
        return cos[positions], sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles in cos/sin (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---- prepacked weights for CPU inference ------------------------------------------------------------

PACK_MIN_NUMEL = 1 << 18  # below ~256 x 1024, oneDNN's call overhead eats what faster streaming saves
PACK_BATCH_HINT = 8  # the layout chosen for 8 rows also serves 1 row at full speed (bench/bench_generate.py)


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can run this weight prepacked: a CPU fp32 weight, or bf16 where the CPU has bf16."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


class PackedWeight:
    """A oneDNN-prepacked copy of `source` (or of matrices derived from it), valid while `source` is
    neither changed in place nor replaced: an optimizer step, a load or a move makes it stale."""

    def __init__(self, source: torch.Tensor, matrices: list[torch.Tensor]):
        self.key = self.version(source)
        self.tensors = [torch.ops.mkldnn._reorder_linear_weight(m, PACK_BATCH_HINT) for m in matrices]

    @staticmethod
    def version(source: torch.Tensor) -> tuple[int, int | None]:
        if source.is_inference():  # no version counter: made under inference_mode, changed only there
            return source.data_ptr(), None
        return source.data_ptr(), source._version

    def usable(self, source: torch.Tensor, x: torch.Tensor) -> bool:
        return (
            not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and x.dtype == source.dtype
            and self.key == self.version(source)
        )


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Packable:
    """Mixin for a module that keeps a PackedWeight in `packed`: copies and pickles leave it out
    (oneDNN tensors can be neither), and the copy packs again when asked."""

    packed: PackedWeight | None = None

    def pack(self) -> None:
        """Pack `self.weight` (as `matrices_to_pack` splits it) unless a valid pack is already there."""
        w = self.weight
        if packable(w) and (self.packed is None or self.packed.key != PackedWeight.version(w)):
            self.packed = PackedWeight(w, self.matrices_to_pack(w.detach()))

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
        if self.packed is not None and self.packed.usable(self.weight, x):
            return packed_linear(x, self.packed.tensors[0], self.bias)
        return F.linear(x, self.weight, self.bias)


def prepack(module: nn.Module, min_numel: int | None = None) -> None:
    """Pack every `Linear` (and anything else with a `pack()`) under `module` whose weight has at least
    `min_numel` (default PACK_MIN_NUMEL) elements; packs that are still valid are kept."""
    min_numel = PACK_MIN_NUMEL if min_numel is None else min_numel
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if hasattr(m, "pack") and weight is not None and weight.numel() >= min_numel:
            m.pack()


def unpack(module: nn.Module) -> None:
    """Drop every prepacked copy under `module`, freeing its memory."""
    for m in module.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = None


class KVCache(nn.Module):
    """Keys and values preallocated once, written in place at each row's positions."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at `input_pos` (T,) shared by all rows, or (B, T) per row."""
        if input_pos.dim() == 1:
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
        else:
            index = input_pos[:, None, :, None].expand_as(k)
            self.k_cache.scatter_(2, index, k)
            self.v_cache.scatter_(2, index, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(n_heads * head_dim, dim, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv=None) -> torch.Tensor:
        """x (B, T, D). Keys and values go through `kv(k, v) -> (k, v)` when given (a caller's own
        cache, e.g. the codec's ring), else through this layer's KVCache at `input_pos`."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv(k, v)
        elif self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if mask is not None and mask.shape[-1] < k.shape[2]:  # the mask says how much of the cache is in use
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu" and mask is not None:
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


def one_query_attention(q, k, v, mask) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, D), over k, v (B, KV, S, D), grouped-query aware;
    mask is boolean, broadcastable to (B, 1, 1, S).

    Decoding in bf16 on CPU, PyTorch's flash attention costs ~1.7 us per key and row, 5-10x these few
    products (scores in fp32, as flash accumulates them).
    """
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    scores = q.view(B, n_kv, H // n_kv, D).float() @ k.float().transpose(-1, -2)
    scores = (scores * D**-0.5).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
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

    def run_layers(self, h, positions, mask=None, input_pos=None, hidden_states=None) -> torch.Tensor:
        """Apply every layer and the final norm to h (B, T, D); positions (T,) or (B, T) feed RoPE.
        A list passed as `hidden_states` receives each layer's input, then the final normed state."""
        cos, sin = self.rotary_emb(positions, h.dtype)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(h)
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, input_pos)
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
