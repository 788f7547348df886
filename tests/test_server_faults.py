"""Server faults: one request's failure stays its own, errors are statuses (or an aborted transfer), stalled
clients are dropped, the schema is declared, and SIGTERM drains."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serving import SAMPLES_PER_FRAME, assert_error, demo_checkpoint, serve

from csm.batching import BatchCore


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


def speak(client, rid: str | None = None, **fields):
    headers = {"X-Request-ID": rid} if rid else {}
    body = {"input": "Hello from the server.", "response_format": "pcm", **fields}
    return client.post("/v1/audio/speech", json=body, headers=headers)


def fail_decode_for(monkeypatch, request_id: str, after_frames: int = 0):
    """Make the codec decode of the job with `request_id` raise once it holds `after_frames` frames (a shared
    decode of several rows raises too; the batching core then decodes each of them alone)."""
    decode = BatchCore._decode

    def flaky(self, group):
        for b, _ in group:
            job = self.job(b)
            if getattr(job, "request_id", None) == request_id and job.frames >= after_frames:
                raise RuntimeError("codec exploded")
        return decode(self, group)

    monkeypatch.setattr(BatchCore, "_decode", flaky)


def test_one_rows_decode_failure_fails_that_request_alone(checkpoint, tmp_path, monkeypatch, caplog):
    fail_decode_for(monkeypatch, "poison")
    with serve(checkpoint, tmp_path, max_batch_size=4, max_frames=6) as c:
        alone = {i: speak(c, seed=i, input=f"Row {i} speaks.").content for i in range(3)}
        with ThreadPoolExecutor(4) as pool:
            bad = pool.submit(speak, c, "poison", seed=9)
            rows = {i: pool.submit(speak, c, seed=i, input=f"Row {i} speaks.") for i in range(3)}
            for i, f in rows.items():
                r = f.result(timeout=60)
                assert r.status_code == 200
                got, want = np.frombuffer(r.content, "<i2"), np.frombuffer(alone[i], "<i2")
                assert got.shape == want.shape  # the same audio: up to the shared decode's rounding
                assert np.abs(got.astype(np.int32) - want).max() <= 1
            r = bad.result(timeout=60)
        assert r.headers["x-request-id"] == "poison"
        assert_error(r, 500)
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["message"].count("failed") == 1
        assert "codec exploded" in error["message"]
        assert any("poison" in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")
        assert c.get("/health").json()["scheduler"]["failed"] == 1


@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac", "sse"])
def test_a_failure_after_audio_is_never_a_clean_short_file(checkpoint, tmp_path, monkeypatch, fmt):
    fail_decode_for(monkeypatch, "late", after_frames=4)  # the first chunk (2 frames) is sent, then it fails
    with serve(checkpoint, tmp_path, max_batch_size=2, max_frames=8) as c:
        fields = (
            {"response_format": "pcm", "stream_format": "sse"} if fmt == "sse" else {"response_format": fmt}
        )
        if fmt == "flac":  # written only at the end, so buffered: the failure is a status
            assert_error(speak(c, "late", **fields), 500)
        elif fmt == "sse":
            r = speak(c, "late", **fields)
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[0]["type"] == "speech.audio.delta" and events[-1]["type"] == "error"
            assert events[-1]["error"]["type"] == "server_error"
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                speak(c, "late", **fields)
        assert speak(c, **fields).status_code == 200  # the server goes on
        assert c.get("/health").status_code == 200


def test_request_ids_are_echoed_or_made(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=1) as c:
        assert c.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
        made = c.get("/v1/models").headers["x-request-id"]
        assert len(made) == 32
        r = c.post("/v1/audio/speech", content=b"{oops", headers={"X-Request-ID": "bad-body"})
        assert_error(r, 400)
        assert r.headers["x-request-id"] == "bad-body"
        assert c.get("/nope").headers["x-request-id"]


def test_schema_is_declared_and_405_says_allow(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=1) as c:
        spec = c.get("/openapi.json").json()
        body = spec["paths"]["/v1/audio/speech"]["post"]["requestBody"]["content"]["application/json"]
        fields = spec["components"]["schemas"]["SpeechRequest"]["properties"]
        assert body["schema"]["$ref"].endswith("/SpeechRequest")
        assert {"input", "voice", "response_format", "speed", "seed", "temperature", "top_k"} <= set(fields)
        assert fields["input"]["maxLength"] == 4096 and "wav" in fields["response_format"]["enum"]
        assert "multipart/form-data" in spec["paths"]["/v1/voices"]["post"]["requestBody"]["content"]
        assert c.get("/docs").status_code == 200
        r = c.get("/v1/audio/speech")
        assert_error(r, 405)
        assert r.headers["allow"] == "POST"
        assert_error(speak(c, speed="fast"), 400, "speed")
        assert_error(speak(c, voice={"name": "x"}), 400)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scheduler_answers_503_at_once(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=1) as c:
        scheduler = c.app.state.scheduler

        class Fatal(BaseException):
            pass

        def die():
            raise Fatal

        scheduler.core.step = die
        r = speak(c)  # the thread dies under this request: it gets an answer, not a hang
        assert_error(r, 503)
        scheduler._thread.join(timeout=5)
        assert not scheduler.alive
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        started = time.perf_counter()
        assert_error(speak(c), 503)
        assert time.perf_counter() - started < 2


def test_a_client_that_stops_reading_is_dropped_and_its_row_freed(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, sndbuf=4096, max_batch_size=2, max_frames=1500, stall_timeout=0.5) as c:
        port = int(str(c.base_url).rsplit(":", 1)[1].rstrip("/"))
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        body = json.dumps({"input": "A long answer. " * 40, "response_format": "pcm"}).encode()
        stalled.sendall(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )  # and never read
        deadline = time.time() + 30
        while time.time() < deadline:
            stats = c.get("/health").json()["scheduler"]
            if stats["steps"] and stats["active"] == 0:
                break
            time.sleep(0.1)
        assert stats["active"] == 0 and stats["cancelled"] == 1 and stats["completed"] == 0
        assert stats["frames_generated"] < 1500
        assert speak(c).status_code == 200  # others are served meanwhile and after
        stalled.close()


@pytest.mark.parametrize("grace", [20.0, 0.5])
def test_sigterm_drains_in_flight_requests_then_exits_0(checkpoint, tmp_path, grace):
    """New requests get 503 while the one in flight finishes (grace 20 s) or, past a short grace, is ended as
    an aborted transfer (an SSE `error` event); the server exits 0 with no traceback either way."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "CSM_VOICES_DIR": str(tmp_path / "voices")}
    cmd = [sys.executable, "-m", "csm", "serve", "--model", str(checkpoint), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--shutdown-grace", str(grace), "--max-frames", "60"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"input": "Speak for a while. " * 10, "response_format": "pcm", "stream_format": "sse"}
        with (
            httpx.Client(base_url=base, timeout=60) as c,
            c.stream("POST", "/v1/audio/speech", json=body) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            late = httpx.post(
                base + "/v1/audio/speech", json=body, timeout=5, headers={"X-Request-ID": "late"}
            )
            assert_error(late, 503)  # the listener is still open during the drain: the documented 503
            assert httpx.get(base + "/health").json()["status"] == "draining"
            events = [json.loads(first[6:])] + [
                json.loads(line[6:]) for line in lines if line.startswith("data: ")
            ]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in out and "CancelledError" not in out, out
    assert re.search(r'csm.access: "POST /v1/audio/speech" 503 [0-9.]+s .* rid=late', out), out
    if grace > 5:
        assert events[-1]["type"] == "speech.audio.done"  # the in-flight request finished
        audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
        frames = events[-1]["usage"]["output_tokens"]
        assert frames > 0 and abs(len(audio) // 2 - frames * SAMPLES_PER_FRAME) < SAMPLES_PER_FRAME
    else:  # ended by the server: never a clean short file
        assert events[-1]["type"] == "error" and "still running after the 0.5 s shutdown grace" in out
