"""The requests file of `csm batch`: one JSON object per line, checked in full before any work.

    {"id": "a1", "text": "Hello there.", "speaker": 0, "voice": "alice", "seed": 7, "format": "flac"}
    {"id": "d1", "turns": [{"speaker": 0, "text": "Hi!"}, {"speaker": 1, "text": "Oh, hello."}],
     "voices": {"0": "alice"}, "pause": 0.3, "seed": 3}

`id` and `text` (or `turns`, a dialogue in `csm dialogue`'s JSON form, its clips' paths relative to the
requests file) are required; the others default to the command's flags. Every problem is reported with its
line number; a line without its own seed gets one derived from the job's seed and its id, so its audio does
not depend on which lines run beside it, in which order, or on which machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..chunking import MAX_TEXT_CHARS

FIELDS = ("id", "text", "turns", "voices", "pause", "speaker", "voice", "seed", "format")
FORMATS = ("wav", "flac", "ogg", "opus", "mp3")
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # a file name on every filesystem, no folders


@dataclass
class LineRequest:
    """One checked line: what to say and how; voices are voice folders and clips absolute paths (resolved
    when read, so that workers elsewhere find them on a shared filesystem)."""

    id: str
    line: int
    text: str | None
    seed: int
    format: str
    speaker: int | None = None
    voice: str | None = None
    turns: list[dict] | None = None  # a dialogue: [{"speaker", "text", "audio": clip path or None}, ...]
    voices: dict[str, str] | None = None  # a dialogue's speakers bound to voices: {"0": folder}
    pause: float | None = None  # a dialogue's silence between turns, seconds

    @property
    def filename(self) -> str:
        return f"{self.id}.{self.format}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> LineRequest:
        return cls(**json.loads(data))


@dataclass
class BadLine:
    """A line that cannot be run: its number, its id when it has a usable one, and what is wrong."""

    line: int
    id: str | None
    error: str


def line_seed(job_seed: int, id: str) -> int:
    """The seed of a line that gives none: a hash of the job's seed and the line's id."""
    digest = hashlib.sha256(f"{job_seed}:{id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def available_formats() -> tuple[str, ...]:
    """The output formats this soundfile can write (mp3 needs libsndfile >= 1.1)."""
    import soundfile as sf

    have = sf.available_formats()
    return tuple(f for f in FORMATS if f == "opus" and "OGG" in have or f.upper() in have)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_dialogue(obj: dict, base: Path, find_voice) -> tuple[list[dict], dict[str, str], float]:
    """A dialogue line's turns, voices and pause, checked as `csm dialogue` checks a script (csm.dialogue)."""
    from ..conversation import PAUSE_SECONDS, dialogue_turns, speaker_id
    from ..dialogue import clip_path

    for name in ("speaker", "voice"):
        if name in obj:
            raise ValueError(
                f'a dialogue line takes no "{name}": bind voices with "voices": {{"0": "alice"}}'
            )
    turns = []
    for i, (speaker, text, audio) in enumerate(dialogue_turns(obj["turns"])):
        speaker = speaker_id(speaker, f"turn {i}: speaker")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"turn {i} has no text")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"turn {i} has {len(text)} characters, more than {MAX_TEXT_CHARS}")
        if audio is not None:
            try:
                path = clip_path(audio, base)
            except ValueError as e:
                raise ValueError(f"turn {i}: {e}") from None
            if not path.is_file():
                raise ValueError(f"turn {i}: clip not found: {path}")
            audio = str(path.resolve())
        turns.append({"speaker": speaker, "text": text, "audio": audio})
    if all(t["audio"] is not None for t in turns):
        raise ValueError("every turn has its audio already: give at least one turn without audio to speak")
    voices = obj.get("voices") or {}
    if not isinstance(voices, dict):
        raise ValueError(f'voices must be an object like {{"0": "alice"}}, got {voices!r:.40}')
    speakers = {t["speaker"] for t in turns}
    bound = {}
    for key, name in voices.items():
        speaker = speaker_id(key, "a voice's speaker")
        if speaker not in speakers:
            raise ValueError(f"voice {name!r} is bound to speaker {speaker}, who never speaks")
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"speaker {speaker}'s voice must be a saved voice's name or folder, got {name!r}"
            )
        bound[str(speaker)] = find_voice(name)
    pause = obj.get("pause", PAUSE_SECONDS)
    if not isinstance(pause, (int, float)) or isinstance(pause, bool) or not 0 <= pause <= 60:
        raise ValueError(f"pause must be between 0 and 60 seconds, got {pause!r}")
    return turns, bound, float(pause)


def _check(obj, n: int, job_seed: int, default_format: str, formats, find_voice, base: Path) -> LineRequest:
    """One parsed line as a LineRequest; raises ValueError with what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; a line may hold {', '.join(FIELDS)}")
    id = obj.get("id")
    if _is_int(id):
        id = str(id)
    if not isinstance(id, str) or not _ID.fullmatch(id):
        raise ValueError(
            f"id {id!r} is missing or not a file name: use letters, digits, _, - and . (not first), "
            "at most 200 characters"
        )
    text = obj.get("text")
    dialogue = None
    if "turns" in obj:
        if text is not None:
            raise ValueError('a line holds "text" or "turns" (a dialogue), not both')
        dialogue = _check_dialogue(obj, base, find_voice)
    elif not isinstance(text, str) or not text.strip():
        raise ValueError(f'line {id!r} has no text: "text" must be a non-empty string')
    elif len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text has {len(text)} characters, more than {MAX_TEXT_CHARS}; split it over lines")
    elif any(k in obj for k in ("voices", "pause")):
        raise ValueError('"voices" and "pause" belong to a dialogue ("turns"); a text line takes "voice"')
    speaker = obj.get("speaker")
    if speaker is not None and (not _is_int(speaker) or speaker < 0):
        raise ValueError(f"speaker must be a non-negative integer, got {speaker!r}")
    seed = obj.get("seed")
    if seed is None:
        seed = line_seed(job_seed, id)
    elif not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    fmt = obj.get("format", default_format)
    if not isinstance(fmt, str) or fmt.lower() not in formats:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(formats)}")
    voice = obj.get("voice")
    if voice is not None:
        if not isinstance(voice, str) or not voice:
            raise ValueError(f"voice must be a saved voice's name or folder, got {voice!r}")
        voice = find_voice(voice)
    request = LineRequest(id, n, text, seed, fmt.lower(), speaker, voice)
    if dialogue is not None:
        request.turns, request.voices, request.pause = dialogue
    return request


def voice_finder():
    """`find(name)`: the folder of a saved voice (a name in the voices folder, or a folder path), as an
    absolute path that workers on other machines can open on a shared filesystem; ValueError when unknown."""
    from ..voice import VOICE_FILE, list_voices, voices_dir

    found: dict[str, str] = {}

    def find(name: str) -> str:
        if name not in found:
            for folder in (Path(name).expanduser(), voices_dir() / name):
                if (folder / VOICE_FILE).is_file():
                    found[name] = str(folder.resolve())
                    break
            else:
                known = ", ".join(list_voices()) or "none saved yet"
                raise ValueError(
                    f"unknown voice {name!r}: no {VOICE_FILE} in {voices_dir() / name} or ./{name} "
                    f"(saved voices: {known}); create it with `csm voice create`"
                )
        return found[name]

    return find


def read_requests(
    path: str | os.PathLike, job_seed: int, default_format: str = "wav"
) -> tuple[list[LineRequest], list[BadLine]]:
    """Read and check every line of a JSON-lines requests file (blank lines skipped).

    Returns the good lines and the bad ones (malformed JSON, missing or bad fields, unknown voices, and
    every repeat of an id after its first line), each with its 1-based line number.
    """
    formats = available_formats()
    if default_format not in formats:
        raise ValueError(f"--format {default_format!r} is not one of {', '.join(formats)}")
    find_voice = voice_finder()
    base = Path(path).expanduser().resolve().parent  # dialogue clips are relative to the requests file
    good: list[LineRequest] = []
    bad: list[BadLine] = []
    first_line: dict[str, int] = {}
    try:
        handle = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    with handle:
        for n, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                bad.append(BadLine(n, None, f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            try:
                request = _check(obj, n, job_seed, default_format, formats, find_voice, base)
            except ValueError as e:
                id = obj.get("id") if isinstance(obj, dict) else None
                id = str(id) if isinstance(id, (str, int)) and _ID.fullmatch(str(id)) else None
                bad.append(BadLine(n, id, str(e)))
                if id is not None:
                    first_line.setdefault(id, n)
                continue
            if request.id in first_line:
                message = f"duplicate id {request.id!r} (first on line {first_line[request.id]})"
                bad.append(BadLine(n, request.id, message))
                continue
            first_line[request.id] = n
            good.append(request)
    return good, bad
