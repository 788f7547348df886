"""The causal sliding-window transformer that Mimi runs on its 25 Hz frames, in encoder and decoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..llama import Attention, Linear, additive_mask, rotation
from .config import MimiConfig
from .streaming import StreamingModule, StreamState

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """RoPE rotations (..., 2, 2, head_dim / 2) at `positions` (...) (see csm.llama.apply_rope), computed
    in float32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim)
    )
    freqs = positions[..., None].float() * inv_freq
    return rotation(freqs.cos(), freqs.sin()).to(dtype)


@dataclass
class KVCache:
    """The last `window` keys and values of every layer, in a ring per row indexed by position % window.

    Each row keeps its own positions, so rows can be streams that started at different times.
    """

    keys: list[torch.Tensor]  # per layer (B, H_kv, window, head_dim)
    values: list[torch.Tensor]
    positions: torch.Tensor  # (B, window) position held by each slot, -1 while empty
    offsets: torch.Tensor  # (B,) position of each row's next frame
    rows: torch.Tensor | None = None  # the rows the current step runs (None: all)
    index: torch.Tensor | None = None  # (rows, 1): those rows as an index, all of them when rows is None
    slots: torch.Tensor | None = None  # (rows, T') ring slots of the current step's newest frames
    later: Callable | None = None  # how the current step writes (StreamState.later); None: at once

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values to attend to (the ring, then the new frames); the newest then enter the ring."""
        ring_k, ring_v = self.keys[layer], self.values[layer]
        if self.rows is not None:
            ring_k, ring_v = ring_k[self.rows], ring_v[self.rows]
        keys, values = torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2)
        newest = self.slots.shape[1]
        # Advanced indices (rows, 1) and (rows, T') around a slice: the indexed dims come first.
        where = (self.index, slice(None), self.slots)
        self.write(self.keys[layer].__setitem__, where, k[:, :, -newest:].transpose(1, 2))
        self.write(self.values[layer].__setitem__, where, v[:, :, -newest:].transpose(1, 2))
        return keys, values

    def write(self, fn: Callable, *args) -> None:
        if self.later is None:
            fn(*args)
        else:
            self.later(partial(fn, *args))

    def reset_rows(self, rows: torch.Tensor) -> None:
        self.positions[rows] = -1
        self.offsets[rows] = 0


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class MLP(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.attention_bias,
        )
        self.mlp = MLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn_layer_scale = LayerScale(config.hidden_size, config.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(config.hidden_size, config.layer_scale_initial_scale)

    def forward(
        self,
        x: torch.Tensor,
        rot: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        kv = None if cache is None else partial(cache.attend, layer)
        h = self.self_attn(self.input_layernorm(x), rot, mask, kv=kv)
        x = x + self.self_attn_layer_scale(h)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(StreamingModule):
    """Pre-norm transformer, causal with a sliding window: frame t attends to frames (t - window, t]."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.layers = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_hidden_layers)])
        self.window = config.sliding_window
        self.head_dim = config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.theta = config.rope_theta

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        T = x.shape[1]
        if stream is not None:
            return self._step(x, stream[self], stream) if T else x
        if T > self.window:
            # Past the window, a window at a time through a ring cache: the same result as one masked
            # pass, in memory and time linear in T instead of quadratic.
            cache = self.init_state(x.shape[0], x.device, x.dtype)
            return torch.cat([self._step(chunk, cache) for chunk in x.split(self.window, dim=1)], dim=1)
        rot = rope(torch.arange(T, device=x.device), self.head_dim, self.theta, x.dtype)
        for layer in self.layers:
            x = layer(x, rot, None)
        return x

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch_size, self.num_kv_heads, self.window, self.head_dim)
        return KVCache(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            positions=torch.full((batch_size, self.window), -1, device=device, dtype=torch.long),
            offsets=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def _step(self, x: torch.Tensor, cache: KVCache, stream: StreamState | None = None) -> torch.Tensor:
        T = x.shape[1]
        rows = None if stream is None else stream.rows
        offsets = cache.offsets if rows is None else cache.offsets[rows]
        positions = offsets[:, None] + torch.arange(T, device=x.device)  # (B, T): each row at its own point
        rot = rope(positions, self.head_dim, self.theta, x.dtype)
        held = cache.positions if rows is None else cache.positions[rows]
        held = torch.cat([held, positions], dim=1)  # positions of the keys attended: ring, then new
        delta = positions[:, :, None] - held[:, None, :]
        mask = ((delta >= 0) & (delta < self.window) & (held[:, None, :] >= 0))[:, None]  # (B, 1, T, S)
        mask = additive_mask(mask, x.dtype)  # once, not per layer
        index = rows if rows is not None else torch.arange(len(offsets), device=offsets.device)
        cache.rows, cache.index, cache.slots = (
            rows,
            index[:, None],
            positions[:, -self.window :] % self.window,
        )
        cache.later = None if stream is None else stream.later
        try:
            for i, layer in enumerate(self.layers):
                x = layer(x, rot, mask, cache, i)
            cache.write(cache.positions.__setitem__, (cache.index, cache.slots), positions[:, -self.window :])
            cache.write(cache.offsets.index_add_, 0, index, torch.full_like(offsets, T))
        finally:
            cache.rows = cache.index = cache.slots = cache.later = None
        return x
