"""Padded 1-d convolutions of SEANet, each usable whole or as a stream."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..llama import PACK_MIN_NUMEL, PackedWeight, onednn_reads_plain, packable, packed_linear
from .derived import derived
from .streaming import StreamingModule, StreamState


def pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad along time; 'reflect' also works on inputs shorter than the padding."""
    if mode == "constant":
        return F.pad(x, (left, right))
    if mode == "replicate":
        return F.pad(x, (left, right), mode="replicate")
    # Reflection needs more samples than the padding: lend it zeros on the right, then cut them off.
    short = max(left, right) - x.shape[-1] + 1
    if short > 0:
        return F.pad(F.pad(x, (0, short)), (left, right), mode="reflect")[..., :-short]
    return F.pad(x, (left, right), mode="reflect")


SHORT_FRAMES = 32  # up to this many output frames (a streamed step), a large conv runs as one product


def short_conv(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias, stride: int = 1):
    """The conv of unpadded x (B, C, T) with weight (O, C, K) (one group, no dilation) as the product of
    x's windows with the (O, C * K) weight, oneDNN-prepacked (plain in fp32); None where that is not the
    faster way.

    For a few output frames PyTorch's CPU conv takes its slow path (~4x the time to read the weight);
    the product streams the weight at memory speed.
    """
    n_out, C, K = weight.shape
    frames = (x.shape[-1] - K) // stride + 1
    if not 0 < frames <= SHORT_FRAMES or weight.numel() < PACK_MIN_NUMEL or torch.is_grad_enabled():
        return None
    if not packable(weight):
        return None
    windows = x.unfold(-1, K, stride).transpose(1, 2).reshape(x.shape[0], frames, C * K)
    if onednn_reads_plain(weight, windows):  # fp32: no copy of the weight (csm.llama)
        return packed_linear(windows, weight.view(n_out, C * K), bias).transpose(1, 2)
    packed = derived(module, "packed", [weight], lambda: PackedWeight(weight, [weight.reshape(n_out, C * K)]))
    return packed_linear(windows, packed.tensors[0], bias).transpose(1, 2)


APART_NEEDS_CONSTANT_PADDING = (
    "streams that start apart need pad_mode='constant' (replicate pads from the start)"
)


@dataclass
class _ConvState:
    previous: torch.Tensor | None  # (B, C_in, T) the input frames the next output still needs
    replicate: bool = False  # padded by the stream's first sample: its rows cannot start apart

    def reset_rows(self, rows: torch.Tensor) -> None:
        if self.replicate:
            raise ValueError(APART_NEEDS_CONSTANT_PADDING)
        self.previous[rows] = 0


class Conv1d(StreamingModule):
    """Conv1d padded as Mimi does: on the left by `kernel - stride` (causal), and on the right up to
    a whole last stride, so T input samples give ceil(T / stride) output frames."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        causal: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias
        )
        self.stride = stride
        self.kernel = (kernel_size - 1) * dilation + 1  # span in samples, dilation included
        self.padding_total = self.kernel - stride
        self.causal = causal
        self.pad_mode = pad_mode

    def output_length(self, length):
        """Output frames for `length` input samples (an int or a tensor of lengths)."""
        return (length + self.stride - 1) // self.stride

    def forward(
        self, x: torch.Tensor, stream: StreamState | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C_in, T). `lengths` (B,): valid samples of each row of a right-padded batch."""
        if stream is not None:
            return self._step(x, stream)
        if lengths is not None and self.stride > 1:
            # A clip's last stride window reaches past its end: alone it sees padding there, in a batch
            # it would see activations computed from the batch padding. Give it what it sees alone.
            x = self._pad_past(x, lengths)
        frames = self.output_length(x.shape[-1])
        if self.causal and self.pad_mode == "constant" and self.padding_total >= self.stride - 1:
            # Zeros on both sides inside the conv, no padded copy of the input; the zeros on the right
            # cover the last stride window, and the frames they add past it are dropped.
            return self._conv(x, self.padding_total)[..., :frames]
        extra = frames * self.stride - x.shape[-1]
        if self.causal:
            left, right = self.padding_total, extra
        else:
            right = self.padding_total // 2
            left, right = self.padding_total - right, right + extra
        return self._conv(pad1d(x, left, right, self.pad_mode), 0)

    def _conv(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        """The conv over x with `padding` zeros on both sides."""
        conv = self.conv
        if padding == 0 and conv.groups == 1 and conv.dilation[0] == 1:
            y = short_conv(self, x, conv.weight, conv.bias, self.stride)
            if y is not None:
                return y
        if conv.out_channels > 1 or conv.groups > 1 or self.stride > 1:
            return F.conv1d(x, conv.weight, conv.bias, self.stride, padding, conv.dilation, conv.groups)
        # One output channel (SEANet's last layer): oneDNN is slow at it, while one matrix-vector
        # product per tap on a shifted view of the input is not.
        d, T = conv.dilation[0], x.shape[-1] + 2 * padding - self.kernel + 1
        y = x.new_zeros(x.shape[0], 1, T) if conv.bias is None else conv.bias.expand(x.shape[0], 1, T).clone()
        for j in range(conv.kernel_size[0]):
            shift = j * d - padding  # output t reads input t + shift
            lo, hi = max(0, -shift), min(T, x.shape[-1] - shift)
            y[..., lo:hi] += torch.matmul(conv.weight[:, :, j], x[..., lo + shift : hi + shift])
        return y

    def _pad_past(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(x.shape[-1], device=x.device) < lengths[:, None]  # (B, T)
        if self.pad_mode == "replicate":
            last = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, x.shape[1], 1)
            return torch.where(valid[:, None], x, x.gather(-1, last))
        return x * valid[:, None].to(x.dtype)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> _ConvState:
        if not self.causal:
            raise ValueError("streaming needs causal convolutions (use_causal_conv=True)")
        if self.pad_mode == "replicate":
            return _ConvState(previous=None, replicate=True)  # filled from the stream's first sample
        return _ConvState(
            previous=torch.zeros(
                batch_size, self.conv.in_channels, self.padding_total, device=device, dtype=dtype
            )
        )

    def _step(self, x: torch.Tensor, stream: StreamState) -> torch.Tensor:
        state: _ConvState = stream[self]
        if state.replicate and stream.rows is not None:
            raise ValueError(APART_NEEDS_CONSTANT_PADDING)
        if state.previous is None:
            if x.shape[-1] == 0:
                return x.new_zeros(x.shape[0], self.conv.out_channels, 0)
            previous = x[..., :1].expand(-1, -1, self.padding_total)
        else:
            previous = stream.take(state.previous)
        x = torch.cat([previous, x], dim=-1)
        if stream.final:
            x = pad1d(x, 0, -(x.shape[-1] - self.padding_total) % self.stride, self.pad_mode)
        frames = max(0, (x.shape[-1] - self.kernel) // self.stride + 1)
        consumed = frames * self.stride
        state.previous = stream.keep(state.previous, x[..., consumed:])  # (a first step runs all rows)
        if frames == 0:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0)
        return self._conv(x[..., : consumed + self.padding_total], 0)


class ConvTranspose1d(StreamingModule):
    """ConvTranspose1d trimmed as Mimi does, so T input frames give T * stride output samples.

    It runs as its polyphase equivalent: output sample t * stride + r is a causal conv over input frames
    t, t-1, ... with the kernel taps r, r + stride, ...; so one conv computes all `stride` phases. CPU
    transposed convolutions are slow on short inputs (a streamed frame), and this also makes streaming
    the same as for `Conv1d`: keep the last input frames.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        causal: bool = True,
        trim_right_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        if not causal and trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1.0 only makes sense for causal convolutions")
        # Holds the weights in the checkpoint's layout and names; forward uses their polyphase form.
        self.conv = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias
        )
        self.stride = stride
        self.groups = groups
        self.taps = math.ceil(kernel_size / stride)  # input frames that reach one output sample
        padding_total = kernel_size - stride
        self.padding_right = math.ceil(padding_total * trim_right_ratio) if causal else padding_total // 2
        self.padding_left = padding_total - self.padding_right
        self.causal = causal

    def polyphase(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (stride * C_out, C_in / groups, taps) and bias of the equivalent causal conv."""
        return derived(self, "polyphase", [self.conv.weight, self.conv.bias], self._polyphase)

    def _polyphase(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.conv.weight, self.conv.bias
        c_in, c_out_g, k = weight.shape  # c_out_g: output channels per group
        s, m, g = self.stride, self.taps, self.groups
        w = F.pad(weight, (0, m * s - k)).view(g, c_in // g, c_out_g, m, s)  # tap r + i*s at [..., i, r]
        # Output channel (group, phase r, channel o); the conv's last tap reads the newest frame (i = 0).
        w = w.permute(0, 4, 2, 1, 3).flip(-1).reshape(g * s * c_out_g, c_in // g, m)
        b = None if bias is None else bias.view(g, 1, c_out_g).expand(g, s, c_out_g).reshape(-1)
        return w.contiguous(), b

    def _run(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        """(B, C_in, T) -> (B, C_out, (T + 2 * padding - taps + 1) * stride), `padding` zero frames each side."""
        weight, bias = self.polyphase()
        z = short_conv(self, x, weight, bias) if padding == 0 and self.groups == 1 else None
        if z is None:
            z = F.conv1d(x, weight, bias, padding=padding, groups=self.groups)  # (B, stride * C_out, frames)
        B, _, T = z.shape
        z = z.view(B, self.groups, self.stride, -1, T).permute(0, 1, 3, 4, 2)
        return z.reshape(B, -1, T * self.stride)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """x: (B, C_in, T) -> (B, C_out, T * stride)."""
        if stream is not None:
            return self._step(x, stream)
        T, s = x.shape[-1], self.stride
        # Zero frames on the left make it causal (taps - 1 of them). Frames past the end matter only
        # when the trim is not all on the right; as many on the right since conv padding is symmetric.
        padding = max(self.taps - 1, -(-self.padding_left // s))
        y = self._run(x, padding)
        start = (padding - self.taps + 1) * s + self.padding_left
        return y[..., start : start + T * self.stride]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> _ConvState:
        if not self.causal or self.padding_left:
            raise ValueError(
                "streaming needs causal transposed convolutions trimmed on the right (trim_right_ratio=1)"
            )
        return _ConvState(
            torch.zeros(batch_size, self.conv.in_channels, self.taps - 1, device=device, dtype=dtype)
        )

    def _step(self, x: torch.Tensor, stream: StreamState) -> torch.Tensor:
        state: _ConvState = stream[self]
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0)
        x = torch.cat([stream.take(state.previous), x], dim=-1)
        state.previous = stream.keep(state.previous, x[..., x.shape[-1] - (self.taps - 1) :])
        return self._run(x, 0)
