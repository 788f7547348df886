"""`csm say`: speak text into an audio file, or stream it to stdout."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import common
from .common import CliError


def add_parser(sub) -> None:
    say = sub.add_parser("say", help="speak text into an audio file (or stream it to stdout)")
    say.add_argument("text", nargs="?", help="the text to speak (or use --text-file)")
    say.add_argument(
        "-f",
        "--text-file",
        "-i",
        "--input-file",
        dest="text_file",
        help="read the text from a file; - for stdin",
    )
    say.add_argument(
        "-o", "--output", default=None, help="output audio file (.wav, .flac, .ogg, .mp3); - for stdout"
    )
    say.add_argument(
        "--stream", action="store_true", help="write audio to stdout as it is generated, for a player"
    )
    say.add_argument(
        "--format", choices=["pcm", "wav"], default="pcm", help="stdout format: raw s16le 24 kHz PCM or WAV"
    )
    common.add_model_args(say)
    common.add_generation_args(say)
    say.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar, seed or summary line (warnings still print)",
    )
    say.set_defaults(handler=cmd_say)


def read_text(args) -> str:
    if args.text is not None and args.text_file is not None:
        raise CliError("give the text as an argument or with --text-file, not both")
    if args.text_file is not None:
        if args.text_file == "-":
            return sys.stdin.read()
        try:
            return Path(args.text_file).read_text(encoding="utf-8")
        except OSError as e:
            raise CliError(f"cannot read {args.text_file}: {e.strerror}") from None
    if args.text is None:
        raise CliError("nothing to say: pass the text, or --text-file FILE (- for stdin)")
    return args.text


def cmd_say(args) -> int:
    text = read_text(args)
    if not text.strip():
        raise CliError("the text is empty: there is nothing to say")
    common.check_output(args, "the audio", "out.wav")
    seed = common.seed(args)
    pipe = common.load_pipeline(args.model, args.device, args.dtype, args.quiet, args.quantize)
    options = dict(
        speaker=args.speaker,
        voice=args.voice,
        context=common.context(args),
        temperature=args.temperature,
        top_k=args.top_k,
        max_seconds=args.max_seconds,
        seed=seed,
        progress=not args.quiet,
    )
    start = time.perf_counter()
    rate = pipe.sampling_rate
    if args.stream or args.output == "-":
        out = sys.stdout.buffer
        if args.format == "wav":
            out.write(common.wav_header_unknown_length(rate))
        samples = 0
        if args.stream:
            for chunk in pipe.stream(text, **options):
                out.write(common.pcm16(chunk))
                out.flush()
                samples += len(chunk)
        else:
            audio = pipe(text, **options)["audio"]
            out.write(common.pcm16(audio))
            samples = len(audio)
        out.flush()
        where = "stdout"
    else:
        from ..audio import save_audio

        audio = pipe(text, **options)["audio"]
        if len(audio) == 0:
            raise CliError("the model ended the audio at once: nothing was generated (try another --seed)")
        save_audio(audio, args.output, sampling_rate=rate)
        samples, where = len(audio), args.output
    if not args.quiet:
        common.print_summary(where, samples, rate, time.perf_counter() - start)
    return 0
