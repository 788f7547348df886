"""LoRA adapters: low-rank updates beside frozen linear layers, saved on their own and merged back.

Adapters are written in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` keys), so the reference model can load them with `peft` as well.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..llama import Linear, fuse_projections

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Where adapters may go: the backbone and the depth decoder, never the codec.
LORA_SCOPES = ("backbone_model.", "depth_decoder.")


@dataclass
class LoraConfig:
    """Rank, scale (alpha / rank), dropout and the linear layers that get adapters.

    A target matches a module whose name is the target or ends with "." + target, so "q_proj" adapts every
    query projection and "depth_decoder.model.layers.0.mlp.up_proj" one layer.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module, e.g. q_proj")


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) * B A dropout(x), with W and b frozen and B zero at the start.

    `weight` and `bias` are the wrapped layer's own parameters, so the base keys of the state dict do not change.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: A random, B zero
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            F.linear(x, self.weight, self.bias)
            + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        )

    def merged(self) -> Linear:
        """A plain Linear holding W + (alpha / r) B A, computed in fp32."""
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear


def _targets(model: nn.Module, targets: list[str]) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(LORA_SCOPES):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze `model` and wrap the targeted linear layers with trainable adapters; returns their names."""
    names = _targets(model, config.target_modules)
    if not names:
        raise ValueError(
            f"no linear layer in the backbone or depth decoder matches LoRA targets {config.target_modules}; "
            f"try {', '.join(DEFAULT_TARGETS)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set(model, name, LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its linear layer, leaving a model with the original architecture."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set(model, name, module.merged())
    fuse_projections(model)  # the merged layers' q/k/v and gate/up run as one product again
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed by their names in `model`."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def save_adapter(
    model: nn.Module, config: LoraConfig, folder: str | os.PathLike, base_model: str = ""
) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT layout) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    peft = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft, indent=2) + "\n")


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> LoraConfig:
    """Wrap `model` as in training and load saved adapter weights; `merge_lora` then gives a plain model."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file() or not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{folder} is not a LoRA adapter: it needs {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    peft = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    config = LoraConfig(rank=peft["r"], alpha=peft["lora_alpha"], target_modules=list(peft["target_modules"]))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(folder / ADAPTER_WEIGHTS_NAME).items()}
    apply_lora(model, config)
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        raise ValueError(f"{folder}: the adapter does not fit this model (e.g. no weights for {missing})")
    model.load_state_dict(state, strict=False)
    return config
