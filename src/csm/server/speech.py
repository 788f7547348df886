"""One speech request's audio: its text chunk by chunk through the scheduler, then encoded bytes or SSE events."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr
import torch

from ..audio import SAMPLING_RATE
from ..generate import GenerationConfig
from ..pipeline import CrossfadeStream
from ..planner import Turn
from ..voice import Voice
from .encode import AudioEncoder
from .scheduler import QueueFull, Scheduler, SpeechJob, Unavailable

log = logging.getLogger("csm.server")


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


def server_error(e: Exception) -> ApiError:
    """The ApiError for a job that failed on our side."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Unavailable):
        return ApiError(503, str(e), "server_error")
    return ApiError(500, f"speech generation failed ({type(e).__name__}: {e})", "server_error")


@dataclass
class SpeechPlan:
    """A checked request: its text in sentence-sized chunks, and how to speak them."""

    chunks: list[str]
    speaker: int
    voice: Voice | None
    config: GenerationConfig
    seed: int | None


class SpeechStream:
    """One request's audio, chunk after chunk: each chunk is a scheduler job whose context holds the chunks
    before it and the audio made for them (as `csm.pipeline` does for long text), joined with crossfades."""

    def __init__(
        self,
        plan: SpeechPlan,
        job_for,
        scheduler: Scheduler,
        max_frames: int,
        request_id: str = "-",
        max_buffered: int = 0,
    ):
        self.plan, self.job_for, self.scheduler, self.max_frames = plan, job_for, scheduler, max_frames
        self.request_id, self.max_buffered = request_id, max_buffered
        self.prompt_len = self.frames = 0  # usage, over every chunk
        self.first: tuple[SpeechJob, Any] | None = None
        self.job: SpeechJob | None = None

    def cancel(self) -> None:
        """Free the row of the chunk in progress (the client went away or stalled); a no-op once done."""
        if self.job is not None:
            self.job.cancelled.set()

    async def start(self) -> None:
        """Queue the first chunk and wait for its first audio, so that a failure is still an error status."""
        self.first = await self._run(0, [], wait=False)

    async def _run(self, index: int, carried: list[Turn], wait: bool) -> tuple[SpeechJob, Any]:
        job = await asyncio.to_thread(self.job_for, self.plan, index, carried, self.max_frames - self.frames)
        job.loop, job.out = asyncio.get_running_loop(), asyncio.Queue()
        job.request_id, job.max_buffered = self.request_id, self.max_buffered
        self.job = job
        while True:
            try:
                self.scheduler.submit(job)
                break
            except Unavailable as e:
                raise server_error(e) from None
            except QueueFull:
                if not wait:  # a new request is turned away; one already speaking waits its turn
                    raise ApiError(
                        429,
                        "the server is busy: too many requests waiting; retry shortly",
                        "rate_limit_error",
                    ) from None
                await asyncio.sleep(0.05)
        first = await job.take()
        if isinstance(first, Exception):
            raise server_error(first)
        return job, first

    async def audio(self):
        """Float32 pieces of the whole request's audio; raises ApiError when a chunk fails."""
        joiner, carried = CrossfadeStream(SAMPLING_RATE), []
        for index, text in enumerate(self.plan.chunks):
            if index and self.frames >= self.max_frames:
                break
            job, first = self.first if index == 0 else await self._run(index, carried, wait=True)
            joiner.start_sentence(last=index == len(self.plan.chunks) - 1)
            parts = []
            async for piece in audio_chunks(job, first):
                parts.append(piece)
                out = joiner.push(piece)
                if len(out):
                    yield out
            self.prompt_len, self.frames = self.prompt_len + job.prompt_len, self.frames + job.frames
            if job.codes:
                carried.append(Turn(self.plan.speaker, text, np.concatenate(parts), torch.stack(job.codes)))
        tail = joiner.finish()
        if len(tail):
            yield tail


async def audio_chunks(job: SpeechJob, first):
    """Float32 chunks of a job as the scheduler sends them; a client that leaves cancels the job."""
    item = first
    try:
        while item is not None:
            if isinstance(item, Exception):
                raise server_error(item)
            yield item
            item = await job.take()
    finally:
        job.cancelled.set()  # no-op once the job is done; frees the row when the client went away


async def audio_bytes(chunks, fmt: str, speed: float):
    """Encoded bytes of float32 audio chunks; `speed` resamples (pitch follows the speed)."""
    encoder = AudioEncoder(fmt, SAMPLING_RATE)
    stretch = (
        soxr.ResampleStream(SAMPLING_RATE * speed, SAMPLING_RATE, 1, dtype="float32")
        if speed != 1.0
        else None
    )
    async for chunk in chunks:
        if stretch is not None:
            chunk = stretch.resample_chunk(chunk)
        data = encoder.push(chunk)
        if data:
            yield data
    tail = (
        encoder.push(stretch.resample_chunk(np.zeros(0, np.float32), last=True))
        if stretch is not None
        else b""
    )
    data = tail + encoder.finish()
    if data:
        yield data


def sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


async def sse_events(stream, speech: SpeechStream):
    """OpenAI's speech SSE: `speech.audio.delta` events with base64 audio, then `speech.audio.done`; a failure
    midway sends an `error` event (OpenAI's error object) and ends the stream."""
    try:
        async for data in stream:
            yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    except Exception as e:
        error = server_error(e)
        log.error("request %s failed after audio was sent: %s", speech.request_id, error.message)
        body = {"message": error.message, "type": error.type, "param": error.param, "code": None}
        yield sse({"type": "error", "error": body})
        return
    usage = {
        "input_tokens": speech.prompt_len,
        "output_tokens": speech.frames,
        "total_tokens": speech.prompt_len + speech.frames,
    }
    yield sse({"type": "speech.audio.done", "usage": usage})
