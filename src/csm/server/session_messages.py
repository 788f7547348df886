"""The realtime session's client messages (see csm/server/session.py for the protocol): pydantic models, each
with its `type`, validated in one place (`parse_message`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .speech import ApiError


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionStart(_Message):
    type: Literal["session.start"]
    voices: dict[str, str] = Field(default_factory=dict, max_length=8, description="speaker -> saved voice")
    speaker: int = Field(0, ge=0, le=999, description="who the agent is")
    seed: int | None = Field(None, ge=0, le=2**62, description="turn i uses seed + i (user turns counted)")
    temperature: float | None = Field(None, ge=0.01, le=10.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    do_sample: bool | None = Field(None, description="false: greedy")
    format: Literal["pcm16", "float32"] = "pcm16"
    first_clause: bool = Field(False, description="start a turn's first sentence at its first clause mark")


class UserTurn(_Message):
    type: Literal["user.turn"]
    speaker: int = Field(1, ge=0, le=999)
    text: str = Field(min_length=1, max_length=4096, description="the transcript of `audio`")
    audio: str = Field(min_length=1, description="base64 of a wav file, or of 24 kHz mono pcm16")
    audio_format: Literal["wav", "pcm16"] = "wav"


class TextDelta(_Message):
    type: Literal["text.delta"]
    text: str = Field(max_length=4096)


class Flush(_Message):
    type: Literal["flush"]


class Cancel(_Message):
    type: Literal["cancel"]


class Truncate(_Message):
    type: Literal["truncate"]
    turn_id: int = Field(ge=0)
    played_samples: int = Field(ge=0, description="samples of the turn's audio (24 kHz) the listener heard")


ClientMessage = Annotated[
    SessionStart | UserTurn | TextDelta | Flush | Cancel | Truncate, Field(discriminator="type")
]
MESSAGES = TypeAdapter(ClientMessage)
TYPES = ("session.start", "user.turn", "text.delta", "flush", "cancel", "truncate")


def parse_message(raw: str):
    """A client message, validated; ApiError(400) naming the field at fault otherwise."""
    try:
        return MESSAGES.validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = first["loc"][1:] if first["loc"] and first["loc"][0] in TYPES else first["loc"]  # no tag
        where = ".".join(str(p) for p in loc) or "message"
        if first["type"] == "union_tag_invalid" or first["type"] == "union_tag_not_found":
            raise ApiError(400, f"`type` must be one of {', '.join(TYPES)}", param="type") from None
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
