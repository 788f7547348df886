"""Throughput of `csm batch`: lines/s and audio-seconds/s at several batch sizes, in one process and on a local
Ray instance with 2 workers, against the loop users write today (`tts(text)` line by line, each file saved).

    python bench/bench_batch.py                                  # tiny demo checkpoint, 64 lines
    python bench/bench_batch.py --lines 128 --batch-sizes 1 8 32 --model PATH --device cuda

Every run starts from an empty output folder and is timed end to end (loading the model included: for Ray
that is starting the actors and loading one model per worker). Random weights never say end-of-audio, so
every sentence is exactly `--max-seconds` long and each configuration does the same work.
Not a test: prints a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from csm.batch import OutputDir
from csm.cli import main
from csm.demo import write_demo_checkpoint

TEXTS = [
    "Hello from the tiny demo model.",
    "Speech comes out of a backbone and a depth decoder, one frame at a time.",
    "The quick brown fox jumps over the lazy dog.",
    "We listen, and then it answers in the voice of the speaker.",
    "How are you doing today?",
]


def requests(path: Path, n: int) -> Path:
    """n lines, a third of them two sentences long."""
    with open(path, "w") as f:
        for i in range(n):
            text = TEXTS[i % len(TEXTS)]
            if i % 3 == 2:
                text += " " + TEXTS[(i + 1) % len(TEXTS)]
            f.write(json.dumps({"id": f"line{i:05d}", "text": text}) + "\n")
    return path


def run_batch(args, reqs: Path, out: Path, batch_size: int, ray: bool) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["batch", str(reqs), "--out", str(out), "--model", str(args.model), "--max-seconds",
            str(args.max_seconds), "--seed", "0", "--batch-size", str(batch_size), "-q"]  # fmt: skip
    argv += ["--device", args.device] if args.device else []
    argv += ["--ray", "--workers", "2"] if ray else []
    argv += ["--batched-decode"] if args.batched_decode else []
    t0 = time.perf_counter()
    assert main(argv) == 0, "the batch run failed"
    took = time.perf_counter() - t0
    rows = [r for r in OutputDir(out).rows() if r["status"] == "ok"]
    return took, sum(r["seconds"] for r in rows), len(rows)


def run_loop(args, reqs: Path, out: Path) -> tuple[float, float, int]:
    """What a user writes today: load the pipeline, then call it line by line and save each file."""
    from csm.audio import save_audio
    from csm.pipeline import pipeline

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    tts = pipeline("text-to-audio", model=str(args.model), device=args.device)
    seconds, n = 0.0, 0
    for line in reqs.read_text().splitlines():
        request = json.loads(line)
        audio = tts(request["text"], seed=0, max_seconds=args.max_seconds)["audio"]
        save_audio(audio, out / f"{request['id']}.wav")
        seconds, n = seconds + len(audio) / tts.sampling_rate, n + 1
    return time.perf_counter() - t0, seconds, n


def main_bench() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the tiny demo checkpoint)")
    p.add_argument("--device", default=None)
    p.add_argument("--lines", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=1.0, help="audio per sentence (default: 1.0)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-ray", action="store_true", help="leave out the Ray runs")
    p.add_argument("--batched-decode", action="store_true", help="csm batch --batched-decode")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of this process (default: torch's)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # random weights: "without end-of-audio" on every sentence
    work = Path(tempfile.mkdtemp(prefix="csm-bench-batch-"))
    args.model = args.model or write_demo_checkpoint(work / "ckpt")
    reqs = requests(work / "requests.jsonl", args.lines)
    runs = [("loop: `tts(text)` per line", None, lambda: run_loop(args, reqs, work / "loop"))]
    for bs in args.batch_sizes:
        runs.append(("csm batch", bs, lambda bs=bs: run_batch(args, reqs, work / f"b{bs}", bs, False)))
    ray = None
    if not args.no_ray:

        def on_ray(bs):
            nonlocal ray
            if ray is None:  # started after the one-process runs, so its daemons do not slow those down
                import ray

                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            return run_batch(args, reqs, work / f"r{bs}", bs, True)

        for bs in args.batch_sizes:
            runs.append(("csm batch --ray, 2 workers", bs, lambda bs=bs: on_ray(bs)))
    rows = []
    try:
        for name, bs, fn in runs:
            times = []
            for _ in range(args.repeats):
                took, seconds, n = fn()
                assert n == args.lines, f"{name}: {n} of {args.lines} lines"
                times.append(took)
            took = statistics.median(times)
            rows.append((name, bs, took, n / took, seconds / took))
            print(
                f"{name} bs={bs}: {took:.1f} s, {n / took:.2f} lines/s, {seconds / took:.2f} audio-s/s",
                flush=True,
            )
    finally:
        if ray is not None:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0][3]
    print(f"\n{args.lines} lines, {args.max_seconds} s per sentence; {platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}\n")  # fmt: skip
    print("| run | batch size | wall s | lines/s | audio-s/s | vs loop |\n|---|---|---|---|---|---|")
    for name, bs, took, lps, asps in rows:
        print(f"| {name} | {bs or '-'} | {took:.1f} | {lps:.2f} | {asps:.2f} | {lps / base:.2f}x |")


if __name__ == "__main__":
    main_bench()
