"""What every route of one server shares (`request.app.state.service`, taken with `Depends(service)`): the
model, its processor, the scheduler, the settings and the saved voices; and how one chunk of a request's text
becomes a scheduler job."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, Request

from ..audio import SAMPLING_RATE
from ..generate import GenerationConfig
from ..planner import Turn, encode_turns, plan_prompt
from ..voice import VOICE_FILE, Voice, voices_dir
from .dialogue import has_clips
from .limits import in_pool, pool
from .scheduler import Scheduler, SpeechJob
from .schemas import OPENAI_MODELS, OPENAI_VOICES, VoiceRef
from .speech import (
    ApiError,
    SpeechPlan,
    SpeechStream,
    context_overflow,
    prompt_positions,
    speaker_number,
)
from .voice_store import VoiceStore

VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always fullmatch (`$` matches before a newline)


def frames_for_text(text: str, frame_rate: float) -> int:
    """A generous frame budget for `text` (5 s + 0.25 s per character, ~4x normal speech): a guard against
    runaway generation when the model never says end-of-audio."""
    return int((5.0 + 0.25 * len(text)) * frame_rate)


class Service:
    """One server's model, processor, scheduler, settings (a `ServerSettings`) and saved voices."""

    def __init__(self, model, processor, settings, scheduler: Scheduler):
        self.model, self.processor, self.settings, self.scheduler = model, processor, settings, scheduler
        self.root = Path(settings.voices_dir).expanduser() if settings.voices_dir else voices_dir()
        self.voices = VoiceStore(
            self.root,
            settings.max_voices,
            settings.max_voices_bytes,
            settings.voice_cache,
            getattr(settings, "voice_cache_bytes", 64 << 20),
            2 * settings.max_upload_seconds,
        )
        self.preparing = 0  # requests admitted and being checked (their clips decoded), not yet queued
        pool("decode", getattr(settings, "decode_workers", 2))
        self.sessions: dict = {}  # realtime sessions open (routes/session.py): id -> csm.server.session.Session

    async def prepare(self, fn, body):
        """`fn(self, body)`, a request's checks, once it is admitted: 429 at once when the queue (waiting
        requests, and those being prepared) is full, before any clip is decoded. A request with clips is
        prepared in the decode pool (a few threads of its own), so that decoding cannot starve other requests
        nor the threads the routes share."""
        waiting = self.scheduler.waiting.qsize() + self.preparing
        if waiting >= self.settings.max_queue:
            raise ApiError(
                429, "the server is busy: too many requests waiting; retry shortly", "rate_limit_error"
            )
        self.preparing += 1
        try:
            if has_clips(body):
                return await in_pool("decode", fn, self, body)
            return await asyncio.to_thread(fn, self, body)
        finally:
            self.preparing -= 1

    @property
    def sessions_open(self) -> int:
        return len(self.sessions)

    def resolve_voice(self, value: Any, param: str = "voice") -> tuple[int, Voice | None]:
        """A speaker number (ASCII digits), a saved voice, or one of OpenAI's voice names (a saved voice of
        that name wins) as (speaker, voice or None)."""
        if isinstance(value, VoiceRef):
            value, param = value.id, f"{param}.id"
        speaker = speaker_number(value, param)
        if speaker is not None:
            return speaker, None
        if not isinstance(value, str) or not VOICE_NAME.fullmatch(value):
            raise ApiError(
                400,
                "voice must be a saved voice name, one of OpenAI's voice names or a speaker number "
                "(ASCII digits, 0-999)",
                param=param,
            )
        if value.lower() in OPENAI_VOICES and not (self.root / value / VOICE_FILE).is_file():
            return OPENAI_VOICES[value.lower()], None
        voice = self.voices.get(value, param)
        return voice.speaker, voice

    def check_voice_fits(self, audio: np.ndarray, transcript: str, speaker: int) -> None:
        """A voice is context in every prompt it speaks in: it may take at most half the model's context."""
        limit = self.scheduler.max_seq_len
        frames = int(np.ceil(len(audio) / SAMPLING_RATE * self.model.codec_model.frame_rate))
        text = prompt_positions(self.processor, [], speaker, transcript.strip())
        if text is not None and text + frames <= limit // 2:
            return
        clip_too_long = frames > limit // 4
        raise ApiError(
            400,
            f"the voice would take {'more than all' if text is None else text + frames} of the model's "
            f"{limit} context positions ({frames} for the clip's audio); at most {limit // 2} leave room to "
            f"speak: use a {'shorter clip' if clip_too_long else 'shorter transcript'}",
            param="audio_file" if clip_too_long else "transcript",
        )

    def check_model(self, name: str | None) -> None:
        accepted = (None, "", self.settings.model_name, self.settings.model_path, "csm", *OPENAI_MODELS)
        if name not in accepted:
            raise ApiError(
                404, f"unknown model {name!r}; this server serves {self.settings.model_name!r}", param="model"
            )

    def generation_config(self, body) -> GenerationConfig:
        try:
            return GenerationConfig.from_model(self.model, temperature=body.temperature, top_k=body.top_k)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def job_for(
        self, plan: SpeechPlan, turn: int, index: int, carried: list[Turn], frames_left: int
    ) -> SpeechJob:
        """The job for chunk `index` of turn `turn`: the voices' clips and as many of the turns and chunks
        before it (with the audio made for them) as fit the context with its whole frame budget, then its text."""
        model = self.model
        spoken = plan.turns[turn]
        text = spoken.chunks[index]
        budget = min(frames_left, frames_for_text(text, model.codec_model.frame_rate))
        try:
            prompt = plan_prompt(
                self.processor,
                plan.fixed,
                carried,
                spoken.speaker,
                text,
                budget,
                self.scheduler.max_seq_len,
                "keep",
            )
        except ValueError:  # the planner names Python knobs; the 400 names the request field at fault
            raise context_overflow(self.processor, plan, spoken, text, self.scheduler.max_seq_len) from None

        # Clips are encoded here, on the request's worker thread, once per request (voices: once), so that a
        # joining request's encoding never holds up the scheduler's frames.
        with torch.inference_mode():
            for voice, turns in plan.voices:
                if turns and turns[0].codes is None:
                    for t, codes in zip(turns, voice.codes(model), strict=True):
                        t.codes = codes
            encode_turns(model, prompt.context)

        def embed():  # on the scheduler's thread; with its content, so stored prefixes are not read again
            codes = [c.to(model.device) for c in prompt.audio_codes or []]
            return model.embed_prompt(prompt.input_ids.to(model.device), audio_codes=codes or None)

        return SpeechJob(
            embed=embed,
            prompt_len=prompt.length,
            max_frames=prompt.frames,
            backbone=plan.config.backbone,
            depth_decoder=plan.config.depth_decoder,
            seed=None if spoken.seed is None else spoken.seed + index,
            carried_kept=len(prompt.carried),
        )

    async def start(self, plan: SpeechPlan, request: Request) -> SpeechStream:
        """A request's audio under way: cancelled when the request ends; a failure before the first audio is
        still raised here (an error status)."""
        settings = self.settings
        speech = SpeechStream(
            plan,
            self.job_for,
            self.scheduler,
            settings.max_frames,
            request.state.request_id,
            settings.max_buffered_chunks,
        )
        request.state.cleanup.append(speech.cancel)
        request.state.speech = speech  # the access log reads its prompt positions and those reused
        await speech.start()
        t0, metrics = request.state.t0, self.scheduler.metrics
        metrics.time_to_first_audio.observe(time.perf_counter() - t0)
        request.state.cleanup.append(
            lambda: metrics.spoke(speech.samples / SAMPLING_RATE, time.perf_counter() - t0)
        )
        return speech


async def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]
