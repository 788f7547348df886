"""GET /v1/voices (the saved voices) and POST /v1/voices (save one from an uploaded clip)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from ...audio import SAMPLING_RATE
from ..dialogue import read_clip
from ..limits import in_pool
from ..schemas import OPENAI_VOICES, VoiceCard, VoiceCreated, VoiceList, errors
from ..service import VOICE_NAME, ServiceDep
from ..speech import ApiError

router = APIRouter()


@router.get("/v1/voices", response_model=VoiceList, responses=errors(401))
async def voices(service: ServiceDep):
    return VoiceList(
        voices=[VoiceCard(id=name, name=name) for name in service.voices.names()],
        speakers='any speaker number, e.g. "0", without reference audio',
        openai_voices=OPENAI_VOICES,
    )


@router.post(
    "/v1/voices",
    status_code=201,
    response_model=VoiceCreated,
    responses=errors(400, 401, 409, 413, 500),
    description="Save a voice: a clip and its transcript. 409 when the name is taken (`code`: voice_exists) or "
    "the server holds as many voices or bytes of them as it allows (voice_limit_reached).",
)
async def create_voice(
    service: ServiceDep,
    audio_file: Annotated[UploadFile, File(description="a clip of the voice (wav, flac, mp3, ...)")],
    name: Annotated[str, Form(description="1-64 letters, digits, '_', '-' or '.', not only digits")],
    transcript: Annotated[str, Form(description="the words spoken in the clip")],
    speaker: Annotated[int, Form(ge=0, le=999, description="the speaker number it speaks as")] = 0,
):
    settings = service.settings
    if not VOICE_NAME.fullmatch(name) or name.isdigit():
        raise ApiError(
            400, "name must be 1-64 letters, digits, '_', '-' or '.', not only digits", param="name"
        )
    if not transcript.strip():
        raise ApiError(400, "transcript must hold the words spoken in the clip", param="transcript")
    if len(transcript) > settings.max_transcript_chars:
        raise ApiError(
            400,
            f"transcript is {len(transcript)} characters; the limit is {settings.max_transcript_chars} "
            "(the words of the clip, at most a minute of speech)",
            param="transcript",
        )
    await asyncio.to_thread(service.voices.check_room, name)  # before the upload is read and decoded
    data = await audio_file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413, f"audio_file is larger than {settings.max_upload_bytes} bytes", param="audio_file"
        )
    audio = await in_pool("decode", read_clip, data, "audio_file", settings)  # bounded: see read_clip
    seconds = len(audio) / SAMPLING_RATE
    service.check_voice_fits(audio, transcript, speaker)
    await asyncio.to_thread(service.voices.create, name, speaker, audio, transcript)
    return VoiceCreated(id=name, name=name, speaker=speaker, seconds=round(seconds, 3))
