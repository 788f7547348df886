"""One speech request's audio: its text chunk by chunk through the scheduler, then encoded bytes or SSE events."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr
import torch

from ..audio import SAMPLING_RATE
from ..chunking import CrossfadeStream
from ..conversation import manifest_entry
from ..generate import GenerationConfig
from ..planner import Turn, plan_prompt
from ..voice import Voice
from .encode import AudioEncoder
from .scheduler import QueueFull, Scheduler, SpeechJob, Unavailable

log = logging.getLogger("csm.server")


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


MAX_SPEAKER = 999


def speaker_number(value: str | int, param: str) -> int | None:
    """The speaker number `value` names (an int, or a string of ASCII digits such as "0"); None when it is no
    number (a voice name, or digits of another script such as "²" or "٣"); ApiError 400 when out of range."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            return None
        value = int(value) if len(value) <= 6 else MAX_SPEAKER + 1  # never int() of thousands of digits
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not 0 <= value <= MAX_SPEAKER:
        raise ApiError(400, f"a speaker number must be between 0 and {MAX_SPEAKER}", param=param)
    return value


def server_error(e: Exception) -> ApiError:
    """The ApiError for a job that failed on our side."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Unavailable):
        return ApiError(503, str(e), "server_error")
    return ApiError(500, f"speech generation failed ({type(e).__name__}: {e})", "server_error")


@dataclass
class PlannedTurn:
    """A turn of a request: one to speak (its text in sentence-sized chunks), or one already spoken (`given`,
    context only: its clip's codes are encoded on the scheduler's thread)."""

    speaker: int
    text: str
    chunks: list[str] = field(default_factory=list)
    given: Turn | None = None
    seed: int | None = None  # chunk j uses seed + j
    param: str = "input"  # the request field it came from, for errors


@dataclass
class SpeechPlan:
    """A checked request: its turns in order (context and turns to speak) and how to speak them. A speech
    request is one turn to speak after its context turns; a dialogue, any number of them."""

    turns: list[PlannedTurn]
    config: GenerationConfig
    voices: list[tuple[Voice, list[Turn]]] = field(default_factory=list)  # clips kept in every prompt
    pause: float = 0.0  # seconds of silence between spoken turns
    voice_params: list[str] = field(default_factory=list)  # the request field of each voice, for errors

    @property
    def fixed(self) -> list[Turn]:
        return [t for _, turns in self.voices for t in turns]


def prompt_positions(processor, fixed: list[Turn], speaker: int, text: str) -> int | None:
    """Context positions `fixed` turns and `speaker` saying `text` take; None past the processor's limit."""
    try:
        return plan_prompt(processor, fixed, [], speaker, text, 1, 1 << 40).length
    except ValueError:
        return None


def context_overflow(processor, plan: SpeechPlan, spoken: PlannedTurn, text: str, limit: int) -> ApiError:
    """The 400 for a chunk that leaves no room for audio in the model's context of `limit` positions. It
    blames the saved voices when their clips and transcripts take over half of it, else the text; never the
    turns before (they leave the window first)."""
    voices = prompt_positions(processor, plan.fixed, spoken.speaker, "") if plan.fixed else 0
    if voices is None or voices > limit // 2:
        names = ", ".join(repr(voice.name) for voice, _ in plan.voices)
        taken = "more than all" if voices is None else f"{voices}"
        return ApiError(
            400,
            f"the saved voice(s) {names} take {taken} of the model's {limit} context positions (their clips "
            "and transcripts), leaving too little room to speak: use a voice with shorter clips",
            param=plan.voice_params[0] if plan.voice_params else "voice",
        )
    total = prompt_positions(processor, plan.fixed, spoken.speaker, text)
    taken = "more than all" if total is None else f"{total}"
    return ApiError(
        400,
        f"{spoken.param} (a sentence of {len(text)} characters, with the voices' clips) takes {taken} of the "
        f"model's {limit} context positions, leaving no room to speak it: shorten the sentence",
        param=spoken.param,
    )


class SpeechStream:
    """One request's audio, turn after turn and chunk after chunk: each chunk is a scheduler job whose context
    holds the voices' clips, the turns before it and the chunks of its turn before it, with the audio made for
    them (as `csm.conversation` does), joined with crossfades within a turn and `pause` between turns.
    `max_frames` bounds the whole request (every turn and chunk together): once spent, nothing more is spoken.
    `entries` gets each spoken turn's start and end (seconds in the audio) as it is done."""

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
        self.reused = 0  # prompt positions found in the prefix store, over every chunk
        self.first: tuple[SpeechJob, Any] | None = None
        self.job: SpeechJob | None = None
        self.entries: list[dict] = []  # manifest entries of the turns spoken so far
        self.samples = 0  # float32 samples sent so far

    def cancel(self) -> None:
        """Free the row of the chunk in progress (the client went away or stalled); a no-op once done."""
        if self.job is not None:
            self.job.cancelled.set()

    def _history(self, upto: int) -> list[Turn]:
        return [t.given for t in self.plan.turns[:upto] if t.given is not None]

    async def start(self) -> None:
        """Queue the first chunk and wait for its first audio, so that a failure is still an error status."""
        first = next(i for i, t in enumerate(self.plan.turns) if t.given is None)
        self.first = await self._run(first, 0, self._history(first), self.max_frames, wait=False)

    async def _run(
        self, turn: int, index: int, carried: list[Turn], frames_left: int, wait: bool
    ) -> tuple[SpeechJob, Any]:
        job = await asyncio.to_thread(self.job_for, self.plan, turn, index, carried, frames_left)
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
        history: list[Turn] = []
        gap = np.zeros(round(self.plan.pause * SAMPLING_RATE), np.float32)
        for t, turn in enumerate(self.plan.turns):
            if turn.given is not None:
                history.append(turn.given)
                continue
            if self.frames >= self.max_frames:  # the request's budget is spent: later turns are not spoken
                log.info(
                    "request %s: its %d frames are spent; turns from %d on are not spoken",
                    self.request_id,
                    self.max_frames,
                    t,
                )
                break
            if self.entries and len(gap):
                self.samples += len(gap)
                yield gap
            start, frames = self.samples, 0
            joiner, done, parts, codes = CrossfadeStream(SAMPLING_RATE), [], [], []
            for index, text in enumerate(turn.chunks):
                if index and self.frames >= self.max_frames:
                    break
                if self.first is not None:
                    (job, first), self.first = self.first, None
                else:
                    left = self.max_frames - self.frames
                    job, first = await self._run(t, index, [*history, *done], left, True)
                joiner.start_sentence(last=index == len(turn.chunks) - 1)
                chunk_parts = []
                async for piece in audio_chunks(job, first):
                    chunk_parts.append(piece)
                    out = joiner.push(piece)
                    if len(out):
                        self.samples += len(out)
                        yield out
                self.prompt_len, self.frames = self.prompt_len + job.prompt_len, self.frames + job.frames
                self.reused += job.reused
                frames += job.frames
                if job.codes:
                    audio, chunk_codes = np.concatenate(chunk_parts), torch.stack(job.codes)
                    done.append(Turn(turn.speaker, text, audio, chunk_codes))
                    parts.append(audio)
                    codes.append(chunk_codes)
            tail = joiner.finish()
            if len(tail):
                self.samples += len(tail)
                yield tail
            if codes:  # the next turns see this one as one turn
                history.append(Turn(turn.speaker, turn.text, np.concatenate(parts), torch.cat(codes)))
            entry = manifest_entry(
                t, turn.speaker, turn.text, start, self.samples, SAMPLING_RATE, turn.seed, frames
            )
            self.entries.append(entry)

    def usage(self) -> dict:
        return {
            "input_tokens": self.prompt_len,
            "output_tokens": self.frames,
            "total_tokens": self.prompt_len + self.frames,
        }


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


def sse_error(speech, e: Exception) -> str:
    """The `error` event (OpenAI's error object) for a failure after audio was sent; logged with the request."""
    error = server_error(e)
    log.error("request %s failed after audio was sent: %s", speech.request_id, error.message)
    return sse(
        {
            "type": "error",
            "error": {"message": error.message, "type": error.type, "param": error.param, "code": None},
        }
    )


async def sse_events(stream, speech: SpeechStream):
    """OpenAI's speech SSE: `speech.audio.delta` events with base64 audio, then `speech.audio.done`; a failure
    midway sends an `error` event (OpenAI's error object) and ends the stream."""
    try:
        async for data in stream:
            yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    except Exception as e:
        yield sse_error(speech, e)
        return
    yield sse({"type": "speech.audio.done", "usage": speech.usage()})
