"""`csm dialogue SCRIPT -o talk.wav`: a dialogue script spoken turn by turn, each turn in the context of the
ones before; the mix, a manifest beside it, and one file per turn with --turns-dir."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..dialogue import MANIFEST_KIND, ScriptError, ScriptTurn, load_script, parse_voice_bindings
from . import common
from .common import CliError


def add_parser(sub) -> None:
    """Register `csm dialogue` on the `csm` command's subparsers."""
    p = sub.add_parser(
        "dialogue", help="speak a dialogue script, each turn in the context of the ones before"
    )
    p.add_argument("script", help="the script: `[0] Hello.` lines, or a JSON list of turns (- for stdin)")
    p.add_argument(
        "-o", "--output", default=None, help="the mixed conversation (.wav, .flac, ...); - for stdout"
    )
    p.add_argument("--pause", type=float, default=0.3, help="seconds of silence between turns (default: 0.3)")
    p.add_argument(
        "--manifest",
        default=None,
        metavar="FILE.json",
        help="where the manifest goes (default: beside -o, with .json: talk.wav -> talk.json)",
    )
    p.add_argument("--turns-dir", default=None, help="also write one audio file per spoken turn here")
    p.add_argument("--stream", action="store_true", help="write audio to stdout as each turn is generated")
    p.add_argument(
        "--format",
        choices=["pcm", "wav"],
        default=None,
        help="stdout format (--stream, -o -): raw s16le (default) or WAV; a file's format is its extension",
    )
    p.add_argument(
        "--voice",
        action="append",
        default=[],
        metavar="SPEAKER=VOICE",
        help="bind a speaker to a saved voice, whose clips stay in every turn's context (repeatable)",
    )
    common.add_model_args(p)
    common.add_sampling_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, seed or summary line")
    p.set_defaults(handler=cmd_dialogue)


def _outputs(args, script: str) -> tuple[Path, Path]:
    """The mix and the manifest beside it; never the script, never a JSON file we did not write."""
    out = Path(args.output)
    manifest = Path(args.manifest).expanduser() if args.manifest else out.with_suffix(".json")
    if out.suffix.lower() == ".json":
        raise ScriptError(f"-o {out}: the audio needs an audio extension (.wav, .flac, ...)")
    if args.manifest:
        if manifest.suffix.lower() != ".json":
            raise CliError(f"--manifest {args.manifest}: the manifest is JSON; give a .json name")
        if manifest.resolve() == out.resolve():
            raise CliError("--manifest and -o name the same file; give each its own name")
        if not manifest.parent.is_dir():
            raise CliError(f"--manifest {args.manifest}: folder {manifest.parent} does not exist")
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
    except (OSError, ValueError, RuntimeError) as e:  # named by the file asked for, never the temporary one
        reason = (e.strerror if isinstance(e, OSError) else str(e)) or type(e).__name__
        raise CliError(f"cannot write {path}: {reason.replace(str(tmp), str(path))}") from None
    finally:
        tmp.unlink(missing_ok=True)


def cmd_dialogue(args) -> int:
    """`csm dialogue SCRIPT -o talk.wav`: the mix, talk.json beside it, and per-turn files with --turns-dir."""
    import time

    from ..voice import Voice

    turns = load_script(args.script)
    name = "<stdin>" if args.script == "-" else args.script
    voices = {s: Voice.named(v) for s, v in parse_voice_bindings(args.voice, turns, name).items()}
    if all(t.audio is not None for t in turns):
        raise ScriptError(f"{name}: every turn has its audio already; there is nothing to speak")
    common.check_output(args, "the conversation", "talk.wav")
    common.check_sampling(args)
    if not 0 <= args.pause <= 60:
        raise CliError(f"--pause must be between 0 and 60 seconds, got {args.pause}")
    out = manifest_path = None
    if not (args.stream or args.output == "-"):
        out, manifest_path = _outputs(args, args.script)
        spoken = [t for t in turns if t.audio is None]
        speech = sum(len(t.text) for t in spoken) / 15 + args.pause * len(spoken)  # ~15 characters a second
        if args.max_seconds is not None:
            speech = min(speech, (args.max_seconds + args.pause) * len(spoken))
        common.check_free_space(out, speech * (2 if args.turns_dir else 1))  # the mix, and each turn's file
        if args.turns_dir:
            common.check_folder(args.turns_dir, "--turns-dir")
            Path(args.turns_dir).mkdir(parents=True, exist_ok=True)
    seed = common.seed(args)
    tts = common.load_pipeline(args.model, args.device, args.dtype, args.quiet, args.quantize)
    options = common.sampling_options(args)
    rate, start = tts.sampling_rate, time.perf_counter()
    with common.frame_caps(args) as caps:
        spoken = _speak(args, tts, turns, voices, seed, options, name, out, manifest_path)
    if spoken is None:  # interrupted; what was finished is written
        return 130
    where, samples = spoken
    if not args.quiet:
        common.print_summary(where, samples, rate, time.perf_counter() - start, caps.note())
    return 0


def _speak(args, tts, turns, voices, seed, options, name, out, manifest_path) -> tuple[str, int] | None:
    """Speak the script to stdout (streamed or whole) or into the files; returns where it went and its samples,
    or None when Ctrl-C stopped it (the finished turns written)."""
    rate = tts.sampling_rate
    conversation = tts.conversation(voices=voices, seed=seed, **options)
    if args.stream:
        stdout = sys.stdout.buffer
        if args.format == "wav":
            stdout.write(common.wav_header_unknown_length(rate))
        gap, spoken = np.zeros(round(args.pause * rate), np.float32), 0
        for turn in _bar(turns, not args.quiet):
            if turn.audio is not None:
                conversation.add(turn.speaker, turn.text, turn.audio)
                continue
            if spoken:
                stdout.write(common.pcm16(gap))
            with _at_line(name, turns):
                for chunk in conversation.stream(turn.speaker, turn.text):
                    stdout.write(common.pcm16(chunk))
                    stdout.flush()
            spoken += 1
        samples = sum(len(t.audio) for t in conversation.turns if not t.given) + (spoken - 1) * len(gap)
        where = "stdout"
    else:
        bar = _bar(turns, not args.quiet)
        try:
            with _at_line(name, turns):
                for turn in bar:
                    conversation.add(turn.speaker, turn.text, turn.audio)
        except KeyboardInterrupt:
            bar.close()
            _interrupted(args, conversation, turns, name, out, manifest_path)
            return None
        result = conversation.result(args.pause)
        samples = len(result.audio)
        if args.output == "-":
            stdout = sys.stdout.buffer
            if args.format == "wav":
                stdout.write(common.wav_header_unknown_length(rate))
            stdout.write(common.pcm16(result.audio))
            stdout.flush()
            where = "stdout"
        else:
            _write_dialogue(result, turns, args, out, manifest_path)
            where = f"{out} and {manifest_path}"
    return where, samples


def _interrupted(args, conversation, turns, name: str, out: Path | None, manifest_path: Path | None) -> None:
    """Ctrl-C: the turns finished so far go into the mix and its manifest (valid files, marked unfinished),
    and the run says what was kept and where to start again (exit 130)."""
    spoken = [t for t in conversation.turns if not t.given]
    left = len(turns) - len(conversation.turns)
    if not spoken or args.output == "-":
        print("csm: interrupted before a turn was finished: nothing was written", file=sys.stderr)
        return
    result = conversation.result(args.pause)
    result.manifest["interrupted"] = True
    result.manifest["turns_not_spoken"] = left
    _write_dialogue(result, turns, args, out, manifest_path)
    next_line = turns[len(conversation.turns)].line
    print(
        f"csm: interrupted: wrote the {len(spoken)} finished turn(s) ({len(result.audio) / result.sampling_rate:.2f} "
        f"s of audio) to {out} and {manifest_path}; {left} turn(s) were not spoken, from line {next_line} of "
        f"{name}",
        file=sys.stderr,
    )


def _bar(turns: list[ScriptTurn], show: bool):
    return common.items_with_bar(turns, "csm dialogue", "turn", show and len(turns) > 1)


@contextmanager
def _at_line(name: str, turns: list[ScriptTurn]):
    """A turn that cannot be spoken (too long for the context, ...) is reported at its line of the script."""
    from ..planner import TurnError

    try:
        yield
    except TurnError as e:
        raise ScriptError(f"{name}:{turns[e.index].line}: {e.message}") from None


def _write_dialogue(result, turns: list[ScriptTurn], args, out: Path, manifest_path: Path) -> None:
    """The mix, the per-turn files and the manifest that ties them together."""
    import warnings

    from ..audio import save_audio

    if not len(result.audio):
        raise ScriptError("the model ended every turn at once: nothing was generated (try another --seed)")
    rate = result.sampling_rate
    try:
        _replace(out, lambda tmp: save_audio(result.audio, tmp, sampling_rate=rate))
    except CliError as e:  # a full disk: the mix is kept elsewhere, not lost
        raise CliError(f"{e}{common.keep_unsaved(result.audio, rate)}") from None
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
