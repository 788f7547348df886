"""Quantized weights at csm-1b size on the CPU: speed, bytes, memory and accuracy against bf16, in one run.

    flock /tmp/csm-heavy.lock python bench/bench_quant.py                      # every variant, batch 1 and 8
    flock /tmp/csm-heavy.lock python bench/bench_quant.py --no-accuracy        # speed and memory only
    flock /tmp/csm-heavy.lock python bench/bench_quant.py --kernels            # one product per shape

Random weights at the full size are written once (bf16, by the reference, to a temporary folder). Each
variant then runs in a process of its own, so its RSS is its own and only one model is in memory at a time:
ours in bf16 and fp32, int8 and int4 (on a bf16 model, and with `-fp32` on an fp32 one), and the reference
in bf16. ms per frame is bench_generate's: (time for F frames - time for 1 frame) / (F - 1), greedy, medians.
Bytes per frame: the weights a frame reads (backbone and codebook-0 head once, depth decoder, projector
and one codebook head per codebook 1..31); the bound is those bytes over the fastest matrix-vector
streaming measured on this machine (bench_generate.matvec_bandwidth, fp32 and bf16, csm's kernels included).

Accuracy against our bf16 model (random weights cannot judge audio, so what can be measured): the relative
error of each decoder layer's output and of the logits, teacher-forced on bf16's own greedy frames; the
share of those frames' codes each variant picks too (teacher-forced), and the share of greedy codes equal
to bf16's when each runs free for `--accuracy-frames` frames.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import GREEDY, matvec_bandwidth, reference_model, timed  # noqa: E402

from csm import CsmForConditionalGeneration  # noqa: E402
from csm.quant import QuantConfig, make_linear  # noqa: E402

VARIANTS = ["bf16", "fp32", "int8", "int4", "int8-fp32", "int4-fp32", "bf16w-fp32", "fp16w-fp32", "reference"]
# "bf16w-fp32": quantize="bf16" (16-bit weights under an fp32 model). A variant ending in ":torch" runs with
# CSM_CPU_KERNELS=0 (PyTorch's kernels, what csm ran before csm/cpu_kernels.py), ":ours" with =1 (csm's
# kernels also where they are not the default, as on AMX CPUs), ":avx2", ":avx512", ":avx512bf16" with =1 and
# CSM_CPU_KERNELS_ISA naming that variant of csm's kernels (AVX2 code on an AVX-512 CPU, for comparisons).
ISAS = ("avx2", "avx512", "avx512bf16")
CODES = 2048  # ids the codec decodes: what greedy picks among


def rss_mb() -> dict[str, float]:
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def load(variant: str, folder: str, group_size: int):
    if variant == "reference":
        from transformers import CsmForConditionalGeneration as Reference

        return Reference.from_pretrained(folder, dtype=torch.bfloat16).eval()
    variant = variant.split(":")[0]
    scheme, _, dtype = variant.partition("-")  # "int8-fp32": int8 on an fp32 model; "int8": on a bf16 one
    quantize = {"int8": "int8", "int4": "int4", "bf16w": "bf16", "fp16w": "fp16"}.get(scheme)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype or ("bf16" if quantize else scheme)]
    return CsmForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, quantize=quantize, group_size=group_size if quantize == "int4" else None
    )


def frame_cost(run, ids, frames: int, repeats: int) -> tuple[float, float]:
    """bench_generate's ms per frame, and the same in CPU time (all threads): on a machine shared with other
    work, wall time counts their load too, CPU time much less so."""
    run(ids, 2)  # warm-up
    wall, cpu = {frames: [], 1: []}, {frames: [], 1: []}
    for _ in range(repeats):
        for n in (frames, 1):
            w, c = time.perf_counter(), time.process_time()
            run(ids, n)
            wall[n].append(time.perf_counter() - w)
            cpu[n].append(time.process_time() - c)
    per = lambda t: 1000 * (statistics.median(t[frames]) - statistics.median(t[1])) / (frames - 1)  # noqa: E731
    return per(wall), per(cpu)


def weight_bytes_per_frame(model) -> int:
    """Bytes of weights one frame reads (quantized tensors included; caches and tables left out)."""

    def size(m):  # a fused q/k/v buffer and its layers' views of it count once
        largest: dict[int, int] = {}
        for n, t in [*m.named_parameters(), *m.named_buffers()]:
            if "kv_cache" not in n:
                key = t.untyped_storage().data_ptr()
                largest[key] = max(largest.get(key, 0), t.numel() * t.element_size())
        return sum(largest.values())

    backbone = size(model.backbone_model.layers) + size(model.lm_head)
    dd = model.depth_decoder.model
    head = size(model.depth_decoder.codebooks_head) // (model.config.num_codebooks - 1)  # one per pass
    per_codebook = size(dd.layers) + size(dd.inputs_embeds_projector) + head
    return backbone + (model.config.num_codebooks - 1) * per_codebook


def prompt(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(batch))


# ---- accuracy ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, frames: torch.Tensor) -> dict:
    """Every decoder layer's output, the logits and the greedy picks for `frames` (1, F, K) after prompt
    `ids` (1, T), each frame predicted from the frames before it."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out, key=f"{part}.{i}": outputs.__setitem__(key, out.float())
        )
        for part, stack in (
            ("backbone", model.backbone_model.layers),
            ("depth", model.depth_decoder.model.layers),
        )
        for i, layer in enumerate(stack)
    ]
    try:
        embeds = model.embed_inputs(ids)[0]
        frame_embeds = model.backbone_model.embed_tokens(frames[:, :-1]).to(embeds.dtype)
        hidden = model.backbone_model(inputs_embeds=torch.cat([embeds, frame_embeds], 1)).last_hidden_state
        hidden = hidden[0, ids.shape[1] - 1 :]  # (F, D): the state each frame is drawn from
        logits0 = model.lm_head(hidden).float()  # (F, V)
        depth_in = F.pad(frames[0, :, :-1], (1, 0))  # (F, K): position 0 is the backbone state
        depth = model.depth_decoder(depth_in, hidden).logits.float()  # (F, K-1, V)
    finally:
        for h in hooks:
            h.remove()
    picks = torch.cat([logits0[:, None, :CODES], depth[..., :CODES]], 1).argmax(-1)  # (F, K)
    return {"layers": outputs, "logits0": logits0, "depth_logits": depth, "picks": picks}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def weight_errors(model, folder: str) -> dict[str, float]:
    """Relative error of each quantized weight against the checkpoint's bf16 one, averaged per kind."""
    from safetensors import safe_open

    if model.quantization is None:
        return {}
    kinds: dict[str, list[float]] = {}
    with safe_open(Path(folder) / "model.safetensors", framework="pt") as f:
        for name in model.quantization.modules:
            m = model.get_submodule(name)
            w = f.get_tensor(name + ".weight").float()
            if hasattr(m, "dequantized"):
                deq = m.dequantized()
            else:
                deq = m.qweight.float() * m.scales.float()[:, None]
            kind = ("backbone." if name.startswith("backbone") else "depth.") + name.rsplit(".", 1)[-1]
            kinds.setdefault(kind, []).append(rel(deq, w))
    return {k: statistics.mean(v) for k, v in sorted(kinds.items())}


def accuracy(model, variant: str, folder: str, probe_file: Path, frames: int) -> dict:
    ids = prompt(1, 32, model.config.text_vocab_size)
    codes = model.generate(input_ids=ids, max_new_tokens=frames, **GREEDY)
    if variant == "bf16":  # the first variant of an accuracy run
        torch.save({"codes": codes, **teacher_forced(model, ids, codes)}, probe_file)
        return {"frames": codes.shape[1]}
    ref = torch.load(probe_file)
    got = teacher_forced(model, ids, ref["codes"])
    n = min(codes.shape[1], ref["codes"].shape[1])
    same = codes[:, :n] == ref["codes"][:, :n]
    differs = (~same).any(-1)[0]
    return {
        "layers": {k: rel(v, ref["layers"][k]) for k, v in got["layers"].items()},
        "logits0": rel(got["logits0"], ref["logits0"]),
        "depth_logits": rel(got["depth_logits"], ref["depth_logits"]),
        "teacher_forced_same_codes": float((got["picks"] == ref["picks"]).float().mean()),
        "teacher_forced_same_codebook0": float((got["picks"][:, 0] == ref["picks"][:, 0]).float().mean()),
        "free_running_same_codes": float(same.float().mean()),
        "free_running_frames_before_first_difference": int(differs.float().argmax()) if differs.any() else n,
        "weights": weight_errors(model, folder),
    }


# ---- one variant, in its own process ------------------------------------------------------------------------


def run_variant(args) -> dict:
    before = rss_mb()  # the interpreter, torch and csm imported: what the model's memory comes on top of
    start = time.perf_counter()
    model = load(args.variant, args.folder, args.group_size)
    from csm import cpu_kernels

    result = {"variant": args.variant, "load_s": time.perf_counter() - start, "rss_after_load_mb": rss_mb()}
    result["rss_before_load_mb"] = before
    result["cpu_kernels"] = cpu_kernels.available()
    tensors = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    result["model_mb"] = sum(t.untyped_storage().nbytes() for t in tensors.values()) / 2**20  # codec included
    reference = args.variant == "reference"
    if not reference:
        result["bytes_per_frame"] = weight_bytes_per_frame(model)

    def run(ids, n):
        with torch.inference_mode():
            model.generate(input_ids=ids, max_new_tokens=n, **GREEDY)

    import warnings

    warnings.simplefilter("ignore")
    vocab = model.config.text_vocab_size
    result["ms_per_frame"], result["cpu_ms_per_frame"] = {}, {}
    for b in args.batch:
        result["ms_per_frame"][b], result["cpu_ms_per_frame"][b] = frame_cost(
            run, prompt(b, 32, vocab), args.frames, args.repeats
        )
    if args.prefill:
        ids = prompt(1, args.prefill, vocab)
        result["prefill_ms"] = 1000 * timed(lambda: run(ids, 1), args.repeats)
    result["rss_after_generate_mb"] = rss_mb()
    if args.accuracy and not reference:
        result["accuracy"] = accuracy(
            model, args.variant, args.folder, Path(args.probe), args.accuracy_frames
        )
    return result


# ---- the whole run --------------------------------------------------------------------------------------------


def write_checkpoint(folder: str) -> None:
    model = reference_model("full", torch.bfloat16)
    model.save_pretrained(folder)


def run_child(args, variant: str, folder: str, tmp: str) -> dict | None:
    """One variant in a process of its own: its figures, or None (with its error printed) when it failed."""
    cmd = [sys.executable, __file__, "--variant", variant, "--folder", folder, "--probe", os.path.join(tmp, "probe.pt"),
           "--frames", str(args.frames), "--repeats", str(args.repeats), "--group-size", str(args.group_size),
           "--prefill", str(args.prefill), "--accuracy-frames", str(args.accuracy_frames),
           "--batch", *map(str, args.batch)] + ([] if args.accuracy else ["--no-accuracy"])  # fmt: skip
    load = os.getloadavg()[0]
    suffix = variant[variant.find(":") + 1 :] if ":" in variant else ""
    kernels = {"torch": "0", "ours": "1", **dict.fromkeys(ISAS, "1")}.get(suffix)
    env = dict(os.environ, **({"CSM_CPU_KERNELS": kernels} if kernels else {}))
    if suffix in ISAS:
        env["CSM_CPU_KERNELS_ISA"] = suffix
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        print(f"{variant} failed:\n{out.stderr[-3000:]}", flush=True)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["load_average"] = [load, os.getloadavg()[0]]  # 1-minute load before and after: others' work
    print(
        f"{variant}: " + ", ".join(f"batch {b} {ms:.0f} ms/frame" for b, ms in r["ms_per_frame"].items()),
        flush=True,
    )
    return r


def print_rounds(rounds: list[list[dict]]) -> None:
    """Medians over rounds of ms/frame and of each round's speed-up on that round's fp32 (the machine's
    speed drifts between rounds; a ratio within one round does not see most of it)."""
    print(f"\nmedians over {len(rounds)} rounds (variants rotated each round)")
    print("| variant | batch | ms/frame | speed-up on our fp32, same round | speed-ups per round |")
    print("|---|---|---|---|---|")
    names = [r["variant"] for r in rounds[0]]
    for name in names:
        for b in rounds[0][names.index(name)]["ms_per_frame"]:
            ms, ups = [], []
            for results in rounds:
                by = {r["variant"]: r["ms_per_frame"][b] for r in results}
                if name in by:
                    ms.append(by[name])
                    if "fp32" in by:
                        ups.append(by["fp32"] / by[name])
            med = statistics.median(ups) if ups else float("nan")
            print(
                f"| {name} | {b} | {statistics.median(ms):.0f} | {med:.2f}x | {', '.join(f'{u:.2f}' for u in ups)} |"
            )


def print_summary(results: list[dict], bandwidth: float) -> None:
    base = {b: ms for r in results if r["variant"] == "fp32" for b, ms in r["ms_per_frame"].items()}
    print(f"\nmatvec bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(
        "| variant | batch | ms/frame | speed-up on our fp32 | CPU ms/frame | CPU speed-up | GB/frame | bound ms "
        "| / bound | RSS load MB | peak RSS MB | peak / model | peak growth / model |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cpu_base = {b: ms for r in results if r["variant"] == "fp32" for b, ms in r["cpu_ms_per_frame"].items()}
    for r in results:
        for b, ms in r["ms_per_frame"].items():
            gb = r.get("bytes_per_frame", 0) / 1e9
            bound = 1000 * gb * 1e9 / bandwidth if gb else float("nan")
            cpu = r["cpu_ms_per_frame"][b]
            growth = r["rss_after_generate_mb"]["VmHWM"] - r.get("rss_before_load_mb", {}).get(
                "VmRSS", float("nan")
            )
            print(
                f"| {r['variant']} | {b} | {ms:.0f} | {base.get(b, float('nan')) / ms:.2f}x | {cpu:.0f} | "
                f"{cpu_base.get(b, float('nan')) / cpu:.2f}x | {gb:.2f} | "
                f"{bound:.0f} | {ms / bound:.2f} | {r['rss_after_load_mb']['VmRSS']:.0f} | "
                f"{r['rss_after_generate_mb']['VmHWM']:.0f} | "
                f"{r['rss_after_generate_mb']['VmHWM'] / r.get('model_mb', float('nan')):.2f} | "
                f"{growth / r.get('model_mb', float('nan')):.2f} |"
            )
    fp32_prefill = next(
        (r["prefill_ms"] for r in results if r["variant"] == "fp32" and "prefill_ms" in r), None
    )
    for r in results:
        if "prefill_ms" in r:
            ratio = f" ({r['prefill_ms'] / fp32_prefill:.2f}x our fp32's time)" if fp32_prefill else ""
            print(f"prefill {r['variant']}: {r['prefill_ms']:.0f} ms{ratio}")
    for r in results:
        acc = r.get("accuracy")
        if acc and "layers" in acc:
            layers = acc["layers"]
            print(
                f"accuracy {r['variant']}: layer error backbone 0 {layers['backbone.0']:.4f}, backbone 15 "
                f"{layers['backbone.15']:.4f}, depth 3 {layers['depth.3']:.4f}; logits c0 {acc['logits0']:.4f}, "
                f"depth {acc['depth_logits']:.4f}; same codes teacher-forced {acc['teacher_forced_same_codes']:.3f} "
                f"(c0 {acc['teacher_forced_same_codebook0']:.3f}), free-running {acc['free_running_same_codes']:.3f} "
                f"(first difference after {acc['free_running_frames_before_first_difference']} frames)"
            )
            if acc["weights"]:
                print("   weight error: " + ", ".join(f"{k} {v:.4f}" for k, v in acc["weights"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=VARIANTS,
        choices=VARIANTS + [v + ":" + s for v in VARIANTS[:-1] for s in ("torch", "ours", *ISAS)],
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times, rotated")
    ap.add_argument("--group-size", type=int, default=QuantConfig("int4").group_size)
    ap.add_argument("--prefill", type=int, default=128, help="also time a prompt this long (0: no)")
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--accuracy-frames", type=int, default=50)
    ap.add_argument(
        "--checkpoint", default=None, help="keep the random full-size weights in this folder and reuse them"
    )
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--kernels", action="store_true", help="time one product per shape and kernel instead")
    ap.add_argument(
        "--kernel-variants",
        action="store_true",
        help="time one product per shape, format and variant of csm's kernels (AVX2, AVX-512), rotated rounds",
    )
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kernels:
        return kernel_table(args)
    if args.kernel_variants:
        return variant_table(args)
    if args.variant:  # a child process
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint or os.path.join(tmp, "ckpt")
        if not (Path(folder) / "model.safetensors").is_file():
            print(f"writing random full-size weights to {folder} ...", flush=True)
            write_checkpoint(folder)
        bandwidth = max(matvec_bandwidth(torch.float32), matvec_bandwidth(torch.bfloat16))
        print(
            f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
        )
        variants = args.variants  # in the order given, rotated each round, so drift favours none
        if args.accuracy:
            variants = sorted(variants, key=lambda v: v != "bf16")  # bf16 first: the others compare with it
        rounds: list[list[dict]] = []
        for turn in range(args.rounds):
            order = variants[turn % len(variants) :] + variants[: turn % len(variants)]
            rounds.append([r for r in (run_child(args, v, folder, tmp) for v in order) if r is not None])
        results = rounds[-1]
        if args.rounds > 1:
            print_rounds(rounds)
        print_summary(results, bandwidth)
        if args.json:
            Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "rounds": rounds}, indent=1))


# ---- one product per shape --------------------------------------------------------------------------------


SHAPES = [(8192, 2048), (2048, 8192), (2048, 2048), (512, 2048), (8192, 1024), (1024, 8192), (1024, 1024),
          (256, 1024), (1024, 2048), (2051, 1024)]  # fmt: skip


def kernel_table(args) -> None:
    """Median ms (and GB/s of weights read) for one (batch x K) by (K x N) product per shape and kernel,
    weights cycled through 256 MB so none runs from cache. `ours` columns are csm.cpu_kernels (absent when
    they cannot run here); the others are PyTorch's: oneDNN-prepacked fp32 and bf16, the aten int kernels."""
    from bench_generate import PackedWeight, packable, packed_linear

    from csm import cpu_kernels
    from csm.quant import quantize_int4, quantize_int8

    ours = cpu_kernels.kernels() is not None  # wherever they can run, also where csm would not use them
    names = ["fp32 prepacked", "bf16 torch", "int8 aten", "int4 g32 aten"]
    if ours:
        names += ["fp16 ours", "bf16 ours", "int8 ours", "int4 g32 ours"]
    print(
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    )
    print("cells: median ms / GB/s of weights read")
    print("| N x K | batch | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for n, k in SHAPES:
        copies = max(2, (256 << 20) // (n * k * 4))
        weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
        for b in args.batch:
            x = torch.randn(b, k)
            cells = []

            def cell(product, x, items, nbytes, cells=cells):
                ms = cycle(product, x, items, cpu=torch.get_num_threads() == 1)  # one thread: its CPU time
                cells.append(f"{ms:.3f} / {nbytes / ms / 1e6:.1f}")

            packed = [PackedWeight(w, [w]).tensors[0] for w in weights]
            cell(packed_linear, x, packed, 4 * n * k)
            del packed
            bf16 = [w.bfloat16() for w in weights]
            if packable(bf16[0]):
                cell(packed_linear, x.bfloat16(), [PackedWeight(w, [w]).tensors[0] for w in bf16], 2 * n * k)
            else:
                cell(F.linear, x.bfloat16(), bf16, 2 * n * k)
            for scheme, g in (("int8", None), ("int4", 32)):
                if scheme == "int4" and n % 16:
                    cells.append("-")
                    continue
                with cpu_kernels.disabled():
                    layers = [make_linear(linear_of(w), QuantConfig(scheme, g)) for w in weights]
                    cell(lambda x, m: m(x), x, layers, _nbytes(layers[0]))
                del layers
            if ours:
                for dtype in (torch.float16, torch.bfloat16):
                    ws = [w.to(dtype) for w in weights]
                    cell(lambda x, w, d=dtype: cpu_kernels.linear(x, w, d), x, ws, 2 * n * k)
                    del ws
                q8 = [quantize_int8(w) for w in weights]
                cell(
                    lambda x, t: cpu_kernels.linear(x, t["qweight"], "int8", t["scales"]),
                    x,
                    q8,
                    n * k + 2 * n,
                )
                del q8
                q4 = [quantize_int4(w, 32) for w in weights]
                cell(lambda x, t: cpu_kernels.linear(x, t["qweight"], "int4", t["scales"], t["zeros"], 32),
                     x, q4, n * k // 2 + 4 * n * k // 32)  # fmt: skip
                del q4
            print(f"| {n} x {k} | {b} | " + " | ".join(cells) + " |", flush=True)


VARIANT_SHAPES = [(8192, 2048), (2048, 8192), (6144, 2048), (8192, 1024), (1024, 8192), (2051, 1024),
                  (1024, 1024)]  # fmt: skip


def variant_table(args) -> None:
    """Median ms (GB/s of weights read) of one (batch x K) by (K x N) product per shape, weight format and
    variant of csm's kernels this CPU runs, weights cycled through 256 MB; rounds rotate the variants' order
    and the medians are over rounds; the last column is AVX2's time over the best variant's (same round).
    With one thread (OMP_NUM_THREADS=1) the times are the thread's CPU time, which others' load on a shared
    machine does not inflate as it does wall time (memory contention aside)."""
    from csm import cpu_kernels

    names = cpu_kernels.runnable_variants()[::-1]
    clock = "CPU time of the one thread" if torch.get_num_threads() == 1 else "wall time"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads ({clock}), variants {', '.join(names)}"
    )
    print("cells: median ms / GB/s of weights read, over rounds; last: avx2 ms / best ms per round (median)")
    formats = ["bf16 (fp32 x)", "bf16 (bf16 x)", "fp16", "int8", "int4 g32"]
    print("| N x K | batch | format | " + " | ".join(names) + " | avx2 / best |")
    print("|---|---|---|" + "---|" * (len(names) + 1))
    for n, k in VARIANT_SHAPES:
        copies = max(2, (256 << 20) // (n * k * 2))
        weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
        for b in args.batch:
            x = torch.randn(b, k)
            for fmt in formats:
                items, xin, nbytes = weights_in(fmt, weights, x)
                per = {v: [] for v in names}
                for turn in range(args.rounds):
                    for v in names[turn % len(names) :] + names[: turn % len(names)]:
                        with cpu_kernels.using(v):
                            per[v].append(cycle(product, xin, items, cpu=torch.get_num_threads() == 1))
                best = [min(per[v][t] for v in names) for t in range(args.rounds)]
                ratio = statistics.median(a / m for a, m in zip(per[names[0]], best))
                cells = [
                    f"{statistics.median(per[v]):.3f} / {nbytes / statistics.median(per[v]) / 1e6:.1f}"
                    for v in names
                ]
                print(f"| {n} x {k} | {b} | {fmt} | " + " | ".join(cells) + f" | {ratio:.2f}x |", flush=True)
                del items


def weights_in(fmt: str, weights: list, x: torch.Tensor) -> tuple[list, torch.Tensor, int]:
    """(each weight as `fmt` stores it, x as the product takes it, the bytes one product reads)."""
    from csm.quant import quantize_int4, quantize_int8

    n, k = weights[0].shape
    if fmt == "int8":
        return [quantize_int8(w) for w in weights], x, n * k + 2 * n
    if fmt == "int4 g32":
        return [quantize_int4(w, 32) for w in weights], x, n * k // 2 + 4 * n * k // 32
    dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
    return [w.to(dtype) for w in weights], x.bfloat16() if "bf16 x" in fmt else x, 2 * n * k


def product(x: torch.Tensor, item) -> torch.Tensor:
    from csm import cpu_kernels

    if isinstance(item, torch.Tensor):
        return cpu_kernels.linear(x, item, item.dtype)
    if "zeros" in item:
        return cpu_kernels.linear(x, item["qweight"], "int4", item["scales"], item["zeros"], 32)
    return cpu_kernels.linear(x, item["qweight"], "int8", item["scales"])


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers())


def linear_of(w: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta").eval()
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    return layer


def cycle(product, x, items, cpu: bool = False) -> str:
    """Median ms of `product(x, item)` over the items in turn (each 8 times); `cpu`: the calling thread's
    CPU time instead of wall time (one thread only)."""
    turn = iter(range(1 << 30))
    times = []
    clock = time.thread_time if cpu else time.perf_counter
    with torch.inference_mode():
        for _ in range(8 * len(items)):
            item = items[next(turn) % len(items)]
            t = clock()
            product(x, item)
            times.append(clock() - t)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
