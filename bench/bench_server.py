"""Load benchmark of the speech server: requests/s and latency at 1, 8 and 32 concurrent clients.

    python bench/bench_server.py                       # the tiny demo checkpoint, 25 frames (2 s) per request
    python bench/bench_server.py --model PATH --max-frames 50 --max-batch-size 16

The server runs in a child process on 127.0.0.1 (an ephemeral port); clients are asyncio + httpx here.
Not a test: prints a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx
from healthy import wait_healthy


def serve(args) -> None:
    import uvicorn

    from csm.server import ServerSettings, load_app

    settings = ServerSettings(
        max_batch_size=args.max_batch_size,
        max_frames=args.max_frames,
        max_queue=256,
        chunk_frames=args.chunk_frames,
    )
    app = load_app(args.model, device=args.device, settings=settings)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


async def level(base: str, concurrency: int, requests: int, budget_s: float) -> dict:
    latencies, first_bytes, failures = [], [], 0
    audio_bytes = 0
    counter = iter(range(requests))
    deadline = time.perf_counter() + budget_s

    async def client(http: httpx.AsyncClient):
        nonlocal failures, audio_bytes
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {
                "model": "csm",
                "input": f"This is benchmark request number {i}.",
                "response_format": "pcm",
            }
            t0 = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/audio/speech", json=body) as r:
                async for chunk in r.aiter_bytes():
                    first = first or time.perf_counter()
                    audio_bytes += len(chunk)
                ok = r.status_code == 200
            if not ok:
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)
            first_bytes.append(first - t0)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        stats = (await http.get("/health")).json()["scheduler"]
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "concurrency": concurrency,
        "done": len(latencies),
        "failed": failures,
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p95": q[18],
        "ttfb_p50": statistics.median(first_bytes),
        "audio_x_realtime": audio_bytes / 2 / 24000 / wall,
        "max_rows": stats["max_active_rows"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the tiny demo checkpoint)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-frames", type=int, default=25, help="frames per request (12.5 per second of audio)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--chunk-frames", type=int, default=4)
    p.add_argument("--levels", default="1,8,32", help="concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds per level at most")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return 0
    if args.model is None:
        from csm.demo import write_demo_checkpoint

        args.model = str(write_demo_checkpoint())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", "--model", args.model, "--port", str(port)]
    cmd += ["--max-frames", str(args.max_frames), "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--chunk-frames", str(args.chunk_frames)] + (["--device", args.device] if args.device else [])
    server = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(base, server, 120):
            return 1
        print(
            f"model {args.model}, {args.max_frames} frames/request, max batch {args.max_batch_size}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        )
        print(
            "| clients | requests | failed | req/s | p50 latency s | p95 latency s | p50 first audio s | audio x realtime | max rows/step |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for c in (int(x) for x in args.levels.split(",")):
            r = asyncio.run(level(base, c, max(args.requests, c), args.budget))
            print(
                f"| {c} | {r['done']} | {r['failed']} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                f"{r['ttfb_p50']:.2f} | {r['audio_x_realtime']:.2f} | {r['max_rows']} |",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
