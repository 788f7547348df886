"""`csm voice create` and `csm voice list`: saved voices."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import CliError


def add_parser(sub) -> None:
    voice = sub.add_parser("voice", help="create and list saved voices")
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
            v = Voice.load(root / name)
            print(f"{name}\tspeaker {v.speaker}\t{len(v.clips)} clip(s), {v.seconds:.1f} s")
        return 0
    if args.voice_command == "create":
        name = args.name
        if not name or "/" in name or name.startswith("."):
            raise CliError(f"invalid voice name {name!r}: use letters, digits, - or _")
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
    raise CliError("say what to do: `csm voice create NAME CLIP TRANSCRIPT` or `csm voice list`")
