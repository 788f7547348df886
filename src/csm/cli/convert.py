"""`csm convert`: an original Sesame checkpoint in this (Hugging Face) layout."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    convert = sub.add_parser(
        "convert", help="convert an original Sesame checkpoint to this (Hugging Face) layout"
    )
    convert.add_argument("src", help="the original checkpoint file or folder")
    convert.add_argument("dst", help="output folder")
    convert.add_argument(
        "--config",
        default=None,
        help="folder with a config.json in this layout, for models that are not csm-1b's size "
        "(default: from the original's config.json flavors)",
    )
    convert.add_argument(
        "--codec", default="kyutai/mimi", help="Mimi codec folder or repo id (default: %(default)s)"
    )
    convert.set_defaults(handler=cmd_convert)


def cmd_convert(args) -> int:
    from ..convert import convert_original_checkpoint

    config = None
    if args.config:
        from ..config import CsmConfig

        config = CsmConfig.from_pretrained(args.config)
    convert_original_checkpoint(args.src, args.dst, codec=args.codec, config=config)
    print(f"csm: converted {args.src} to {args.dst}", file=sys.stderr)
    return 0
