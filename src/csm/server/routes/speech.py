"""POST /v1/audio/speech: OpenAI's `audio.speech.create`, with context turns and long input in sentences."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ...chunking import split_sentences
from ...planner import voice_turns
from ..dialogue import context_turns
from ..encode import MEDIA_TYPES
from ..limits import json_route
from ..schemas import SPEECH_RESPONSES, SpeechRequest
from ..service import Service, ServiceDep
from ..speech import ApiError, PlannedTurn, SpeechPlan, audio_bytes, sse_events

SPEED_HEADER = "resample: speed > 1 plays faster and higher, < 1 slower and lower (pitch follows)"

router = APIRouter(route_class=json_route())


def prepare(service: Service, body: SpeechRequest) -> SpeechPlan:
    """Check a request and cut its text into sentence-sized chunks, after its context turns."""
    settings = service.settings
    text = body.input.strip()
    if not text:
        raise ApiError(400, "input is empty", param="input")
    if len(body.input) > settings.max_input_chars:
        raise ApiError(
            400,
            f"input is {len(body.input)} characters; the limit is {settings.max_input_chars}",
            param="input",
        )
    service.check_model(body.model)
    speaker, voice = service.resolve_voice(body.voice)
    config = service.generation_config(body)
    voices = [(voice, voice_turns(voice))] if voice is not None else []
    more_voices, given = context_turns(body.context, service.resolve_voice, settings)
    turn = PlannedTurn(speaker, text, split_sentences(text, settings.max_chunk_chars), seed=body.seed)
    params = ["voice"] * len(voices) + [
        f"context.{i}.voice" for i, t in enumerate(body.context or []) if t.voice is not None
    ]
    return SpeechPlan([*given, turn], config, [*voices, *more_voices], voice_params=params)


@router.post("/v1/audio/speech", response_class=Response, responses=SPEECH_RESPONSES)
async def speech(body: SpeechRequest, request: Request, service: ServiceDep):
    """Speak `input`; the audio streams back as it is made (OpenAI's `audio.speech.create`)."""
    plan = await service.prepare(prepare, body)  # 429 before decoding; clips in the decode pool
    speech = await service.start(plan, request)  # a failure before the first audio is still an error status
    stream = audio_bytes(speech.audio(), body.response_format, body.speed)
    headers = {"X-Accel-Buffering": "no", "X-Speed-Method": SPEED_HEADER if body.speed != 1.0 else "none"}
    if body.stream_format == "sse":
        return StreamingResponse(sse_events(stream, speech), media_type="text/event-stream", headers=headers)
    media_type = MEDIA_TYPES[body.response_format]
    if body.response_format == "flac":  # written only at the end: buffered, so a failure is a status
        data = b"".join([part async for part in stream])
        return Response(data, media_type=media_type, headers=headers)
    return StreamingResponse(stream, media_type=media_type, headers=headers)
