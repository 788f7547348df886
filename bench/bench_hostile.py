"""Hostile clients against the speech server: what they get back, and what they cost it in memory and sockets.

    python bench/bench_hostile.py                 # the tiny demo checkpoint, each attack a few times
    python bench/bench_hostile.py --repeat 4 --slow-sockets 300

`csm serve` runs in a child process on 127.0.0.1 (an ephemeral port). The mix, each case `--repeat` times at
once: decode bombs (the issue's 60-minute 96 kHz stereo FLAC of silence, 1.37 MB, and the same file with a
header that does not say its length) as an upload, a speech context clip and a dialogue turn; 100 MB JSON
bodies (with a Content-Length, and chunked), 300 MB uploads (both ways); request heads and bodies trickled a
byte at a time (`--slow-sockets` of them); malformed requests (bad JSON, not UTF-8, no Content-Type, unknown
fields, wrong types, odd voices); and valid requests throughout, which must still get audio. The server's peak
RSS is read from /proc (VmHWM, reset before each case), its open file descriptors sampled. Not a test: prints
a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import collections
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from healthy import wait_healthy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hostile import claim_length, silent_flac  # noqa: E402  (the test suite's bomb maker)


def proc_status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_request(port: int, head: bytes, body_chunks=(), timeout: float = 60.0) -> str:
    """Send a request by hand (a writer thread feeds `body_chunks`) and return its status, or what happened."""
    sock = socket.create_connection(("127.0.0.1", port))

    def write():
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    except TimeoutError:
        return "timeout"
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


def chunked(total: int, size: int = 1 << 20):
    piece = b"%x\r\n" % size + b"0" * size + b"\r\n"
    for _ in range(total // size):
        yield piece
    yield b"0\r\n\r\n"


def cases(port: int, flac: dict, valid_body: dict) -> dict:
    """Name -> a function that makes one attack and returns the status it got."""
    base = f"http://127.0.0.1:{port}"

    def post(path, **kw):
        def go():
            try:
                return str(httpx.post(base + path, timeout=120, **kw).status_code)
            except httpx.HTTPError as e:
                return type(e).__name__

        return go

    def clip_cases(name, data):
        b64 = base64.b64encode(data).decode()
        files = {"audio_file": ("bomb.flac", data, "audio/flac")}
        turns = [{"speaker": 0, "text": "Silence.", "audio": b64}, {"speaker": 1, "text": "Hello."}]
        return {
            f"{name} as upload": post("/v1/voices", files=files, data={"name": "bomb", "transcript": "Hi."}),
            f"{name} as context": post(
                "/v1/audio/speech", json={"input": "Hi.", "context": [{"text": "Hi.", "audio": b64}]}
            ),
            f"{name} as dialogue turn": post("/v1/audio/dialogue", json={"turns": turns}),
        }

    json_head = b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    upload_head = (
        b"POST /v1/voices HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    )
    big = 100 << 20
    part = b'--b\r\nContent-Disposition: form-data; name="audio_file"; filename="a.wav"\r\n\r\n'
    keys = ("{" + ",".join(f'"k{i}":1' for i in range(2_600_000)) + "}").encode()  # issue 32: 31 MB
    long_clip = base64.b64encode(flac["minute"]).decode()
    wide_clip = base64.b64encode(flac["wide"]).decode()
    body_31 = 31 << 20

    def fast_then_trickled():  # 31 MiB at once, then a byte every 20 s (issue 32, item 2)
        def trickle():
            yield b" " * (body_31 - 100)
            for _ in range(100):
                time.sleep(20)
                yield b" "

        return raw_request(port, json_head + b"Content-Length: %d\r\n\r\n" % body_31, trickle(), 300)

    def smuggle(head):
        return lambda: raw_request(port, head, (), 10)

    mix = {
        "31 MB JSON of 2.6 M keys": post(
            "/v1/audio/speech", content=keys, headers={"content-type": "application/json"}
        ),
        "JSON nested 5000 deep": post(
            "/v1/audio/speech",
            content=b'{"input": "hi", "voice": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            headers={"content-type": "application/json"},
        ),
        "31 MiB body, then a byte / 20 s (x4 per repeat)": lambda: collections.Counter(
            ThreadPoolExecutor(4).map(lambda _: fast_then_trickled(), range(4))
        ),
        "64 x 60 s context clips (359 KB)": post(
            "/v1/audio/speech",
            json={"input": "Hi.", "context": [{"text": "Hi.", "audio": long_clip}] * 64},
        ),
        "12 x 5 s 384 kHz 8-ch context clips": post(
            "/v1/audio/speech",
            json={"input": "Hi.", "context": [{"text": "Hi.", "audio": wide_clip}] * 12},
        ),
        "Host: attacker.example": post(
            "/v1/audio/speech", json=valid_body, headers={"host": "attacker.example"}
        ),
        "cross-origin voice 'alloy'": post(
            "/v1/voices",
            files={"audio_file": ("a.flac", flac["second"], "audio/flac")},
            data={"name": "alloy", "transcript": "Planted."},
            headers={"origin": "http://evil.example"},
        ),
        "voice name 'alloy\\n'": post(
            "/v1/voices",
            files={"audio_file": ("a.flac", flac["second"], "audio/flac")},
            data={"name": "alloy\n", "transcript": "Planted."},
        ),
        "voice true": post("/v1/audio/speech", json={**valid_body, "voice": True}),
        "CL + TE, then a pipelined request": smuggle(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
        ),
        "obs-fold header": smuggle(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n folded\r\n\r\n"),
        "bare LF head": smuggle(b"GET /health HTTP/1.1\nHost: localhost\n\n"),
        "path with %0d%0a (log forging)": smuggle(
            b"GET /x%0d%0aFORGED HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ),
        **clip_cases("bomb (header: 60 min)", flac["header"]),
        **clip_cases("bomb (header: unknown)", flac["stream"]),
        "100 MB JSON, Content-Length": lambda: raw_request(
            port, json_head + b"Content-Length: %d\r\n\r\n" % big, chunked(big)
        ),
        "100 MB JSON, chunked": lambda: raw_request(
            port, json_head + b"Transfer-Encoding: chunked\r\n\r\n", chunked(big)
        ),
        "300 MB upload, Content-Length": lambda: raw_request(
            port, upload_head + b"Content-Length: %d\r\n\r\n" % (3 * big), chunked(3 * big)
        ),
        "300 MB upload, chunked": lambda: raw_request(
            port,
            upload_head + b"Transfer-Encoding: chunked\r\n\r\n",
            itertools.chain([b"%x\r\n%s\r\n" % (len(part), part)], chunked(3 * big)),
        ),
        "not JSON": post("/v1/audio/speech", content=b"{nope", headers={"content-type": "application/json"}),
        "not UTF-8": post(
            "/v1/audio/speech", content=b'{"input": "\xff"}', headers={"content-type": "application/json"}
        ),
        "JSON without Content-Type": post("/v1/audio/speech", content=json.dumps(valid_body).encode()),
        "unknown field": post("/v1/audio/speech", json={**valid_body, "response_fromat": "wav"}),
        "voice null": post("/v1/audio/speech", json={**valid_body, "voice": None}),
        "voice '²'": post("/v1/audio/speech", json={**valid_body, "voice": "²"}),
        "voice of 5000 digits": post("/v1/audio/speech", json={**valid_body, "voice": "9" * 5000}),
        "multipart without boundary": post(
            "/v1/voices", content=b"x", headers={"content-type": "multipart/form-data"}
        ),
        "valid speech": post("/v1/audio/speech", json=valid_body),
    }
    return mix


def slow_sockets(port: int, count: int, seconds: float, body: bool) -> collections.Counter:
    """`count` connections that trickle a head (or, `body`, a body) one byte a second; how each one ended."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        if body:
            s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n")
        else:
            s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\n")
        s.setblocking(False)
        socks.append(s)
    ended: dict[int, str] = {}
    start = time.time()
    while time.time() - start < seconds and len(ended) < count:
        for i, s in enumerate(socks):
            if i in ended:
                continue
            try:
                data = s.recv(4096)
                ended[i] = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
                continue
            except BlockingIOError:
                pass
            except OSError:
                ended[i] = "closed"
                continue
            try:
                s.send(b"X")
            except OSError:
                ended[i] = "closed"
        time.sleep(1.0)
    for s in socks:
        s.close()
    return collections.Counter({**{i: "still open" for i in range(count)}, **ended}.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the tiny demo checkpoint)")
    p.add_argument("--repeat", type=int, default=4, help="each attack this many times at once")
    p.add_argument("--slow-sockets", type=int, default=300, help="connections trickling a head, then a body")
    p.add_argument(
        "--slow-seconds", type=float, default=45.0, help="how long the trickling clients keep at it"
    )
    p.add_argument("serve_args", nargs="*", help="more `csm serve` options, after --")
    args = p.parse_args()
    if args.model is None:
        from csm.demo import write_demo_checkpoint

        args.model = str(write_demo_checkpoint())
    print("making the bombs ...", file=sys.stderr)
    made = time.time()
    real = silent_flac(3600.0)  # the file: 60 minutes of 96 kHz stereo silence
    flac = {"header": real, "stream": claim_length(real, 0.0, 96_000)}  # the same, its length unknown
    flac["minute"] = silent_flac(60.0, rate=24_000, channels=1)  # issue 32: 64 of them in a small body
    flac["wide"] = silent_flac(5.0, rate=384_000, channels=8)  # issue 32: decoding work
    flac["second"] = silent_flac(1.0, rate=24_000, channels=1)
    print(f"  {len(real) / 1e6:.2f} MB bomb in {time.time() - made:.0f} s", file=sys.stderr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "csm",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--max-frames",
        "8",
    ]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-hostile-server-{os.getpid()}.log"
    log_file = open(log_path, "w")  # noqa: SIM115 (the child writes it until the end)
    server = subprocess.Popen([*cmd, *args.serve_args], stdout=subprocess.DEVNULL, stderr=log_file)
    print(f"  server log: {log_path}", file=sys.stderr)
    base = f"http://127.0.0.1:{port}"
    valid = {"input": "A valid request among the hostile ones.", "response_format": "wav"}
    try:
        if not wait_healthy(base, server, 120):
            return 1
        httpx.post(base + "/v1/audio/speech", json=valid, timeout=120)  # warm up
        rss_start = proc_status(server.pid, "VmRSS")
        fds_start = open_fds(server.pid)

        def reset_peak():  # VmHWM from here on
            with open(f"/proc/{server.pid}/clear_refs", "w") as f:
                f.write("5")

        peak = rss_start
        fds_max = [fds_start]
        sampling = threading.Event()

        def sample():
            while not sampling.wait(0.2):
                fds_max[0] = max(fds_max[0], open_fds(server.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        probes: list[tuple[float, float]] = []  # (when sent, seconds to answer) of /health, every 0.5 s

        def probe():
            with httpx.Client(timeout=120) as client:
                while not sampling.wait(0.5):
                    t = time.time()
                    try:
                        client.get(base + "/health")
                        probes.append((t, time.time() - t))
                    except httpx.HTTPError:
                        probes.append((t, float("inf")))

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()

        def health_max(t0: float, t1: float) -> float:
            return max((took for t, took in probes if t0 <= t <= t1), default=float("nan"))

        rows = []
        mix = cases(port, flac, valid)
        for name, attack in mix.items():
            t0 = time.time()
            reset_peak()
            with ThreadPoolExecutor(args.repeat) as pool:
                statuses = list(pool.map(lambda _, a=attack: a(), range(args.repeat)))
            counted = collections.Counter()
            for status in statuses:  # a case may count several requests itself
                counted.update(status if isinstance(status, collections.Counter) else [status])
            time.sleep(0.5)  # a refused body is still being read and dropped
            case_peak = proc_status(server.pid, "VmHWM")
            peak = max(peak, case_peak)
            rows.append((name, counted, time.time() - t0, case_peak, health_max(t0, time.time())))
            print(f"  {name}: {dict(rows[-1][1])}", file=sys.stderr)
        for body in (False, True):
            t0 = time.time()
            reset_peak()
            ended = slow_sockets(port, args.slow_sockets, args.slow_seconds, body)
            name = f"{args.slow_sockets} sockets trickling a {'body' if body else 'head'}"
            case_peak = proc_status(server.pid, "VmHWM")
            peak = max(peak, case_peak)
            rows.append((name, ended, time.time() - t0, case_peak, health_max(t0, time.time())))
            print(f"  {name}: {dict(ended)}", file=sys.stderr)
        time.sleep(1.0)
        sampling.set()
        try:
            after = httpx.post(base + "/v1/audio/speech", json=valid, timeout=120).status_code
        except httpx.HTTPError as e:
            after = type(e).__name__
            subprocess.run(["py-spy", "dump", "--pid", str(server.pid)], check=False)  # where it stalls
        rss_end = proc_status(server.pid, "VmRSS")
        fds_end = open_fds(server.pid)
        print(
            f"model {args.model}, each case x{args.repeat} at once, {os.cpu_count()} CPUs, "
            f"server flags: {' '.join(args.serve_args) or '(defaults)'}"
        )
        print("| case | statuses | seconds | server peak RSS MB | slowest /health s |")
        print("|---|---|---|---|---|")
        for name, statuses, took, case_peak, slowest in rows:
            shown = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
            print(f"| {name} | {shown} | {took:.1f} | {case_peak:.0f} | {slowest:.2f} |")
        print()
        print(
            f"server RSS: {rss_start:.0f} MB before, peak {peak:.0f} MB, {rss_end:.0f} MB after; "
            f"open fds: {fds_start} before, max {fds_max[0]}, {fds_end} after; a valid request after: {after}"
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print("server: did not stop within 60 s of SIGTERM; killed")
            server.kill()
        log_file.close()
        log = log_path.read_text(errors="replace").splitlines()
        errors = [line for line in log if "ERROR" in line]
        forged = [line for line in log if line.startswith("FORGED")]
        print(f"log lines an attacker wrote (a path with %0d%0a): {len(forged)}")
        for line in itertools.islice(errors, 10):
            print("server:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
