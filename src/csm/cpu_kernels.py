"""Weight-streaming CPU kernels for 16-bit and quantized linear layers (cpu_kernels.cpp), built on first use.

On x86 CPUs with AVX2, FMA and F16C and without AMX, decoding reads fp16/bf16/int8/int4 weights through
these kernels: each weight is converted in registers as it is read, once for all rows of x. PyTorch's own
kernels there either convert bf16 weights through a slow path or take bf16 activations only (BENCHMARKS.md,
"CPU kernels"). CPUs with AMX keep PyTorch's kernels (oneDNN's AMX paths are faster than anything AVX2).

The extension is compiled by torch.utils.cpp_extension (one file, a C++ compiler and ninja needed; ninja
comes with the package) into torch's extension cache ($TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions), once per machine and torch version. When it cannot be built (no compiler, a
failed build) one warning is logged and the callers use PyTorch's kernels; nothing fails.

CSM_CPU_KERNELS=0 turns the kernels off, =1 uses them whatever the CPU (where it has AVX2, FMA and F16C).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
NAME = "csm_cpu_kernels_v1"  # change with the source's interface
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c"]
FORMATS = {torch.float16: 0, torch.bfloat16: 1, "int8": 2, "int4": 3}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def wanted() -> bool:
    """Whether this machine should use the kernels: x86-64 with AVX2, FMA and F16C, no AMX (unless
    CSM_CPU_KERNELS says otherwise)."""
    setting = os.environ.get("CSM_CPU_KERNELS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return False
    return setting in ("1", "true", "yes", "on") or not any(f.startswith("amx") for f in flags)


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's binary is not on it when the venv is not
    activated (a script run as .venv/bin/csm)."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + (os.pathsep + path if path else "")


@functools.lru_cache(maxsize=1)
def kernels():
    """The built extension module, or None where it is not wanted or could not be built."""
    if not wanted():
        return None
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        return cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: PyTorch's kernels do the work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("csm: CPU kernels unavailable, using PyTorch's (slower) kernels: %s", first[:300])
        return None


_enabled = True


def available() -> bool:
    """Whether quantized and 16-bit layers made now run these kernels."""
    return _enabled and kernels() is not None


@contextlib.contextmanager
def disabled():
    """Layers made and run inside this block use PyTorch's kernels (tests and benchmarks of the fallback)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    fmt,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """x (..., K) @ w^T for a weight in format `fmt` (torch.float16, torch.bfloat16, "int8", "int4"), in
    x's dtype. Callers check `available()` first."""
    y = kernels().linear(x.reshape(-1, x.shape[-1]), weight, scales, zeros, FORMATS[fmt], group_size)
    return y.view(*x.shape[:-1], y.shape[-1])
