"""The realtime session (WebSocket /v1/audio/session) against a real uvicorn server with the tiny checkpoint,
driven by the package's client (the `websockets` library): sentences from text deltas, tagged audio, cancel,
truncate, limits and close codes, and the same codes as a `Conversation` with the same seed."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import weakref

import numpy as np
import pytest
import torch
import websockets
from serving import SAMPLES_PER_FRAME, demo_checkpoint, serve, speak

from csm import pipeline
from csm.chunking import split_sentences
from csm.client.session import SessionClient, SessionError, wav_bytes
from csm.server import service as server_service
from csm.server.session import SentenceBuffer
from csm.server.session_messages import parse_message
from csm.server.speech import ApiError

FRAMES = 4  # each sentence may take 4 frames (as if the model said end-of-audio there)
USER = "Hi, did you get the message I sent this morning?"
REPLY = "I did get it, thank you so much. Let us talk about it tomorrow at noon."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with (
        pytest.MonkeyPatch.context() as mp,
        serve(checkpoint, tmp_path_factory.mktemp("sess"), max_batch_size=4, max_frames=64) as c,
    ):
        mp.setattr(server_service, "frames_for_text", lambda text, frame_rate: FRAMES)
        yield c


def ws_url(client) -> str:
    return str(client.base_url).replace("http://", "ws://") + "/v1/audio/session"


def user_clip(seconds: float = 0.5, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    return (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def spy_jobs(client, monkeypatch) -> list:
    """Every scheduler job the server submits, in order (their codes fill in as they are generated)."""
    scheduler, jobs = client.app.state.scheduler, []
    submit = scheduler.submit

    def spy(job):
        jobs.append(job)
        return submit(job)

    monkeypatch.setattr(scheduler, "submit", spy)
    return jobs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def until(session: SessionClient, kind: str, events: list | None = None) -> dict:
    while True:
        event = await session.recv()
        if events is not None:
            events.append(event)
        if event["type"] == "error":
            raise AssertionError(event)
        if event["type"] == kind:
            return event


# ---- sentences from deltas -------------------------------------------------------------------------------


def test_sentence_buffer_cuts_the_sentences_the_whole_text_is_cut_into():
    text = "Hi. How are you doing today, my friend? I am fine. Thanks for asking, really. Bye now!"
    for step in (1, 3, 7):
        buffer, got = SentenceBuffer(200), []
        for i in range(0, len(text), step):
            got += buffer.push(text[i : i + step])
        assert got == ["Hi. How are you doing today, my friend?", "I am fine. Thanks for asking, really."]
        assert got + buffer.flush() == ["Hi. How are you doing today, my friend?"] + [
            "I am fine. Thanks for asking, really.",
            "Bye now!",
        ]


def test_sentence_buffer_may_start_at_the_first_clause():
    buffer = SentenceBuffer(200, first_clause=True)
    assert buffer.push("Well, that is a very good question, ") == ["Well, that is a very good question,"]
    assert buffer.push("and the answer is, ") == []  # only the reply's first piece starts early
    assert buffer.flush() == ["and the answer is,"]


def test_messages_are_validated_in_one_place_with_the_field_named():
    with pytest.raises(ApiError, match="type"):
        parse_message(json.dumps({"type": "nope"}))
    with pytest.raises(ApiError) as e:
        parse_message(json.dumps({"type": "truncate", "turn_id": -1, "played_samples": 0}))
    assert e.value.param == "turn_id"
    with pytest.raises(ApiError) as e:
        parse_message(json.dumps({"type": "session.start", "format": "mp3"}))
    assert e.value.param == "format"


def test_a_sentence_is_spoken_as_soon_as_it_is_complete_and_audio_is_tagged(server):
    async def go():
        async with await SessionClient.connect(ws_url(server), seed=3) as s:
            assert s.started["sampling_rate"] == 24000 and s.format == "pcm16"
            await s.user_turn(USER, user_clip())
            assert (await until(s, "user.turn.added"))["turn_id"] == 0
            for token in ["I did get it,", " thank you so", " much. Let us", " talk"]:
                await s.text_delta(token)
            events: list[dict] = []
            started = await until(s, "sentence.started", events)  # before the reply's end was sent
            assert (started["turn_id"], started["sentence_id"]) == (1, 0)
            assert started["text"] == "I did get it, thank you so much."
            await until(s, "sentence.done", events)
            await s.text_delta(" about it tomorrow at noon.")
            await s.flush()
            done = await until(s, "turn.done", events)
            return events, done

    events, done = run(go())
    audio = [e for e in events if e["type"] == "audio"]
    assert {(e["turn_id"], e["sentence_id"]) for e in audio} == {(1, 0), (1, 1)}
    assert [e["sentence_id"] for e in audio] == sorted(e["sentence_id"] for e in audio)
    assert all(len(e["pcm"]) == e["samples"] for e in audio)
    samples = sum(len(e["pcm"]) for e in audio)
    crossfade = 240  # 10 ms at 24 kHz, once between the two sentences
    assert samples == done["frames"] * SAMPLES_PER_FRAME - crossfade
    assert done == {
        "type": "turn.done",
        "turn_id": 1,
        "text": REPLY,
        "frames": 2 * FRAMES,
        "cancelled": False,
    }


def test_float32_audio_is_the_pcm16_audio_at_full_precision(server):
    async def speak(fmt):
        async with await SessionClient.connect(ws_url(server), seed=5, format=fmt) as s:
            audio, _ = await s.speak(REPLY)
            return audio

    pcm16, float32 = run(speak("pcm16")), run(speak("float32"))
    assert len(pcm16) == len(float32) > 0
    np.testing.assert_allclose(pcm16, float32, atol=2 / 32768)


# ---- the same conversation as Conversation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling, batched",
    [({"do_sample": False}, False), ({}, False), ({}, True)],
    ids=["greedy", "seeded", "seeded-batched-with-http-requests"],
)
def test_a_session_gives_the_codes_of_a_conversation_with_the_same_seed(
    server, checkpoint, monkeypatch, sampling, batched
):
    voices = server.app.state.service.root
    if not (voices / "ava").exists():  # a saved voice, bound to the agent in both
        files = {"audio_file": ("clip.wav", wav_bytes(user_clip(0.4, 180.0)), "audio/wav")}
        created = server.post(
            "/v1/voices", files=files, data={"name": "ava", "transcript": "Hello, Ava here."}
        )
        assert created.status_code == 201, created.text
    jobs = spy_jobs(server, monkeypatch)
    second = "Sure, noon works for me too."

    async def go():
        start = dict(seed=11, speaker=0, voices={0: "ava"}, **sampling)
        async with await SessionClient.connect(ws_url(server), **start) as s:
            await s.user_turn(USER, user_clip(0.6))
            await s.speak(REPLY)
            await s.user_turn(second, user_clip(0.3, 330.0), speaker=1)
            await s.speak("Great. Then we are settled, see you at noon!")

    if batched:  # HTTP requests share the scheduler's steps with the session's sentences all along
        done = threading.Event()

        def others():
            while not done.is_set():
                assert speak(server, response_format="pcm").status_code == 200

        before = dict(server.app.state.scheduler.stats()["active_rows_histogram"])
        pool = [threading.Thread(target=others)]  # one: two rows at once means a session row beside it
        [t.start() for t in pool]
        try:
            run(go())
        finally:
            done.set()
            [t.join() for t in pool]
        rows = server.app.state.scheduler.stats()["active_rows_histogram"]
        assert any(int(k) >= 2 and v > before.get(k, 0) for k, v in rows.items())
    else:
        run(go())
    tts = pipeline("text-to-audio", model=str(checkpoint), device="cpu")
    conv = tts.conversation(voices={0: str(voices / "ava")}, seed=11, max_new_tokens=FRAMES, **sampling)
    conv.add(1, USER, audio=user_clip(0.6))
    conv.say(0, REPLY)
    conv.add(1, second, audio=user_clip(0.3, 330.0))
    conv.say(0, "Great. Then we are settled, see you at noon!")
    expected = [t.codes for t in conv.history if t.speaker == 0]
    jobs = [j for j in jobs if j.request_id.startswith("session-")]
    n = len(split_sentences(REPLY))  # its sentences' jobs, then the second reply's (one sentence)
    assert n == 2 and len(jobs) == n + 1
    got = [torch.cat([torch.stack(j.codes) for j in jobs[:n]]), torch.stack(jobs[n].codes)]
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


# ---- cancel and truncate -----------------------------------------------------------------------------------


def test_cancel_stops_within_one_frame_and_no_audio_of_the_turn_follows(checkpoint, tmp_path, monkeypatch):
    with serve(checkpoint, tmp_path, max_frames=2000, chunk_frames=1) as client:
        monkeypatch.setattr(server_service, "frames_for_text", lambda text, frame_rate: 2000)
        jobs = spy_jobs(client, monkeypatch)

        async def go():
            async with await SessionClient.connect(ws_url(client), seed=1) as s:
                await s.text_delta(REPLY)
                await until(s, "audio")
                await s.cancel()
                events: list[dict] = []
                cancelled = await until(s, "cancelled", events)
                at_cancel = len(jobs[0].codes)
                await asyncio.sleep(0.5)
                after = len(jobs[0].codes)
                done = await until(s, "turn.done", events)
                # the session goes on: the next reply is spoken
                audio, _ = await s.speak("And now something else entirely, friend.")
                return cancelled, events, at_cancel, after, done, audio

        cancelled, events, at_cancel, after, done, audio = run(go())
    assert cancelled["turn_id"] == 0
    assert not [e for e in events if e["type"] == "audio"]  # nothing of the turn after `cancelled`
    assert after - at_cancel <= 1 and at_cancel < 2000
    assert done["cancelled"] and 0 < done["frames"] <= at_cancel
    assert len(audio) > 0


def test_truncate_keeps_only_the_frames_played_in_the_next_prompt(server, monkeypatch):
    model, prompts = server.app.state.scheduler.model, []
    embed = model.embed_inputs

    def spy(input_ids, audio_codes=None, **kw):
        prompts.append([c.cpu() for c in audio_codes or []])
        return embed(input_ids, audio_codes=audio_codes, **kw)

    monkeypatch.setattr(model, "embed_inputs", spy)
    jobs = spy_jobs(server, monkeypatch)

    async def go(truncate: int | None):
        async with await SessionClient.connect(ws_url(server), seed=2) as s:
            await s.speak(REPLY)  # turn 0: two sentences, 4 frames each
            if truncate is not None:
                await s.truncate(0, truncate)
                return (await until(s, "truncated")), await s.speak("What did I just say to you?")
            return None, await s.speak("What did I just say to you?")

    run(go(None))
    full = prompts[-1][0]
    assert len(full) == 2 * FRAMES  # the reply's codes, whole, in the next prompt
    spoken = torch.cat([torch.stack(j.codes) for j in jobs[:2]])
    prompts.clear()
    jobs.clear()
    truncated, _ = run(go(3 * SAMPLES_PER_FRAME + 100))
    assert truncated == {
        "type": "truncated",
        "turn_id": 0,
        "frames": 3,
        "text": "I did get it, thank you so much.",
    }
    assert torch.equal(prompts[-1][0], spoken[:3])  # the listener heard 3 frames: the memory keeps 3


# ---- limits --------------------------------------------------------------------------------------------------


async def closed_with(url: str, first: str | None = None, **start) -> tuple[int, str]:
    try:
        if first is None:
            s = await SessionClient.connect(url, **start)
            async for _ in s.events():
                pass
        else:
            async with websockets.connect(url) as ws:
                await ws.send(first)
                while True:
                    await ws.recv()
    except SessionError as e:
        return e.code, e.reason
    except websockets.ConnectionClosed as e:
        return e.rcvd.code, e.rcvd.reason
    raise AssertionError("the session was not closed")


def test_sessions_over_the_limit_are_refused_with_1013(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_sessions=1) as client:

        async def go():
            async with await SessionClient.connect(ws_url(client)):
                assert client.app.state.service.sessions_open == 1
                code, reason = await closed_with(ws_url(client))
            return code, reason

        code, reason = run(go())
        assert code == 1013 and "1 sessions" in reason
        deadline = time.time() + 5
        while client.app.state.service.sessions_open and time.time() < deadline:
            time.sleep(0.02)
        assert client.app.state.service.sessions_open == 0  # a closed session frees its place
        run(go())


def test_an_idle_session_expires_with_1008(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, session_idle_timeout=0.5) as client:
        t0 = time.perf_counter()
        code, reason = run(closed_with(ws_url(client)))
        assert code == 1008 and "idle" in reason
        assert time.perf_counter() - t0 < 5
        assert client.app.state.service.sessions_open == 0


def test_a_message_too_big_closes_with_1009_and_bad_starts_with_1008(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_session_message_bytes=2000) as client:
        url = ws_url(client)
        big = json.dumps({"type": "session.start", "voices": {"0": "x" * 3000}})
        assert run(closed_with(url, big))[0] == 1009
        code, reason = run(closed_with(url, json.dumps({"type": "flush"})))
        assert code == 1008 and "session.start" in reason
        code, reason = run(closed_with(url, voices={"0": "nobody"}))
        assert code == 1008 and "nobody" in reason

        async def bad_message_then_go_on():
            async with await SessionClient.connect(url) as s:
                await s.send({"type": "truncate", "turn_id": "x", "played_samples": 1})
                error = await s.recv()
                audio, _ = await s.speak(REPLY)
                return error, audio

        error, audio = run(bad_message_then_go_on())
        assert error["type"] == "error" and error["error"]["param"] == "turn_id" and len(audio)


def test_a_session_holding_too_much_audio_closes_with_1009(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, max_session_audio_bytes=100_000) as client:

        async def go():
            s = await SessionClient.connect(ws_url(client))
            await s.user_turn(USER, user_clip(0.5))  # 48 kB of float32
            assert (await s.recv())["type"] == "user.turn.added"
            await s.user_turn(USER, user_clip(0.8))
            return await closed_with_events(s)

        async def closed_with_events(s):
            try:
                async for _ in s.events():
                    pass
            except SessionError as e:
                return e.code, e.reason
            raise AssertionError("not closed")

        code, reason = run(go())
        assert code == 1009 and "MiB" in reason


def test_a_session_needs_the_api_key(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, api_key="secret") as client:
        code, reason = run(closed_with(ws_url(client)))
        assert code == 1008 and "API key" in reason

        async def go():
            async with await SessionClient.connect(ws_url(client), api_key="secret") as s:
                return s.session_id

        assert run(go())


def test_the_api_docs_say_where_the_session_is(server):
    info = server.get("/openapi.json").json()["info"]
    assert "ws://HOST/v1/audio/session" in info["description"]
    assert server.get("/health").json()["sessions_open"] == 0


def test_a_client_that_stops_reading_is_closed_with_1008(checkpoint, tmp_path, monkeypatch):
    with serve(
        checkpoint, tmp_path, sndbuf=4096, stall_timeout=1.0, max_frames=3000, chunk_frames=1
    ) as client:
        monkeypatch.setattr(server_service, "frames_for_text", lambda text, frame_rate: 3000)

        async def go():
            async with websockets.connect(ws_url(client), max_queue=1, max_size=None) as ws:
                await ws.send(json.dumps({"type": "session.start"}))
                await ws.send(json.dumps({"type": "text.delta", "text": REPLY}))
                await ws.send(json.dumps({"type": "flush"}))
                await asyncio.sleep(4)  # reads nothing
                try:
                    while True:
                        await ws.recv()
                except websockets.ConnectionClosed as e:
                    return e.rcvd.code, e.rcvd.reason

        code, reason = run(go())
        assert code == 1008 and "read nothing" in reason
        assert client.app.state.scheduler.stats()["active"] == 0  # its row was freed


def test_many_idle_sessions_all_expire_and_let_go_of_their_turns(checkpoint, tmp_path):
    with serve(checkpoint, tmp_path, session_idle_timeout=1.0, max_sessions=40) as client:
        service = client.app.state.service

        async def opened():
            s = await SessionClient.connect(ws_url(client))
            await s.user_turn(USER, user_clip(0.5))
            assert (await s.recv())["type"] == "user.turn.added"
            return s

        async def closed(s):
            try:
                async for _ in s.events():
                    pass
            except SessionError as e:
                return e.code

        async def many():
            sessions = await asyncio.gather(*[opened() for _ in range(30)])
            held = [weakref.ref(state) for state in service.sessions.values()]
            return held, await asyncio.gather(*[closed(s) for s in sessions])

        held, codes = run(many())
        assert len(held) == 30 and codes == [1008] * 30
        deadline = time.time() + 5
        while service.sessions_open and time.time() < deadline:
            time.sleep(0.02)
        gc.collect()
        assert service.sessions_open == 0 and not [r for r in held if r() is not None]  # their audio let go


def test_serve_takes_the_session_limits():
    from csm.cli import build_parser
    from csm.server import ServerSettings

    args = build_parser().parse_args(["serve", "--max-sessions", "3", "--session-idle-timeout", "5"])
    assert (args.max_sessions, args.session_idle_timeout) == (3, 5.0)
    assert {"max_sessions", "session_idle_timeout"} <= set(vars(ServerSettings()))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--session-idle-timeout", "0"])


def test_a_session_outlives_the_request_head_deadline(checkpoint, tmp_path):
    # the HTTP head deadline (limits.http_protocol) once closed every WebSocket after head_timeout seconds
    with serve(checkpoint, tmp_path, head_timeout=0.5) as client:

        async def go():
            async with await SessionClient.connect(ws_url(client)) as s:
                await asyncio.sleep(1.5)
                audio, _ = await s.speak(REPLY)
                return len(audio)

        assert run(go()) > 0
