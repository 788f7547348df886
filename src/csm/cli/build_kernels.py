"""`csm build-kernels`: build csm's CPU kernels ahead of their first use (which would otherwise build them
inside the first model load, 25-50 s on 2 cores)."""

from __future__ import annotations

import sys
import time

from .common import CliError

ISAS = ("auto", "avx2", "avx512", "avx512bf16", "all")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build-kernels",
        help="build csm's CPU kernels now (once per compiler and torch), not at the first model load",
    )
    p.add_argument(
        "--isa",
        choices=ISAS,
        default="auto",
        help="variant to build: auto (the one csm runs on this CPU, or CSM_CPU_KERNELS_ISA's), a named one, "
        "or all this CPU can run (default: %(default)s)",
    )
    p.set_defaults(handler=cmd_build_kernels)


def cmd_build_kernels(args) -> int:
    from .. import cpu_kernels

    can = cpu_kernels.runnable_variants()
    if not can:
        raise CliError(
            "this CPU cannot run csm's CPU kernels (x86-64 with AVX2, FMA and F16C needed); "
            "PyTorch's kernels are used, nothing to build"
        )
    if args.isa == "all":
        names = can
    elif args.isa == "auto":
        names = [cpu_kernels.variant()]
    elif args.isa in can:
        names = [args.isa]
    else:
        raise CliError(f"--isa {args.isa}: this CPU runs only {', '.join(can)}")
    failed = []
    for name in names:
        began = time.monotonic()
        built = cpu_kernels.build(name)
        if built is None:
            failed.append(name)
            continue
        print(
            f"csm: CPU kernels ({name}) ready in {built[1]} ({time.monotonic() - began:.1f} s)",
            file=sys.stderr,
        )
    if not cpu_kernels.wanted():
        print(
            "csm: note: csm does not use them by default on this CPU (AMX, or CSM_CPU_KERNELS=0); "
            "CSM_CPU_KERNELS=1 does",
            file=sys.stderr,
        )
    if failed:
        raise CliError(
            f"the CPU-kernel build failed for {', '.join(failed)} (the warning above says why); "
            "csm uses PyTorch's kernels instead"
        )
    return 0
