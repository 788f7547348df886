"""MimiConfig: the codec's hyperparameters, read from and written to the reference's `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import CONFIG_NAME, CheckpointError, read_json, resolve_checkpoint
from ..config_methods import ReferenceConfigMethods

_BOUNDS = {  # what any Mimi (or a test's tiny one) may have
    "sampling_rate": (1, 384_000),
    "audio_channels": (1, 8),
    "hidden_size": (1, 16_384),
    "num_filters": (1, 4096),
    "num_residual_layers": (0, 16),
    "kernel_size": (1, 64),
    "last_kernel_size": (1, 64),
    "residual_kernel_size": (1, 64),
    "dilation_growth_rate": (1, 16),
    "compress": (1, 64),
    "codebook_size": (1, 1 << 16),
    "codebook_dim": (1, 16_384),
    "num_quantizers": (1, 64),
    "vector_quantization_hidden_dimension": (1, 16_384),
    "num_semantic_quantizers": (0, 64),
    "upsample_groups": (1, 16_384),
    "num_hidden_layers": (0, 64),
    "intermediate_size": (1, 65_536),
    "num_attention_heads": (1, 256),
    "num_key_value_heads": (1, 256),
    "head_dim": (1, 1024),
    "max_position_embeddings": (1, 1 << 20),
    "sliding_window": (1, 1 << 20),
}


@dataclass
class MimiConfig(ReferenceConfigMethods):
    """Mimi's hyperparameters, with the reference's field names and defaults (those of kyutai/mimi)."""

    sampling_rate: int = 24_000
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "constant"
    compress: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    use_conv_shortcut: bool = False
    vector_quantization_hidden_dimension: int = 256
    num_semantic_quantizers: int = 1
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "gelu"
    max_position_embeddings: int = 8000
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    use_cache: bool = False
    use_streaming: bool = False
    rope_parameters: dict[str, Any] | None = None
    sliding_window: int = 250
    attention_dropout: float = 0.0
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    # Older checkpoints (kyutai/mimi) state the frame rate; newer ones derive it from the strides.
    frame_rate_override: float | None = None

    def _check_bounds(self) -> None:
        """Refuse sizes no Mimi has before anything is built (a planted codec_config could ask for 100,000 layers):
        a ValueError naming the field and its range."""
        for name, (low, high) in _BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in ("head_dim", "codebook_dim"):
                continue
            if type(value) is not int or not low <= value <= high:
                raise CheckpointError(
                    f"codec config: {name} is {str(value)[:40]}; it must be an integer from {low} to {high}"
                )
        ratios = self.upsampling_ratios
        if not 1 <= len(ratios) <= 8 or not all(type(r) is int and 1 <= r <= 64 for r in ratios):
            raise CheckpointError(
                f"codec config: upsampling_ratios {str(ratios)[:60]} must be 1-8 integers from 1 to 64"
            )

    def __post_init__(self) -> None:
        if not hasattr(self, "extra"):
            self.extra = {}
        self.upsampling_ratios = list(self.upsampling_ratios or [8, 6, 5, 4])
        self._check_bounds()
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        rope = dict(self.rope_parameters or {})
        rope.setdefault("rope_theta", 10000.0)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        self.rope_parameters = rope
        if rope["rope_type"] != "default":
            raise ValueError(f"Mimi supports only default RoPE, got rope_type={rope['rope_type']!r}")
        if not 0 < self.num_semantic_quantizers < self.num_quantizers:
            raise ValueError(
                f"num_semantic_quantizers ({self.num_semantic_quantizers}) must be at least 1 and below "
                f"num_quantizers ({self.num_quantizers})"
            )
        if self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {self.codebook_size}")
        if self.pad_mode not in ("constant", "replicate", "reflect"):
            raise ValueError(f"pad_mode must be 'constant', 'replicate' or 'reflect', got {self.pad_mode!r}")

    # Derived sizes, as the reference defines them.
    @property
    def encodec_frame_rate(self) -> int:
        """Frames per second out of the SEANet encoder, before the downsampling to `frame_rate`."""
        return math.ceil(self.sampling_rate / math.prod(self.upsampling_ratios))

    @property
    def frame_size(self) -> int:
        """Audio samples per codec frame (1920 for Mimi)."""
        return math.prod(self.upsampling_ratios) * 2

    @property
    def frame_rate(self) -> float:
        """Codec frames per second (12.5 for Mimi)."""
        if self.frame_rate_override is not None:
            return self.frame_rate_override
        return self.sampling_rate / self.frame_size

    @property
    def latent_stride(self) -> int:
        """Stride of the convolution between SEANet frames and codec frames (2 for Mimi)."""
        return int(self.encodec_frame_rate / self.frame_rate)

    @property
    def has_resampling(self) -> bool:
        """Whether there is a `downsample` / `upsample` pair between the SEANet and codec frame rates."""
        return self.frame_rate != self.encodec_frame_rate

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MimiConfig:
        """Build from the reference's Mimi config dict, or a CSM config dict holding it as `codec_config`."""
        if "codec_config" in d:
            d = d["codec_config"] or {}
        model_type = d.get("model_type", "mimi")
        if model_type != "mimi":
            raise CheckpointError(
                f"expected a Mimi config (model_type 'mimi'), got model_type {model_type!r}"
            )
        d = dict(d)
        if "rope_theta" in d and not d.get("rope_parameters"):
            d["rope_parameters"] = {"rope_theta": d["rope_theta"], "rope_type": "default"}
        # kyutai/mimi says `frame_rate`; the reference saves it as `_frame_rate` (null when derived).
        frame_rate = d.get("frame_rate", d.get("_frame_rate"))
        if frame_rate is not None:
            d["frame_rate_override"] = frame_rate
        # The reference's bookkeeping and derived values; any other key is kept (see __init__).
        for key in ("model_type", "architectures", "frame_rate", "_frame_rate"):
            d.pop(key, None)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The reference's config dict, which its `MimiConfig` reads back."""
        out = {**self.extra, **dataclasses.asdict(self)}
        override = out.pop("frame_rate_override")
        if override is not None:
            out["frame_rate"] = override
        return {"architectures": ["MimiModel"], "model_type": "mimi", **out}

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike) -> MimiConfig:
        """Read `config.json` from a Mimi (or CSM) checkpoint folder or hub repo id."""
        folder = resolve_checkpoint(path_or_repo_id, allow_patterns=[CONFIG_NAME])
        return cls.from_dict(read_json(folder))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


_dataclass_init = MimiConfig.__init__


def _init_keeping_unknown_keys(self, *args, **kwargs) -> None:
    """Like the reference's config, keep keyword arguments Mimi does not model (transformers bookkeeping,
    newer fields) as attributes, written back by to_dict; they change nothing in the codec."""
    names = {f.name for f in dataclasses.fields(MimiConfig)}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
    self.extra = {k: v for k, v in extra.items() if not isinstance(getattr(MimiConfig, k, None), property)}
    _dataclass_init(self, *args, **kwargs)
    for key, value in self.extra.items():
        setattr(self, key, value)


MimiConfig.__init__ = _init_keeping_unknown_keys
