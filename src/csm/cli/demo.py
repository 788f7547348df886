"""`csm demo`: the whole path offline on a tiny random-weight model (its audio is noise)."""

from __future__ import annotations

import sys
import time
import warnings

from .common import CliError


def add_parser(sub) -> None:
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
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args) -> int:
    from ..audio import save_audio
    from ..demo import write_demo_checkpoint
    from ..pipeline import pipeline

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
