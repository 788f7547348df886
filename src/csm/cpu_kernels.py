"""Weight-streaming CPU kernels for 16-bit and quantized linear layers (cpu_kernels.cpp), built on first use.

On x86 CPUs with AVX2, FMA and F16C and no AMX, decoding reads fp16/bf16/int8/int4 weights through these
kernels: 16-bit weights are converted in registers as they are read, int8 and int4 weights meet the
activations quantized to int8 in integer multiply-adds; each weight is read once for all rows of x. On
AVX2-only CPUs PyTorch's own kernels convert bf16 weights through a slow path and take int weights with
bf16 activations only, at a fraction of the memory's speed; with AVX-512 these are still 1.2x (bf16) and
1.8x (int8) faster per frame (BENCHMARKS.md, "csm's CPU kernels"). CPUs with AMX keep PyTorch's (oneDNN's
AMX paths) by default: BENCHMARKS.md, "AVX-512 variants", has the measurement.

One source, one build per variant, chosen at run time by the CPU's flags (VARIANTS): `avx2`; `avx512`
(AVX-512 F/BW/VL/DQ and VNNI: 512-bit widening of 16-bit weights, `vpdpbusd` for int8/int4); `avx512bf16`
(+ AVX512_BF16: `vdpbf16ps` for bf16 weights times bf16 activations). CSM_CPU_KERNELS_ISA=avx2 (or another
variant) holds csm to older code, for comparisons.

Each variant is compiled by torch.utils.cpp_extension (a C++ compiler and ninja needed; ninja comes with
the package) into a folder of torch's extension cache ($TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions) named by what changes the binary (source, flags, torch, Python, compiler), so
every virtual environment with the same torch shares one build and loads it without running ninja. A build
says so on stderr (25-50 s on 2 cores); `csm build-kernels` builds ahead of time. Concurrent processes
build once, under a lock the kernel drops when its holder dies (a killed build blocks no one); a live
build is waited for up to CSM_CPU_KERNELS_WAIT seconds (300), saying so, then PyTorch's kernels are used.
When the kernels cannot be built (no compiler, a failed build) one warning is logged and the callers use
PyTorch's kernels; nothing fails.

CSM_CPU_KERNELS=0 turns the kernels off, =1 uses them wherever they can run (AVX2, FMA and F16C), AMX
machines included.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
BASE_FLAGS = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for is serial without it
# One build per variant, from the same source: the compiler's target macros pick the code (cpu_kernels.cpp).
# Each: (compiler flags, the CPU flags it needs), from the most capable down.
VARIANTS = {
    "avx512bf16": (
        [
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mavx512vnni",
            "-mavx512bf16",
        ],
        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"},
    ),
    "avx512": (
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    ),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
}
FORMATS = {torch.float16: 0, torch.bfloat16: 1, "int8": 2, "int4": 3}
BUILD_SECONDS = 40  # a variant's build on 2 busy cores (25-50 s measured); said when a build starts
WAIT_SECONDS = 300  # the longest a process waits for another one's build before using PyTorch's kernels


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


def runnable_variants() -> list[str]:
    """The variants this CPU can run, the most capable first (none off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return [v for v, (_, needs) in VARIANTS.items() if needs <= cpu_flags()]


def runnable() -> bool:
    """Whether this CPU can run the kernels: x86-64 with AVX2, FMA and F16C."""
    return bool(runnable_variants())


def variant() -> str | None:
    """The variant csm runs here: the most capable the CPU has, or the one CSM_CPU_KERNELS_ISA names
    (avx2, avx512, avx512bf16: an older CPU's code on a newer one, for comparisons) where the CPU can run
    it; None where no variant can run."""
    return _variant if _variant is not None else _default_variant()


@functools.lru_cache(maxsize=1)
def _default_variant() -> str | None:
    can = runnable_variants()
    asked = os.environ.get("CSM_CPU_KERNELS_ISA", "").strip().lower()
    if asked and asked != "auto":
        if asked in can:
            return asked
        log.warning(
            "csm: CSM_CPU_KERNELS_ISA=%s %s; using %s",
            asked,
            "is not a variant (avx2, avx512, avx512bf16, auto)"
            if asked not in VARIANTS
            else "cannot run on this CPU",
            can[0] if can else "PyTorch's kernels",
        )
    return can[0] if can else None


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


def _compiler() -> str:
    """The compiler torch's builder runs, as `$CXX --version` names it ("none" where it cannot run)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        return f"{cxx}: {out.strip().splitlines()[0]}" if out.strip() else f"{cxx}: ?"
    except (OSError, subprocess.SubprocessError):
        return f"{cxx}: none"


@functools.cache
def build_key(name: str) -> str:
    """What changes the binary of variant `name`: the source, the flags, torch's version and ABI, Python's,
    the compiler. Not the include paths, which differ per virtual environment with the same torch: every
    venv with the same torch and compiler shares one build."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (
        " ".join(BASE_FLAGS + VARIANTS[name][0]),
        torch.__version__,
        str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")),
        sys.implementation.cache_tag,
        platform.machine(),
        _compiler(),
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def module_name(name: str) -> str:
    return f"csm_cpu_kernels_{name}_{build_key(name)}"


def build_dir(name: str) -> Path:
    """The variant's build folder, one per build configuration, under torch's extension cache
    ($TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(module_name(name), False))


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _locked_build(name: str, folder: Path, wait: float):
    """Build variant `name` in `folder` under an advisory lock on `folder`/csm.lock, or load what another
    process built while this one waited. The kernel drops the lock when its holder dies (SIGKILL, the OOM
    killer), so a killed build blocks no one; a live holder is waited for up to `wait` seconds, saying so,
    then None (PyTorch's kernels this time)."""
    import fcntl

    from torch.utils import cpp_extension

    mod, so, done = module_name(name), folder / f"{module_name(name)}.so", folder / "built"
    lock = folder / "csm.lock"
    with open(lock, "a+") as f:
        start, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log.warning(
                        "csm: waiting for %s, which is building csm's CPU kernels (%s) in %s (up to %.0f s)",
                        _holder(lock),
                        name,
                        folder,
                        wait,
                    )
                    said = True
                if time.monotonic() - start > wait:
                    log.warning(
                        "csm: gave up waiting %.0f s for the CPU-kernel build of %s; using PyTorch's (slower) "
                        "kernels in this process (CSM_CPU_KERNELS_WAIT sets the wait)",
                        wait,
                        _holder(lock),
                    )
                    return None
                time.sleep(0.25)
        try:
            if done.exists() and so.exists():  # built by the process this one waited for
                return _import(mod, so)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
            f.flush()
            # torch's own lock: every builder of this folder holds csm.lock first, so one here was left by
            # a killed build, and torch's builder would wait on it for ever.
            (folder / "lock").unlink(missing_ok=True)
            log.warning(
                "csm: building csm's CPU kernels (%s), once for this compiler and torch: about %d s (one file), "
                "in %s; `csm build-kernels` does this ahead of time",
                name,
                BUILD_SECONDS,
                folder,
            )
            began = time.monotonic()
            _ninja_on_path()
            module = cpp_extension.load(
                mod, [str(SOURCE)], extra_cflags=BASE_FLAGS + VARIANTS[name][0], build_directory=str(folder)
            )
            done.write_text(f"{mod}\n")
            log.warning("csm: CPU kernels (%s) built in %.0f s", name, time.monotonic() - began)
            return module
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def kernels_of(name: str):
    """Variant `name`'s extension module (built on the first call in any process, then loaded), or None
    where it cannot be built or another process's build outlasted the wait."""
    try:
        folder = build_dir(name)
        so = folder / f"{module_name(name)}.so"
        if (folder / "built").exists() and so.exists():
            return _import(module_name(name), so)
        wait = float(os.environ.get("CSM_CPU_KERNELS_WAIT", WAIT_SECONDS))
        return _locked_build(name, folder, wait)
    except Exception as e:  # no compiler, no ninja, a failed build: PyTorch's kernels do the work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("csm: CPU kernels unavailable, using PyTorch's (slower) kernels: %s", first[:300])
        return None


def kernels():
    """The extension module of the variant csm runs here (built on the first call), or None where it
    cannot run or be built."""
    name = variant()
    return None if name is None else kernels_of(name)


kernels.cache_clear = kernels_of.cache_clear  # tests: build (or fail to) again


def build(name: str | None = None) -> tuple[str, Path] | None:
    """Build (or find built) variant `name`, by default the one csm runs here, ahead of first use: `csm
    build-kernels`. (variant, build folder), or None where it cannot run or failed (logged)."""
    name = name or variant()
    if name is None or name not in runnable_variants():
        return None
    return (name, build_dir(name)) if kernels_of(name) is not None else None


_variant: str | None = None  # set by `using`


@contextlib.contextmanager
def using(name: str):
    """Within this block csm's kernels are variant `name` (tests and benchmarks of each on one machine)."""
    global _variant
    saved, _variant = _variant, name
    try:
        yield
    finally:
        _variant = saved


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
