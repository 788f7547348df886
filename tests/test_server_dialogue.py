"""Conversations over HTTP: /v1/audio/dialogue (streamed, SSE with turn times, JSON) and context turns on
/v1/audio/speech, on a loopback server with the tiny checkpoint."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from serving import SAMPLES_PER_FRAME, assert_error, demo_checkpoint, serve, speak

from csm import CsmProcessor
from csm.audio import load_audio
from csm.server import service as server_service
from csm.voice import encode_audio


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    # Each chunk may take 4 frames (as if the model said end-of-audio there); a request up to 64 in all.
    with (
        pytest.MonkeyPatch.context() as mp,
        serve(checkpoint, tmp_path_factory.mktemp("dlg"), max_batch_size=4, max_frames=64) as c,
    ):
        mp.setattr(server_service, "frames_for_text", lambda text, frame_rate: 4)
        yield c


def wav_b64(seconds: float, hz: float = 220.0) -> str:
    buf = io.BytesIO()
    t = np.arange(int(24000 * seconds)) / 24000
    sf.write(buf, (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 24000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def events_of(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def spy_prompts(client, monkeypatch) -> list[dict]:
    """Record the input ids and audio codes of every prompt the server's model embeds."""
    model, calls = client.app.state.scheduler.model, []
    embed = model.embed_inputs

    def spy(input_ids, audio_codes=None, **kw):
        calls.append({"input_ids": input_ids.cpu(), "audio_codes": [c.cpu() for c in audio_codes or []]})
        return embed(input_ids, audio_codes=audio_codes, **kw)

    monkeypatch.setattr(model, "embed_inputs", spy)
    return calls


DIALOGUE = {
    "turns": [
        {"speaker": 0, "text": "Did you get my message?", "audio": wav_b64(0.4)},
        {"speaker": 1, "text": "I did, yes."},
        {"speaker": 0, "text": "Great, see you then."},
    ],
    "response_format": "pcm",
    "pause": 0.2,
    "seed": 3,
}


def test_dialogue_sse_gives_the_mix_turn_times_and_a_manifest_that_match(client):
    r = client.post("/v1/audio/dialogue", json={**DIALOGUE, "stream_format": "sse"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r)
    audio = np.frombuffer(
        b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "dialogue.audio.delta"), "<i2"
    )
    turns = [e["turn"] for e in events if e["type"] == "dialogue.turn.done"]
    done = events[-1]
    assert done["type"] == "dialogue.done" and done["manifest"]["turns"] == turns
    assert [(t["index"], t["speaker"], t["seed"], t["frames"]) for t in turns] == [(1, 1, 4, 4), (2, 0, 5, 4)]
    gap = round(0.2 * 24000)
    assert len(audio) == 2 * 4 * SAMPLES_PER_FRAME + gap
    assert round(done["manifest"]["seconds"] * 24000) == len(audio)
    first, second = [(round(t["start"] * 24000), round(t["end"] * 24000)) for t in turns]
    assert first == (0, 4 * SAMPLES_PER_FRAME) and second == (first[1] + gap, len(audio))
    assert not audio[first[1] : second[0]].any()  # the pause is silence
    assert done["usage"]["output_tokens"] == 8 and done["usage"]["input_tokens"] > 0


def test_dialogue_json_and_audio_variants_give_the_same_seeded_mix(client):
    streamed = client.post("/v1/audio/dialogue", json={**DIALOGUE, "response_format": "wav"})
    assert streamed.status_code == 200 and streamed.headers["content-type"] == "audio/wav"
    whole = client.post(
        "/v1/audio/dialogue", json={**DIALOGUE, "response_format": "wav", "stream_format": "json"}
    )
    assert whole.status_code == 200, whole.text
    body = whole.json()
    a = sf.read(io.BytesIO(streamed.content), dtype="int16")[0]
    b = sf.read(io.BytesIO(base64.b64decode(body["audio"])), dtype="int16")[0]
    np.testing.assert_array_equal(a, b)
    assert body["response_format"] == "wav" and body["manifest"]["seed"] == 3
    assert [t["index"] for t in body["manifest"]["turns"]] == [1, 2]
    other = client.post("/v1/audio/dialogue", json={**DIALOGUE, "response_format": "wav", "seed": 4})
    assert other.content != streamed.content


def test_a_dialogue_streams_audio_before_its_last_turn_is_generated(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_batch_size=2, max_frames=400) as c:
        body = {
            "turns": [{"speaker": 0, "text": "Hi."}, {"speaker": 1, "text": "a long answer " * 14}],
            "response_format": "pcm",
        }
        with c.stream("POST", "/v1/audio/dialogue", json=body) as r:
            assert r.status_code == 200
            assert len(next(r.iter_bytes())) > 0
            stats = c.get("/health").json()["scheduler"]
            # The last turn is not done (the first may be, or be between its last frame and its count)
            assert stats["completed"] < 2 and stats["failed"] == 0
        assert c.get("/health").status_code == 200


def test_each_dialogue_turn_sees_the_turns_before_it(client, monkeypatch, checkpoint):
    calls = spy_prompts(client, monkeypatch)
    body = {**DIALOGUE, "voices": {}, "stream_format": "json"}
    assert client.post("/v1/audio/dialogue", json=body).status_code == 200
    assert len(calls) == 2
    clip = load_audio(base64.b64decode(DIALOGUE["turns"][0]["audio"]))
    model = client.app.state.scheduler.model
    assert torch.equal(calls[0]["audio_codes"][0], encode_audio(model, clip).cpu())  # the given clip
    assert len(calls[1]["audio_codes"]) == 2  # the given clip, then turn 1 as generated
    assert calls[1]["audio_codes"][1].shape[0] == 4
    processor = CsmProcessor.from_pretrained(checkpoint)
    turn1_audio = np.zeros(4 * SAMPLES_PER_FRAME, np.float32)  # only its length counts for the ids
    conversation = [
        {
            "role": "0",
            "content": [
                {"type": "text", "text": "Did you get my message?"},
                {"type": "audio", "audio": clip},
            ],
        },
        {
            "role": "1",
            "content": [{"type": "text", "text": "I did, yes."}, {"type": "audio", "audio": turn1_audio}],
        },
        {"role": "0", "content": [{"type": "text", "text": "Great, see you then."}]},
    ]
    expected = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert calls[1]["input_ids"].tolist() == expected.tolist()


def test_context_given_to_speech_reaches_the_prompt(client, monkeypatch, checkpoint):
    calls = spy_prompts(client, monkeypatch)
    clip_b64 = wav_b64(0.3, 330.0)
    context = [{"speaker": 1, "text": "What time is it?", "audio": clip_b64}]
    r = speak(client, input="It is noon.", voice="0", response_format="pcm", context=context)
    assert r.status_code == 200, r.text
    clip = load_audio(base64.b64decode(clip_b64))
    model = client.app.state.scheduler.model
    assert len(calls) == 1 and torch.equal(calls[0]["audio_codes"][0], encode_audio(model, clip).cpu())
    processor = CsmProcessor.from_pretrained(checkpoint)
    conversation = [
        {
            "role": "1",
            "content": [{"type": "text", "text": "What time is it?"}, {"type": "audio", "audio": clip}],
        },
        {"role": "0", "content": [{"type": "text", "text": "It is noon."}]},
    ]
    expected = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert calls[0]["input_ids"].tolist() == expected.tolist()


def test_a_saved_voice_as_context_speaks_as_the_speaker_given(client, monkeypatch, checkpoint):
    files = {"audio_file": ("clip.wav", base64.b64decode(wav_b64(0.3)), "audio/wav")}
    created = client.post("/v1/voices", files=files, data={"name": "bea", "transcript": "Hi, Bea here."})
    assert created.status_code == 201
    calls = spy_prompts(client, monkeypatch)
    r = speak(client, input="Hello Bea.", response_format="pcm", context=[{"voice": "bea", "speaker": 2}])
    assert r.status_code == 200, r.text
    assert len(calls[0]["audio_codes"]) == 1
    text = CsmProcessor.from_pretrained(checkpoint).decode(calls[0]["input_ids"][0])
    assert "[2]Hi, Bea here." in text and text.endswith("[0]Hello Bea.<|end_of_text|>")


def test_old_context_turns_leave_the_window_first(checkpoint, tmp_path, monkeypatch):
    with serve(checkpoint, tmp_path, max_seq_len=110) as c:
        calls = spy_prompts(c, monkeypatch)
        clips = [wav_b64(0.4, 200.0 + 50 * i) for i in range(4)]
        context = [{"speaker": i % 2, "text": f"Context turn {i}.", "audio": a} for i, a in enumerate(clips)]
        r = speak(c, input="Hi.", response_format="pcm", context=context)
        assert r.status_code == 200, r.text
        kept = calls[0]["audio_codes"]
        model = c.app.state.scheduler.model
        newest = [encode_audio(model, load_audio(base64.b64decode(a))).cpu() for a in clips[4 - len(kept) :]]
        assert 0 < len(kept) < 4 and all(torch.equal(k, n) for k, n in zip(kept, newest, strict=True))
        assert calls[0]["input_ids"].shape[1] + 4 <= 110


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("speech", {"context": [{"text": "Hi.", "audio": "not base64!"}]}, 400, "context.0.audio"),
        ("speech", {"context": [{"text": "Hi.", "audio": wav_b64(0.1)[:40]}]}, 400, "context.0.audio"),
        ("speech", {"context": [{"text": "Hi."}]}, 400, "context.0"),
        ("speech", {"context": [{"voice": "nobody"}]}, 404, "context.0.voice"),
        ("speech", {"context": [{"audio": wav_b64(0.1)}]}, 400, "context.0.text"),
        ("speech", {"context": [{"text": "Hi.", "audio": wav_b64(0.1), "extra": 1}]}, 400, "context.0.extra"),
        ("dialogue", {"turns": []}, 400, "turns"),
        ("dialogue", {"turns": [{"speaker": 0, "text": "Hi.", "audio": wav_b64(0.1)}]}, 400, "turns"),
        (
            "dialogue",
            {"turns": [{"speaker": 0, "text": "Hi.", "audio": "???"}, {"speaker": 1, "text": "Yo."}]},
            400,
            "turns.0.audio",
        ),
        ("dialogue", {"turns": [{"speaker": 0, "text": "  "}]}, 400, "turns.0.text"),
        ("dialogue", {"turns": [{"speaker": 0, "text": "Hi."}], "voices": {"1": "bea"}}, 400, "voices"),
        ("dialogue", {"turns": [{"speaker": 0, "text": "Hi."}], "voices": {"0": "nobody"}}, 404, "voices.0"),
        ("dialogue", {"turns": [{"speaker": 0, "text": "Hi."}], "voices": {"0": "7"}}, 400, "voices.0"),
        ("dialogue", {"turns": [{"speaker": 0, "text": "Hi."}], "pause": -1}, 400, "pause"),
        ("dialogue", {"turns": [{"speaker": 0, "text": "Hi."}], "model": "gpt-9"}, 404, "model"),
    ],
)
def test_bad_conversation_requests_get_openai_errors_with_the_param(client, path, body, status, param):
    if path == "speech":
        r = speak(client, **body)
    else:
        r = client.post("/v1/audio/dialogue", json=body)
    assert_error(r, status, param)


def test_a_clip_over_the_upload_limit_is_413(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_upload_seconds=0.2) as c:
        assert_error(speak(c, context=[{"text": "Hi.", "audio": wav_b64(0.5)}]), 413, "context.0.audio")
