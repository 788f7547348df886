"""Request and response bodies of the HTTP API, declared so that /openapi.json and /docs describe them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .encode import FORMATS, MEDIA_TYPES

OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")

# OpenAI's voice names (the `openai` client's list), each bound to a speaker number in alphabetical order, so
# that code written for OpenAI speaks at its first request; a saved voice of the same name wins.
OPENAI_VOICES = {
    name: speaker
    for speaker, name in enumerate(
        sorted(
            ["alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse"]
            + ["marin", "cedar"]
        )
    )
}


class VoiceRef(BaseModel):
    """OpenAI's voice object: `{"id": "..."}`."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | StrictInt = Field(
        description="a saved voice's name, one of OpenAI's voice names, or a speaker number"
    )


class ContextTurn(BaseModel):
    """Extra: an earlier turn of the conversation, as context. Either its words and their audio (a turn that
    was spoken), or a saved voice whose clips (with their transcripts) become context."""

    model_config = ConfigDict(extra="forbid")

    speaker: int | None = Field(
        None,
        ge=0,
        le=999,
        strict=True,
        description="who spoke it (default: the voice's speaker for `voice`, else 0)",
    )
    text: str | None = Field(None, min_length=1, max_length=4096, description="the words spoken in `audio`")
    audio: str | None = Field(
        None, min_length=1, description="base64 of an audio file (wav, flac, ogg or mp3) of `text` spoken"
    )
    voice: str | None = Field(None, min_length=1, max_length=64, description="a saved voice (see /v1/voices)")


class SpeechRequest(BaseModel):
    """OpenAI's `POST /v1/audio/speech` body, plus our `seed`, `temperature` and `top_k`. Unknown fields are
    refused (400 naming the field), as OpenAI's API does: a misspelt option is never silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description=f"this server's model name, `csm`, or one of OpenAI's ({', '.join(OPENAI_MODELS)})"
    )
    input: str = Field(
        min_length=1, max_length=4096, description="the text to speak (the server may set a lower limit)"
    )
    voice: StrictStr | StrictInt | VoiceRef = Field(
        "0",
        description='a saved voice (see /v1/voices), one of OpenAI\'s voice names ("alloy", ...: each speaks '
        'as a speaker number, see /v1/voices) or a speaker number such as "0"',
    )
    instructions: str | None = Field(
        None, max_length=4096, description="accepted for compatibility; CSM takes no instructions"
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
    context: list[ContextTurn] | None = Field(
        None,
        max_length=64,
        description="extra: earlier turns of the conversation, oldest first, spoken in before `input`; "
        "their audio is context (oldest dropped first when the context window is full), saved voices' clips "
        "are always kept",
    )


class DialogueTurn(BaseModel):
    """One turn of a dialogue: who speaks and what; with `audio` it was spoken already (context only)."""

    model_config = ConfigDict(extra="forbid")

    speaker: int = Field(ge=0, le=999, strict=True, description="speaker id")
    text: str = Field(min_length=1, max_length=4096, description="the words")
    audio: str | None = Field(
        None, min_length=1, description="base64 of an audio file of `text` spoken: a turn that happened"
    )


class DialogueRequest(BaseModel):
    """Extra endpoint: a whole dialogue spoken turn by turn, each turn in the context of the ones before."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="this server's model name, `csm`, or one of OpenAI's")
    turns: list[DialogueTurn] = Field(min_length=1, max_length=64, description="the turns, in order")
    voices: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description='speaker id -> saved voice, e.g. {"0": "alice"}: its clips stay in every turn\'s context',
    )
    pause: float = Field(0.3, ge=0.0, le=10.0, description="seconds of silence between spoken turns")
    response_format: Literal[FORMATS] = Field("wav", description="audio format of the mix")
    stream_format: Literal["audio", "sse", "json"] = Field(
        "audio",
        description="`audio`: the mix's bytes as they are made; `sse`: dialogue events with the audio and "
        "each turn's times; `json`: one JSON body once complete (audio as base64, manifest, usage)",
    )
    seed: int | None = Field(None, ge=0, le=2**62, description="turn i uses seed + i (given turns counted)")
    temperature: float | None = Field(None, ge=0.01, le=10.0, description="sampling temperature")
    top_k: int | None = Field(None, ge=0, le=100_000, description="sample among the k likeliest codes")


class ManifestTurn(BaseModel):
    index: int = Field(description="the turn's place in the request's `turns`")
    speaker: int
    text: str
    start: float = Field(description="seconds into the mix")
    end: float
    seed: int | None
    frames: int = Field(description="codec frames generated (12.5 per second)")


class Manifest(BaseModel):
    sampling_rate: int
    seconds: float
    pause: float
    seed: int | None
    voices: dict[str, str]
    turns: list[ManifestTurn] = Field(description="the spoken turns (given ones are context, not in the mix)")


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class DialogueResult(BaseModel):
    """`stream_format=json`: the whole dialogue at once."""

    audio: str = Field(description="base64 of the mix in `response_format`")
    response_format: str
    manifest: Manifest
    usage: Usage


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
    openai_voices: dict[str, int] = Field(
        description="OpenAI's voice names and the speaker number each speaks as (a saved voice of the same "
        "name wins)"
    )


class VoiceCreated(BaseModel):
    id: str
    name: str
    speaker: int
    seconds: float


class PrefixCacheStats(BaseModel):
    """The prefix store (csm.prefix_cache): what prompts found stored, and what it holds."""

    enabled: bool
    hits: int
    misses: int
    positions_saved: int
    positions_prefilled: int
    bytes: int
    max_bytes: int
    entries: int
    evictions: int


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
    prefilling: int = 0  # rows whose prompt is going in, a slice per step
    prefix_cache: PrefixCacheStats | None = None


class Health(BaseModel):
    status: Literal["ok", "draining", "unavailable"]
    model: str
    scheduler: SchedulerStats
    sessions_open: int = Field(0, description="realtime sessions open (WebSocket /v1/audio/session)")


def errors(*statuses: int) -> dict:
    """OpenAPI `responses` entries for error statuses, all with the OpenAI error body."""
    text = {
        400: "invalid request (`param` names the field)",
        401: "missing or wrong API key",
        403: "a cross-origin request that would change something",
        404: "unknown model or voice",
        408: "the request head or body did not arrive in time",
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


DIALOGUE_RESPONSES = {
    200: {
        "description": "the mixed dialogue, streamed as each turn is made (flac: whole, once complete); with "
        "stream_format=sse, `dialogue.audio.delta` events (base64 `audio`), a `dialogue.turn.done` event per "
        "spoken turn (its manifest entry), then `dialogue.done` (manifest, usage) or `error`; with "
        "stream_format=json, one DialogueResult",
        "model": DialogueResult,  # application/json
        "content": SPEECH_RESPONSES[200]["content"],
    },
    **errors(400, 401, 404, 413, 429, 500, 503),
}
SPEECH_RESPONSES = {**SPEECH_RESPONSES, 413: errors(413)[413]}  # a context clip too large or too long
