"""`csm voice create`, `list`, `rename` and `delete`: saved voices."""

from __future__ import annotations

import sys
from pathlib import Path

from . import common
from .common import CliError


def add_parser(sub) -> None:
    voice = sub.add_parser("voice", help="create, list, rename and delete saved voices")
    vsub = voice.add_subparsers(dest="voice_command", metavar="ACTION")
    create = vsub.add_parser("create", help="save a voice from reference clips and their transcripts")
    create.add_argument("name", help="the voice's name")
    create.add_argument("clip", help="a reference audio file (a few seconds of clean speech)")
    create.add_argument("transcript", help="the words spoken in the clip")
    create.add_argument(
        "--add",
        nargs=2,
        action="append",
        default=[],
        metavar=("CLIP", "TRANSCRIPT"),
        help="another clip (repeatable)",
    )
    create.add_argument("--speaker", type=int, default=0, help="speaker id the voice speaks as (default: 0)")
    create.add_argument(
        "--voices-dir",
        default=None,
        help="where voices live (default: $CSM_VOICES_DIR or ~/.local/share/csm/voices)",
    )
    create.add_argument("--force", action="store_true", help="replace an existing voice of that name")
    lst = vsub.add_parser("list", help="list saved voices")
    lst.add_argument("--voices-dir", default=None, help="where voices live")
    rename = vsub.add_parser("rename", help="give a saved voice another name")
    rename.add_argument("name", help="the voice's name now")
    rename.add_argument("new_name", help="its new name")
    rename.add_argument("--voices-dir", default=None, help="where voices live")
    delete = vsub.add_parser("delete", help="delete a saved voice (its clips and cached codes)")
    delete.add_argument("name", nargs="+", help="the voice(s) to delete")
    delete.add_argument("--voices-dir", default=None, help="where voices live")
    voice.set_defaults(handler=cmd_voice)


def cmd_voice(args) -> int:
    from ..voice import Voice, list_voices, voices_dir

    root = Path(args.voices_dir).expanduser() if getattr(args, "voices_dir", None) else voices_dir()
    if args.voice_command == "list":
        names = list_voices(root)
        if not names:
            print(
                f'no voices in {root}; create one with `csm voice create NAME CLIP.wav "transcript"`',
                file=sys.stderr,
            )
        for name in names:
            print(_describe(root / name))
        return 0
    if args.voice_command == "rename":
        return _rename(root, args.name, args.new_name)
    if args.voice_command == "delete":
        return _delete(root, args.name)
    if args.voice_command == "create":
        name = args.name
        check_name(name)
        common.check_folder(root / name, "--voices-dir" if args.voices_dir else "$CSM_VOICES_DIR")
        voice = Voice.from_files(
            name, args.speaker, [(args.clip, args.transcript), *[(c, t) for c, t in args.add]]
        )
        folder = root / name
        if (folder / "voice.json").is_file() and not args.force:
            raise CliError(f"a voice named {name!r} already exists in {root}; pass --force to replace it")
        voice.save(folder, overwrite=args.force)
        print(
            f"saved voice {name!r} ({len(voice.clips)} clip(s), {voice.seconds:.1f} s) to {folder}",
            file=sys.stderr,
        )
        return 0
    raise CliError(
        "say what to do: `csm voice create NAME CLIP TRANSCRIPT`, `csm voice list`, `csm voice rename OLD NEW` "
        "or `csm voice delete NAME`"
    )


def _describe(folder: Path) -> str:
    """`name  speaker 0  2 clip(s), 7.5 s` from voice.json and the clips' headers: nothing decoded, no torch."""
    import json

    import soundfile as sf

    from ..voice import VOICE_FILE

    try:
        meta = json.loads((folder / VOICE_FILE).read_text())
        clips = [folder / c["audio"] for c in meta["clips"]]
        seconds = sum(sf.info(str(c)).duration for c in clips)
        return f"{folder.name}\tspeaker {int(meta.get('speaker', 0))}\t{len(clips)} clip(s), {seconds:.1f} s"
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        return f"{folder.name}\tunreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise CliError(f"invalid voice name {name!r}: use letters, digits, - or _")


def _saved(root: Path, name: str) -> Path:
    """A saved voice's folder, or a one-line error listing the ones there are."""
    from ..voice import VOICE_FILE, list_voices

    check_name(name)
    folder = root / name
    if not (folder / VOICE_FILE).is_file():
        known = ", ".join(list_voices(root)) or "none saved yet"
        raise CliError(f"no voice named {name!r} in {root} (known: {known})")
    return folder


def _rename(root: Path, name: str, new_name: str) -> int:
    """Move the folder (one rename: never half done), then set the name inside voice.json."""
    import json
    import os

    from ..voice import VOICE_FILE

    folder = _saved(root, name)
    check_name(new_name)
    target = root / new_name
    if target.exists():
        raise CliError(
            f"a voice named {new_name!r} already exists in {root}; delete it first or pick another name"
        )
    os.rename(folder, target)
    meta_file = target / VOICE_FILE
    meta = json.loads(meta_file.read_text())
    meta["name"] = new_name
    tmp = target / f".{VOICE_FILE}.partial"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_file)
    print(f"renamed voice {name!r} to {new_name!r} ({target})", file=sys.stderr)
    return 0


def _delete(root: Path, names: list[str]) -> int:
    """Delete whole voice folders; every name is checked before any is deleted."""
    import os
    import shutil

    folders = [_saved(root, name) for name in names]
    for name, folder in zip(names, folders, strict=True):
        hidden = root / f".deleting-{name}"  # out of `voice list` at once, even if the removal is cut short
        os.rename(folder, hidden)
        shutil.rmtree(hidden)
        print(f"deleted voice {name!r} ({folder})", file=sys.stderr)
    return 0
