"""GPU figures in one run: correctness of the graphed and compiled steps, then speed against the reference.

    python bench/bench_gpu.py --out $OUT            # on a GPU machine (bench/gpu_suite.sh runs it)
    python bench/bench_gpu.py --device cpu --size tiny --budget 120   # a dry run of the plumbing anywhere

Full csm-1b size, random weights written by the reference (transformers) and loaded by ours, bf16 on the
GPU. Phases, most important first, each skipped once `--budget` seconds are spent:
  1. correctness: the graphed step (CUDA graphs) against the eager one, greedy, batch 2: in fp32 the codes
     must be equal; in bf16 codes part after a few frames (rounding on random weights), so the check is
     the codebook-0 logits of every frame whose codes still agree, within a tolerance; the compiled step's
     codes against the eager ones in fp32;
  2. kernels per frame on the GPU (profiler, CUDA kernels of one eager frame step at batch 1);
  3. ms per frame at batch 1: ours eager / graphed / compiled (+ graphed), int8 weights (graphed; refused by
     `from_pretrained` on CUDA, quantized here directly to keep the figure), the reference eager and with
     its static cache + torch.compile (what its docs recommend);
  4. time from `generate_stream` to the first audio chunk;
  5. frames per second and real-time streams at batch 1, 4, 16, 64 (graphed; compiled too with --compile);
  6. the codec's streaming decode per frame.
ms per frame is (time for F frames - time for 1 frame) / (F - 1), so prefill cancels out; medians of
`--repeats`. Prints a markdown table last and writes it, and every figure as JSON (`figures.json`, to commit
as bench/results/gpu-YYYY-MM-DD.json), under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import GREEDY, reference_model, weight_bytes_per_frame  # noqa: E402

from csm import CsmForConditionalGeneration  # noqa: E402
from csm.engine import FrameEngine, Sampling  # noqa: E402
from csm.generate import engine_for, finish  # noqa: E402
from csm.llama import fuse_projections  # noqa: E402
from csm.quant import QuantConfig, choose_modules, quantize_modules  # noqa: E402

FRAME_MS = 80.0  # one frame of audio


class Suite:
    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.rows: list[tuple[str, str, str]] = []  # (what, value, note)
        self.figures: dict[str, object] = {}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def record(self, what: str, value, note: str = "", fmt: str = "{:.2f}") -> None:
        self.figures[what] = value
        text = fmt.format(value) if isinstance(value, float) else str(value)
        self.rows.append((what, text, note))
        print(f"{what}: {text} {note}", flush=True)

    def phase(self, name: str, fn, *args) -> None:
        if self.left() <= 0:
            self.rows.append((name, "skipped", "out of time budget"))
            return
        print(f"--- {name} ({self.left():.0f} s left)", flush=True)
        try:
            fn(self, *args)
        except Exception as e:  # one phase failing must not cost the others
            traceback.print_exc()
            self.rows.append((name, "FAILED", f"{type(e).__name__}: {e}"[:200]))

    def table(self) -> str:
        lines = ["| what | value | note |", "|---|---|---|"]
        lines += [f"| {w} | {v} | {n} |" for w, v, n in self.rows]
        return "\n".join(lines)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ms_per_frame(run, frames: int, repeats: int, device) -> float:
    run(2)  # warm-up (captures, compiles)
    long = timed(lambda: run(frames), repeats, device)
    short = timed(lambda: run(1), repeats, device)
    return 1000 * (long - short) / (frames - 1)


def prompt(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 300, (batch, length), generator=g).to(model.device)


# ---- phases ------------------------------------------------------------------------------------------


def frames_and_logits(model, ids, frames: int, compile: bool = False, cuda_graph: bool = False):
    """Greedy codes (B, F, K) and, after each frame, the next codebook-0 logits (B, F, V) in fp32. A
    graphed or compiled engine is the one `generate` keeps on the model, so later calls reuse its graphs."""
    engine = engine_for(model, ids.shape[0], ids.shape[1] + frames + 1, compile, cuda_graph)
    engine.backbone_sampling.set(slice(None), Sampling(do_sample=False))
    engine.depth_sampling.set(slice(None), Sampling(do_sample=False))
    codes, logits = [], []
    try:
        with torch.inference_mode():
            engine.prefill(model.embed_inputs(ids)[0])
            for _ in range(frames):
                codes.append(engine.next_frame().clone())
                logits.append(model.lm_head(engine.hidden).float())
    finally:
        finish(engine)
    return torch.stack(codes, 1), torch.stack(logits, 1)


def against_eager(
    s: Suite, model, label: str, tolerance: float, batch: int = 2, compile: bool = False
) -> None:
    """Codes of the graphed (or compiled + graphed) step and the eager one, and the codebook-0 logits of
    every frame whose codes agree so far."""
    ids, n = prompt(model, batch, s.args.prompt), s.args.frames
    name = "compiled + graphed" if compile else "graphed"
    eager_codes, eager_logits = frames_and_logits(model, ids, n, cuda_graph=False)
    start = time.perf_counter()
    codes, logits = frames_and_logits(model, ids, n, cuda_graph=True, compile=compile)
    if compile:
        s.record(f"{name}: {n} frames incl. compile and capture", time.perf_counter() - start, "s", "{:.1f}")
    same = (eager_codes == codes).all(-1).all(0)  # (F,)
    agree = int(same.long().cumprod(0).sum())
    where = f"{label}, greedy, batch {batch}"
    s.record(f"{name} codes == eager ({where})", f"{agree}/{n} frames", "equal from the start")
    if agree == 0:
        s.record(f"{name} logits vs eager ({where})", "n/a", "the first frame already differs")
        return
    scale = eager_logits[:, :agree].abs().max()
    diff = float((logits[:, :agree] - eager_logits[:, :agree]).abs().max() / scale)
    s.record(
        f"{name} logits vs eager ({where}), max |diff| / max |logit|",
        diff,
        f"{'OK' if diff <= tolerance else 'FAIL'} (tolerance {tolerance:g}; frames 1..{agree})",
        "{:.2e}",
    )


def check_codes(s: Suite, ours, ours_fp32) -> None:
    if ours_fp32 is not None:
        against_eager(s, ours_fp32, "fp32", 1e-4)
    against_eager(s, ours, s.args.dtype, 5e-2)
    if s.args.compile:  # at batch 1, the compiled graph the speed phase reuses
        against_eager(s, ours, s.args.dtype, 5e-2, batch=1, compile=True)


def kernels_per_frame(s: Suite, ours) -> None:
    """CUDA kernels one eager frame step launches at batch 1 (what a CUDA graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    ids = prompt(ours, 1, s.args.prompt)
    engine = FrameEngine(ours, 1, ids.shape[1] + 8)
    engine.backbone_sampling.set(slice(None), Sampling(do_sample=False))
    engine.depth_sampling.set(slice(None), Sampling(do_sample=False))
    with torch.inference_mode():
        engine.prefill(ours.embed_inputs(ids)[0])
        engine.next_frame()
        sync(ours.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.next_frame()
            sync(ours.device)
    engine.release()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    s.record(
        "CUDA kernels per frame, eager step, batch 1", len(kernels), "profiler (the graph replays these)"
    )


def batch1_speed(s: Suite, ours, ref) -> None:
    dev, frames, repeats = ours.device, s.args.frames, s.args.repeats
    ids = prompt(ours, 1, s.args.prompt)
    variants = [("ours eager", dict(cuda_graph=False)), ("ours graphed", dict(cuda_graph=True))]
    if s.args.compile:
        variants.append(("ours compiled + graphed", dict(compile=True, cuda_graph=True)))
    for name, options in variants:
        ms = ms_per_frame(
            lambda n, o=options: ours.generate(input_ids=ids, max_new_tokens=n, **o, **GREEDY),
            frames,
            repeats,
            dev,
        )
        s.figures.setdefault("batch1", {})[name] = ms
        s.record(f"{name}, batch 1", ms, "ms/frame")
    if ref is None:
        return
    ref_ids = ids.clone()

    def run_ref(n):
        with torch.no_grad():
            ref.generate(input_ids=ref_ids, max_new_tokens=n, **GREEDY)

    ms = ms_per_frame(run_ref, max(frames // 2, 4), repeats, dev)
    s.record("reference eager, batch 1", ms, "ms/frame")
    if s.left() > 60 and dev.type == "cuda":
        ref.generation_config.cache_implementation = "static"
        ref.depth_decoder.generation_config.cache_implementation = "static"
        ms = ms_per_frame(run_ref, max(frames // 2, 4), repeats, dev)
        s.record("reference static cache + compile, batch 1", ms, "ms/frame")
    best = min(s.figures["batch1"].values())
    bound = 1000 * weight_bytes_per_frame(ours) / (s.args.bandwidth * 1e9)
    s.record("weights-read bound", bound, f"ms/frame at {s.args.bandwidth:.0f} GB/s")
    s.record("ours best / bound", best / bound, "x")


def int8_speed(s: Suite, folder: str) -> None:
    """Graphed ms/frame with int8 weights (refused by from_pretrained on CUDA; quantized directly here)."""
    model = CsmForConditionalGeneration.from_pretrained(
        folder, dtype=getattr(torch, s.args.dtype), device=s.args.device
    )
    config = QuantConfig("int8")
    config.modules = choose_modules(model, config)
    quantize_modules(model, config)
    fuse_projections(model)
    model.quantization = config
    ids = prompt(model, 1, s.args.prompt)
    ms = ms_per_frame(
        lambda n: model.generate(input_ids=ids, max_new_tokens=n, cuda_graph=True, **GREEDY),
        s.args.frames,
        s.args.repeats,
        model.device,
    )
    s.record("int8 weights, graphed, batch 1", ms, "ms/frame (refused on CUDA; bf16 above)")


def first_chunk(s: Suite, ours) -> None:
    ids = prompt(ours, 1, s.args.prompt)

    def latency():
        sync(ours.device)
        t = time.perf_counter()
        stream = ours.generate_stream(
            input_ids=ids, max_new_tokens=50, chunk_frames=s.args.chunk, cuda_graph=True
        )
        next(iter(stream))
        sync(ours.device)
        elapsed = time.perf_counter() - t
        stream.close()
        return elapsed

    latency()  # warm-up
    ms = 1000 * statistics.median(latency() for _ in range(s.args.repeats))
    s.record(f"first audio chunk ({s.args.chunk} frames), batch 1", ms, "ms after the call")


def throughput(s: Suite, ours, compile_batches: list[int] | None = None) -> None:
    compile = compile_batches is not None
    name = "compiled + graphed" if compile else "graphed"
    for batch in compile_batches if compile else s.args.batches:
        if s.left() <= 0:
            break
        ids = prompt(ours, batch, s.args.prompt, seed=batch)
        ms = ms_per_frame(
            lambda n, ids=ids: ours.generate(
                input_ids=ids, max_new_tokens=n, cuda_graph=True, compile=compile, **GREEDY
            ),
            s.args.frames,
            s.args.repeats,
            ours.device,
        )
        s.record(
            f"{name}, batch {batch}",
            ms,
            f"ms/frame; {1000 * batch / ms:.0f} frames/s; {FRAME_MS / ms:.1f}x real time per stream",
        )


def codec_decode(s: Suite, ours) -> None:
    codec, K = ours.codec_model, ours.config.num_codebooks
    for batch, chunk in ((1, 1), (1, 4), (16, 4)):
        codes = torch.randint(0, 2048, (batch, K, 64), device=ours.device)
        decoder = codec.streaming_decoder(batch)

        def run(decoder=decoder, codes=codes, chunk=chunk):
            for t in range(0, codes.shape[-1], chunk):
                decoder.step(codes[..., t : t + chunk])

        run()
        decoder.reset()
        seconds = timed(run, s.args.repeats, ours.device)
        s.record(
            f"codec streaming decode, batch {batch}, {chunk} frames a step", 1000 * seconds / 64, "ms/frame"
        )
    # The server's case: 16 requests' streams, each at its own point; a decoder each, or one for all rows.
    rows = 16
    codes = torch.randint(0, 2048, (rows, K, 64), device=ours.device)
    own = [codec.streaming_decoder(1) for _ in range(rows)]
    shared, index = codec.streaming_decoder(rows), list(range(rows))

    def per_request():
        for t in range(0, 64, 4):
            for r, decoder in enumerate(own):
                decoder.step(codes[r : r + 1, :, t : t + 4])

    def together():
        for t in range(0, 64, 4):
            shared.step(codes[..., t : t + 4], index)

    for name, run in (("a decoder per request", per_request), ("one call for all rows", together)):
        seconds = timed(run, s.args.repeats, ours.device)
        s.record(
            f"codec decode of {rows} streams, {name}", 1000 * seconds / 64, "ms per frame of all streams"
        )


def write_checkpoint(folder: Path, size: str, dtype: torch.dtype) -> None:
    """A servable checkpoint: the reference's random model of `size` with the demo's tokenizer and template."""
    from csm.demo import write_demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_checkpoint(Path(tmp) / "demo")
        folder.mkdir(parents=True, exist_ok=True)
        for f in demo.iterdir():
            if f.name not in ("config.json", "model.safetensors", "generation_config.json", "DEMO"):
                (folder / f.name).write_bytes(f.read_bytes())
    reference_model(size, dtype).save_pretrained(folder)


def run_info(device_name: str, args) -> dict:
    """What a figures.json needs to be read later: when, where, with what."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "torch": torch.__version__,
        "commit": commit,
        "size": args.size,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt,
        "frames": args.frames,
        "repeats": args.repeats,
    }


# ---- main --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=64, help="prompt length in text tokens")
    ap.add_argument(
        "--chunk", type=int, default=2, help="frames per streamed chunk for the first-chunk figure"
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument(
        "--compile-batches",
        type=int,
        nargs="+",
        default=[64],
        help="batches for the compiled throughput (each new size past 1 may compile again)",
    )
    ap.add_argument("--budget", type=float, default=330, help="seconds for all phases")
    ap.add_argument(
        "--bandwidth", type=float, default=4300, help="device memory GB/s for the bound (H200 copy)"
    )
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile figures")
    ap.add_argument("--no-reference", dest="reference", action="store_false")
    ap.add_argument("--out", default=None, help="folder for table.md and figures.json")
    ap.add_argument(
        "--write-checkpoint", metavar="DIR", help="only write a servable checkpoint of --size there"
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.write_checkpoint:
        write_checkpoint(Path(args.write_checkpoint), args.size, dtype)
        return 0
    suite = Suite(args)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, size {args.size}, {args.dtype}", flush=True)
    ref = reference_model(args.size, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = CsmForConditionalGeneration.from_pretrained(tmp, dtype=dtype, device=device)
        ours_fp32 = None
        if dtype != torch.float32:
            ours_fp32 = CsmForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32, device=device)
        ref = ref.to(device) if args.reference else None
        suite.record("set-up", time.perf_counter() - suite.start, "s (build, save, load)", "{:.0f}")
        suite.phase("correctness", check_codes, ours, ours_fp32)
        del ours_fp32
        if device.type == "cuda":
            suite.phase("kernels", kernels_per_frame, ours)
        suite.phase("batch 1 speed", batch1_speed, ours, ref)
        del ref
        if device.type == "cuda":
            suite.phase("int8", int8_speed, tmp)
    suite.phase("first audio chunk", first_chunk, ours)
    suite.phase("throughput", throughput, ours)
    suite.phase("codec", codec_decode, ours)
    if args.compile:
        suite.phase("throughput compiled", throughput, ours, args.compile_batches)
    table = suite.table()
    size = "csm-1b size" if args.size == "full" else "tiny"
    header = (
        f"{name}, torch {torch.__version__}, {size} random weights, {args.dtype}, prompt {args.prompt} tokens"
    )
    print("\n" + header + "\n\n" + table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "table.md").write_text(header + "\n\n" + table + "\n")
        figures = {"run": run_info(name, args), **suite.figures}
        (Path(args.out) / "figures.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
