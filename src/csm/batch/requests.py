"""The requests file of `csm batch`: JSON lines (or a CSV with a header), checked in full before any work.

    {"id": "a1", "text": "Hello there.", "speaker": 0, "voice": "alice", "seed": 7, "format": "flac"}
    {"id": "d1", "turns": [{"speaker": 0, "text": "Hi!"}, {"speaker": 1, "text": "Oh, hello."}],
     "voices": {"0": "alice"}, "pause": 0.3, "seed": 3}

`id` and `text` (or `turns`, a dialogue in `csm dialogue`'s JSON form, its clips' paths relative to the
requests file) are required; the others default to the command's flags. A file named `*.csv` is read as CSV:
its first row names the columns (id, text, speaker, voice, seed, format; an empty cell is a field left out),
one line per row after it (dialogues need JSON lines). The file must be UTF-8. Every problem is reported with
its line number; a line without its own seed gets one derived from the job's seed and its id, so its audio
does not depend on which lines run beside it, in which order, or on which machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..chunking import MAX_TEXT_CHARS

FIELDS = ("id", "text", "turns", "voices", "pause", "speaker", "voice", "seed", "format")
CSV_COLUMNS = ("id", "text", "speaker", "voice", "seed", "format")  # a CSV holds text lines, not dialogues
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
    key: str = (
        ""  # a hash of all that decides this line's audio (`request_key`): a rerun redoes a changed line
    )

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


def _digest_files(paths: list[Path], h) -> None:
    for path in paths:
        h.update(path.name.encode() + b"\0")
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:  # generation reports it; the key only has to differ
            h.update(f"unreadable: {e.strerror}".encode())
        h.update(b"\0")


def _content(path: str | None, seen: dict[str, str]) -> str | None:
    """A hash of a clip's bytes, or of a voice folder's files (its codes cache aside): what it sounds like,
    wherever it lives."""
    if path is None:
        return None
    if path not in seen:
        from ..voice import CODES_FILE

        folder, h = Path(path), hashlib.sha256()
        files = (
            sorted(p for p in folder.iterdir() if p.is_file() and p.name != CODES_FILE and p.name[0] != ".")
            if folder.is_dir()
            else [folder]
        )
        _digest_files(files, h)
        seen[path] = h.hexdigest()
    return seen[path]


def set_request_keys(
    requests: list[LineRequest], voice: str | None = None, context: list[list[str]] = ()
) -> None:
    """Set each request's `key`: a short hash of everything of the line that decides its audio (text or
    turns, speaker, seed, format, and the content of its voices and clips). `voice` and `context` are the
    job's defaults for text lines; the job's other settings are in job.json, checked on their own."""
    seen: dict[str, str] = {}
    for r in requests:
        if r.turns is not None:
            what = {
                "turns": [{**t, "audio": _content(t["audio"], seen)} for t in r.turns],
                "voices": {k: _content(v, seen) for k, v in sorted((r.voices or {}).items())},
                "pause": r.pause,
            }
        else:
            what = {
                "text": r.text,
                "speaker": r.speaker,
                "voice": _content(r.voice or voice, seen),
                "context": [[_content(c, seen), t] for c, t in context],
            }
        what.update(id=r.id, seed=r.seed, format=r.format)
        r.key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def available_formats() -> tuple[str, ...]:
    """The output formats this soundfile can write (mp3 needs libsndfile >= 1.1)."""
    import soundfile as sf

    have = sf.available_formats()
    return tuple(f for f in FORMATS if f == "opus" and "OGG" in have or f.upper() in have)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_clip_header(path: Path, where: str) -> None:
    """ValueError when a clip's header says it is longer than a context clip may be (checked with the line,
    before the model loads; the runner reads it bounded too, for a header that does not say or lies)."""
    from ..audio import MAX_CLIP_SECONDS, audio_header

    rate, _, frames = audio_header(path)
    if frames is not None and frames / rate > MAX_CLIP_SECONDS:
        raise ValueError(
            f"{where}: clip {path.name} is {frames / rate:.1f} s long; the limit is {MAX_CLIP_SECONDS:g} s: trim it"
        )


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
            check_clip_header(path, f"turn {i}")
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


def _decoded(handle) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) for each line of a binary file, or (n, None, what is wrong) when a line is
    not UTF-8; a byte-order mark at the start is dropped (spreadsheets write one)."""
    for n, raw in enumerate(handle, 1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield n, raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            where = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
            yield n, None, f"not valid UTF-8 ({where}); save the file as UTF-8"


def _json_lines(handle) -> Iterator[tuple[int, object, str | None]]:
    """(line number, parsed object, None) per non-blank line, or (n, None, what is wrong)."""
    for n, text, error in _decoded(handle):
        if error is not None:
            yield n, None, error
        elif text.strip():
            try:
                yield n, json.loads(text), None
            except json.JSONDecodeError as e:
                hint = (
                    "; a CSV file must be named *.csv" if n == 1 and "," in text and text[:1] != "{" else ""
                )
                yield n, None, f"not valid JSON ({e.msg} at column {e.colno}){hint}"


def _csv_rows(handle, path) -> Iterator[tuple[int, object, str | None]]:
    """(line number, a row as a JSON line's object, None) per CSV row after the header, or (n, None, error).
    Cells of speaker and seed that are integers become integers; empty cells are left out."""
    bad: list[tuple[int, str]] = []  # lines that are not UTF-8: kept from the reader, reported in order
    first = [0]  # the first line of the record being read

    def lines():
        for n, text, error in _decoded(handle):
            if error is not None:
                bad.append((n, error))
            else:
                first[0] = first[0] or n
                yield text

    reader = csv.reader(lines())
    header = next(reader, None)
    if bad:
        raise ValueError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    if header is None:
        return
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown or "id" not in header or "text" not in header:
        problem = f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "no id or text column"
        raise ValueError(
            f"{path}:1: {problem}; a CSV's first row names its columns: id and text, optionally "
            f"{', '.join(CSV_COLUMNS[2:])} (a dialogue needs a JSON-lines file)"
        )
    while True:
        first[0] = 0
        try:
            cells = next(reader, None)
            error = None
        except csv.Error as e:
            cells, error = [], f"not valid CSV ({e})"
        yield from ((n, None, e) for n, e in bad)
        bad.clear()
        if cells is None:
            return
        start = first[0]
        if error is not None:
            yield start, None, error
        elif len(cells) > len(header):
            yield start, None, f"{len(cells)} cells, more than the header's {len(header)} columns"
        elif any(c.strip() for c in cells):
            row = {}
            for name, cell in zip(header, cells, strict=False):
                if cell.strip():
                    is_int = name in ("speaker", "seed") and re.fullmatch(r"-?\d+", cell.strip())
                    row[name] = int(cell) if is_int else cell
            yield start, row, None


def read_requests(
    path: str | os.PathLike, job_seed: int, default_format: str = "wav"
) -> tuple[list[LineRequest], list[BadLine]]:
    """Read and check every line of a requests file: JSON lines (blank lines skipped), or CSV for `*.csv`.

    Returns the good lines and the bad ones (malformed JSON or CSV, text that is not UTF-8, missing or bad
    fields, unknown voices, and every repeat of an id after its first line), each with its 1-based line number.
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
        handle = open(path, "rb")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    with handle:
        rows = _csv_rows(handle, path) if str(path).lower().endswith(".csv") else _json_lines(handle)
        for n, obj, error in rows:
            if error is not None:
                bad.append(BadLine(n, None, error))
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
