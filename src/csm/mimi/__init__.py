"""Mimi, Kyutai's neural audio codec: 24 kHz audio <-> 12.5 Hz frames of 32 codes."""

from .config import MimiConfig
from .model import (
    MimiDecoderOutput,
    MimiEncoderOutput,
    MimiModel,
    MimiOutput,
    MimiStreamingDecoder,
    MimiStreamingEncoder,
)

__all__ = [
    "MimiConfig",
    "MimiDecoderOutput",
    "MimiEncoderOutput",
    "MimiModel",
    "MimiOutput",
    "MimiStreamingDecoder",
    "MimiStreamingEncoder",
]
