"""Mimi encode/decode speed: ours against the reference (transformers' MimiModel) in the same run.

    python bench/bench_codec.py                      # random weights, default (kyutai/mimi) config
    python bench/bench_codec.py --checkpoint kyutai/mimi --seconds 10 --repeats 9

Both models hold the same weights; ours and the reference's calls alternate, so both see the same
machine load, and each figure is the median of the repeats. Also times our streaming decoder per frame,
early in a stream and after it has run past the transformer's 250-step window
(the default 300 frames are 600 transformer steps); and `--rows N ...` streams decoded side by side, as a
server's requests are: one decoder per stream against one shared decoder that steps all rows in one call.

    python bench/bench_codec.py --rows 1 4 16 --only-rows    # the shared decoder only (no reference)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from csm.llama import prepack, unpack
from csm.mimi import MimiModel


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(ours_fn, reference_fn, repeats: int) -> tuple[float, float]:
    """Median seconds of ours and of the reference, calls alternating, after one warm-up each."""
    ours_fn(), reference_fn()
    ours, reference = [], []
    for _ in range(repeats):
        ours.append(timed(ours_fn))
        reference.append(timed(reference_fn))
    return statistics.median(ours), statistics.median(reference)


def load_models(checkpoint: str | None):
    import transformers

    if checkpoint is None:
        torch.manual_seed(0)
        reference = transformers.MimiModel(transformers.MimiConfig())
        with torch.no_grad():  # the reference's init leaves codebooks at zero: give them random centroids
            for name, buffer in reference.named_buffers():
                if name.endswith("embed_sum"):
                    buffer.normal_()
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            return MimiModel.from_pretrained(folder), reference.eval()
    return MimiModel.from_pretrained(checkpoint), transformers.MimiModel.from_pretrained(checkpoint).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="Mimi checkpoint folder or hub id (default: random weights)")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length per clip")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stream-frames", type=int, default=300, help="frames to stream through our decoder")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--rows", type=int, nargs="*", default=[4, 16], help="streams decoded side by side")
    parser.add_argument("--chunk", type=int, default=4, help="frames per step of those streams")
    parser.add_argument("--only-rows", action="store_true", help="time the side-by-side streams only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, reference = load_models(args.checkpoint)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores "
        f"({platform.machine()}), load average {os.getloadavg()[0]:.2f} at start"
    )
    print(f"{args.seconds:g} s clips, median of {args.repeats}; speedup = reference time / our time\n")
    print(f"{'':8} {'batch':>5} {'ours (s)':>9} {'ref (s)':>9} {'speedup':>8} {'ours x realtime':>16}")
    samples = int(args.seconds * ours.sampling_rate)
    if args.only_rows:
        args.batch, args.stream_frames = [], 0
    with torch.inference_mode():
        for batch in args.batch:
            audio = torch.randn(batch, 1, samples, generator=torch.Generator().manual_seed(0)) * 0.1
            codes = ours.encode(audio).audio_codes
            rows = {
                "encode": compare(
                    lambda a=audio: ours.encode(a), lambda a=audio: reference.encode(a), args.repeats
                ),
                "decode": compare(
                    lambda c=codes: ours.decode(c), lambda c=codes: reference.decode(c), args.repeats
                ),
            }
            for name, (mine, theirs) in rows.items():
                realtime = batch * args.seconds / mine
                print(
                    f"{name:8} {batch:>5} {mine:>9.3f} {theirs:>9.3f} {theirs / mine:>7.2f}x {realtime:>15.1f}x"
                )

        codes = torch.randint(
            0, ours.config.codebook_size, (1, ours.config.num_quantizers, args.stream_frames)
        )
        for packed in (
            (False, True) if args.stream_frames else ()
        ):  # generate prepacks the transformer's weights (csm.llama.prepack)
            prepack(ours) if packed else unpack(ours)
            stream = ours.streaming_decoder(batch_size=1)
            per_frame = [
                timed(lambda i=i, s=stream: s.step(codes[..., i : i + 1])) for i in range(args.stream_frames)
            ]
            early, late = statistics.median(per_frame[1:51]), statistics.median(per_frame[-50:])
            print(
                f"\nstreaming decode{' (prepacked)' if packed else ''}, batch 1, one frame (80 ms of audio) "
                f"per step: median {early * 1e3:.1f} ms over frames 2-51, {late * 1e3:.1f} ms over the last "
                f"50 of {args.stream_frames}"
            )
        prepack(ours)
        for rows in args.rows:
            own, shared = side_by_side(ours, rows, args.chunk, args.repeats)
            print(
                f"\n{rows} streams, {args.chunk} frames each per step (prepacked): a decoder per stream "
                f"{own * 1e3:.1f} ms, one shared decoder {shared * 1e3:.1f} ms per step ({own / shared:.2f}x); "
                f"{shared * 1e3 / (rows * args.chunk):.2f} ms per frame shared"
            )
        print(f"\nload average {os.getloadavg()[0]:.2f} at end")


def side_by_side(ours: MimiModel, rows: int, chunk: int, repeats: int) -> tuple[float, float]:
    """Seconds per step of `rows` streams, `chunk` frames each: a decoder each, and one shared decoder."""
    gen = torch.Generator().manual_seed(1)
    Q, size = ours.config.num_quantizers, ours.config.codebook_size
    codes = torch.randint(0, size, (rows, Q, chunk), generator=gen)
    own = [ours.streaming_decoder(batch_size=1) for _ in range(rows)]
    shared = ours.streaming_decoder(batch_size=rows)
    for r in range(rows):  # each stream at its own point, as requests that arrived at different times
        start = torch.randint(0, size, (1, Q, 1 + 3 * r), generator=gen)
        own[r].step(start)
        shared.step(start, [r])
    index = list(range(rows))
    times_own, times_shared = [], []
    for _ in range(repeats):  # alternating, so both see the same load
        times_own.append(timed(lambda: [d.step(codes[r : r + 1]) for r, d in enumerate(own)]))
        times_shared.append(timed(lambda: shared.step(codes, index)))
    return statistics.median(times_own), statistics.median(times_shared)


if __name__ == "__main__":
    main()
