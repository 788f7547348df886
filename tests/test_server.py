"""The speech server on a loopback port with the tiny checkpoint: endpoints, errors, streaming, batching."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
import soundfile as sf
from serving import SAMPLES_PER_FRAME, assert_error, demo_checkpoint, serve, speak

from csm.server import service as server_service


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    with serve(checkpoint, tmp_path_factory.mktemp("srv"), max_batch_size=8, max_upload_seconds=2.0) as c:
        yield c


def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(24000 * seconds)) / 24000
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000, format="WAV")
    return buf.getvalue()


# ---- endpoints ---------------------------------------------------------------------------------------


def test_health_models_and_voices_list(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["scheduler"]["max_batch_size"] == 8
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert client.get("/v1/voices").json()["object"] == "list"


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus", "aac"])
def test_every_response_format_decodes_to_audio(client, fmt):
    r = speak(client, response_format=fmt)
    assert r.status_code == 200, r.text
    assert r.headers["x-accel-buffering"] == "no"
    if fmt == "pcm":
        audio = np.frombuffer(r.content, dtype="<i2")
        assert audio.shape == (4 * SAMPLES_PER_FRAME,)
    elif fmt in ("wav", "flac"):
        audio, rate = sf.read(io.BytesIO(r.content))
        assert rate == 24000 and audio.shape == (4 * SAMPLES_PER_FRAME,)
    else:
        with av.open(io.BytesIO(r.content)) as container:
            samples = sum(frame.samples for frame in container.decode(audio=0))
        assert samples > 0.5 * 4 * SAMPLES_PER_FRAME


def test_sse_sends_audio_deltas_then_done_with_usage(client):
    r = speak(client, response_format="pcm", stream_format="sse")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) == 2  # 4 frames in chunks of 2
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) == 4 * SAMPLES_PER_FRAME * 2
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == 4 and events[-1]["usage"]["input_tokens"] > 0


def test_speed_resamples_the_audio(client):
    fast = speak(client, response_format="pcm", speed=2.0)
    slow = speak(client, response_format="pcm", speed=0.5)
    assert fast.headers["x-speed-method"].startswith("resample")
    n = 4 * SAMPLES_PER_FRAME
    assert abs(len(fast.content) // 2 - n / 2) <= 64
    assert abs(len(slow.content) // 2 - n * 2) <= 64


def test_a_seeded_request_alone_is_reproducible(client):
    a = speak(client, response_format="pcm", seed=7).content
    b = speak(client, response_format="pcm", seed=7).content
    c = speak(client, response_format="pcm", seed=8).content
    assert a == b and a != c


def test_speaker_number_and_openai_voice_object(client):
    assert speak(client, voice="3", response_format="pcm").status_code == 200
    assert speak(client, voice=1, response_format="pcm").status_code == 200
    assert speak(client, voice={"id": "2"}, response_format="pcm").status_code == 200


def test_uploaded_voice_is_listed_and_speaks(client):
    files = {"audio_file": ("clip.wav", wav_bytes(0.5), "audio/wav")}
    r = client.post("/v1/voices", files=files, data={"name": "ana", "transcript": "The quick brown fox."})
    assert r.status_code == 201, r.text
    assert "ana" in [v["id"] for v in client.get("/v1/voices").json()["voices"]]
    r = speak(client, voice="ana", response_format="wav")
    assert r.status_code == 200 and sf.read(io.BytesIO(r.content))[0].shape == (4 * SAMPLES_PER_FRAME,)
    again = client.post("/v1/voices", files=files, data={"name": "ana", "transcript": "Again."})
    assert_error(again, 409, "name")


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, status, param",
    [
        ({"input": ""}, 400, "input"),
        ({"input": "x" * 5000}, 400, "input"),
        ({"response_format": "ogg"}, 400, "response_format"),
        ({"speed": 5.0}, 400, "speed"),
        ({"stream_format": "video"}, 400, "stream_format"),
        ({"voice": "nobody"}, 404, "voice"),
        ({"voice": "../etc"}, 400, "voice"),
        ({"model": "gpt-5"}, 404, "model"),
        ({"input": 12}, 400, "input"),
        ({"temperature": -1.0}, 400, None),
    ],
)
def test_bad_speech_requests_get_json_errors(client, fields, status, param):
    assert_error(speak(client, **fields), status, param)


def test_malformed_bodies_and_uploads_never_take_the_server_down(client):
    assert_error(client.post("/v1/audio/speech", content=b"{not json"), 400)
    assert_error(client.post("/v1/audio/speech", json={"voice": "0"}), 400, "input")
    assert_error(client.post("/v1/audio/speech", json=[1, 2]), 400)
    files = {"audio_file": ("clip.wav", b"not audio at all", "audio/wav")}
    assert_error(
        client.post("/v1/voices", files=files, data={"name": "x", "transcript": "hi"}), 400, "audio_file"
    )
    long = {"audio_file": ("clip.wav", wav_bytes(3.0), "audio/wav")}
    assert_error(
        client.post("/v1/voices", files=long, data={"name": "long", "transcript": "hi"}), 413, "audio_file"
    )
    assert_error(client.post("/v1/voices", files=files, data={"name": "x"}), 400, "transcript")
    ok = {"audio_file": ("clip.wav", wav_bytes(0.2), "audio/wav")}
    assert_error(
        client.post("/v1/voices", files=ok, data={"name": "bad/name", "transcript": "hi"}), 400, "name"
    )
    assert speak(client, response_format="pcm").status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_upload_size_limit(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=1, max_upload_bytes=1000) as c:
        files = {"audio_file": ("clip.wav", wav_bytes(0.5), "audio/wav")}
        assert_error(
            c.post("/v1/voices", files=files, data={"name": "big", "transcript": "hi"}), 413, "audio_file"
        )


def test_api_key_guards_v1_but_not_health(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=1, api_key="secret") as c:
        assert_error(c.get("/v1/models"), 401)
        assert_error(speak(c), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
        assert c.get("/health").status_code == 200


# ---- streaming, disconnects, batching, queue ---------------------------------------------------------


def test_streaming_yields_audio_before_the_request_completes_and_disconnect_frees_the_row(
    checkpoint, tmp_path
):
    with serve(checkpoint, tmp_path, max_batch_size=2, max_frames=400) as c:
        # One chunk (no sentence end, under 200 characters): no earlier job can complete before we look.
        body = {"input": "a long answer " * 14, "response_format": "pcm"}  # a budget of 400 frames
        with c.stream("POST", "/v1/audio/speech", json=body) as r:
            assert r.status_code == 200
            first = next(r.iter_bytes())
            assert len(first) > 0
            stats = c.get("/health").json()["scheduler"]
            assert stats["active"] == 1 and stats["completed"] == 0  # audio arrived while still generating
        deadline = time.time() + 20
        while time.time() < deadline:
            stats = c.get("/health").json()["scheduler"]
            if stats["active"] == 0:
                break
            time.sleep(0.05)
        assert stats["active"] == 0 and stats["cancelled"] == 1
        assert stats["frames_generated"] < 400


def test_queue_full_gets_429(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=1, max_queue=1, max_frames=400) as c:
        body = {"input": "Busy for a while. " * 20, "response_format": "pcm"}
        with c.stream("POST", "/v1/audio/speech", json=body) as busy:
            assert busy.status_code == 200  # holds the only row
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(c.post, "/v1/audio/speech", json={**body, "input": "Waiting."})
                deadline = time.time() + 10
                while c.get("/health").json()["scheduler"]["waiting"] < 1 and time.time() < deadline:
                    time.sleep(0.02)
                assert_error(c.post("/v1/audio/speech", json=body), 429)
                busy.close()  # frees the row: the waiting request runs
                assert waiting.result(timeout=60).status_code == 200


def test_32_concurrent_requests_complete_and_are_batched(client):
    def one(i):
        return client.post(
            "/v1/audio/speech", json={"input": f"Request number {i}.", "response_format": "wav"}
        )

    before = client.get("/health").json()["scheduler"]["completed"]
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32), timeout=120))
    for r in responses:
        assert r.status_code == 200, r.text
        audio, rate = sf.read(io.BytesIO(r.content))
        assert rate == 24000 and audio.shape == (4 * SAMPLES_PER_FRAME,) and np.isfinite(audio).all()
    stats = client.get("/health").json()["scheduler"]
    assert stats["completed"] - before == 32
    assert stats["max_active_rows"] > 1


def alone_and_batched(client) -> tuple[np.ndarray, np.ndarray]:
    """A seeded request's pcm samples when it runs alone, then beside five others."""
    alone = speak(client, response_format="pcm", seed=11).content
    with ThreadPoolExecutor(6) as pool:
        others = [
            pool.submit(speak, client, response_format="pcm", input=f"Other request {i}.") for i in range(5)
        ]
        batched = pool.submit(speak, client, response_format="pcm", seed=11)
        for f in others:
            assert f.result(timeout=120).status_code == 200
        batched = batched.result(timeout=120).content
    assert client.get("/health").json()["scheduler"]["max_active_rows"] > 1
    return np.frombuffer(alone, "<i2"), np.frombuffer(batched, "<i2")


def test_a_seeded_request_gives_the_same_audio_alone_and_batched(client):
    alone, batched = alone_and_batched(client)  # the rows' audio decoded in shared codec calls
    assert client.app.state.scheduler.core.decoder is not None
    assert alone.shape == batched.shape
    # the same codes; the shared decode's float rounding may move a 16-bit sample by one step
    assert np.abs(alone.astype(np.int32) - batched).max() <= 1


def test_without_batched_decode_a_seeded_request_is_bit_for_bit_the_same_alone_and_batched(
    checkpoint, tmp_path
):
    with serve(checkpoint, tmp_path, max_batch_size=8, batched_decode=False) as own_decoders:
        assert own_decoders.app.state.scheduler.core.decoder is None
        alone, batched = alone_and_batched(own_decoders)
    assert alone.tobytes() == batched.tobytes()


def sse_audio_and_usage(response) -> tuple[bytes, dict]:
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    return b"".join(base64.b64decode(e["audio"]) for e in deltas), events[-1]["usage"]


def test_long_input_is_spoken_sentence_by_sentence_in_context(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(server_service, "frames_for_text", lambda text, rate: 3)  # 3 frames per sentence
    sentences = ["First part is here.", "Second part is here.", "And a third one."]
    fields = dict(response_format="pcm", stream_format="sse", seed=5)
    with serve(checkpoint, tmp_path, max_chunk_chars=20, max_frames=100) as c:
        whole = c.post("/v1/audio/speech", json={"input": " ".join(sentences), **fields})
        alone = [c.post("/v1/audio/speech", json={"input": s, **fields}) for s in sentences]
        stats = c.get("/v1/stats").json()
    audio, usage = sse_audio_and_usage(whole)
    assert usage["output_tokens"] == 9  # every sentence got its own 3 frames
    assert len(audio) == 2 * (9 * SAMPLES_PER_FRAME - 2 * 240)  # int16; two 10 ms crossfades
    # Later sentences see the earlier ones (text and audio) in their prompt.
    prompts_alone = sum(sse_audio_and_usage(r)[1]["input_tokens"] for r in alone)
    assert usage["input_tokens"] > prompts_alone + 2 * 3
    assert stats["completed"] == 3 + 3
