"""Turn planning cost: `plan_prompt` (bisection over how many old turns to drop) against dropping the oldest
turn one at a time (what the pipeline and the server each did before csm.planner), in the same run.

    python bench/bench_planner.py                                   # the demo checkpoint's processor
    python bench/bench_planner.py --processor sesame/csm-1b --turns 10 50 200

A conversation of N turns (each a sentence and `--seconds` of audio) is planned for the next turn in the
2048-position window with a 125-frame budget; both ways must keep the same turns. Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from csm import CsmProcessor
from csm.planner import Turn, plan_prompt


def one_by_one(processor, fixed, carried, speaker, text, frames, limit):
    """The old loop: re-render the conversation after each dropped turn."""
    carried = list(carried)
    while True:
        conv = [t.as_message() for t in [*fixed, *carried]]
        conv.append({"role": str(speaker), "content": [{"type": "text", "text": text}]})
        try:
            ids = processor.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
            if ids.shape[1] + frames <= limit or not carried:
                return carried
        except ValueError:
            if not carried:
                raise
        carried.pop(0)


def compare(ours_fn, old_fn, repeats: int) -> tuple[float, float]:
    """Median milliseconds of each, calls alternating so that both see the same machine load."""
    ours, old = [], []
    for _ in range(repeats):
        for fn, times in ((ours_fn, ours), (old_fn, old)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(ours), 1000 * statistics.median(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", default=None, help="a checkpoint folder or hub id (default: demo)")
    parser.add_argument("--turns", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per turn")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.processor is None:
        from csm.demo import write_demo_checkpoint

        args.processor = str(write_demo_checkpoint(tempfile.mkdtemp() + "/demo"))
    processor = CsmProcessor.from_pretrained(args.processor)
    frames = int(args.seconds * 12.5)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'turns':>6} {'kept':>5} {'planner ms':>11} {'one-by-one ms':>14} {'speed-up':>9}")
    for n in args.turns:
        rng = np.random.default_rng(n)
        carried = [
            Turn(i % 2, f"This is turn number {i}, a sentence of ordinary length.",
                 np.zeros(frames * 1920, np.float32), torch.from_numpy(rng.integers(0, 2048, (frames, 32))))
            for i in range(n)
        ]  # fmt: skip
        text = "And this is the next thing to say, in context."

        def plan(carried=carried, text=text):
            return plan_prompt(processor, [], carried, 0, text, 125, 2048, "keep")

        def old(carried=carried, text=text):
            return one_by_one(processor, [], carried, 0, text, 125, 2048)

        kept = plan().carried
        assert kept == old(), "both ways keep the same turns"
        ours, theirs = compare(plan, old, args.repeats)
        print(f"{n:>6} {len(kept):>5} {ours:>11.1f} {theirs:>14.1f} {theirs / ours:>8.1f}x")


if __name__ == "__main__":
    main()
