"""Replicas on Ray Serve against one `csm serve`: requests/s at N clients, then a soak with a replica killed.

    flock /tmp/csm-bench.lock python bench/bench_ray_serve.py                  # tiny demo checkpoint
    flock /tmp/csm-bench.lock python bench/bench_ray_serve.py --rounds 2 --soak 1000 --kill-at 500

Each server is a child process: `csm serve` and `csm serve --ray --replicas 2` (the CLI as users run it: a local
Ray, Ray Serve's proxy, 1 CPU per replica), on 127.0.0.1; they alternate `--rounds` times. The soak sends
`--soak` requests through the replicas from `--clients` clients and SIGKILLs one replica's process (found among
the child's descendants by its title, `ray::ServeReplica:...`) when request `--kill-at` is sent, as the kernel's
OOM killer would. Every request has a `--timeout`; a request is "hung" when it hits it. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from healthy import wait_healthy

BODY = {"model": "csm", "response_format": "pcm"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, ray: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "csm", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--max-frames", str(args.max_frames), "--max-batch-size", str(args.max_batch_size)]
    if ray:
        cmd += ["--ray", "--replicas", str(args.replicas)]
    env = {**os.environ, "CSM_VOICES_DIR": str(Path(args.voices))}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmd = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out.append((child, cmd))
            todo.append(child)
    return out


async def load(base: str, clients: int, requests: int, timeout: float, on_send=None) -> dict:
    """`requests` speech requests from `clients` clients; outcomes counted."""
    outcome = {"ok": 0, "error status": 0, "aborted": 0, "hung": 0, "short 200": 0}
    latencies: list[float] = []
    counter = iter(range(requests))
    full = None

    async def client(http: httpx.AsyncClient):
        nonlocal full
        for i in counter:
            if on_send is not None:
                on_send(i)
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    body = {**BODY, "input": f"This is request number {i}."}
                    async with http.stream("POST", "/v1/audio/speech", json=body) as r:
                        size = sum([len(c) async for c in r.aiter_bytes()])
                        status = r.status_code
            except TimeoutError:
                outcome["hung"] += 1
                continue
            except httpx.HTTPError:
                outcome["aborted"] += 1
                continue
            if status != 200:
                outcome["error status"] += 1
                continue
            full = full or size
            if size != full:
                outcome["short 200"] += 1
                continue
            outcome["ok"] += 1
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {
        **outcome,
        "wall": wall,
        "rps": outcome["ok"] / wall,
        "p50": statistics.median(latencies) if latencies else float("nan"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the tiny demo checkpoint)")
    p.add_argument("--max-frames", type=int, default=24)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=192, help="requests per throughput run")
    p.add_argument("--rounds", type=int, default=2, help="one server then the replicas, this many times")
    p.add_argument("--soak", type=int, default=1000, help="requests of the soak (0: none)")
    p.add_argument("--kill-at", type=int, default=500)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as hung")
    p.add_argument("--voices", default="/tmp/csm-bench-ray-voices")
    args = p.parse_args()
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(1)
    )  # `timeout` stops us: the finally blocks stop the servers
    if args.model is None:
        from csm.demo import write_demo_checkpoint

        args.model = str(write_demo_checkpoint())
    print(
        f"model {args.model}, {args.max_frames} frames/request, max batch {args.max_batch_size}, "
        f"{args.clients} clients, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("| server | round | requests ok | failed | wall s | req/s | p50 latency s |")
    print("|---|---|---|---|---|---|---|")
    rates: dict[str, list[float]] = {"csm serve": [], f"--ray --replicas {args.replicas}": []}
    for rnd in range(args.rounds):
        for name, ray in (("csm serve", False), (f"--ray --replicas {args.replicas}", True)):
            proc, base = start(args, ray)
            try:
                if not wait_healthy(base, proc, 300):
                    return 1
                asyncio.run(load(base, args.clients, args.clients, args.timeout))  # warm-up
                r = asyncio.run(load(base, args.clients, args.requests, args.timeout))
                failed = args.requests - r["ok"]
                print(f"| {name} | {rnd + 1} | {r['ok']} | {failed} | {r['wall']:.1f} | {r['rps']:.2f} | {r['p50']:.2f} |", flush=True)  # fmt: skip
                rates[name].append(r["rps"])
                if ray and args.soak and rnd == args.rounds - 1:
                    soak(args, proc, base)
            finally:
                stop(proc)
    one, many = (statistics.median(v) for v in rates.values())
    print(f"\nmedian req/s: one server {one:.2f}, {args.replicas} replicas {many:.2f}: {many / one:.2f}x")
    return 0


def soak(args, proc: subprocess.Popen, base: str) -> None:
    killed: list[str] = []

    def on_send(i: int) -> None:
        if i == args.kill_at and not killed:
            replicas = [(pid, cmd) for pid, cmd in descendants(proc.pid) if "ServeReplica" in cmd]
            if replicas:
                os.kill(replicas[0][0], signal.SIGKILL)
                killed.append(f"{replicas[0][1].strip()} (pid {replicas[0][0]}) of {len(replicas)}")

    r = asyncio.run(load(base, args.clients, args.soak, args.timeout, on_send))
    print(f"\nsoak: {args.soak} requests, {args.clients} clients, killed at request {args.kill_at}: {killed}")
    print(
        "| requests | ok | error status | aborted transfer | short 200 | hung | wall s | req/s | p50 latency s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.soak} | {r['ok']} | {r['error status']} | {r['aborted']} | {r['short 200']} | {r['hung']} | "
        f"{r['wall']:.1f} | {r['rps']:.2f} | {r['p50']:.2f} |",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
