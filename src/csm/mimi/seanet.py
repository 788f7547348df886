"""SEANet: the convolutional encoder (audio to 25 Hz frames) and decoder (frames to audio) of Mimi."""

from __future__ import annotations

import torch
from torch import nn

from .config import MimiConfig
from .conv import Conv1d, ConvTranspose1d
from .streaming import StreamState


def _conv(config: MimiConfig, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> Conv1d:
    return Conv1d(
        cin, cout, kernel, stride, dilation, causal=config.use_causal_conv, pad_mode=config.pad_mode
    )


class ResnetBlock(nn.Module):
    """x + conv1(elu(conv_k(elu(x)))), the second conv restoring the width the first one compressed."""

    def __init__(self, config: MimiConfig, dim: int, dilations: tuple[int, int]) -> None:
        super().__init__()
        hidden = dim // config.compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                _conv(config, dim, hidden, config.residual_kernel_size, dilation=dilations[0]),
                nn.ELU(),
                _conv(config, hidden, dim, 1, dilation=dilations[1]),
            ]
        )
        self.shortcut = _conv(config, dim, dim, 1) if config.use_conv_shortcut else None

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y, stream) if isinstance(layer, Conv1d) else layer(y)
        return (x if self.shortcut is None else self.shortcut(x, stream)) + y


class SeanetEncoder(nn.Module):
    """Audio (B, channels, T) -> (B, hidden_size, ceil(T / prod(ratios))), strides in reverse ratio order."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            _conv(config, config.audio_channels, config.num_filters, config.kernel_size)
        ]
        dim = config.num_filters
        for ratio in reversed(config.upsampling_ratios):
            layers += [
                ResnetBlock(config, dim, (config.dilation_growth_rate**j, 1))
                for j in range(config.num_residual_layers)
            ]
            layers += [nn.ELU(), _conv(config, dim, dim * 2, ratio * 2, stride=ratio)]
            dim *= 2
        layers += [nn.ELU(), _conv(config, dim, config.hidden_size, config.last_kernel_size)]
        # Indices match the reference's `encoder.layers.{i}`, ELUs included.
        self.layers = nn.ModuleList(layers)

    def output_length(self, length):
        """Frames out for `length` samples in (an int or a tensor)."""
        for layer in self.layers:
            if isinstance(layer, Conv1d):
                length = layer.output_length(length)
        return length

    def forward(
        self, x: torch.Tensor, stream: StreamState | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, Conv1d):
                x = layer(x, stream, lengths)
                lengths = None if lengths is None else layer.output_length(lengths)
            elif isinstance(layer, ResnetBlock):
                x = layer(x, stream)
            else:
                x = layer(x)
        return x


class SeanetDecoder(nn.Module):
    """(B, hidden_size, T) -> audio (B, channels, T * prod(ratios))."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        dim = config.num_filters * 2 ** len(config.upsampling_ratios)
        layers: list[nn.Module] = [_conv(config, config.hidden_size, dim, config.kernel_size)]
        for ratio in config.upsampling_ratios:
            layers += [
                nn.ELU(),
                ConvTranspose1d(
                    dim,
                    dim // 2,
                    ratio * 2,
                    stride=ratio,
                    causal=config.use_causal_conv,
                    trim_right_ratio=config.trim_right_ratio,
                ),
            ]
            dim //= 2
            layers += [
                ResnetBlock(config, dim, (config.dilation_growth_rate**j, 1))
                for j in range(config.num_residual_layers)
            ]
        layers += [nn.ELU(), _conv(config, dim, config.audio_channels, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) if isinstance(layer, nn.ELU) else layer(x, stream)
        return x
