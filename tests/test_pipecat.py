"""csm.pipecat.CsmTTSService in a real Pipecat pipeline (pipecat.tests.utils.run_test), in-process and against a
`csm serve` session: LLM text in, 24 kHz TTSAudioRawFrames out, the user's audio and transcript in the
conversation's context, an interruption in the middle."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="needs the pipecat extra")

from pipecat.frames.frames import (  # noqa: E402
    InputAudioRawFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from serving import serve  # noqa: E402

from csm.demo import write_demo_checkpoint  # noqa: E402
from csm.pipecat import CsmTTSService  # noqa: E402
from csm.server import service as server_service  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("pipecat-ckpt") / "demo")


def user_frames(text: str, seconds: float = 0.5, rate: int = 16000) -> list:
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.2 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2").tobytes()
    half = len(pcm) // 2 // 2 * 2
    return [
        UserStartedSpeakingFrame(),
        InputAudioRawFrame(pcm[:half], rate, 1),
        InputAudioRawFrame(pcm[half:], rate, 1),
        TranscriptionFrame(text, "user", "2026-12-08T00:00:00Z"),
        UserStoppedSpeakingFrame(),
    ]


def reply(*texts: str) -> list:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in texts], LLMFullResponseEndFrame()]


def test_llm_text_becomes_24khz_audio_spoken_after_the_users_turn(checkpoint):
    tts = CsmTTSService(model=str(checkpoint), seed=1, options={"max_new_tokens": 6})
    frames = [
        *user_frames("Hi there, can you hear me?"),
        *reply("Yes, I can hear you ", "very well."),
        SleepFrame(3),
    ]
    down, _ = asyncio.run(run_test(tts, frames_to_send=frames))
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 24000 and f.num_channels == 1 for f in audio)
    assert any(isinstance(f, TTSStartedFrame) for f in down)
    turns = tts.conversation.turns
    assert turns[0].given and turns[0].speaker == 1 and turns[0].text == "Hi there, can you hear me?"
    assert abs(len(turns[0].audio) - 12000) <= 2  # 0.5 s at 16 kHz, resampled to 24 kHz
    assert [t.speaker for t in turns[1:]] == [0] * (len(turns) - 1)
    samples = sum(len(f.audio) // 2 for f in audio)
    assert samples == sum(len(t.audio) for t in turns[1:])


def test_an_interruption_stops_the_sentence_and_the_next_reply_is_spoken(checkpoint):
    tts = CsmTTSService(model=str(checkpoint), seed=2, options={"max_new_tokens": 150})
    frames = [
        *reply("This is a long answer that the user will not let me finish."),
        SleepFrame(0.4),
        InterruptionFrame(),
        *user_frames("Wait, stop."),
        *reply("Okay, I stopped."),
        SleepFrame(0.5),
    ]
    down, _ = asyncio.run(run_test(tts, frames_to_send=frames))
    turns = tts.conversation.turns
    assert [(t.speaker, t.given) for t in turns] == [(0, False), (1, True), (0, False)]
    assert 0 < turns[0].frames < 150 and turns[2].frames == 150  # stopped midway, kept what was made
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before = {f.context_id for f in down[:cut] if isinstance(f, TTSAudioRawFrame)}
    after = [f for f in down[cut:] if isinstance(f, TTSAudioRawFrame)]
    assert before and after and not before & {f.context_id for f in after}  # none of it after the cut
    assert sum(len(f.audio) // 2 for f in after) == len(turns[2].audio)


def test_pointed_at_a_server_session_the_user_turn_is_context_and_audio_comes_back(checkpoint, tmp_path):
    with pytest.MonkeyPatch.context() as mp, serve(checkpoint, tmp_path, max_frames=64) as client:
        mp.setattr(server_service, "frames_for_text", lambda text, frame_rate: 6)
        scheduler, jobs = client.app.state.scheduler, []
        submit = scheduler.submit
        mp.setattr(scheduler, "submit", lambda job: (jobs.append(job), submit(job))[1])
        url = str(client.base_url).replace("http://", "ws://") + "/v1/audio/session"
        tts = CsmTTSService(url=url, seed=4)
        frames = [*user_frames("Hello, is this the support line?"), *reply("Yes it is, how can I help?")]
        down, _ = asyncio.run(run_test(tts, frames_to_send=[*frames, SleepFrame(1.0)]))
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 24000 for f in audio)
    assert sum(len(f.audio) // 2 for f in audio) == 6 * 1920
    assert len(jobs) == 1 and jobs[0].carried_kept == 1  # the user's turn was in the reply's context


def test_an_interruption_cancels_the_server_sessions_turn(checkpoint, tmp_path):
    long = "This is a long answer that the user will not let me finish."
    with (
        pytest.MonkeyPatch.context() as mp,
        serve(checkpoint, tmp_path, max_frames=3000, chunk_frames=1) as client,
    ):
        mp.setattr(server_service, "frames_for_text", lambda text, rate: 3000 if text == long else 6)
        url = str(client.base_url).replace("http://", "ws://") + "/v1/audio/session"
        tts = CsmTTSService(url=url, seed=4)
        frames = [
            *reply(long),
            SleepFrame(0.5),
            InterruptionFrame(),
            *user_frames("Wait, stop."),
            *reply("Okay, I stopped."),
            SleepFrame(1.0),
        ]
        down, _ = asyncio.run(run_test(tts, frames_to_send=frames))
        assert client.app.state.scheduler.cancelled == 1  # the long sentence's row was stopped
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    after = [f for f in down[cut:] if isinstance(f, TTSAudioRawFrame)]
    assert sum(len(f.audio) // 2 for f in after) == 6 * 1920  # the next reply, whole
