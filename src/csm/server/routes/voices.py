"""GET /v1/voices (the saved voices) and POST /v1/voices (save one from an uploaded clip)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from ...audio import SAMPLING_RATE, load_audio
from ...voice import Voice, list_voices
from ..schemas import VoiceCard, VoiceCreated, VoiceList, errors
from ..service import VOICE_NAME, ServiceDep
from ..speech import ApiError

router = APIRouter()


@router.get("/v1/voices", response_model=VoiceList, responses=errors(401))
async def voices(service: ServiceDep):
    return VoiceList(
        voices=[VoiceCard(id=name, name=name) for name in list_voices(service.root)],
        speakers='any speaker number, e.g. "0", without reference audio',
    )


@router.post(
    "/v1/voices", status_code=201, response_model=VoiceCreated, responses=errors(400, 401, 409, 413, 500)
)
async def create_voice(
    service: ServiceDep,
    audio_file: Annotated[UploadFile, File(description="a clip of the voice (wav, flac, mp3, ...)")],
    name: Annotated[str, Form(description="1-64 letters, digits, '_', '-' or '.', not only digits")],
    transcript: Annotated[str, Form(description="the words spoken in the clip")],
    speaker: Annotated[int, Form(ge=0, le=999, description="the speaker number it speaks as")] = 0,
):
    settings, root = service.settings, service.root
    if not VOICE_NAME.match(name) or name.isdigit():
        raise ApiError(
            400, "name must be 1-64 letters, digits, '_', '-' or '.', not only digits", param="name"
        )
    if not transcript.strip():
        raise ApiError(400, "transcript must hold the words spoken in the clip", param="transcript")
    data = await audio_file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413, f"audio_file is larger than {settings.max_upload_bytes} bytes", param="audio_file"
        )
    try:
        audio = await asyncio.to_thread(load_audio, data)
    except Exception as e:
        raise ApiError(400, f"cannot read audio_file: {e}", param="audio_file") from None
    seconds = len(audio) / SAMPLING_RATE
    if seconds > settings.max_upload_seconds:
        raise ApiError(
            413,
            f"audio_file is {seconds:.1f} s long; the limit is {settings.max_upload_seconds:g} s",
            param="audio_file",
        )
    if (root / name).exists():
        raise ApiError(409, f"a voice named {name!r} exists already", param="name")
    try:
        voice = Voice(name, speaker, [(audio, transcript)])
        await asyncio.to_thread(voice.save, root / name)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    service.loaded[name] = voice
    return VoiceCreated(id=name, name=name, speaker=speaker, seconds=round(seconds, 3))
