"""Dialogue scripts and `csm dialogue`: a conversation written by hand, spoken turn by turn in context.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_KIND = "csm.dialogue"
TURN_KEYS = ("speaker", "text", "audio")
_TEXT_TURN = re.compile(r"^\[\s*(\d+)\s*\]\s*(.*)$")
_JSON_LIST = re.compile(r"^\s*\[\s*[{\]]")


class ScriptError(ValueError):
    """A script that cannot be read; the message starts with `file:line`."""


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
        match = _TEXT_TURN.match(line)
        if match is None:
            raise ScriptError(
                f"{name}:{n}: expected `[SPEAKER] text`, like `[0] Hello there.`; got {line!r:.60}"
            )
        if not match.group(2).strip():
            raise ScriptError(f"{name}:{n}: the turn of speaker {match.group(1)} has no text")
        turns.append(ScriptTurn(int(match.group(1)), match.group(2).strip(), None, n))
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
    from .conversation import speaker_id

    try:
        speaker = speaker_id(item.get("speaker"))
    except ValueError as e:
        raise ScriptError(f"{where}: {e}") from None
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ScriptError(f"{where}: the turn of speaker {speaker} has no text")
    audio = item.get("audio")
    if audio is not None:
        if not isinstance(audio, str) or not audio.strip():
            raise ScriptError(f"{where}: audio must be the path of a clip, got {audio!r:.40}")
        from .audio import MAX_CLIP_SECONDS, AudioTooLong, load_audio

        path = (base / audio).expanduser()
        if not path.exists():
            raise ScriptError(f"{where}: audio file {audio} not found (paths are relative to the script)")
        try:  # bounded: an hour-long file is refused from its header, not decoded into gigabytes
            audio = load_audio(path, max_seconds=MAX_CLIP_SECONDS)
        except AudioTooLong as e:
            raise ScriptError(f"{where}: {e}") from None
        except (ValueError, OSError) as e:
            raise ScriptError(f"{where}: cannot read {audio}: {e}") from None
    return ScriptTurn(speaker, " ".join(text.split()), audio, line)


def parse_voice_bindings(values: list[str], turns: list[ScriptTurn], name: str) -> dict[int, str]:
    """`["0=alice", "1=bob"]` as {0: "alice", 1: "bob"}; every speaker bound must speak in the script."""
    speakers = sorted({t.speaker for t in turns})
    bindings: dict[int, str] = {}
    for value in values:
        speaker, _, voice = value.partition("=")
        if not speaker.strip().isdigit() or not voice.strip():
            raise ScriptError(f"--voice takes SPEAKER=VOICE, like --voice 0=alice; got {value!r}")
        speaker = int(speaker)
        if speaker in bindings:
            raise ScriptError(f"--voice binds speaker {speaker} twice ({bindings[speaker]}, {voice.strip()})")
        if speaker not in speakers:
            raise ScriptError(
                f"--voice {value}: speaker {speaker} never speaks in {name} "
                f"(its speakers: {', '.join(map(str, speakers))})"
            )
        bindings[speaker] = voice.strip()
    return bindings


# ---- `csm dialogue` ------------------------------------------------------------------------------------


def add_dialogue_parser(sub) -> None:
    """Register `csm dialogue` on the `csm` command's subparsers."""
    from .cli import _add_model_args, _add_sampling_args

    p = sub.add_parser(
        "dialogue", help="speak a dialogue script, each turn in the context of the ones before"
    )
    p.add_argument("script", help="the script: `[0] Hello.` lines, or a JSON list of turns (- for stdin)")
    p.add_argument(
        "-o", "--output", default=None, help="the mixed conversation (.wav, .flac, ...); - for stdout"
    )
    p.add_argument("--pause", type=float, default=0.3, help="seconds of silence between turns (default: 0.3)")
    p.add_argument("--turns-dir", default=None, help="also write one audio file per spoken turn here")
    p.add_argument("--stream", action="store_true", help="write audio to stdout as each turn is generated")
    p.add_argument("--format", choices=["pcm", "wav"], default="pcm", help="stdout format: raw s16le or WAV")
    p.add_argument(
        "--voice",
        action="append",
        default=[],
        metavar="SPEAKER=VOICE",
        help="bind a speaker to a saved voice, whose clips stay in every turn's context (repeatable)",
    )
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, seed or summary line")
    p.set_defaults(handler=cmd_dialogue)


def _outputs(args, script: str) -> tuple[Path, Path]:
    """The mix and the manifest beside it; never the script, never a JSON file we did not write."""
    out = Path(args.output)
    manifest = out.with_suffix(".json")
    if out.suffix.lower() == ".json":
        raise ScriptError(f"-o {out}: the audio needs an audio extension (.wav, .flac, ...)")
    if script != "-" and manifest.resolve() == Path(script).resolve():
        raise ScriptError(f"the manifest {manifest} would overwrite the script; choose another -o name")
    if manifest.exists():
        try:
            ours = json.loads(manifest.read_text(encoding="utf-8")).get("kind") == MANIFEST_KIND
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ScriptError(
                f"{manifest} exists and is not a csm dialogue manifest; move it or choose another -o"
            )
    return out, manifest


def _replace(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: an interrupted run leaves no half file."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_dialogue(args) -> int:
    """`csm dialogue SCRIPT -o talk.wav`: the mix, talk.json beside it, and per-turn files with --turns-dir."""
    import time

    from .cli import CliError, _load_pipeline, _pcm16, _seed, _wav_header_unknown_length
    from .voice import Voice

    turns = load_script(args.script)
    name = "<stdin>" if args.script == "-" else args.script
    voices = {s: Voice.named(v) for s, v in parse_voice_bindings(args.voice, turns, name).items()}
    if all(t.audio is not None for t in turns):
        raise ScriptError(f"{name}: every turn has its audio already; there is nothing to speak")
    if not args.stream and args.output is None:
        raise CliError("say where to write the conversation: -o talk.wav (or --stream, or -o - for stdout)")
    if args.stream and args.output not in (None, "-"):
        raise CliError("--stream writes to stdout; drop -o or use -o -")
    if not 0 <= args.pause <= 60:
        raise CliError(f"--pause must be between 0 and 60 seconds, got {args.pause}")
    to_stdout = args.stream or args.output == "-"
    if not to_stdout:
        out, manifest_path = _outputs(args, args.script)
        if args.turns_dir:
            Path(args.turns_dir).mkdir(parents=True, exist_ok=True)
    seed = _seed(args)
    tts = _load_pipeline(args.model, args.device, args.dtype, args.quiet, args.quantize)
    options = dict(temperature=args.temperature, top_k=args.top_k, max_seconds=args.max_seconds)
    rate, start = tts.sampling_rate, time.perf_counter()
    if args.stream:
        conversation = tts.conversation(voices=voices, seed=seed, **options)
        stdout = sys.stdout.buffer
        if args.format == "wav":
            stdout.write(_wav_header_unknown_length(rate))
        gap, spoken = np.zeros(round(args.pause * rate), np.float32), 0
        for turn in _bar(turns, not args.quiet):
            if turn.audio is not None:
                conversation.add(turn.speaker, turn.text, turn.audio)
                continue
            if spoken:
                stdout.write(_pcm16(gap))
            with _at_line(name, turns):
                for chunk in conversation.stream(turn.speaker, turn.text):
                    stdout.write(_pcm16(chunk))
                    stdout.flush()
            spoken += 1
        samples = sum(len(t.audio) for t in conversation.turns if not t.given) + (spoken - 1) * len(gap)
        where = "stdout"
    else:
        with _at_line(name, turns):
            result = tts.converse(
                turns, voices=voices, seed=seed, pause=args.pause, progress=not args.quiet, **options
            )
        samples = len(result.audio)
        if args.output == "-":
            stdout = sys.stdout.buffer
            if args.format == "wav":
                stdout.write(_wav_header_unknown_length(rate))
            stdout.write(_pcm16(result.audio))
            stdout.flush()
            where = "stdout"
        else:
            _write_dialogue(result, turns, args, out, manifest_path)
            where = f"{out} and {manifest_path}"
    if not args.quiet:
        took, seconds = time.perf_counter() - start, samples / rate
        rtf = took / seconds if seconds else float("inf")
        print(
            f"csm: wrote {where}: {seconds:.1f} s of audio in {took:.1f} s (RTF {rtf:.2f})", file=sys.stderr
        )
    return 0


def _bar(turns: list[ScriptTurn], show: bool):
    from .pipeline import progress_bar

    return progress_bar(turns, show, unit="turn")


@contextmanager
def _at_line(name: str, turns: list[ScriptTurn]):
    """A turn that cannot be spoken (too long for the context, ...) is reported at its line of the script."""
    from .planner import TurnError

    try:
        yield
    except TurnError as e:
        raise ScriptError(f"{name}:{turns[e.index].line}: {e.message}") from None


def _write_dialogue(result, turns: list[ScriptTurn], args, out: Path, manifest_path: Path) -> None:
    """The mix, the per-turn files and the manifest that ties them together."""
    import warnings

    from .audio import save_audio

    if not len(result.audio):
        raise ScriptError("the model ended every turn at once: nothing was generated (try another --seed)")
    rate = result.sampling_rate
    _replace(out, lambda tmp: save_audio(result.audio, tmp, sampling_rate=rate))
    entries = {e["index"]: e for e in result.manifest["turns"]}
    for turn in result.turns:
        if turn.index not in entries:
            continue
        entry = entries[turn.index]
        entry["line"] = turns[turn.index].line
        if args.turns_dir:
            path = Path(args.turns_dir) / f"turn_{turn.index:03d}_speaker{turn.speaker}{out.suffix}"
            if len(turn.audio):
                _replace(path, lambda tmp, a=turn.audio: save_audio(a, tmp, sampling_rate=rate))
                entry["file"] = os.path.relpath(path, manifest_path.parent)
            else:
                warnings.warn(
                    f"turn {turn.index} (line {entry['line']}) is empty: no file written", stacklevel=2
                )
                entry["file"] = None
    manifest = {
        "kind": MANIFEST_KIND,
        "script": None if args.script == "-" else str(args.script),
        "audio": os.path.relpath(out, manifest_path.parent),
        "model": str(args.model),
        **result.manifest,
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    _replace(manifest_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
