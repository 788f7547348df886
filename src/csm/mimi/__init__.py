"""Mimi, Kyutai's neural audio codec: 24 kHz audio <-> 12.5 Hz frames of 32 codes."""

from .config import MimiConfig
from .model import MimiModel, MimiStreamingDecoder, MimiStreamingEncoder

__all__ = ["MimiConfig", "MimiModel", "MimiStreamingDecoder", "MimiStreamingEncoder"]
