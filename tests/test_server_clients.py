"""The server under real clients: OpenAI's Python client, schemathesis over /openapi.json, and a chaos crowd."""

from __future__ import annotations

import io
import json
import random
import resource
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
from serving import SAMPLES_PER_FRAME, demo_checkpoint, serve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with serve(checkpoint, tmp_path_factory.mktemp("clients"), max_batch_size=8, stall_timeout=1.0) as c:
        yield c


def decoded_samples(data: bytes, fmt: str) -> int:
    """Samples of playable audio in `data` (raises if it does not decode as `fmt`)."""
    if fmt == "pcm":
        assert len(data) % 2 == 0
        return len(data) // 2
    if fmt in ("wav", "flac"):
        audio, rate = sf.read(io.BytesIO(data))
        assert rate == 24000 and np.isfinite(audio).all()
        return len(audio)
    with av.open(io.BytesIO(data)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


def test_openai_client_creates_and_streams_speech(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=str(server.base_url) + "/v1", api_key="unused", max_retries=0)
    audio = client.audio.speech.create(model="tts-1", voice="0", input="Hello.", response_format="wav")
    assert decoded_samples(audio.content, "wav") == 4 * SAMPLES_PER_FRAME
    with client.audio.speech.with_streaming_response.create(
        model="csm", voice="0", input="Streaming now.", response_format="pcm"
    ) as response:
        data = b"".join(response.iter_bytes())
    assert len(data) == 2 * 4 * SAMPLES_PER_FRAME
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="tts-1", voice="0", input="", response_format="wav")
    assert e.value.body["param"] == "input"


def test_schemathesis_finds_no_server_error_or_undocumented_status(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    base = str(server.base_url)
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/audio/speech", "/v1/voices", "/health", "/v1/models"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        def check(case):
            case.call_and_validate(base_url=base, checks=checks, timeout=30)

        check()
    assert server.get("/health").status_code == 200


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


FORMATS = ["wav", "pcm", "flac", "mp3", "opus", "aac"]


def chaos_client(server, i: int) -> tuple[str, object]:
    """One of the crowd: a valid request, a malformed or fuzzed one, a disconnect, or a stalled reader."""
    rng = random.Random(i)
    base = str(server.base_url)
    kind = ["valid", "valid", "valid", "bad", "fuzz", "disconnect", "stall"][i % 7]
    if kind == "valid":
        fmt = FORMATS[i % len(FORMATS)]
        body = {"input": f"Request {i} speaks.", "response_format": fmt, "seed": i}
        r = httpx.post(base + "/v1/audio/speech", json=body, timeout=120)
        return kind, (r.status_code, fmt, r.content)
    if kind == "bad":
        bodies = [
            {"input": ""},
            {"input": "x", "speed": 9},
            {"input": "x", "response_format": "ogg"},
            {"input": "x", "voice": "../x"},
            {"input": "x", "seed": -1},
            {"voice": "0"},
            [1, 2, 3],
        ]
        r = httpx.post(base + "/v1/audio/speech", json=bodies[i % len(bodies)], timeout=60)
        return kind, r
    if kind == "fuzz":
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        r = httpx.post(
            base + "/v1/audio/speech", content=junk, headers={"content-type": "application/json"}, timeout=60
        )
        return kind, r
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"input": "Going away soon. " * 10, "response_format": "pcm"}).encode()
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if kind == "disconnect":
        raw.recv(4096)  # the headers and maybe the first audio, then gone
    else:
        time.sleep(3)  # stalled: never reads
    raw.close()
    return kind, None


def test_chaos_crowd_gets_audio_or_clear_errors_and_the_server_stays_up(server):
    before = rss_mb()
    for _ in range(2):  # the second round sees a warmed-up server: RSS must not keep growing
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: chaos_client(server, i), range(35), timeout=300))
        after = rss_mb()
        for kind, result in results:
            if kind == "valid":
                status, fmt, data = result
                assert status == 200, data[:200]
                assert decoded_samples(data, fmt) > 0.5 * 4 * SAMPLES_PER_FRAME
            elif kind in ("bad", "fuzz"):
                assert 400 <= result.status_code < 500, result.text
                error = result.json()["error"]
                assert error["type"] == "invalid_request_error" and error["message"]
    deadline = time.time() + 20
    while server.get("/health").json()["scheduler"]["active"] and time.time() < deadline:
        time.sleep(0.1)
    health = server.get("/health")
    assert health.status_code == 200 and health.json()["scheduler"]["active"] == 0
    assert after - before < 300, (before, after)
