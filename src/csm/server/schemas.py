"""Request and response bodies of the HTTP API, declared so that /openapi.json and /docs describe them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .encode import FORMATS, MEDIA_TYPES

OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


class VoiceRef(BaseModel):
    """OpenAI's voice object: `{"id": "..."}`."""

    id: str | int = Field(description="a saved voice's name or a speaker number")


class SpeechRequest(BaseModel):
    """OpenAI's `POST /v1/audio/speech` body, plus our `seed`, `temperature` and `top_k`."""

    model: str | None = Field(
        None, description=f"this server's model name, `csm`, or one of OpenAI's ({', '.join(OPENAI_MODELS)})"
    )
    input: str = Field(
        min_length=1, max_length=4096, description="the text to speak (the server may set a lower limit)"
    )
    voice: str | int | VoiceRef = Field(
        "0", description='a saved voice (see /v1/voices) or a speaker number such as "0"'
    )
    instructions: str | None = Field(
        None, description="accepted for compatibility; CSM takes no instructions"
    )
    response_format: Literal[FORMATS] = Field("mp3", description="audio format of the response")
    speed: float = Field(1.0, ge=0.25, le=4.0, description="playback speed by resampling (pitch follows)")
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="`audio`: the file's bytes as they are made; `sse`: OpenAI's speech events"
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**62,
        description="extra: seeds the sampling; the same request and seed give the same audio",
    )
    temperature: float | None = Field(
        None, ge=0.01, le=10.0, description="extra: sampling temperature (default: the checkpoint's)"
    )
    top_k: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="extra: sample among the k likeliest codes; 0 turns it off (default: the checkpoint's)",
    )


class ErrorBody(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error (the request's fault), authentication_error, "
        "rate_limit_error or server_error (ours)"
    )
    param: str | None = Field(None, description="the request field at fault, if any")
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "csm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VoiceCard(BaseModel):
    id: str
    name: str
    type: Literal["saved"] = "saved"


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    voices: list[VoiceCard]
    speakers: str


class VoiceCreated(BaseModel):
    id: str
    name: str
    speaker: int
    seconds: float


class SchedulerStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_batch_size: int
    alive: bool
    active: int
    waiting: int
    steps: int
    frames_generated: int
    max_active_rows: int
    mean_active_rows: float
    active_rows_histogram: dict[str, int]
    completed: int
    failed: int
    cancelled: int


class Health(BaseModel):
    status: Literal["ok", "draining", "unavailable"]
    model: str
    scheduler: SchedulerStats


def errors(*statuses: int) -> dict:
    """OpenAPI `responses` entries for error statuses, all with the OpenAI error body."""
    text = {
        400: "invalid request (`param` names the field)",
        401: "missing or wrong API key",
        404: "unknown model or voice",
        409: "the name is taken",
        413: "upload too large or too long",
        429: "too many requests waiting",
        500: "the server failed to make the audio",
        503: "the server is shutting down or its scheduler is not running",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


SPEECH_RESPONSES = {
    200: {
        "description": "the audio, streamed as it is made (flac: whole, once complete); "
        "with stream_format=sse, `speech.audio.delta` events then `speech.audio.done` (or `error`)",
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in set(MEDIA_TYPES.values())},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "one event; `data` holds JSON: speech.audio.delta, speech.audio.done or error",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                    "required": ["data"],
                }
            },
        },
    },
    **errors(400, 401, 404, 429, 500, 503),
}
