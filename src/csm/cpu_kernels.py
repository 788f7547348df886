"""Weight-streaming CPU kernels for 16-bit and quantized linear layers (cpu_kernels.cpp), built on first use.

On x86 CPUs with AVX2, FMA and F16C and no AMX, decoding reads fp16/bf16/int8/int4 weights through these
kernels: 16-bit weights are converted in registers as they are read, int8 and int4 weights meet the
activations quantized to int8 in integer multiply-adds; each weight is read once for all rows of x. On
AVX2-only CPUs PyTorch's own kernels convert bf16 weights through a slow path and take int weights with
bf16 activations only, at a fraction of the memory's speed; with AVX-512 these are still 1.2x (bf16) and
1.8x (int8) faster per frame (BENCHMARKS.md, "csm's CPU kernels"). CPUs with AMX keep PyTorch's (oneDNN's
AMX paths; not measured here).

The extension is compiled by torch.utils.cpp_extension (one file, a C++ compiler and ninja needed; ninja
comes with the package) into torch's extension cache ($TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions), once per machine and torch version. When it cannot be built (no compiler, a
failed build) one warning is logged and the callers use PyTorch's kernels; nothing fails.

CSM_CPU_KERNELS=0 turns the kernels off, =1 uses them wherever they can run (AVX2, FMA and F16C), AMX
machines included.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
NAME = "csm_cpu_kernels_v3"  # change with the source's interface
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # OpenMP: at::parallel_for is serial without it
FORMATS = {torch.float16: 0, torch.bfloat16: 1, "int8": 2, "int4": 3}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux), empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable() -> bool:
    """Whether this CPU can run the kernels: x86-64 with AVX2, FMA and F16C."""
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= cpu_flags()


def wanted() -> bool:
    """Whether csm uses the kernels here by default: where they can run and the CPU has no AMX, unless
    CSM_CPU_KERNELS says otherwise (0: never, 1: wherever they can run)."""
    setting = os.environ.get("CSM_CPU_KERNELS", "").strip().lower()
    if setting in ("0", "false", "no", "off") or not runnable():
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return not any(f.startswith("amx") for f in cpu_flags())


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


STALE_LOCK_SECONDS = 600  # a build takes 30-50 s on 2 cores: a lock this old was left by a killed one


def clear_stale_lock(build_dir: Path) -> None:
    """torch's builder waits, silently and for ever, while its build folder holds a `lock` file, and a build
    that was killed (the first run stopped by SIGTERM, SIGKILL or the OOM killer) leaves one behind: remove
    one older than any build takes, saying so."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_SECONDS:
            lock.unlink()
            log.warning(
                "csm: removed %s, left %.0f s ago by a CPU-kernel build that did not finish", lock, age
            )
    except OSError:  # no lock (the usual case), or another process removed it first
        pass


@functools.lru_cache(maxsize=1)
def kernels():
    """The built extension module (built on the first call), or None where it cannot run or be built."""
    if not runnable():
        return None
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        clear_stale_lock(Path(cpp_extension._get_build_directory(NAME, False)))
        return cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: PyTorch's kernels do the work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("csm: CPU kernels unavailable, using PyTorch's (slower) kernels: %s", first[:300])
        return None


_forced: bool | None = None  # set by `forced`; None: `wanted()`, read once
_wanted = functools.lru_cache(maxsize=1)(wanted)


def available() -> bool:
    """Whether quantized and 16-bit layers made or run now use these kernels."""
    on = _wanted() if _forced is None else _forced
    return on and kernels() is not None


@contextlib.contextmanager
def forced(on: bool):
    """Within this block layers use the kernels (where they can run) or PyTorch's, whatever the default:
    tests and benchmarks of both paths on one machine."""
    global _forced
    saved, _forced = _forced, on
    try:
        yield
    finally:
        _forced = saved


def disabled():
    """Within this block layers use PyTorch's kernels."""
    return forced(False)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    fmt,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int = 0,
    integer: bool = True,
) -> torch.Tensor:
    """x (..., K) @ w^T for a weight in format `fmt` (torch.float16, torch.bfloat16, "int8", "int4"), in
    x's dtype. For int8 and int4, `integer` quantizes x to int8 in blocks of 32 and multiplies in integers
    (where K is a multiple of 32, and for int4 of 256 with groups of 32 or more); False converts the weights
    to fp32 instead (the exact weight-only product, slower). Callers check `available()` first."""
    y = kernels().linear(x.reshape(-1, x.shape[-1]), weight, scales, zeros, FORMATS[fmt], group_size, integer)
    return y.view(*x.shape[:-1], y.shape[-1])
