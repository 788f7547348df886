"""The `csm` command: say, batch, voice, demo, convert, serve, finetune."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from pathlib import Path

DEFAULT_MODEL = os.environ.get("CSM_MODEL", "sesame/csm-1b")
EXIT_ERROR = 2


class CliError(Exception):
    """An error reported as one line, without a traceback."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
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


def _add_generation_args(p: argparse.ArgumentParser) -> None:
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
    _add_sampling_args(p)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    from .batch import command as batch_command

    parser = argparse.ArgumentParser(prog="csm", description="Sesame CSM text-to-speech in pure PyTorch.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"csm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    _add_model_args(say)
    _add_generation_args(say)
    say.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar, seed or summary line (warnings still print)",
    )

    batch = sub.add_parser("batch", help="speak every line of a JSON-lines file into DIR (resumable; --ray)")
    batch_command.add_arguments(batch)
    _add_model_args(batch)
    _add_generation_args(batch)

    voice = sub.add_parser("voice", help="create and list saved voices")
    vsub = voice.add_subparsers(dest="voice_command", metavar="ACTION")
    create = vsub.add_parser("create", help="save a voice from reference clips and their transcripts")
    create.add_argument("name", help="the voice's name")
    create.add_argument("clip", help="a reference audio file (a few seconds of clean speech)")
    create.add_argument("transcript", help="the words spoken in the clip")
    create.add_argument(
        "--add",
        nargs=2,
        action="append",
        default=[],
        metavar=("CLIP", "TRANSCRIPT"),
        help="another clip (repeatable)",
    )
    create.add_argument("--speaker", type=int, default=0, help="speaker id the voice speaks as (default: 0)")
    create.add_argument(
        "--voices-dir",
        default=None,
        help="where voices live (default: $CSM_VOICES_DIR or ~/.local/share/csm/voices)",
    )
    create.add_argument("--force", action="store_true", help="replace an existing voice of that name")
    lst = vsub.add_parser("list", help="list saved voices")
    lst.add_argument("--voices-dir", default=None, help="where voices live")

    demo = sub.add_parser(
        "demo", help="run the whole path offline on a tiny random-weight model (its audio is noise)"
    )
    demo.add_argument(
        "-o", "--output", default="csm-demo.wav", help="output audio file (default: %(default)s)"
    )
    demo.add_argument(
        "--text", default="Hello from csm. This model is tiny and random.", help="text to speak"
    )
    demo.add_argument(
        "--checkpoint-dir", default=None, help="where to write the demo checkpoint (default: ~/.cache/csm)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

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

    serve = sub.add_parser("serve", help="OpenAI-compatible speech server (needs the `server` extra)")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--api-key", default=os.environ.get("CSM_API_KEY"), help="require this bearer key ($CSM_API_KEY)"
    )
    serve.add_argument(
        "--max-frames", type=int, default=None, help="frame cap per request (12.5 frames per second)"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=8, help="requests generated together (default: %(default)s)"
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests get to finish; new ones get 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        help="seconds a client may stop reading before it is dropped and its row freed (default: 30)",
    )
    serve.add_argument(
        "--batched-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode the audio of all requests in one codec call per step (default: on); with "
        "--no-batched-decode each request has a decoder of its own, and a seeded request's audio is bit "
        "for bit the same alone or batched",
    )

    from .dialogue import add_dialogue_parser

    add_dialogue_parser(sub)

    sub.add_parser(
        "finetune", help="fine-tune on your recordings (see `csm finetune --help`)", add_help=False
    )
    return parser


# ---- commands ---------------------------------------------------------------------------------------


def _read_text(args) -> str:
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


def _load_pipeline(model: str, device, dtype, quiet: bool, quantize: str | None = None):
    from .pipeline import pipeline

    if not quiet:
        print(f"csm: loading {model}{f' ({quantize})' if quantize else ''} ...", file=sys.stderr)
    return pipeline("text-to-audio", model=model, device=device, dtype=dtype, quantize=quantize)


def _context(args):
    if not args.context:
        return None
    from .voice import Voice

    return Voice.from_files("context", args.speaker or 0, [(Path(c), t) for c, t in args.context])


def _wav_header_unknown_length(rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say 'until the end of the stream'."""
    import struct

    big = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", big) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", big)
    )  # fmt: skip


def _pcm16(audio) -> bytes:
    import numpy as np

    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def _seed(args) -> int:
    """--seed, or a new one, printed so that the run can be made again."""
    if args.seed is not None:
        return args.seed
    seed = random.randrange(2**31)
    if not args.quiet:
        print(f"csm: seed {seed}", file=sys.stderr)
    return seed


def cmd_say(args) -> int:
    text = _read_text(args)
    if not text.strip():
        raise CliError("the text is empty: there is nothing to say")
    if not args.stream and args.output is None:
        raise CliError("say where to write the audio: -o out.wav (or --stream, or -o - for stdout)")
    if args.stream and args.output not in (None, "-"):
        raise CliError("--stream writes to stdout; drop -o or use -o -")
    seed = _seed(args)
    pipe = _load_pipeline(args.model, args.device, args.dtype, args.quiet, args.quantize)
    options = dict(
        speaker=args.speaker,
        voice=args.voice,
        context=_context(args),
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
            out.write(_wav_header_unknown_length(rate))
        samples = 0
        if args.stream:
            for chunk in pipe.stream(text, **options):
                out.write(_pcm16(chunk))
                out.flush()
                samples += len(chunk)
        else:
            audio = pipe(text, **options)["audio"]
            out.write(_pcm16(audio))
            samples = len(audio)
        out.flush()
        where = "stdout"
    else:
        from .audio import save_audio

        audio = pipe(text, **options)["audio"]
        if len(audio) == 0:
            raise CliError("the model ended the audio at once: nothing was generated (try another --seed)")
        save_audio(audio, args.output, sampling_rate=rate)
        samples, where = len(audio), args.output
    took = time.perf_counter() - start
    seconds = samples / rate
    if not args.quiet:
        rtf = took / seconds if seconds else float("inf")
        print(
            f"csm: wrote {where}: {seconds:.1f} s of audio in {took:.1f} s (RTF {rtf:.2f})", file=sys.stderr
        )
    return 0


def cmd_batch(args) -> int:
    from .batch import command

    return command.run(args, _load_pipeline, CliError)


def cmd_voice(args) -> int:
    from .voice import Voice, list_voices, voices_dir

    root = Path(args.voices_dir).expanduser() if getattr(args, "voices_dir", None) else voices_dir()
    if args.voice_command == "list":
        names = list_voices(root)
        if not names:
            print(
                f'no voices in {root}; create one with `csm voice create NAME CLIP.wav "transcript"`',
                file=sys.stderr,
            )
        for name in names:
            v = Voice.load(root / name)
            print(f"{name}\tspeaker {v.speaker}\t{len(v.clips)} clip(s), {v.seconds:.1f} s")
        return 0
    if args.voice_command == "create":
        name = args.name
        if not name or "/" in name or name.startswith("."):
            raise CliError(f"invalid voice name {name!r}: use letters, digits, - or _")
        voice = Voice.from_files(
            name, args.speaker, [(args.clip, args.transcript), *[(c, t) for c, t in args.add]]
        )
        folder = root / name
        if (folder / "voice.json").is_file() and not args.force:
            raise CliError(f"a voice named {name!r} already exists in {root}; pass --force to replace it")
        voice.save(folder, overwrite=args.force)
        print(
            f"saved voice {name!r} ({len(voice.clips)} clip(s), {voice.seconds:.1f} s) to {folder}",
            file=sys.stderr,
        )
        return 0
    raise CliError("say what to do: `csm voice create NAME CLIP TRANSCRIPT` or `csm voice list`")


def cmd_demo(args) -> int:
    from .audio import save_audio
    from .demo import write_demo_checkpoint
    from .pipeline import pipeline

    print(
        "csm demo: a tiny model with RANDOM weights, built on the fly; its audio is noise, not speech.",
        file=sys.stderr,
    )
    start = time.perf_counter()
    folder = write_demo_checkpoint(args.checkpoint_dir)
    pipe = pipeline("text-to-audio", model=folder, device="cpu", dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights rarely end the audio on their own
        audio = pipe(args.text, seed=args.seed, max_seconds=1.0)["audio"]
    if len(audio) == 0:
        raise CliError("the demo model ended the audio at once; try another --seed")
    save_audio(audio, args.output, sampling_rate=pipe.sampling_rate)
    took = time.perf_counter() - start
    print(
        f"csm demo: wrote {args.output}: {len(audio) / pipe.sampling_rate:.1f} s of audio in {took:.1f} s "
        f"(processor, generation, codec, file: all working).\n"
        f'For real speech: csm say "Hello." -o hello.wav --model sesame/csm-1b '
        f"(gated: accept its terms on huggingface.co and run `huggingface-cli login`), or --model LOCAL_DIR.",
        file=sys.stderr,
    )
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_original_checkpoint

    config = None
    if args.config:
        from .config import CsmConfig

        config = CsmConfig.from_pretrained(args.config)
    convert_original_checkpoint(args.src, args.dst, codec=args.codec, config=config)
    print(f"csm: converted {args.src} to {args.dst}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    try:
        from . import server
    except ImportError as e:
        raise CliError(
            f"`csm serve` needs the server extra ({e.name or e}): pip install 'csm-speech[server]'"
        ) from None
    return int(server.main(args) or 0)


def cmd_finetune(argv: list[str]) -> int:
    try:
        from .train import add_finetune_arguments, run_finetune
    except ImportError as e:
        raise CliError(f"`csm finetune` is not available in this install ({e})") from None
    parser = argparse.ArgumentParser(prog="csm finetune", description="Fine-tune CSM on your recordings.")
    add_finetune_arguments(parser)
    return int(run_finetune(parser.parse_args(argv)) or 0)


# ---- entry point ------------------------------------------------------------------------------------


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"csm: warning: {str(message).splitlines()[0]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `csm` command; returns the exit code (errors print one line, never a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _one_line_warnings
    try:
        if argv[:1] == ["finetune"]:
            return cmd_finetune(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        command = {
            "say": cmd_say,
            "batch": cmd_batch,
            "voice": cmd_voice,
            "demo": cmd_demo,
            "convert": cmd_convert,
            "serve": cmd_serve,
        }
        return (getattr(args, "handler", None) or command[args.command])(args)
    except KeyboardInterrupt:
        print("csm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the player went away; nothing more to say
        return 1
    except (CliError, ValueError, FileNotFoundError, RuntimeError, OSError, TypeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"csm: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
