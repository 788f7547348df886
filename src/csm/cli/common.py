"""What the `csm` commands have in common: model and sampling flags, loading the pipeline, seeds, where the
audio goes, and raw PCM / WAV on stdout. Commands import this module; it imports no command."""

from __future__ import annotations

import argparse
import os
import random
import re
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


# The library speaks in Python arguments; the CLI's messages speak in flags.
_CLI_WORDS = [
    (re.compile(r"(?:pass |with )?dtype=torch\.(\w+)"), r"--dtype \1"),
    (re.compile(r"\bwithout quantize\b"), "without --quantize"),
    (re.compile(r"\bquantize=(\w+)"), r"--quantize \1"),
    (re.compile(r"max_new_tokens=(\d+) frames"), r"its frame budget (\1 frames)"),
    (re.compile(r"\(raise max_new_tokens or max_seconds\)"), "(raise --max-seconds)"),
    (re.compile(r"\bmax_seconds\b"), "--max-seconds"),
    (re.compile(r"\bdevice_map\b"), "--device"),
]


def cli_words(message: str) -> str:
    """A library message in the CLI's words: `--dtype bfloat16` where Python says `dtype=torch.bfloat16`."""
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


def say_line(line: str) -> None:
    """Print one line to stderr above any progress bar (tqdm's bars redraw below it), never through one."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        tqdm.tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def one_line_warning(message, category=None, filename=None, lineno=None, file=None, line=None) -> None:
    """warnings.showwarning for the CLI: `csm: warning: ...`, one line, in flags, above the bar."""
    say_line(f"csm: warning: {cli_words(str(message)).splitlines()[0]}")


DTYPE_NAMES = {
    "auto": "auto",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def dtype_name(text: str) -> str:
    """An argparse type: a dtype by its name or its short name (bf16, fp16, fp32, as --quantize says them)."""
    name = DTYPE_NAMES.get(text.lower().removeprefix("torch."))
    if name is None:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}: use bfloat16 (bf16), float16 (fp16), float32 (fp32) or auto"
        )
    return name


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
        type=dtype_name,
        help="bfloat16 (bf16), float16 (fp16), float32 (fp32) or auto (default: auto: on a GPU bf16 or fp16; on a CPU float32, with "
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


def check_voice_and_context(args):
    """--speaker, --voice and --context, checked and read before the model loads: returns (the Voice or
    None, the context Voice or None). A missing voice, an unreadable clip or an empty transcript is one
    line naming the flag."""
    if args.speaker is not None and args.speaker < 0:
        raise CliError(f"--speaker must be a speaker id >= 0, got {args.speaker}")
    from ..voice import Voice

    voice = None
    if args.voice is not None:
        try:
            voice = Voice.named(args.voice)
        except (OSError, ValueError) as e:
            raise CliError(f"--voice {args.voice}: {e}") from None
    for clip, transcript in args.context:
        if not Path(clip).expanduser().is_file():
            raise CliError(f"--context {clip}: no such file (give an audio clip, then its transcript)")
        if not transcript.strip():
            raise CliError(f"--context {clip}: the transcript is empty; give the words spoken in the clip")
    try:
        return voice, context(args)
    except (OSError, ValueError) as e:
        raise CliError(f"--context: {e}") from None


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file's content; an unreadable file or another encoding is one line naming the file,
    the place of the first bad byte and how to convert it."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(
            f"{flag} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save it "
            f"as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8.txt"
        ) from None
    except OSError as e:
        raise CliError(f"cannot read {flag} {path}: {e.strerror or e}") from None


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
    if getattr(args, "format", None) is not None and not (args.stream or args.output == "-"):
        raise CliError(
            f"--format {args.format} is for stdout (--stream or -o -); a file's format is its extension: "
            f"-o {args.output} is {Path(args.output).suffix.lstrip('.').upper() or 'a file without one'}"
        )
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
    if file.suffix.lower() == ".aac":
        aac_encoder()  # PyAV is there (checked now, not after the model load)
    else:
        try:
            audio_format(file)
        except ValueError as e:
            raise CliError(f"{e}, or .aac (the extension decides the format)") from None
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
    from ..audio import save_audio_atomic, write_bytes_atomic

    path = Path(path).expanduser()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:  # a temporary file of mkstemp's (O_EXCL, unpredictable): a planted symlink is never written through
        if path.suffix.lower() == ".aac":
            encoder = aac_encoder()(rate)
            write_bytes_atomic(path, encoder.push(audio) + encoder.finish())
        else:
            save_audio_atomic(path, audio, rate)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: libsndfile's ("System error.")
        reason = (e.strerror if isinstance(e, OSError) else str(e)) or type(e).__name__
        kept = keep_unsaved(audio, rate)
        raise CliError(f"cannot write {path}: {reason}{kept}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def aac_encoder():
    """AAC (ADTS) as the server writes it: a callable rate -> encoder with push/finish; needs PyAV."""
    try:
        import av  # noqa: F401

        from ..server.encode import AudioEncoder
    except ImportError as e:
        raise CliError(
            f".aac needs PyAV ({e.name or e}), which comes with the server extra: pip install 'csm-speech[server]'"
        ) from None
    return lambda rate: AudioEncoder("aac", rate)


def check_speed(args) -> None:
    if getattr(args, "speed", None) is not None and not 0.25 <= args.speed <= 4.0:
        raise CliError(f"--speed must be between 0.25 and 4.0 (as the server's speed), got {args.speed:g}")


class SpeedChange:
    """--speed: audio played faster or slower by resampling (the pitch follows), as the server's `speed`;
    chunk by chunk for a stream, the same samples as all at once."""

    def __init__(self, speed: float | None, rate: int):
        import soxr

        self.stream = None
        if speed not in (None, 1.0):
            self.stream = soxr.ResampleStream(rate * speed, rate, 1, dtype="float32")

    def __call__(self, audio, last: bool = False):
        if self.stream is None:
            return audio
        import numpy as np

        return self.stream.resample_chunk(np.ascontiguousarray(audio, dtype=np.float32), last=last)


def keep_unsaved(audio, rate: int) -> str:
    """The audio a failed write would lose, in a WAV file of the system's temporary folder (often another
    disk): a clause for the error message saying where, or that it could not be kept."""
    from ..audio import save_audio

    fd, name = tempfile.mkstemp(prefix="csm-unsaved-", suffix=".wav")
    os.close(fd)
    try:
        save_audio(audio, name, sampling_rate=rate)
    except (OSError, ValueError, RuntimeError):
        os.unlink(name)
        return "; the audio could not be kept elsewhere either"
    return f"; the audio is kept in {name}: move it where you want it once there is room"


def check_free_space(path: str | os.PathLike, seconds: float, flag: str = "-o") -> None:
    """Refuse, before the model loads, an output whose folder has no room for `seconds` of 16-bit audio."""
    import shutil

    folder = Path(path).expanduser().resolve().parent
    need = int(seconds * 24000 * 2) + (1 << 20)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # nothing cheap to say; the write will tell
    if free < need:
        raise CliError(
            f"{flag} {path}: {free / 1e6:.1f} MB free in {folder}, about {need / 1e6:.1f} MB needed for "
            f"{seconds:.0f} s of audio; free some space or write elsewhere"
        )


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
            one_line_warning(text)
            return
        self.count += 1
        if self.max_seconds is None and self.count == 1:
            say_line(
                "csm: warning: a sentence reached its frame budget without ending (the model ran on, or it "
                "was cut short); --max-seconds S sets the most seconds per sentence"
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


class PlainBar:
    """A progress bar for a log: when stderr is not a terminal, whole lines (`csm say: 3/40 sentences,
    frame 5/25 ...`) when an item finishes, at most one a second, and every 30 s while one runs, instead of
    hundreds of carriage-return redraws. Takes the calls the commands make on tqdm."""

    EVERY, QUIET_FOR = 1.0, 30.0

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", **_):
        import time

        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.postfix, self._clock = "", time.monotonic
        self._printed = self._clock() - self.EVERY
        self._shown: tuple | None = None

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe(self.EVERY)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        self._maybe(self.QUIET_FOR)

    def _maybe(self, after: float) -> None:
        if self._clock() - self._printed >= after:
            self._line()

    def _line(self) -> None:
        if self._shown == (self.n, self.postfix):
            return
        total = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{total} {self.unit}s{', ' + self.postfix if self.postfix else ''}",
              file=sys.stderr, flush=True)  # fmt: skip
        self._printed, self._shown = self._clock(), (self.n, self.postfix)

    def write(self, line: str, file=None) -> None:
        print(line, file=file or sys.stderr)

    def close(self) -> None:
        if self.total is None or self.n < self.total or self._shown != (self.n, self.postfix):
            self._line()

    def __iter__(self):
        raise TypeError("iterate over items(...)")


def progress_bar(total: int | None, desc: str, unit: str, **kwargs):
    """tqdm on a terminal; plain lines in a log (PlainBar) when stderr is not one."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, **kwargs)
    return PlainBar(total=total, desc=desc, unit=unit)


def items_with_bar(items: list, desc: str, unit: str, show: bool):
    """Iterate over `items` with a progress bar over them (see progress_bar), when `show`."""
    if not show:
        yield from items
        return
    bar = progress_bar(len(items), desc, unit, leave=False)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


class Parser(argparse.ArgumentParser):
    """argparse, as the csm command wants it: no abbreviated flags (`--temp` is not `--temperature`), and a
    misspelled command, choice or flag answered with the nearest real one ("did you mean --seed?")."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.format_usage()}{self.prog}: error: {message}{self.suggestion(message)}\n")

    def suggestion(self, message: str) -> str:
        import difflib

        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = [c.strip().strip("'") for c in choice[2].split(",")]
            wrong = [choice[1]]
        else:
            unknown = re.search(r"unrecognized arguments: (.*)", message)
            if not unknown:
                return ""
            wrong = [w.split("=")[0] for w in unknown[1].split() if w.startswith("-")]
            options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        for word in wrong:
            prefixed = [o for o in options if o.startswith(word) and word.startswith("--")]
            best = prefixed or difflib.get_close_matches(word, options, n=1, cutoff=0.6)
            if best:
                return f" (did you mean {' or '.join(best[:3])}?)"
        return ""
