"""Conversations over HTTP (extensions of OpenAI's API): context turns for /v1/audio/speech, and
/v1/audio/dialogue, a whole dialogue spoken turn by turn, streamed as it is made."""

from __future__ import annotations

import base64
import binascii
import logging

from ..audio import SAMPLING_RATE, load_audio
from ..chunking import split_sentences
from ..conversation import dialogue_manifest
from ..planner import Turn, voice_turns
from ..voice import Voice
from .schemas import ContextTurn, DialogueRequest
from .speech import ApiError, PlannedTurn, SpeechStream, sse, sse_error

log = logging.getLogger("csm.server")


def decode_clip(data: str, param: str, settings):
    """A base64 audio file from a request as 24 kHz float32; 400 when unreadable, 413 when too large."""
    if len(data) > settings.max_upload_bytes * 4 // 3 + 4:
        raise ApiError(413, f"{param} is larger than {settings.max_upload_bytes} bytes", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"{param} must be base64 of an audio file (wav, flac, ogg, mp3)", param=param
        ) from None
    try:
        clip = load_audio(raw)
    except Exception as e:
        raise ApiError(400, f"cannot read {param}: {e}", param=param) from None
    seconds = len(clip) / SAMPLING_RATE
    if seconds > settings.max_upload_seconds:
        raise ApiError(
            413,
            f"{param} is {seconds:.1f} s long; the limit is {settings.max_upload_seconds:g} s",
            param=param,
        )
    return clip


def context_turns(
    context: list[ContextTurn], resolve_voice, settings
) -> tuple[list[tuple[Voice, list[Turn]]], list[PlannedTurn]]:
    """A speech request's context: saved voices' clips (kept in every prompt) and given turns (history)."""
    voices, given = [], []
    for i, turn in enumerate(context or []):
        at = f"context.{i}"
        if (turn.audio is None) == (turn.voice is None):
            raise ApiError(400, f"{at}: give either `text` with its `audio`, or a saved `voice`", param=at)
        if turn.voice is not None:
            if turn.text is not None:
                raise ApiError(
                    400, f"{at}: a voice's clips carry their own text; drop `text`", param=f"{at}.text"
                )
            voice_speaker, voice = resolve_voice(turn.voice, f"{at}.voice")
            if voice is None:
                raise ApiError(400, f"{at}.voice must name a saved voice", param=f"{at}.voice")
            who = turn.speaker if turn.speaker is not None else voice_speaker
            voices.append((voice, voice_turns(voice, speaker=who)))
            continue
        if turn.text is None or not turn.text.strip():
            raise ApiError(400, f"{at}.text: the words spoken in the audio are needed", param=f"{at}.text")
        clip = decode_clip(turn.audio, f"{at}.audio", settings)
        who = turn.speaker if turn.speaker is not None else 0
        text = " ".join(turn.text.split())
        given.append(PlannedTurn(who, text, given=Turn(who, text, clip)))
    return voices, given


def dialogue_turns(
    body: DialogueRequest, resolve_voice, settings
) -> tuple[list[tuple[Voice, list[Turn]]], list[PlannedTurn]]:
    """A dialogue request's voices (bound to speakers) and turns, checked."""
    speakers = sorted({t.speaker for t in body.turns})
    voices = []
    for key, name in body.voices.items():
        at = f"voices.{key}"
        if not key.isdigit() or int(key) not in speakers:
            raise ApiError(
                400,
                f"{at}: voices binds speaker ids that speak in the dialogue ({', '.join(map(str, speakers))})",
                param="voices",
            )
        _, voice = resolve_voice(name, at)
        if voice is None:
            raise ApiError(400, f"{at} must name a saved voice", param=at)
        voices.append((voice, voice_turns(voice, speaker=int(key))))
    turns = []
    for i, turn in enumerate(body.turns):
        text = " ".join(turn.text.split())
        if not text:
            raise ApiError(400, f"turns.{i}.text is empty", param=f"turns.{i}.text")
        if len(text) > settings.max_input_chars:
            raise ApiError(
                400,
                f"turns.{i}.text is {len(text)} characters; the limit is {settings.max_input_chars}",
                param=f"turns.{i}.text",
            )
        if turn.audio is not None:
            clip = decode_clip(turn.audio, f"turns.{i}.audio", settings)
            turns.append(PlannedTurn(turn.speaker, text, given=Turn(turn.speaker, text, clip)))
        else:
            seed = None if body.seed is None else body.seed + i
            chunks = split_sentences(text, settings.max_chunk_chars)
            turns.append(PlannedTurn(turn.speaker, text, chunks, seed=seed, param=f"turns.{i}.text"))
    if all(t.given is not None for t in turns):
        raise ApiError(
            400, "every turn has its audio: give at least one turn without audio to speak", param="turns"
        )
    return voices, turns


def manifest(speech: SpeechStream, seed: int | None) -> dict:
    voices = {turns[0].speaker: voice.name for voice, turns in speech.plan.voices if turns}
    return dialogue_manifest(speech.entries, speech.samples, SAMPLING_RATE, speech.plan.pause, seed, voices)


async def dialogue_events(stream, speech: SpeechStream, seed: int | None):
    """SSE: `dialogue.audio.delta` (base64 audio), `dialogue.turn.done` (a turn's manifest entry) as each turn
    ends, then `dialogue.done` (manifest, usage); a failure midway sends `error` and ends the stream."""
    sent = 0
    try:
        async for data in stream:
            yield sse({"type": "dialogue.audio.delta", "audio": base64.b64encode(data).decode()})
            for entry in speech.entries[sent:]:
                yield sse({"type": "dialogue.turn.done", "turn": entry})
            sent = len(speech.entries)
    except Exception as e:
        yield sse_error(speech, e)
        return
    for entry in speech.entries[sent:]:
        yield sse({"type": "dialogue.turn.done", "turn": entry})
    yield sse({"type": "dialogue.done", "manifest": manifest(speech, seed), "usage": speech.usage()})


async def dialogue_json(stream, speech: SpeechStream, body: DialogueRequest) -> dict:
    """`stream_format=json`: the whole mix as base64, with its manifest and usage."""
    data = b"".join([part async for part in stream])
    return {
        "audio": base64.b64encode(data).decode(),
        "response_format": body.response_format,
        "manifest": manifest(speech, body.seed),
        "usage": speech.usage(),
    }
