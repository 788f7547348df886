"""`csm finetune`: fine-tune on your recordings; its flags are csm.train's own."""

from __future__ import annotations

from . import common
from .common import CliError


def add_parser(sub) -> None:
    sub.add_parser(
        "finetune", help="fine-tune on your recordings (see `csm finetune --help`)", add_help=False
    )


def cmd_finetune(argv: list[str]) -> int:
    try:
        from ..train import add_finetune_arguments, run_finetune
    except ImportError as e:
        raise CliError(f"`csm finetune` is not available in this install ({e})") from None
    parser = common.Parser(prog="csm finetune", description="Fine-tune CSM on your recordings.")
    add_finetune_arguments(parser)
    args = parser.parse_args(argv)
    if args.device is not None:  # an absent GPU is one line now, not torch's pin_memory warning later
        from ..pipeline import pick_device

        try:
            pick_device(args.device)
        except ValueError as e:
            raise CliError(f"--device {args.device}: {e}") from None
    if not args.prepare_only:
        common.check_folder(args.out, "--out")
    return int(run_finetune(args) or 0)
