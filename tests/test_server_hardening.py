"""The server against a hostile or careless client (issue 21) and code written for OpenAI (issue 22): voice
caps and caching, odd speaker numbers, damaged voices, context overflow, racing creates, the API key, the
per-request frame budget, OpenAI's voice names, the model id and the access log."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from serving import SAMPLES_PER_FRAME, assert_error, demo_checkpoint, serve, speak

from csm.server import model_id
from csm.server.schemas import OPENAI_VOICES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def voices_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def client(checkpoint, voices_root):
    with serve(checkpoint, voices_root, max_batch_size=4, max_upload_seconds=2.0, voice_cache=2) as c:
        yield c


def wav_bytes(seconds: float, hz: float = 220.0) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(24000 * seconds)) / 24000
    sf.write(buf, (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 24000, format="WAV")
    return buf.getvalue()


def upload(c, name: str, transcript: str = "The quick brown fox.", seconds: float = 0.3):
    files = {"audio_file": ("clip.wav", wav_bytes(seconds), "audio/wav")}
    return c.post("/v1/voices", files=files, data={"name": name, "transcript": transcript})


def pcm(c, **fields) -> bytes:
    r = speak(c, response_format="pcm", **fields)
    assert r.status_code == 200, r.text
    return r.content


# ---- item 10: speaker numbers are ASCII digits within range ---------------------------------------------


@pytest.mark.parametrize("voice", ["²", "٣", "１", "1" * 5000, "1000", "-1"])
def test_odd_digits_and_huge_numbers_are_a_400_naming_the_field(client, voice):
    assert_error(speak(client, voice=voice), 400, "voice")
    assert_error(speak(client, voice={"id": voice}), 400, "voice.id")


def test_odd_digits_in_context_and_dialogue_voices_are_a_400_naming_the_field(client):
    body = {"input": "Hi.", "response_format": "pcm", "context": [{"voice": "²"}]}
    assert_error(client.post("/v1/audio/speech", json=body), 400, "context.0.voice")
    turns = [{"speaker": 0, "text": "Hi."}]
    for voices, param in [
        ({"²": "ana"}, "voices"),
        ({"1" * 5000: "ana"}, "voices"),
        ({"0": "٣"}, "voices.0"),
    ]:
        r = client.post("/v1/audio/dialogue", json={"turns": turns, "voices": voices})
        assert_error(r, 400, param)
        assert "Traceback" not in r.text and "int()" not in r.text


# ---- item 6: voices are capped, cached within a bound, and read from disk -------------------------------


def test_voice_count_and_disk_caps_refuse_with_409_before_writing(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_voices=2) as c:
        assert upload(c, "one").status_code == 201 and upload(c, "two").status_code == 201
        full = upload(c, "three")
        assert_error(full, 409)
        assert full.json()["error"]["code"] == "voice_limit_reached"
        assert "2 saved voices" in full.json()["error"]["message"]
        assert not (tmp_path / "voices" / "three").exists()
    with serve(checkpoint, tmp_path / "b", max_voices_bytes=40_000) as c:
        assert upload(c, "small", seconds=0.3).status_code == 201  # 14.4 kB of wav
        full = upload(c, "more", seconds=0.6)
        assert_error(full, 409)
        assert (
            full.json()["error"]["code"] == "voice_limit_reached" and "MB" in full.json()["error"]["message"]
        )
        assert sorted(p.name for p in (tmp_path / "b" / "voices").iterdir()) == ["small"]  # nothing left over


def test_only_the_last_voices_used_stay_in_memory(client):
    names = [f"lru{i}" for i in range(5)]
    for name in names:
        assert upload(client, name).status_code == 201
    for name in names:
        pcm(client, voice=name)
    store = client.app.state.voices
    assert store.cached() == names[-2:]  # voice_cache=2: the two used last, oldest first
    pcm(client, voice=names[0])
    assert store.cached() == [names[-1], names[0]]


def test_a_voice_deleted_on_disk_is_no_longer_served(client, voices_root):
    assert upload(client, "gone").status_code == 201
    pcm(client, voice="gone")
    shutil.rmtree(voices_root / "voices" / "gone")
    assert_error(speak(client, voice="gone"), 404, "voice")
    assert "gone" not in [v["id"] for v in client.get("/v1/voices").json()["voices"]]


# ---- item 11: a damaged voice folder is a clear 500 that names the voice, not the server's path ----------


def test_a_damaged_voice_is_a_500_naming_the_voice_not_the_servers_path(client, voices_root, caplog):
    root = voices_root / "voices"
    (root / "badjson").mkdir(parents=True)
    (root / "badjson" / "voice.json").write_text("{not json")
    assert upload(client, "noclip").status_code == 201
    (root / "noclip" / "clip_0.wav").unlink()
    client.app.state.voices._cache.clear()  # as after a restart: the clip is read from disk again
    for name in ["badjson", "noclip"]:
        with caplog.at_level(logging.ERROR, logger="csm.server"):
            r = speak(client, voice=name)
        assert_error(r, 500, "voice")
        error = r.json()["error"]
        assert error["type"] == "server_error" and repr(name) in error["message"]
        assert str(voices_root) not in r.text and "voice.json'" not in r.text and "/" not in error["message"]
        assert any(
            str(root / name) in rec.getMessage() for rec in caplog.records
        )  # the operator's log has it
    body = {"turns": [{"speaker": 0, "text": "Hi."}], "voices": {"0": "badjson"}}
    r = client.post("/v1/audio/dialogue", json=body)
    assert_error(r, 500, "voices.0")
    assert str(voices_root) not in r.text


# ---- item 12: transcripts are capped; context overflow blames the real cause -----------------------------


def test_a_huge_transcript_is_refused_at_creation(client):
    r = upload(client, "talker", transcript="word " * 20_000)
    assert_error(r, 400, "transcript")
    assert "characters" in r.json()["error"]["message"]
    assert "talker" not in [v["id"] for v in client.get("/v1/voices").json()["voices"]]


def test_a_voice_too_large_for_the_context_is_refused_at_creation(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_seq_len=64, max_upload_seconds=10.0) as c:
        r = upload(c, "longclip", transcript="Hi.", seconds=4.0)  # 50 frames: most of 64 positions
        assert_error(r, 400, "audio_file")
        assert "positions" in r.json()["error"]["message"]
        r = upload(c, "longtext", transcript="many words here " * 12, seconds=0.2)
        assert_error(r, 400, "transcript")
        assert upload(c, "fits", transcript="Hi.", seconds=0.3).status_code == 201


def test_context_overflow_names_the_voice_or_the_input_never_max_seconds(checkpoint, tmp_path):
    from csm.voice import Voice

    root = tmp_path / "voices"
    clip = np.zeros(24000, np.float32)  # 1 s: 13 frames
    Voice("wordy", 0, [(clip, "many words in this transcript " * 8)]).save(root / "wordy")  # by an operator
    with serve(checkpoint, tmp_path, max_seq_len=96) as c:
        r = speak(c, voice="wordy")
        assert_error(r, 400, "voice")
        message = r.json()["error"]["message"]
        assert "wordy" in message and "max_seconds" not in message
        body = {"input": "Hi.", "response_format": "pcm", "context": [{"voice": "wordy"}]}
        r = c.post("/v1/audio/speech", json=body)
        assert_error(r, 400, "context.0.voice")
        r = speak(c, input="A sentence that goes on and on " * 6)  # one chunk longer than the window
        assert_error(r, 400, "input")
        assert "max_seconds" not in r.json()["error"]["message"]


# ---- item 13: racing creates of one name --------------------------------------------------------------


def test_racing_creates_of_one_name_give_one_201_and_409s_without_paths(client, voices_root):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: upload(client, "racer"), range(8)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201] + [409] * 7, [r.text for r in results]
    for r in results:
        assert str(voices_root) not in r.text
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "voice_exists"
    assert [p.name for p in (voices_root / "voices").iterdir() if p.name.startswith(".")] == []
    pcm(client, voice="racer")


# ---- item 8: --max-frames is per request --------------------------------------------------------------


def test_max_frames_bounds_the_whole_dialogue_not_each_turn(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_frames=6, chunk_frames=2) as c:
        turns = [{"speaker": i % 2, "text": f"Turn {i} says a few words."} for i in range(8)]
        body = {"turns": turns, "response_format": "pcm", "stream_format": "json", "pause": 0.0, "seed": 1}
        r = c.post("/v1/audio/dialogue", json=body)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["usage"]["output_tokens"] <= 6
        assert len(base64.b64decode(result["audio"])) // 2 <= 6 * SAMPLES_PER_FRAME
        assert sum(t["frames"] for t in result["manifest"]["turns"]) == result["usage"]["output_tokens"]
        long = speak(c, response_format="pcm", input="One. Two. Three. Four. Five. Six. Seven.", seed=1)
        assert len(long.content) // 2 <= 6 * SAMPLES_PER_FRAME


# ---- item 18: the API key ----------------------------------------------------------------------------


def test_api_key_401_says_bearer_and_the_scheme_is_case_insensitive(checkpoint, tmp_path):
    names = {
        "model_name": model_id(str(checkpoint)),
        "model_path": str(checkpoint),
    }  # as `csm serve` sets them
    with serve(checkpoint, tmp_path, api_key="secret", **names) as c:
        r = c.get("/v1/models")
        assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).headers["www-authenticate"]
        for scheme in ["Bearer", "bearer", "BEARER"]:
            assert c.get("/v1/models", headers={"Authorization": f"{scheme} secret"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Basic secret"}).status_code == 401
        health = c.get("/health")
        assert health.status_code == 200 and str(checkpoint) not in health.text
        assert health.json()["model"] == checkpoint.name == "demo"
        key = {"Authorization": "bearer secret"}
        assert c.get("/v1/models", headers=key).json()["data"][0]["id"] == "demo"
        old_id = {
            "input": "Hi.",
            "model": str(checkpoint),
            "response_format": "pcm",
        }  # the id it listed before
        assert c.post("/v1/audio/speech", json=old_id, headers=key).status_code == 200


def test_model_id_is_never_a_local_path(tmp_path):
    assert model_id("sesame/csm-1b") == "sesame/csm-1b"
    cached = tmp_path / "hub" / "models--sesame--csm-1b" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert model_id(str(cached)) == "sesame/csm-1b"
    (tmp_path / "my-csm").mkdir()
    assert model_id(str(tmp_path / "my-csm")) == "my-csm"


# ---- issue 22: OpenAI's voice names, the model id, the access log ----------------------------------------


def test_openai_voice_names_speak_as_the_documented_speakers(client):
    assert sorted(OPENAI_VOICES.values()) == list(range(len(OPENAI_VOICES)))  # one speaker each
    assert pcm(client, voice="alloy", seed=3) == pcm(client, voice=str(OPENAI_VOICES["alloy"]), seed=3)
    assert pcm(client, voice={"id": "nova"}, seed=3) == pcm(client, voice=str(OPENAI_VOICES["nova"]), seed=3)
    assert pcm(client, voice="ALLOY", seed=3) == pcm(client, voice="alloy", seed=3)  # OpenAI's are lower case


def test_a_saved_voice_named_like_an_openai_voice_wins(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path) as c:
        table = pcm(c, voice="echo", seed=5)
        assert upload(c, "echo", seconds=0.5).status_code == 201
        saved = pcm(c, voice="echo", seed=5)
        assert saved != table


def test_openai_client_speaks_with_every_openai_voice_name(client):
    openai = pytest.importorskip("openai")
    from openai.types.audio.speech_create_params import Voice

    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0)
    names = {x for arg in typing.get_args(Voice) for x in typing.get_args(arg)}  # the client's Literal
    assert "alloy" in names and names <= set(OPENAI_VOICES)
    for name in sorted(names):
        audio = api.audio.speech.create(model="tts-1", voice=name, input="Hi.", response_format="pcm")
        assert len(audio.content) == 4 * SAMPLES_PER_FRAME * 2, name
    assert api.models.list().data[0].id == "csm"


def test_one_access_log_line_per_request_with_its_request_id(client, caplog):
    with caplog.at_level(logging.INFO, logger="csm.access"):
        speak(client, response_format="pcm", input="Hi.").raise_for_status()
        client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
        client.get("/v1/nothing")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "csm.access"]
    assert len(lines) == 3, lines
    # A streamed response's line is written when its handler returns, which may be after the client has its
    # bytes and sent the next request: the lines are matched by request, not by order.
    speech, models, nothing = (
        [x for x in lines if x.startswith(start)]
        for start in ('"POST /v1/audio/speech" 200 ', '"GET /v1/models" 200 ', '"GET /v1/nothing" 404 ')
    )
    assert len(speech) == len(models) == len(nothing) == 1, lines
    assert " rid=" in speech[0] and " prefix=" in speech[0]  # and how much of its prompt was found stored
    assert models[0].endswith("rid=abc-123")
    seconds = float(lines[0].split()[3].rstrip("s"))
    assert 0 < seconds < 60
    assert json.dumps(lines)  # plain strings


# ---- item 15: server flags are checked before anything loads ---------------------------------------------


@pytest.mark.parametrize(
    "flags, wanted",
    [
        (["--max-frames", "0"], "--max-frames: must be > 0, got 0"),
        (["--max-frames", "-5"], "--max-frames: must be > 0, got -5"),
        (["--max-frames", "many"], "--max-frames: expected a whole number, got 'many'"),
        (["--stall-timeout", "0"], "--stall-timeout: must be > 0, got 0"),
        (["--stall-timeout", "nan"], "--stall-timeout: expected a number of seconds"),
        (["--shutdown-grace", "-1"], "--shutdown-grace: must be >= 0, got -1"),
        (["--port", "70000"], "--port: must be 0-65535, got 70000"),
        (["--max-batch-size", "0"], "--max-batch-size: must be > 0, got 0"),
        (["--max-voices", "-1"], "--max-voices: must be >= 0, got -1"),
    ],
)
def test_bad_server_flags_are_one_line_errors_before_loading(tmp_path, flags, wanted):
    cmd = [sys.executable, "-m", "csm", "serve", "--model", str(tmp_path / "no-such-model"), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and wanted in errors[0], r.stderr


# ---- issue 32: API keys, voices made on disk --------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "clé", "a b", "tab\tkey"])
def test_an_empty_or_non_ascii_api_key_is_refused_before_the_model_loads(key, tmp_path):
    from csm.server.app import ServerSettings, check_api_key, create_app

    with pytest.raises(ValueError, match="API key"):
        check_api_key(key)
    with pytest.raises(ValueError, match="API key"):
        create_app(None, None, ServerSettings(api_key=key, voices_dir=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "csm", "serve", "--model", str(tmp_path / "none"), "--api-key", key],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2 and b"--api-key" in result.stdout + result.stderr
    assert b"Traceback" not in result.stderr


def make_voice_on_disk(root, name, clips: int, seconds: float, audio_name=None):
    folder = root / name
    folder.mkdir(parents=True)
    sf.write(folder / "clip.wav", np.zeros(int(seconds * 24000), np.float32), 24000)
    entries = [{"audio": audio_name or "clip.wav", "text": "Silence."} for _ in range(clips)]
    (folder / "voice.json").write_text(json.dumps({"name": name, "speaker": 0, "clips": entries}))


def test_a_cached_voice_is_bounded_by_its_bytes_and_voices_on_disk_by_their_clips(tmp_path):
    from csm.server.speech import ApiError
    from csm.server.voice_store import VoiceStore, voice_bytes

    store = VoiceStore(tmp_path, cache_size=8, cache_bytes=3 * 24000 * 4 + 1000, max_seconds=60.0)
    make_voice_on_disk(tmp_path, "small", 1, 2.0)
    make_voice_on_disk(tmp_path, "big", 2, 2.0)  # 4 s: more than the cache's bytes
    make_voice_on_disk(tmp_path, "many", 200, 0.5)  # 200 clips: refused unread
    make_voice_on_disk(tmp_path, "long", 1, 61.0)  # over max_seconds
    make_voice_on_disk(tmp_path, "climbs", 1, 1.0, audio_name="../small/clip.wav")
    assert store.get("small").seconds == 2.0 and store.get("big").seconds == 4.0
    assert store.cached() == ["small"] and store.cached_bytes() <= store.cache_bytes
    assert voice_bytes(store.get("big")) > store.cache_bytes
    for name in ("many", "long", "climbs"):
        with pytest.raises(ApiError) as e:
            store.get(name)
        assert e.value.status == 500 and "damaged" in e.value.message
    make_voice_on_disk(tmp_path, "second", 1, 1.0)
    store.get("second")
    assert store.cached() == ["small", "second"] and store.cached_bytes() <= store.cache_bytes
