"""Model configurations, read from and written to the reference's `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_NAME, CheckpointError, read_json, resolve_checkpoint
from .config_methods import ReferenceConfigMethods

DEFAULT_ROPE_THETA = 500000.0
# csm-1b's RoPE (Llama-3.2 scaling), as its config.json states it.
CSM_1B_ROPE = dict(
    rope_type="llama3",
    rope_theta=DEFAULT_ROPE_THETA,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def _rope_parameters(d: dict) -> dict:
    """Accept both the `rope_parameters` form and the older `rope_scaling` + `rope_theta` form."""
    params = dict(d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {})
    theta = d.pop("rope_theta", None)
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", theta if theta is not None else DEFAULT_ROPE_THETA)
    d.pop("rope_scaling", None)
    return params


# What any CSM (or a test's tiny one) may have: a config outside these is refused before anything is built.
_BOUNDS = {
    "num_hidden_layers": (0, 256),  # 0: a degenerate model tests build
    "hidden_size": (1, 65_536),
    "intermediate_size": (1, 262_144),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 1024),
    "max_position_embeddings": (1, 1 << 20),
    "vocab_size": (1, 1 << 20),
    "text_vocab_size": (1, 1 << 22),
    "num_codebooks": (1, 64),
    "backbone_hidden_size": (1, 65_536),
}


def check_layers(config, names) -> None:
    """CheckpointError when the config's layer counts are not the layers the weights hold (checked from the
    safetensors headers, before the model is built: a config may not make it build 100,000 layers)."""
    import re

    for prefix, cfg in (("backbone_model", config), ("depth_decoder.model", config.depth_decoder_config)):
        pattern = re.compile(re.escape(prefix) + r"\.layers\.(\d+)\.")
        found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
        if found and max(found) + 1 != cfg.num_hidden_layers:
            raise CheckpointError(
                f"config.json says {cfg.num_hidden_layers} layers for {prefix}, the weights hold "
                f"{max(found) + 1}: the config and the weights do not belong together"
            )


class _SubConfigs:
    """`Config.sub_configs`, read on the class or an instance: the nested configs' names and classes."""

    def __get__(self, obj, cls) -> dict[str, type]:
        if getattr(cls, "model_type", None) != "csm":
            return {}
        from .mimi import MimiConfig

        return {"codec_config": MimiConfig, "depth_decoder_config": CsmDepthDecoderConfig}


class _JsonConfig(ReferenceConfigMethods):
    """from_dict / to_dict / from_pretrained / save_pretrained for a config dataclass.

    Keys we do not model (transformers bookkeeping, generation settings) are kept in `extra`
    and written back, so a config survives the round trip.
    """

    sub_configs = _SubConfigs()

    model_type: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        if "rope_parameters" in {f.name for f in dataclasses.fields(cls)}:
            d["rope_parameters"] = _rope_parameters(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return {**self.extra, **out, "model_type": self.model_type}

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike):
        folder = resolve_checkpoint(path_or_repo_id, allow_patterns=[CONFIG_NAME])
        return cls.from_dict(read_json(folder))

    def _check_bounds(self) -> None:
        """Refuse sizes no CSM has (a planted config.json could ask for 100,000 layers, 10^9 positions, 0 heads
        or -1 layers) before anything is built: one CheckpointError naming the field and its range."""
        for name, (low, high) in _BOUNDS.items():
            if not hasattr(self, name):
                continue
            value = getattr(self, name)
            if value is None and name in ("head_dim", "num_key_value_heads"):
                continue
            if type(value) is not int or not low <= value <= high:
                raise CheckpointError(
                    f"{self.model_type} config: {name} is {str(value)[:40]}; it must be an integer from {low} to "
                    f"{high}: the checkpoint's config.json is damaged or not a CSM config"
                )
        eps = getattr(self, "rms_norm_eps", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise CheckpointError(f"{self.model_type} config: rms_norm_eps is {eps!r}; it must be in (0, 1)")

    def _complete_llama_fields(self) -> None:
        """Derive what a Llama config may leave out, and refuse what our block does not implement."""
        self._check_bounds()
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads or self.head_dim < 1:
            raise CheckpointError(
                f"{self.model_type} config: {self.num_attention_heads} attention heads cannot share "
                f"{self.num_key_value_heads} key/value heads of {self.head_dim} dims"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not supported; CSM uses 'silu'")

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


@dataclass
class CsmDepthDecoderConfig(_JsonConfig):
    """The depth decoder: a small Llama that predicts codebooks 1..K-1 of one frame."""

    model_type = "csm_depth_decoder_model"

    num_codebooks: int = 32
    backbone_hidden_size: int = 2048
    vocab_size: int = 2051
    hidden_size: int = 1024
    intermediate_size: int = 8192
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 33
    rms_norm_eps: float = 1e-5
    rope_parameters: dict = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA}
    )
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._complete_llama_fields()


@dataclass
class CsmConfig(_JsonConfig):
    """The whole model: backbone sizes and token ids, with the depth decoder and codec configs nested."""

    model_type = "csm"

    num_codebooks: int = 32
    vocab_size: int = 2051  # entries per codebook
    text_vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_parameters: dict = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA}
    )
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = 128002
    bos_token_id: int | None = 128000
    eos_token_id: int | None = None
    codebook_pad_token_id: int = 2050
    codebook_eos_token_id: int = 0
    audio_token_id: int = 128002
    audio_eos_token_id: int = 128003
    tie_codebooks_embeddings: bool = True
    depth_decoder_config: CsmDepthDecoderConfig = field(default_factory=CsmDepthDecoderConfig)
    codec_config: Any = (
        None  # MimiConfig; built in __post_init__ so a bare CsmConfig() gets the default codec
    )
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        from .mimi import MimiConfig

        self._complete_llama_fields()
        if isinstance(self.depth_decoder_config, dict):
            self.depth_decoder_config = CsmDepthDecoderConfig.from_dict(self.depth_decoder_config)
        if self.codec_config is None:
            self.codec_config = MimiConfig()
        elif isinstance(self.codec_config, dict):
            self.codec_config = MimiConfig.from_dict(self.codec_config)
        if self.depth_decoder_config.num_codebooks != self.num_codebooks:
            raise CheckpointError(
                f"num_codebooks differs: backbone {self.num_codebooks}, depth decoder "
                f"{self.depth_decoder_config.num_codebooks}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = _JsonConfig.to_dict(self)
        # The reference reads `tie_word_embeddings` as the codebook tie; keep both in step.
        out["tie_word_embeddings"] = self.tie_codebooks_embeddings
        return out
