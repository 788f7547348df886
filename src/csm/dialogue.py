"""Dialogue scripts: a conversation written by hand, spoken turn by turn in context (`csm dialogue`, and the
dialogue lines of `csm batch`).

A script in text form holds one turn per line, a speaker id in brackets, then the words; blank lines and
lines starting with `#` are skipped:

    # Two friends meet.
    [0] Hey, how are you?
    [1] Pretty good, pretty good. And you?

In JSON form it is a list of turns `{"speaker": 0, "text": "...", "audio": "clip.wav"}` (JSON Lines, `.jsonl`:
one turn per line). A turn with audio (a path relative to the script) was already spoken: it is context only.
Every error names `file:line`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_KIND = "csm.dialogue"
TURN_KEYS = ("speaker", "text", "audio")
_TEXT_TURN = re.compile(r"\[\s*([0-9]+)\s*\]\s*(.*)")  # fullmatch; ASCII digits only: `[٣]` is no id
_JSON_LIST = re.compile(r"^\s*\[\s*[{\]]")


class ScriptError(ValueError):
    """A script that cannot be read; the message starts with `file:line`."""


def speaker_id(value, where: str = "speaker") -> int:
    """A speaker id from an int or a string of ASCII digits; ValueError otherwise ("²" and "٣" are digits
    to str.isdigit, not speaker ids; a string of thousands of digits is refused before int() sees it)."""
    if isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= 9:
            value = int(digits)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer speaker id, got {value!r}")
    return value


@dataclass
class ScriptTurn:
    """One turn of a script: who speaks, what, and the audio when it was already spoken (24 kHz float32)."""

    speaker: int
    text: str
    audio: np.ndarray | None = None
    line: int = 0


def load_script(path: str | os.PathLike) -> list[ScriptTurn]:
    """Read a script file (text, JSON or JSON Lines; `-` for stdin)."""
    if str(path) == "-":
        return parse_script(sys.stdin.read(), "<stdin>", Path.cwd())
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ScriptError(f"cannot read the script {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ScriptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_script(source, str(path), path.parent)


def parse_script(source: str, name: str = "<script>", base: Path | None = None) -> list[ScriptTurn]:
    """Turns from a script's text; the form is told by the name (.json, .jsonl) or the first characters."""
    base = base if base is not None else Path.cwd()
    if name.endswith(".jsonl") or (not name.endswith(".json") and source.lstrip().startswith("{")):
        items = _json_lines(source, name)
    elif name.endswith(".json") or _JSON_LIST.match(source):
        items = _json_list(source, name)
    else:
        return _text_turns(source, name)
    turns = [_json_turn(item, f"{name}:{line}", line, base) for line, item in items]
    if not turns:
        raise ScriptError(f"{name}:1: the script has no turns")
    return turns


def _text_turns(source: str, name: str) -> list[ScriptTurn]:
    turns = []
    for n, raw in enumerate(source.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _TEXT_TURN.fullmatch(line)
        if match is None:
            raise ScriptError(
                f"{name}:{n}: expected `[SPEAKER] text`, like `[0] Hello there.`; got {line!r:.60}"
            )
        if not match.group(2).strip():
            raise ScriptError(f"{name}:{n}: the turn of speaker {match.group(1)} has no text")

        digits = match.group(1)
        try:  # never int() of thousands of digits
            speaker = speaker_id(digits)
        except ValueError:
            shown = digits if len(digits) <= 12 else f"{digits[:12]}... ({len(digits)} digits)"
            raise ScriptError(
                f"{name}:{n}: speaker id {shown} is too large; ids have at most 9 digits"
            ) from None
        turns.append(ScriptTurn(speaker, match.group(2).strip(), None, n))
    if not turns:
        raise ScriptError(f"{name}:1: the script has no turns (lines like `[0] Hello there.`)")
    return turns


def _json_lines(source: str, name: str) -> list[tuple[int, object]]:
    items = []
    for n, raw in enumerate(source.splitlines(), 1):
        if raw.strip():
            try:
                items.append((n, json.loads(raw)))
            except json.JSONDecodeError as e:
                raise ScriptError(f"{name}:{n}: not valid JSON ({e.msg})") from None
    return items


def _json_list(source: str, name: str) -> list[tuple[int, object]]:
    """The items of a JSON list with the line each starts on."""
    try:
        data = json.loads(source)
    except json.JSONDecodeError as e:
        raise ScriptError(f"{name}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ScriptError(
            f'{name}:1: a JSON script is a list of turns [{{"speaker": 0, "text": "..."}}, ...]'
        )
    # The document is valid: walk it once more to learn where each item starts.
    decoder, items, at = json.JSONDecoder(), [], source.index("[") + 1
    for _ in data:
        while source[at] in " \t\r\n":
            at += 1
        item, end = decoder.raw_decode(source, at)
        items.append((source.count("\n", 0, at) + 1, item))
        at = end
        while source[at] in " \t\r\n,":
            at += 1
    return items


def _json_turn(item, where: str, line: int, base: Path) -> ScriptTurn:
    if not isinstance(item, dict):
        raise ScriptError(f'{where}: a turn is an object {{"speaker": 0, "text": "..."}}, got {item!r:.40}')
    unknown = sorted(set(item) - set(TURN_KEYS))
    if unknown:
        raise ScriptError(f"{where}: unknown key(s) {', '.join(unknown)}; a turn has {', '.join(TURN_KEYS)}")

    try:
        speaker = speaker_id(item.get("speaker"))
    except ValueError as e:
        raise ScriptError(f"{where}: {e}") from None
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ScriptError(f"{where}: the turn of speaker {speaker} has no text")
    audio = item.get("audio")
    if audio is not None:
        try:
            path = clip_path(audio, base)
        except ValueError as e:
            raise ScriptError(f"{where}: {e}") from None
        from .audio import MAX_CLIP_SECONDS, AudioTooLong, load_audio

        if not path.exists():
            raise ScriptError(f"{where}: audio file {audio} not found (paths are relative to the script)")
        try:  # bounded: an hour-long file is refused from its header, not decoded into gigabytes
            audio = load_audio(path, max_seconds=MAX_CLIP_SECONDS)
        except AudioTooLong as e:
            raise ScriptError(f"{where}: {e}") from None
        except (ValueError, OSError) as e:
            raise ScriptError(f"{where}: cannot read {audio}: {e}") from None
    return ScriptTurn(speaker, " ".join(text.split()), audio, line)


def clip_path(audio, base: Path) -> Path:
    """Where a turn's `audio` (a path relative to the script, or to the requests file of `csm batch`) points;
    ValueError when it is not a path. Whether the file is there is the caller's to check."""
    if not isinstance(audio, str) or not audio.strip():
        raise ValueError(f"audio must be the path of a clip, got {audio!r:.40}")
    return (base / audio).expanduser()


def parse_voice_bindings(values: list[str], turns: list[ScriptTurn], name: str) -> dict[int, str]:
    """`["0=alice", "1=bob"]` as {0: "alice", 1: "bob"}; every speaker bound must speak in the script."""

    speakers = sorted({t.speaker for t in turns})
    bindings: dict[int, str] = {}
    for value in values:
        speaker, _, voice = value.partition("=")
        try:
            speaker = speaker_id(speaker)
        except ValueError:
            speaker = None
        if speaker is None or not voice.strip():
            raise ScriptError(f"--voice takes SPEAKER=VOICE, like --voice 0=alice; got {value!r}")
        if speaker in bindings:
            raise ScriptError(f"--voice binds speaker {speaker} twice ({bindings[speaker]}, {voice.strip()})")
        if speaker not in speakers:
            raise ScriptError(
                f"--voice {value}: speaker {speaker} never speaks in {name} "
                f"(its speakers: {', '.join(map(str, speakers))})"
            )
        bindings[speaker] = voice.strip()
    return bindings
