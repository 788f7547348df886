"""What the `csm` commands have in common: model and sampling flags, loading the pipeline, seeds, where the
audio goes, and raw PCM / WAV on stdout. Commands import this module; it imports no command."""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

DEFAULT_MODEL = os.environ.get("CSM_MODEL", "sesame/csm-1b")
EXIT_ERROR = 2


class CliError(Exception):
    """An error reported as one line, without a traceback."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="checkpoint folder or hub repo id (default: %(default)s; $CSM_MODEL)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 or auto (default: auto)")
    p.add_argument(
        "--quantize",
        choices=["int8", "int4", "bf16", "fp16"],
        default=None,
        help="quantize the weights as they load: int8, int4 (experimental), or bf16/fp16 (16-bit weights "
        "under a float32 model, CPU); a checkpoint saved quantized needs no flag",
    )


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speaker", type=int, default=None, help="speaker id (default: the voice's, else 0)")
    p.add_argument(
        "--voice", default=None, metavar="NAME_OR_DIR", help="a saved voice: its name or its folder"
    )
    p.add_argument(
        "--context",
        nargs=2,
        action="append",
        metavar=("CLIP", "TRANSCRIPT"),
        default=[],
        help="a reference clip and the words spoken in it, as audio context (repeatable)",
    )
    add_sampling_args(p)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed", type=int, default=None, help="random seed (one is picked and printed when omitted)"
    )
    p.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the checkpoint's)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="sample among the k likeliest codes (default: the checkpoint's)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="most seconds of audio per sentence (default: from the text length)",
    )


def load_pipeline(model: str, device, dtype, quiet: bool, quantize: str | None = None):
    from ..pipeline import pipeline

    if not quiet:
        print(f"csm: loading {model}{f' ({quantize})' if quantize else ''} ...", file=sys.stderr)
    return pipeline("text-to-audio", model=model, device=device, dtype=dtype, quantize=quantize)


def context(args):
    """--context CLIP TRANSCRIPT ... as a Voice, or None."""
    if not args.context:
        return None
    from ..voice import Voice

    return Voice.from_files("context", args.speaker or 0, [(Path(c), t) for c, t in args.context])


def seed(args) -> int:
    """--seed, or a new one, printed so that the run can be made again."""
    if args.seed is not None:
        return args.seed
    seed = random.randrange(2**31)
    if not args.quiet:
        print(f"csm: seed {seed}", file=sys.stderr)
    return seed


def check_output(args, what: str, example: str) -> None:
    """-o, --stream and -o - (stdout): exactly one place for the audio."""
    if not args.stream and args.output is None:
        raise CliError(f"say where to write {what}: -o {example} (or --stream, or -o - for stdout)")
    if args.stream and args.output not in (None, "-"):
        raise CliError("--stream writes to stdout; drop -o or use -o -")


def wav_header_unknown_length(rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say 'until the end of the stream'."""
    import struct

    big = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", big) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", big)
    )  # fmt: skip


def pcm16(audio) -> bytes:
    import numpy as np

    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def print_summary(where: str, samples: int, rate: int, took: float) -> None:
    """The last line of a run: what was written, how much audio, how fast."""
    seconds = samples / rate
    rtf = took / seconds if seconds else float("inf")
    print(f"csm: wrote {where}: {seconds:.1f} s of audio in {took:.1f} s (RTF {rtf:.2f})", file=sys.stderr)
