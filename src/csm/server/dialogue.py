"""Conversations over HTTP (extensions of OpenAI's API): context turns for /v1/audio/speech, and
/v1/audio/dialogue, a whole dialogue spoken turn by turn, streamed as it is made."""

from __future__ import annotations

import base64
import binascii
import logging

from ..audio import MAX_BOUNDED_RATE, SAMPLING_RATE, AudioTooLong, audio_header, load_audio
from ..chunking import split_sentences
from ..conversation import dialogue_manifest
from ..planner import Turn, voice_turns
from ..voice import Voice
from .schemas import ContextTurn, DialogueRequest
from .speech import ApiError, PlannedTurn, SpeechStream, speaker_number, sse, sse_error

log = logging.getLogger("csm.server")


def read_clip(raw: bytes, param: str, settings):
    """An audio file from a request (uploaded or base64) as 24 kHz float32: 413 past `max_upload_seconds`, found
    from the file's header before decoding or while decoding (never more than the limit is decoded); 400 when
    unreadable."""
    try:
        return load_audio(raw, max_seconds=settings.max_upload_seconds)
    except AudioTooLong as e:
        length = f"is {e.seconds:.1f} s long" if e.seconds is not None else f"holds more than {e.limit:g} s"
        raise ApiError(
            413, f"{param} {length}; the limit is {e.limit:g} s: send a shorter clip", param=param
        ) from None
    except ValueError as e:
        raise ApiError(400, f"cannot read {param}: {e}", param=param) from None


class ClipBudget:
    """A request's clips (context turns, given dialogue turns) against one budget for the whole request:
    `max_context_seconds` of audio and `max_context_samples` samples over all channels at the files' own rates
    (the work of decoding them). `add` reads each clip's header and refuses (413) before anything is decoded
    when the headers already say too much; `decode` then decodes each clip within what is left, so that a
    header that lies or does not say cannot pass the budget either."""

    def __init__(self, settings):
        self.settings = settings
        self.seconds, self.samples = settings.max_context_seconds, settings.max_context_samples
        self.clips: dict[str, tuple[bytes, int, int, float]] = {}

    def _too_much(self, param: str) -> ApiError:
        s = self.settings
        return ApiError(
            413,
            f"{param} takes the request's clips past their limit of {s.max_context_seconds:g} s of audio "
            f"({s.max_context_samples} samples over all channels) together: send fewer or shorter clips, at "
            "48 kHz or less",
            param=param,
        )

    def add(self, data: str, param: str) -> None:
        """Check a base64 clip's size and header; nothing is decoded."""
        settings = self.settings
        if len(data) > settings.max_upload_bytes * 4 // 3 + 4:
            raise ApiError(413, f"{param} is larger than {settings.max_upload_bytes} bytes", param=param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                400, f"{param} must be base64 of an audio file (wav, flac, ogg, mp3)", param=param
            ) from None
        try:
            rate, channels, frames = audio_header(raw)
        except ValueError as e:
            raise ApiError(400, f"cannot read {param}: {e}", param=param) from None
        if rate > MAX_BOUNDED_RATE:
            raise ApiError(
                400,
                f"cannot read {param}: its sampling rate is {rate} Hz; the limit is {MAX_BOUNDED_RATE} Hz",
                param=param,
            )
        seconds = (frames or 0) / rate
        if seconds > settings.max_upload_seconds:
            raise ApiError(
                413,
                f"{param} is {seconds:.1f} s long; the limit is {settings.max_upload_seconds:g} s: send a "
                "shorter clip",
                param=param,
            )
        self.seconds -= seconds
        self.samples -= (frames or 0) * channels
        if self.seconds < 0 or self.samples < 0:
            raise self._too_much(param)
        self.clips[param] = (raw, rate, channels, seconds)

    def decode(self, param: str):
        """Decode a clip `add` checked, within the request's budget left (see `read_clip`)."""
        raw, rate, channels, seconds = self.clips.pop(param)
        self.seconds += seconds  # its share, held since `add`, is now counted by what decodes
        self.samples += round(seconds * rate) * channels
        allowed = min(self.settings.max_upload_seconds, self.seconds, self.samples / (rate * channels))
        try:
            audio = load_audio(raw, max_seconds=allowed)
        except AudioTooLong as e:
            if allowed < self.settings.max_upload_seconds:
                raise self._too_much(param) from None
            length = (
                f"is {e.seconds:.1f} s long" if e.seconds is not None else f"holds more than {e.limit:g} s"
            )
            raise ApiError(
                413, f"{param} {length}; the limit is {e.limit:g} s: send a shorter clip", param=param
            ) from None
        except ValueError as e:
            raise ApiError(400, f"cannot read {param}: {e}", param=param) from None
        used = len(audio) / SAMPLING_RATE
        self.seconds -= used
        self.samples -= round(used * rate) * channels
        return audio


def decode_clip(data: str, param: str, settings):
    """One base64 audio file (a session's user turn) as 24 kHz float32, checked as a request's clips are: its
    size, then its header against the limits before anything is decoded (`ClipBudget`)."""
    budget = ClipBudget(settings)
    budget.add(data, param)
    return budget.decode(param)


def check_voice_count(count: int, param: str, settings) -> None:
    """400 when a request names more saved voices than `max_request_voices`, before any is read from disk
    (each may hold minutes of clips, all kept in every prompt)."""
    limit = getattr(settings, "max_request_voices", 8)
    if count > limit:
        raise ApiError(
            400, f"{param} names {count} saved voices; a request may use at most {limit}", param=param
        )


def has_clips(body) -> bool:
    """Whether a speech or dialogue request carries audio to decode (then it is prepared in the decode pool)."""
    turns = getattr(body, "context", None) or getattr(body, "turns", None) or []
    return any(getattr(t, "audio", None) is not None for t in turns)


def context_turns(
    context: list[ContextTurn], resolve_voice, settings
) -> tuple[list[tuple[Voice, list[Turn]]], list[PlannedTurn]]:
    """A speech request's context: saved voices' clips (kept in every prompt) and given turns (history)."""
    voices, given, budget = [], [], ClipBudget(settings)
    check_voice_count(sum(t.voice is not None for t in context or []), "context", settings)
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
        budget.add(turn.audio, f"{at}.audio")  # every header is checked before any clip is decoded
        who = turn.speaker if turn.speaker is not None else 0
        text = " ".join(turn.text.split())
        given.append(PlannedTurn(who, text, given=Turn(who, text, None), param=f"{at}.audio"))
    for planned in given:
        planned.given.audio = budget.decode(planned.param)
    return voices, given


def dialogue_turns(
    body: DialogueRequest, resolve_voice, settings
) -> tuple[list[tuple[Voice, list[Turn]]], list[PlannedTurn]]:
    """A dialogue request's voices (bound to speakers) and turns, checked."""
    speakers = sorted({t.speaker for t in body.turns})
    check_voice_count(len(body.voices), "voices", settings)
    voices = []
    for key, name in body.voices.items():
        at = f"voices.{key}" if key.isascii() and key.isprintable() and len(key) <= 16 else "voices"
        speaker = speaker_number(key, "voices")
        if speaker is None or speaker not in speakers:
            raise ApiError(
                400,
                f"{at}: voices binds speaker ids that speak in the dialogue ({', '.join(map(str, speakers))})",
                param="voices",
            )
        _, voice = resolve_voice(name, at)
        if voice is None:
            raise ApiError(400, f"{at} must name a saved voice", param=at)
        voices.append((voice, voice_turns(voice, speaker=speaker)))
    turns, budget = [], ClipBudget(settings)
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
            budget.add(turn.audio, f"turns.{i}.audio")  # every header is checked before any clip is decoded
            given = Turn(turn.speaker, text, None)
            turns.append(PlannedTurn(turn.speaker, text, given=given, param=f"turns.{i}.audio"))
        else:
            seed = None if body.seed is None else body.seed + i
            chunks = split_sentences(text, settings.max_chunk_chars)
            turns.append(PlannedTurn(turn.speaker, text, chunks, seed=seed, param=f"turns.{i}.text"))
    if all(t.given is not None for t in turns):
        raise ApiError(
            400, "every turn has its audio: give at least one turn without audio to speak", param="turns"
        )
    for planned in turns:
        if planned.given is not None:
            planned.given.audio = budget.decode(planned.param)
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
