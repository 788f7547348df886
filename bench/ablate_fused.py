"""Ablation: q/k/v and gate/up as one product each (csm.llama.FusedLinear) against separate products, in one
process on one model, alternating round by round.

    python bench/ablate_fused.py --size tiny --dtype float32 --frames 16 --rounds 5
    python bench/ablate_fused.py --size full --dtype bfloat16 --frames 4 --rounds 3

ms per frame as in bench_generate.py: (time for F frames - time for 1 frame) / (F - 1), greedy, batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import GREEDY, reference_model  # noqa: E402

import csm.engine  # noqa: E402
from csm import CsmForConditionalGeneration  # noqa: E402
from csm.llama import fuse_projections, unfuse_projections  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    csm.engine.fuse_projections = lambda model: None  # an engine would fuse again: this script decides
    dtype = getattr(torch, args.dtype)
    ref = reference_model(args.size, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = CsmForConditionalGeneration.from_pretrained(tmp, dtype=dtype)
    del ref
    ids = torch.randint(4, 300, (1, 32), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        start = time.perf_counter()
        ours.generate(input_ids=ids, max_new_tokens=n, **GREEDY)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    for _ in range(args.rounds):
        for name, times_of in times.items():
            (fuse_projections if name == "fused" else unfuse_projections)(ours)
            run(2)
            times_of.append(1000 * (run(args.frames) - run(1)) / (args.frames - 1))
    for name, v in times.items():
        runs = ", ".join(f"{x:.1f}" for x in v)
        print(f"{args.size} {args.dtype} {name}: median {statistics.median(v):.1f} ms/frame (rounds {runs})")


if __name__ == "__main__":
    main()
