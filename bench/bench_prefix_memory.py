"""The prefix store stays within its bound: `csm serve` (the tiny demo checkpoint) in a child process with
`--prefix-cache-mb M`; N requests each bring a distinct voice clip as `context` (a new voice every time, so
the store fills and evicts); the server's RSS (from /proc) is read after a warm-up and every 100 requests, and
the store's bytes from /health.

    python bench/bench_prefix_memory.py --requests 1000 --mb 16 --seconds 10

Not a test: prints the RSS growth over the warm-up against the bound.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile

import httpx
import numpy as np
import soundfile as sf
from healthy import wait_healthy

from csm.demo import write_demo_checkpoint


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def clip_b64(seconds: float, seed: int) -> str:
    noise = np.random.default_rng(seed).standard_normal(int(24000 * seconds)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, 0.1 * noise, 24000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=16.0, help="--prefix-cache-mb of the server")
    parser.add_argument("--seconds", type=float, default=10.0, help="each voice clip's length")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    checkpoint = write_demo_checkpoint()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CSM_VOICES_DIR": tmp}
        cmd = [
            sys.executable,
            "-m",
            "csm",
            "serve",
            "--model",
            str(checkpoint),
            "--port",
            str(port),
            "--prefix-cache-mb",
            str(args.mb),
            "--max-frames",
            "2",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_healthy(base, proc, 120):
                sys.exit(1)
            clips = [clip_b64(args.seconds, i) for i in range(8)]  # bodies vary by text: each is a new voice
            with httpx.Client(base_url=base, timeout=300) as c:
                base_rss = None
                for i in range(args.requests):
                    body = {
                        "input": "Hi.",
                        "response_format": "pcm",
                        "seed": 1,
                        "context": [
                            {"text": f"Voice number {i} speaking here.", "audio": clips[i % len(clips)]}
                        ],
                    }
                    c.post("/v1/audio/speech", json=body).raise_for_status()
                    if i + 1 == args.warmup:
                        base_rss = rss_mb(proc.pid)
                        print(f"after {i + 1} requests: RSS {base_rss:.0f} MB")
                    if (i + 1) % 100 == 0:
                        store = c.get("/health").json()["scheduler"]["prefix_cache"]
                        rss = rss_mb(proc.pid)
                        print(
                            f"after {i + 1} requests: RSS {rss:.0f} MB (+{rss - base_rss:.0f} MB since the warm-up), "
                            f"store {store['bytes'] / 2**20:.1f} MB of {store['max_bytes'] / 2**20:.0f}, "
                            f"{store['entries']} blocks, {store['evictions']} evicted",
                            flush=True,
                        )
                rss = rss_mb(proc.pid)
                print(
                    f"RSS growth after the warm-up: {rss - base_rss:.0f} MB; bound {args.mb:g} MB "
                    f"({(rss - base_rss) / max(args.mb, 1e-9):.2f}x the bound)"
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
