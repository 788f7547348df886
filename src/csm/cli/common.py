"""What the `csm` commands have in common: model and sampling flags, loading the pipeline, seeds, where the
audio goes, and raw PCM / WAV on stdout. Commands import this module; it imports no command."""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import warnings
from contextlib import contextmanager
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
    p.add_argument(
        "--dtype",
        default="auto",
        help="bfloat16, float16, float32 or auto (default: auto: on a GPU bf16 or fp16; on a CPU float32, with "
        "a bf16 checkpoint's weights kept in bf16 where csm's CPU kernels run)",
    )
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
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; 0 is greedy: the backbone takes its likeliest code, the depth decoder "
        "samples as the checkpoint says (default: the checkpoint's)",
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


def check_sampling(args) -> None:
    """--temperature, --top-k and --max-seconds, checked before the model loads."""
    if args.temperature is not None and not args.temperature >= 0:
        raise CliError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise CliError(f"--top-k must be >= 0 (0 turns it off), got {args.top_k}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise CliError(f"--max-seconds must be > 0, got {args.max_seconds}")


def sampling_options(args) -> dict:
    """The pipeline's sampling options from the flags: --temperature 0 is greedy (do_sample=False)."""
    if args.temperature == 0:
        return dict(do_sample=False, top_k=args.top_k, max_seconds=args.max_seconds)
    return dict(temperature=args.temperature, top_k=args.top_k, max_seconds=args.max_seconds)


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
    """-o, --stream and -o - (stdout): exactly one place for the audio, and one that can take it, checked
    before any work."""
    if not args.stream and args.output is None:
        raise CliError(f"say where to write {what}: -o {example} (or --stream, or -o - for stdout)")
    if args.stream and args.output not in (None, "-"):
        raise CliError("--stream writes to stdout; drop -o or use -o -")
    if args.stream or args.output == "-":
        if sys.stdout.isatty():
            raise CliError(
                "stdout is a terminal: the audio would print there as raw bytes; pipe it to a player "
                "(... | aplay -r 24000 -f S16_LE -c 1, or ... | ffplay -nodisp -f s16le -ar 24000 -ac 1 -) "
                f"or write a file with -o {example}"
            )
    else:
        check_audio_file(args.output)


def check_audio_file(path: str | os.PathLike, flag: str = "-o") -> None:
    """An audio file that can be written: a known extension, a folder that exists, a file that can be created
    there (tried, then removed). Raises CliError saying what to change."""
    from ..audio import audio_format

    file = Path(path).expanduser()
    if file.is_dir():
        raise CliError(f"{flag} {path} is a folder: give a file name, e.g. {flag} {file / 'out.wav'}")
    try:
        audio_format(file)
    except ValueError as e:
        raise CliError(f"{e} (the extension decides the format)") from None
    if not file.parent.is_dir():
        raise CliError(
            f"cannot write {path}: folder {file.parent} does not exist; create it (mkdir -p {file.parent}) "
            f"or give another {flag}"
        )
    existed = file.exists()
    try:
        with open(file, "ab"):
            pass
    except OSError as e:
        raise CliError(
            f"cannot write {path} ({e.strerror}): give {flag} a file in a folder you can write, "
            f"e.g. {flag} ./{file.name}"
        ) from None
    if not existed:
        file.unlink(missing_ok=True)


def check_folder(path: str | os.PathLike, flag: str) -> None:
    """A folder that is there or can be made: the nearest existing folder above it must take a new entry
    (tried with a temporary folder, then removed). Raises CliError saying what to change."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{flag} {path} is a file; give a folder")
    above = folder
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise CliError(f"{flag} {path}: {above} is a file, not a folder; give another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".csm-check-", dir=above))
    except OSError as e:
        raise CliError(
            f"{flag} {path}: cannot write in {above} ({e.strerror}); give a folder you can write"
        ) from None


def write_audio(path: str | os.PathLike, audio, rate: int) -> None:
    """Write an audio file through a temporary name in its folder, then rename it into place: an interrupted
    run leaves no torn file; errors name the file asked for, never the temporary one; Ctrl-C waits."""
    from ..audio import save_audio_atomic

    path = Path(path).expanduser()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:  # a temporary file of mkstemp's (O_EXCL, unpredictable): a planted symlink is never written through
        save_audio_atomic(path, audio, rate)
    except (OSError, ValueError) as e:
        reason = (e.strerror if isinstance(e, OSError) else str(e)) or type(e).__name__
        raise CliError(f"cannot write {path}: {reason}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class FrameCaps:
    """Counts the sentences that reached their frame budget without an end of audio (from the library's
    warning, which names `max_new_tokens`): one warning in the CLI's words when the budget was the default,
    none when --max-seconds set it (the summary counts them)."""

    def __init__(self, max_seconds: float | None):
        self.max_seconds, self.count = max_seconds, 0

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if "without end-of-audio" not in text:
            print(f"csm: warning: {text.splitlines()[0]}", file=sys.stderr)
            return
        self.count += 1
        if self.max_seconds is None and self.count == 1:
            print(
                "csm: warning: a sentence reached its frame budget without ending (the model ran on, or it "
                "was cut short); --max-seconds S sets the most seconds per sentence",
                file=sys.stderr,
            )

    def note(self) -> str:
        """For the summary line: how many sentences stopped at --max-seconds."""
        if not self.count or self.max_seconds is None:
            return ""
        return f"; {self.count} sentence(s) stopped at --max-seconds {self.max_seconds:g}"


@contextmanager
def frame_caps(args):
    """Within: the library's warnings in the CLI's words (see FrameCaps)."""
    caps = FrameCaps(args.max_seconds)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = caps.show
        yield caps


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


def print_summary(where: str, samples: int, rate: int, took: float, note: str = "") -> None:
    """The last line of a run: what was written, how much audio, how fast."""
    seconds = samples / rate
    rtf = took / seconds if seconds else float("inf")
    print(
        f"csm: wrote {where}: {seconds:.1f} s of audio in {took:.1f} s (RTF {rtf:.2f}){note}", file=sys.stderr
    )
