"""The `csm` command: its subcommands, collected from one module each, and `main()`."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import batch, build_kernels, convert, demo, dialogue, finetune, say, serve, voice
from .common import EXIT_ERROR, CliError, Parser, cli_words, one_line_warning

COMMANDS = (
    say,
    batch,
    voice,
    demo,
    convert,
    serve,
    dialogue,
    finetune,
    build_kernels,
)  # in the order `csm --help` lists them


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="csm", description="Sesame CSM text-to-speech in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"csm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` ran: `csm voice create` for `csm voice create ...`."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None:
            return parser
        parser = subs[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    """Run the `csm` command; returns the exit code (errors print one line, never a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = one_line_warning
    try:
        if argv[:1] == ["finetune"]:
            return finetune.cmd_finetune(argv[1:])
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the subcommand's parser, with its usage, not the top level's
            command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        return args.handler(args)
    except KeyboardInterrupt:
        print("csm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the player went away; nothing more to say
        return 1
    except (CliError, ValueError, FileNotFoundError, RuntimeError, OSError, TypeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"csm: error: {cli_words(message)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
