"""POST /v1/audio/dialogue (an extension of OpenAI's API): a dialogue, each turn in the context of the ones
before, the mix streamed back as each turn is made."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..dialogue import dialogue_events, dialogue_json, dialogue_turns
from ..encode import MEDIA_TYPES
from ..limits import json_route
from ..schemas import DIALOGUE_RESPONSES, DialogueRequest
from ..service import Service, ServiceDep
from ..speech import SpeechPlan, audio_bytes

router = APIRouter(route_class=json_route())


def prepare_dialogue(service: Service, body: DialogueRequest) -> SpeechPlan:
    service.check_model(body.model)
    config = service.generation_config(body)
    voices, turns = dialogue_turns(body, service.resolve_voice, service.settings)
    params = [f"voices.{key}" for key in body.voices]
    return SpeechPlan(turns, config, voices, pause=body.pause, voice_params=params)


@router.post("/v1/audio/dialogue", response_class=Response, responses=DIALOGUE_RESPONSES)
async def dialogue(body: DialogueRequest, request: Request, service: ServiceDep):
    """Extra: speak a dialogue, each turn in the context of the ones before; the mix streams back as each
    turn is made, with `pause` seconds between turns (`sse`: with each turn's times; `json`: all at once)."""
    plan = await service.prepare(prepare_dialogue, body)  # 429 before decoding; clips in the decode pool
    speech = await service.start(plan, request)
    stream = audio_bytes(speech.audio(), body.response_format, 1.0)
    headers = {"X-Accel-Buffering": "no"}
    if body.stream_format == "sse":
        events = dialogue_events(stream, speech, body.seed)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    if body.stream_format == "json":
        return JSONResponse(await dialogue_json(stream, speech, body), headers=headers)
    media_type = MEDIA_TYPES[body.response_format]
    if body.response_format == "flac":
        data = b"".join([part async for part in stream])
        return Response(data, media_type=media_type, headers=headers)
    return StreamingResponse(stream, media_type=media_type, headers=headers)
