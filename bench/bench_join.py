"""Streams that never stall: the gaps between a running row's frames while long prompts join the batch, with
each prompt prefilled whole when it joins (`prefill_chunk=None`, what the server did) and in slices between
frames ("auto"), in the same run, alternating.

    python bench/bench_join.py --size tiny
    python bench/bench_join.py --size full --checkpoint /tmp/conv_ckpt --positions 1500 --joins 2

`--running` rows generate (greedy, a short prompt each); after `--warm` frames, `--joins` prompts of
`--positions` positions (text and audio frames) join one after another, each once the one before it is in.
Printed: the running rows' inter-frame gaps (p50, p99, max) in ms and max / p50, per variant. The prefix store
is off, so every position of a joining prompt is prefilled.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from csm.batching import BatchCore, RowJob  # noqa: E402
from csm.demo import write_demo_checkpoint  # noqa: E402
from csm.engine import Sampling  # noqa: E402
from csm.pipeline import pipeline  # noqa: E402

GREEDY = Sampling(do_sample=False)


def prompt(model, positions: int, seed: int):
    """Embeds (1, T, D) of a prompt with about a third of its positions text and the rest audio frames."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, min(1000, cfg.text_vocab_size), (1, positions), generator=g)
    audio = torch.rand(1, positions, generator=g) < 0.66
    ids[audio] = cfg.audio_token_id
    frames = torch.randint(0, 2048, (int(audio.sum()), cfg.num_codebooks), generator=g)
    with torch.inference_mode():
        return model.embed_prompt(ids, audio_codes=[frames])


def job(model, positions: int, seed: int, frames: int) -> RowJob:
    inputs = prompt(model, positions, seed)
    return RowJob(
        embed=lambda: inputs, max_frames=frames, backbone=GREEDY, depth_decoder=GREEDY, decode=False
    )


def run(model, chunk, args) -> list[float]:
    """The running rows' gaps (seconds between two of their frames) over the whole run."""
    core = BatchCore(
        model, max_batch_size=args.running + 1, max_seq_len=args.positions + 64, prefill_chunk=chunk
    )
    running = [job(model, 16, 100 + i, 10**6) for i in range(args.running)]
    for j in running:
        core.add(j)
    gaps, last = [], None
    joins = [job(model, args.positions, i, 4) for i in range(args.joins)]
    step = 0
    while True:
        if step == args.warm or (
            step > args.warm and joins and not core.prefilling and len(core.live_rows()) == args.running
        ):
            if joins:
                core.add(joins.pop(0))  # with None: prefilled whole here, between two frames
        core.step()
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
        step += 1
        if (
            not joins
            and not core.prefilling
            and step > args.warm + 4
            and len(core.live_rows()) == args.running
        ):
            break
    core.close()
    return gaps


def summary(gaps: list[float]) -> str:
    ms = sorted(1000 * g for g in gaps)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"p50 {p50:8.1f}  p99 {p99:8.1f}  max {ms[-1]:8.1f} ms  max/p50 {ms[-1] / p50:5.2f}x  ({len(ms)} gaps)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument(
        "--checkpoint", default=None, help="a full-size checkpoint folder (see bench_conversation)"
    )
    parser.add_argument("--positions", type=int, default=1500)
    parser.add_argument("--joins", type=int, default=2)
    parser.add_argument("--running", type=int, default=1)
    parser.add_argument("--warm", type=int, default=8, help="frames before the first prompt joins")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ["CSM_PREFIX_CACHE"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "tiny":
            args.checkpoint = write_demo_checkpoint(Path(tmp) / "demo")
        else:
            if args.checkpoint is None:
                from bench_conversation import full_checkpoint

                args.checkpoint = os.path.join(tmp, "full")
                full_checkpoint(args.checkpoint)
        model = pipeline("text-to-audio", model=args.checkpoint, device="cpu").model  # the CPU default's load
        print(
            f"csm join bench, {args.size}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; {args.running} running row(s), "
            f"{args.joins} prompt(s) of {args.positions} positions joining"
        )
        for r in range(args.rounds):
            for chunk in (None, "auto") if r % 2 == 0 else ("auto", None):
                print(
                    f"round {r + 1} prefill_chunk={str(chunk):5s} {summary(run(model, chunk, args))}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
