"""Conversations that remember: time to first audio with the prefix store on and off (CSM_PREFIX_CACHE=0),
in the same run, alternating, on the same random weights.

    python bench/bench_conversation.py --size tiny                        # seconds: checks the whole path
    python bench/bench_conversation.py --size full --checkpoint /tmp/conv_ckpt --rounds 10

Scenarios (`--scenarios`, default all):
- conversation: a bound voice of `--voice-seconds` (10 s), then each round the user adds a `--user-seconds` (4 s)
  turn with its audio and the agent says one sentence (`stream`, chunk_frames=1): first audio per round.
- voice: a saved voice's first and second request against a request with no voice (first audio).
- longtext: 8 sentences, each spoken in the context of those before: each sentence's first audio (from the
  start of its generate_stream call to its first chunk).
- batch: `csm batch` of `--lines` lines in one voice: lines per second as the CLI reports them (a process each).

Greedy decoding, so both sides say the same; replies are capped at `--reply-seconds`. The full size is csm-1b's
shape with random bf16 weights loaded the CPU default's way (csm.pipeline), the tests' tiny tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from csm.demo import write_demo_checkpoint  # noqa: E402
from csm.pipeline import pipeline  # noqa: E402
from csm.prefix_cache import prefix_stats  # noqa: E402
from csm.voice import Voice  # noqa: E402

GREEDY = dict(do_sample=False)
SENTENCES = [
    "The first thing to say is short.",
    "Then comes a second sentence.",
    "A third one follows it closely.",
    "The fourth keeps the thread going.",
    "Halfway there, a fifth one.",
    "The sixth is nearly the end.",
    "A seventh before the last.",
    "And this is the eighth sentence.",
]


def speech(seconds: float, seed: int) -> np.ndarray:
    """A stand-in for speech: noise shaped by a slow envelope (the codec's codes vary with it)."""
    rng = np.random.default_rng(seed)
    n = int(24000 * seconds)
    envelope = 0.5 + 0.5 * np.sin(np.linspace(0, 6 * np.pi * seconds, n))
    return (0.1 * rng.standard_normal(n) * envelope).astype(np.float32)


def cache(on: bool) -> None:
    os.environ["CSM_PREFIX_CACHE"] = "1" if on else "0"


def first_audio(chunks) -> tuple[float, int]:
    """Seconds to the first chunk of an audio iterator, and the samples it gave in all (consumed whole)."""
    start = time.perf_counter()
    first, samples = None, 0
    for piece in chunks:
        if first is None and len(piece):
            first = time.perf_counter() - start
        samples += len(piece)
    return first if first is not None else float("nan"), samples


def conversation(tts, voice, args) -> None:
    print(
        f"\n## conversation: a bound {args.voice_seconds:g} s voice, {args.user_seconds:g} s user turns, one sentence a round"
    )
    convs = {
        on: tts.conversation(voices={0: voice}, seed=1, max_seconds=args.reply_seconds, **GREEDY)
        for on in (True, False)
    }
    rows = []
    for r in range(args.rounds):
        row = {}
        for on in (True, False) if r % 2 == 0 else (False, True):  # alternating which goes first
            cache(on)
            conv = convs[on]
            conv.add(1, f"This is what the user said in round {r}.", audio=speech(args.user_seconds, 100 + r))
            row[on], _ = first_audio(conv.stream(0, f"And this is my answer number {r}.", chunk_frames=1))
        rows.append(row)
        print(f"round {r + 1:2d}: store {row[True]:7.2f} s   no store {row[False]:7.2f} s", flush=True)
    on, off = [r[True] for r in rows], [r[False] for r in rows]
    print(
        f"last round / round 1: store {on[-1] / on[0]:.2f}x, no store {off[-1] / off[0]:.2f}x; "
        f"last round no store / store {off[-1] / on[-1]:.2f}x"
    )


def voice_requests(tts, voice, args) -> None:
    print("\n## voice: first audio of a request with a saved voice (first and second time) and with none")
    times = {"no voice": [], "voice, first": [], "voice, second": []}
    for rep in range(args.repeats):
        tts.model._prefix_store = None  # the voice is new to the store each repeat
        cache(True)
        text = f"Hello there, this is request {rep}."
        times["no voice"].append(
            first_audio(tts.stream(text, chunk_frames=1, max_seconds=args.reply_seconds, **GREEDY))[0]
        )
        for label in ("voice, first", "voice, second"):
            t, _ = first_audio(
                tts.stream(text, voice=voice, chunk_frames=1, max_seconds=args.reply_seconds, **GREEDY)
            )
            times[label].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:14s} {v:7.2f} s (median of {args.repeats})")
    print(
        f"second / no voice {med['voice, second'] / med['no voice']:.2f}x; first / no voice {med['voice, first'] / med['no voice']:.2f}x"
    )


def long_text(tts, voice, args) -> None:
    print("\n## longtext: 8 sentences in one call, each in the context of those before")
    model = tts.model
    real = model.generate_stream
    for on in (True, False):
        cache(on)
        starts: list[float] = []

        def timed_stream(*a, starts=starts, **k):
            starts.append(time.perf_counter())
            it = real(*a, **k)
            first = True
            for item in it:
                if first:
                    starts[-1] = time.perf_counter() - starts[-1]
                    first = False
                yield item

        model.generate_stream = timed_stream
        try:
            first_audio(
                tts.stream(
                    " ".join(SENTENCES),
                    voice=voice,
                    chunk_frames=1,
                    max_chunk_chars=40,
                    max_seconds=args.reply_seconds,
                    **GREEDY,
                )
            )
        finally:
            model.generate_stream = real
        label = "store" if on else "no store"
        print(
            f"{label:9s} "
            + " ".join(f"{t:5.2f}" for t in starts)
            + f"   sentence 8 / sentence 2: {starts[-1] / starts[1]:.2f}x"
        )


def batch(folder: str, voice_dir: str, args) -> None:
    print(
        f"\n## batch: csm batch of {args.lines} lines in one voice (a process each; lines over the run's seconds)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "lines.jsonl"
        lines.write_text(
            "".join(json.dumps({"id": f"l{i}", "text": SENTENCES[i % 8]}) + "\n" for i in range(args.lines))
        )
        rates = {}
        for on in (False, True):
            env = {**os.environ, "CSM_PREFIX_CACHE": "1" if on else "0"}
            out = Path(tmp) / f"out-{int(on)}"
            cmd = [
                sys.executable,
                "-m",
                "csm",
                "batch",
                str(lines),
                "-o",
                str(out),
                "--model",
                folder,
                "--voice",
                voice_dir,
                "--max-seconds",
                str(args.reply_seconds),
                "--seed",
                "1",
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            # "N ok, ... X s of audio in Y s (...)": lines over the seconds the run took, not the rounded lines/s
            m = re.search(r"(\d+) ok, .*? of audio in ([\d.]+) s \(", done.stdout + done.stderr)
            if done.returncode or not m:
                print(done.stdout[-2000:], done.stderr[-2000:])
                return
            rates[on] = int(m.group(1)) / float(m.group(2))
            print(f"{'store' if on else 'no store':9s} {rates[on]:.3f} lines/s", flush=True)
        print(f"store / no store {rates[True] / rates[False]:.2f}x")


def full_checkpoint(folder: str) -> None:
    """csm-1b's shape with random bf16 weights and the demo's tokenizer (its special ids in the config)."""
    from csm import CsmForConditionalGeneration
    from csm.config import CsmConfig
    from csm.demo import CHAT_TEMPLATE, demo_tokenizer
    from csm.processor import CsmProcessor

    if (Path(folder) / "config.json").exists():
        return
    torch.manual_seed(0)
    ids = dict(bos_token_id=1, pad_token_id=2, eos_token_id=0, audio_token_id=2, audio_eos_token_id=3)
    model = CsmForConditionalGeneration(CsmConfig(**ids)).eval()
    with torch.no_grad():  # as a trained model would: never pick ids the codec lacks
        model.lm_head.weight[2048:] = 0
        model.depth_decoder.codebooks_head.weight[..., 2048:] = 0
    model.to(torch.bfloat16).save_pretrained(folder)
    CsmProcessor(demo_tokenizer(), CHAT_TEMPLATE).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument(
        "--checkpoint", default=None, help="keep the full-size random weights here and reuse them"
    )
    parser.add_argument("--scenarios", nargs="+", default=["conversation", "voice", "longtext", "batch"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--voice-seconds", type=float, default=10.0)
    parser.add_argument("--user-seconds", type=float, default=4.0)
    parser.add_argument("--reply-seconds", type=float, default=1.0)
    parser.add_argument("--lines", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "tiny":
            folder = str(write_demo_checkpoint(Path(tmp) / "demo"))
        else:
            folder = args.checkpoint or os.path.join(tmp, "full")
            full_checkpoint(folder)
        print(
            f"csm conversation bench, {args.size}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
        )
        tts = pipeline("text-to-audio", model=folder, device="cpu")
        voice = Voice(
            "bench",
            0,
            [(speech(args.voice_seconds, 7), "This is how the bound voice sounds when it speaks.")],
        )
        voice_dir = str(voice.save(Path(tmp) / "voice"))
        for name in args.scenarios:
            if name == "batch":
                batch(folder, voice_dir, args)
            else:
                {"conversation": conversation, "voice": voice_requests, "longtext": long_text}[name](
                    tts, voice, args
                )
        cache(True)
        print("\nstore:", prefix_stats(tts.model))


if __name__ == "__main__":
    main()
