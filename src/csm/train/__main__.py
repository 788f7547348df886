"""`python -m csm.train --model ... --data ... --out ...`, the entry point for torchrun."""

import argparse
import sys

from . import add_finetune_arguments, run_finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m csm.train", description="Fine-tune CSM on your voice data."
    )
    add_finetune_arguments(parser)
    return run_finetune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
