"""`csm say`: speak text into an audio file, or stream it to stdout. A long text is announced up front, its
progress shown in frames of the sentence being spoken, and Ctrl-C keeps the sentences finished so far."""

from __future__ import annotations

import sys
import time

import numpy as np

from ..chunking import CROSSFADE_MS, MAX_CHUNK_CHARS, MAX_TEXT_CHARS, split_sentences
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
        "-o", "--output", default=None, help="output audio file (.wav, .flac, .ogg, .mp3, .aac); - for stdout"
    )
    say.add_argument(
        "--stream", action="store_true", help="write audio to stdout as it is generated, for a player"
    )
    say.add_argument(
        "--format",
        choices=["pcm", "wav"],
        default=None,
        help="stdout format (--stream, -o -): raw s16le 24 kHz PCM (default) or WAV; a file's format is its extension",
    )
    say.add_argument(
        "--speed",
        type=float,
        default=None,
        help="play the audio faster or slower, 0.25-4.0, by resampling (the pitch follows), as the server's "
        "speed (default: 1)",
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
            try:
                return sys.stdin.read()
            except UnicodeDecodeError as e:
                raise CliError(
                    f"the text on stdin is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                    "convert it first, e.g. ... | iconv -f latin1 -t utf-8 | csm say -f - ..."
                ) from None
        return common.read_text_file(args.text_file, "--text-file")
    if args.text is None:
        raise CliError("nothing to say: pass the text, or --text-file FILE (- for stdin)")
    return args.text


CHUNK_FRAMES = 4  # frames between progress updates (and Ctrl-C points)
SPEECH_CHARS_PER_SECOND = 15  # what text takes to say, about: for the estimates


def check_text(text: str) -> None:
    """Something to say, within csm say's limit (the server's and the pipeline's too)."""
    if not text.strip():
        raise CliError("the text is empty: there is nothing to say")
    if len(text) > MAX_TEXT_CHARS:
        raise CliError(
            f"the text has {len(text):,} characters, more than the {MAX_TEXT_CHARS:,} csm say takes at once: "
            "split it into several files, or put one paragraph per line and use `csm batch`"
        )


def cmd_say(args) -> int:
    text = read_text(args)
    check_text(text)
    common.check_output(args, "the audio", "out.wav")
    common.check_sampling(args)
    common.check_speed(args)
    voice, context = common.check_voice_and_context(args)  # clips read now, not after the model load
    sentences = split_sentences(text, MAX_CHUNK_CHARS)
    if not (args.stream or args.output == "-"):  # room for the speech, at most --max-seconds per sentence
        speech = len(text) / SPEECH_CHARS_PER_SECOND
        if args.max_seconds is not None:
            speech = min(speech, args.max_seconds * len(sentences))
        common.check_free_space(args.output, speech)
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
        voice=voice,
        context=context,
        seed=seed,
        **common.sampling_options(args),
    )
    start = time.perf_counter()
    rate = pipe.sampling_rate
    speed = common.SpeedChange(args.speed, rate)
    with common.frame_caps(args) as caps:
        if args.stream:
            out = sys.stdout.buffer
            if args.format == "wav":
                out.write(common.wav_header_unknown_length(rate))
            samples = 0
            for chunk in pipe.stream(text, progress=not args.quiet, **options):
                chunk = speed(chunk)
                out.write(common.pcm16(chunk))
                out.flush()
                samples += len(chunk)
            tail = speed(np.zeros(0, np.float32), last=True)
            out.write(common.pcm16(tail))
            samples += len(tail)
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
            audio = speed(audio, last=True)
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
    audio = common.SpeedChange(args.speed, rate)(audio, last=True)
    where = _write(args, audio, rate)
    print(
        f"csm: interrupted: wrote the {done} finished sentence(s) ({len(audio) / rate:.2f} s of audio) to "
        f"{where}; {total - done} sentence(s) were not spoken",
        file=sys.stderr,
    )
    return 130


def duration(seconds: float) -> str:
    """3 h 05 min, 12 min 40 s, 8 s."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class Progress:
    """What `csm say` has made so far: the audio pieces, where each finished sentence ends in them, and a bar
    over the sentences that shows the frames of the one in progress against its budget and, once the first
    frames are measured, the time to go."""

    MEASURE_AFTER = 8  # frames after the first chunk (which holds the prompt's prefill) before estimating

    def __init__(self, pipe, chunks: list[str], options: dict, quiet: bool):
        self.pipe, self.chunks, self.options, self.quiet = pipe, chunks, options, quiet
        self.frame_rate = pipe.model.codec_model.frame_rate
        self.samples_per_frame = pipe.sampling_rate / self.frame_rate
        self.pieces: list[np.ndarray] = []
        self.samples = 0  # audio made so far
        self.ends: list[int] = []  # self.samples when each sentence was finished
        self.index = -1  # the sentence in progress
        self.start_samples = 0  # self.samples when it started
        self.budget = 0
        self.frames_done = 0  # frames of the finished sentences
        self.clock: tuple[float, int] | None = None  # (time, frames) at the end of the first chunk
        self.rate: float | None = None  # frames per second, measured
        self.bar = None
        if not quiet:
            self.bar = common.progress_bar(
                len(chunks),
                "csm say",
                "sentence",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )

    @property
    def done(self) -> int:
        return len(self.ends)

    def sentences(self, chunks: list[str]):
        """The pipeline's sentence loop runs through this: each step starts a sentence (the one before is done)."""
        self.chunks = list(chunks)  # as the pipeline split them (it normalizes the spaces first)
        if self.bar is not None:
            self.bar.total = len(self.chunks)
        for j, chunk in enumerate(self.chunks):
            self._sentence_done()
            self.index, self.start_samples = j, self.samples
            self.budget = self.pipe.frame_budget(chunk, **self.options)
            self._show()
            yield chunk
        self._sentence_done()

    def _sentence_done(self) -> None:
        if self.index >= len(self.ends):
            self.frames_done += self._frames()
            self.ends.append(self.samples)
            if self.bar is not None:
                self.bar.update(1)

    def _frames(self) -> int:
        return min(self.budget, round((self.samples - self.start_samples) / self.samples_per_frame))

    def add(self, piece: np.ndarray) -> None:
        self.pieces.append(piece)
        self.samples += len(piece)
        made = self.frames_done + self._frames()
        now = time.perf_counter()
        if self.clock is None:
            self.clock = (now, made)
        elif made - self.clock[1] >= self.MEASURE_AFTER:  # the rate since the first chunk, kept up to date
            first, self.rate = self.rate is None, (made - self.clock[1]) / max(now - self.clock[0], 1e-9)
            if first and self.bar is not None:
                self.bar.write(
                    f"csm: {self.rate:.1f} frames/s ({self.rate / self.frame_rate:.2f} s of audio per second): "
                    f"about {duration(self._to_go())} to go",
                    file=sys.stderr,
                )
        self._show()

    def _to_go(self) -> float:
        """Seconds left, about: the frames the sentences left will take (their length as speech, at most their
        budget) at the measured rate."""
        rest = sum(self._expected(c) for c in self.chunks[self.index + 1 :])
        return (rest + max(self._expected(self.chunks[self.index]) - self._frames(), 0)) / self.rate

    def _expected(self, chunk: str) -> float:
        speech = len(chunk) / SPEECH_CHARS_PER_SECOND * self.frame_rate
        return min(speech, self.pipe.frame_budget(chunk, **self.options))

    def _show(self) -> None:
        if self.bar is None or self.index < 0:
            return
        postfix = f"frame {self._frames()}/{self.budget} of sentence {self.index + 1}"
        if self.rate is not None:
            postfix += f", ~{duration(self._to_go())} to go"
        self.bar.set_postfix_str(postfix)

    def finished(self) -> np.ndarray:
        """The finished sentences' audio (the last few ms, held for a crossfade, faded out instead)."""
        end = self.ends[-1] if self.ends else 0
        audio = np.concatenate(self.pieces)[:end] if end else np.zeros(0, np.float32)
        fade = min(len(audio), int(self.pipe.sampling_rate * CROSSFADE_MS / 1000))
        if fade:
            audio = audio.copy()
            audio[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        return audio

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
