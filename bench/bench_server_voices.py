"""Server memory held by saved voices: `csm serve` (the tiny demo checkpoint) in a child process; N voices of
S seconds each are created through POST /v1/voices, then each speaks once; the server's RSS (from /proc) is read
before, after the creates and after the uses.

    python bench/bench_server_voices.py --voices 30 --seconds 60

Not a test: prints a markdown table row to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import soundfile as sf

from csm.demo import write_demo_checkpoint


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voices", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    checkpoint = write_demo_checkpoint()
    noise = np.random.default_rng(0).standard_normal(int(24000 * args.seconds)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, 0.1 * noise, 24000, format="WAV", subtype="PCM_16")
    clip = buf.getvalue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CSM_VOICES_DIR": tmp}
        cmd = [sys.executable, "-m", "csm", "serve", "--model", str(checkpoint), "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=300) as c:
                for _ in range(600):
                    try:
                        if c.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.1)
                c.post("/v1/audio/speech", json={"input": "Hi.", "response_format": "pcm"}).raise_for_status()
                before = rss_mb(proc.pid)
                for i in range(args.voices):
                    files = {"audio_file": ("clip.wav", clip, "audio/wav")}
                    r = c.post(
                        "/v1/voices", files=files, data={"name": f"v{i}", "transcript": "Hello there."}
                    )
                    r.raise_for_status()
                created = rss_mb(proc.pid)
                for i in range(args.voices):
                    body = {"input": "Hi.", "voice": f"v{i}", "response_format": "pcm"}
                    c.post("/v1/audio/speech", json=body).raise_for_status()
                used = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print("| voices | seconds each | RSS before MB | after creates MB | after one use each MB |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.voices} | {args.seconds:g} | {before:.0f} | {created:.0f} (+{created - before:.0f}) "
        f"| {used:.0f} (+{used - before:.0f}) |"
    )


if __name__ == "__main__":
    main()
