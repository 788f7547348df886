"""Waiting for a `csm serve` child process to answer /health: shared by the server benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx


def wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> bool:
    """Poll `base`/health until it answers 200; False (and a line on stderr) if the server exits or
    `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            print("the server did not start", file=sys.stderr)
            return False
        time.sleep(0.2)
