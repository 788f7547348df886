"""What every route of one server shares (`request.app.state.service`, taken with `Depends(service)`): the
model, its processor, the scheduler, the settings and the saved voices; and how one chunk of a request's text
becomes a scheduler job."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from ..generate import GenerationConfig
from ..planner import Turn, encode_turns, plan_prompt
from ..voice import Voice, list_voices, voices_dir
from .scheduler import Scheduler, SpeechJob
from .schemas import OPENAI_MODELS, VoiceRef
from .speech import ApiError, SpeechPlan, SpeechStream

VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def frames_for_text(text: str, frame_rate: float) -> int:
    """A generous frame budget for `text` (5 s + 0.25 s per character, ~4x normal speech): a guard against
    runaway generation when the model never says end-of-audio."""
    return int((5.0 + 0.25 * len(text)) * frame_rate)


class Service:
    """One server's model, processor, scheduler, settings (a `ServerSettings`) and saved voices."""

    def __init__(self, model, processor, settings, scheduler: Scheduler):
        self.model, self.processor, self.settings, self.scheduler = model, processor, settings, scheduler
        self.root = Path(settings.voices_dir).expanduser() if settings.voices_dir else voices_dir()
        self.loaded: dict[str, Voice] = {}  # saved voices read once, and voices created through the API

    def resolve_voice(self, value: Any, param: str = "voice") -> tuple[int, Voice | None]:
        if isinstance(value, VoiceRef):
            value = value.id
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            speaker = int(value)
            if not 0 <= speaker < 1000:
                raise ApiError(400, "a speaker number must be between 0 and 999", param=param)
            return speaker, None
        if not isinstance(value, str) or not VOICE_NAME.match(value):
            raise ApiError(400, "voice must be a saved voice name or a speaker number", param=param)
        if value not in self.loaded:
            if not (self.root / value / "voice.json").is_file():
                known = ", ".join(list_voices(self.root)) or "none saved yet"
                raise ApiError(
                    404,
                    f"unknown voice {value!r} (saved voices: {known}; or a speaker number)",
                    param=param,
                )
            self.loaded[value] = Voice.load(self.root / value)
        return self.loaded[value].speaker, self.loaded[value]

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.settings.model_name, "csm", *OPENAI_MODELS):
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
        except ValueError as e:
            raise ApiError(400, str(e), param=spoken.param) from None

        def embed():  # on the scheduler's thread: clips are encoded there, once per request (voices: once)
            for voice, turns in plan.voices:
                if turns and turns[0].codes is None:
                    for t, codes in zip(turns, voice.codes(model), strict=True):
                        t.codes = codes
            encode_turns(model, prompt.context)
            codes = [c.to(model.device) for c in prompt.audio_codes or []]
            return model.embed_inputs(prompt.input_ids.to(model.device), audio_codes=codes or None)[0]

        return SpeechJob(
            embed=embed,
            prompt_len=prompt.length,
            max_frames=prompt.frames,
            backbone=plan.config.backbone,
            depth_decoder=plan.config.depth_decoder,
            seed=None if spoken.seed is None else spoken.seed + index,
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
        await speech.start()
        return speech


async def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]
