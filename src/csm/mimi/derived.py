"""Tensors derived from weights (a rearranged kernel, codebook centroids), built once per set of weights."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

# Kept beside the modules, not in them: copies and pickles of a module never carry (or choke on) a cache.
_CACHES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def derived(module: nn.Module, name: str, sources: list[torch.Tensor | None], build: Callable[[], object]):
    """`build()`, cached on `module` until one of `sources` is replaced (load, `.to()`) or changed in place.

    Rebuilt on every call while autograd records, so that gradients reach the sources.
    """
    sources = [t for t in sources if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    cache = _CACHES.setdefault(module, {})
    versions = [_version(t) for t in sources]
    hit = cache.get(name)
    if (
        hit is None
        or hit[1] != versions
        or any(ref() is not t for ref, t in zip(hit[0], sources, strict=True))
    ):
        hit = cache[name] = ([weakref.ref(t) for t in sources], versions, build())
    return hit[2]
