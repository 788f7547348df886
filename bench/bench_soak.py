"""Soak test of the speech server: many requests at a fixed number of clients, then failures, latency and RSS.

    python bench/bench_soak.py                          # 1000 requests, 16 clients, the tiny demo checkpoint
    python bench/bench_soak.py --requests 200 --clients 8 --model PATH --max-frames 25

`csm serve` runs in a child process on 127.0.0.1 (an ephemeral port; its RSS read from /proc); clients are
asyncio + httpx here, cycling through response formats (wav, pcm, flac, mp3, opus, aac) and checking each
response decodes to audio. Not a test: prints a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import soundfile as sf
from healthy import wait_healthy

FORMATS = ("wav", "pcm", "flac", "mp3", "opus", "aac")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def playable(data: bytes, fmt: str) -> bool:
    try:
        if fmt == "pcm":
            return len(data) > 0 and len(data) % 2 == 0
        if fmt in ("wav", "flac"):
            return len(sf.read(io.BytesIO(data))[0]) > 0
        import av  # the server extra's encoder, needed only for mp3/opus/aac

        with av.open(io.BytesIO(data)) as container:
            return sum(frame.samples for frame in container.decode(audio=0)) > 0
    except Exception:
        return False


async def soak(base: str, clients: int, requests: int, formats=FORMATS) -> dict:
    latencies, first_audio, failures = [], [], []
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        for i in counter:
            fmt = formats[i % len(formats)]
            body = {"input": f"This is soak request number {i}.", "response_format": fmt}
            t0, first, data = time.perf_counter(), None, bytearray()
            try:
                async with http.stream("POST", "/v1/audio/speech", json=body) as r:
                    async for chunk in r.aiter_bytes():
                        first = first or time.perf_counter()
                        data += chunk
                    status = r.status_code
            except httpx.HTTPError as e:
                failures.append(f"{fmt}: {type(e).__name__}")
                continue
            if status != 200 or not playable(bytes(data), fmt):
                failures.append(f"{fmt}: status {status}, {len(data)} bytes")
                continue
            latencies.append(time.perf_counter() - t0)
            first_audio.append(first - t0)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    fq = statistics.quantiles(first_audio, n=20)
    return {
        "wall": wall,
        "done": len(latencies),
        "failures": failures,
        "p50": statistics.median(latencies),
        "p95": q[18],
        "first_p50": statistics.median(first_audio),
        "first_p95": fq[18],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the tiny demo checkpoint)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-frames", type=int, default=25, help="frame cap per request (12.5 per second)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument(
        "--start-timeout", type=float, default=120, help="seconds the server may take to be healthy"
    )
    p.add_argument(
        "serve_args", nargs="*", help="more `csm serve` options, after --, e.g. -- --no-batched-decode"
    )
    args = p.parse_args()
    if args.model is None:
        from csm.demo import write_demo_checkpoint

        args.model = str(write_demo_checkpoint())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "csm", "serve", "--model", args.model, "--port", str(port)]
    cmd += [
        "--max-frames",
        str(args.max_frames),
        "--max-batch-size",
        str(args.max_batch_size),
        *args.serve_args,
    ]
    launched = time.time()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(base, server, args.start_timeout):
            return 1
        print(f"healthy {time.time() - launched:.1f} s after launch", flush=True)
        warm = asyncio.run(soak(base, args.clients, args.clients, args.formats))  # allocate, fill pools
        rss_start = rss_mb(server.pid)
        r = asyncio.run(soak(base, args.clients, args.requests, args.formats))
        rss_end = rss_mb(server.pid)
        health = httpx.get(base + "/health").json()
        print(
            f"model {args.model}, {args.requests} requests at {args.clients} clients, formats {'/'.join(args.formats)}, "
            f"--max-frames {args.max_frames} --max-batch-size {args.max_batch_size}, {os.cpu_count()} CPUs; "
            f"warm-up {warm['done']} requests first"
        )
        print(
            "| requests | failed | wall s | req/s | p50 latency s | p95 latency s | p50 first audio s "
            "| p95 first audio s | server RSS start MB | server RSS end MB | mean rows/step |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {args.requests} | {len(r['failures'])} | {r['wall']:.1f} | {r['done'] / r['wall']:.2f} | "
            f"{r['p50']:.2f} | {r['p95']:.2f} | {r['first_p50']:.2f} | {r['first_p95']:.2f} | "
            f"{rss_start:.0f} | {rss_end:.0f} | {health['scheduler']['mean_active_rows']:.1f} |"
        )
        for failure in sorted(set(r["failures"]))[:10]:
            print("failure:", failure, f"(x{r['failures'].count(failure)})")
        print("health after:", health["status"])
    finally:
        server.terminate()
        server.wait(timeout=60)
        lines = server.stderr.read().decode(errors="replace").splitlines()
        for line in lines:
            if "ready to generate" in line:  # its start-up times: load, compile, capture
                print("server:", line.strip())
        for line in itertools.islice((line for line in lines if "ERROR" in line), 10):
            print("server:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
