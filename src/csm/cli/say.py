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


CHUNK_FRAMES = 4  # frames between progress updates (and Ctrl-C points)


def cmd_say(args) -> int:
    import numpy as np

    from ..chunking import MAX_CHUNK_CHARS, split_sentences
    from .progress import SPEECH_CHARS_PER_SECOND, Progress, duration

    text = read_text(args)
    if not text.strip():
        raise CliError("the text is empty: there is nothing to say")
    common.check_output(args, "the audio", "out.wav")
    common.check_sampling(args)
    sentences = split_sentences(text, MAX_CHUNK_CHARS)
    if not args.quiet and len(sentences) > 1:
        speech = len(text) / SPEECH_CHARS_PER_SECOND
        print(
            f"csm: {len(sentences):,} sentences ({len(text):,} characters): about {duration(speech)} of "
            "speech; an estimate of the time follows once the first frames are measured",
            file=sys.stderr,
        )
    seed = common.seed(args)
    pipe = common.load_pipeline(args.model, args.device, args.dtype, args.quiet, args.quantize)
    options = dict(
        speaker=args.speaker,
        voice=args.voice,
        context=common.context(args),
        seed=seed,
        **common.sampling_options(args),
    )
    start = time.perf_counter()
    rate = pipe.sampling_rate
    with common.frame_caps(args) as caps:
        if args.stream:
            out = sys.stdout.buffer
            if args.format == "wav":
                out.write(common.wav_header_unknown_length(rate))
            samples = 0
            for chunk in pipe.stream(text, progress=not args.quiet, **options):
                out.write(common.pcm16(chunk))
                out.flush()
                samples += len(chunk)
            where = "stdout"
        else:
            progress = Progress(pipe, sentences, options, args.quiet)
            try:
                for chunk in pipe.stream(text, CHUNK_FRAMES, progress=progress.sentences, **options):
                    progress.add(chunk)
            except KeyboardInterrupt:
                progress.close()
                return _interrupted(args, progress, rate)
            finally:
                progress.close()  # before any message
            audio = np.concatenate(progress.pieces) if progress.pieces else np.zeros(0, np.float32)
            if len(audio) == 0:
                raise CliError(
                    "the model ended the audio at once: nothing was generated (try another --seed)"
                )
            where = _write(args, audio, rate)
            samples = len(audio)
    if not args.quiet:
        common.print_summary(where, samples, rate, time.perf_counter() - start, caps.note())
    return 0


def _write(args, audio, rate: int) -> str:
    if args.output == "-":
        out = sys.stdout.buffer
        if args.format == "wav":
            out.write(common.wav_header_unknown_length(rate))
        out.write(common.pcm16(audio))
        out.flush()
        return "stdout"
    common.write_audio(args.output, audio, rate)
    return args.output


def _interrupted(args, progress, rate: int) -> int:
    """Ctrl-C: the sentences finished so far go into the file (a valid one), and the run says so."""
    audio = progress.finished()
    done, total = progress.done, len(progress.chunks)
    if not len(audio):
        print("csm: interrupted before a sentence was finished: nothing was written", file=sys.stderr)
        return 130
    where = _write(args, audio, rate)
    print(
        f"csm: interrupted: wrote the {done} finished sentence(s) ({len(audio) / rate:.2f} s of audio) to "
        f"{where}; {total - done} sentence(s) were not spoken",
        file=sys.stderr,
    )
    return 130
