"""Where a CPU frame's time goes at csm-1b size, batch 1: the backbone, the depth decoder's 31 passes, and in
each the share of csm's matrix-vector kernels against everything else (norms, RoPE, attention, embeddings,
head selection, sampling, Python), to see what fusing the per-pass work could save.

    flock /tmp/csm-bench.lock python bench/bench_depth.py --scheme int8 --frames 6

Random weights (csm's own model, no checkpoint), fp32 model with `--scheme` (int8, int4, bf16) weights,
csm's kernels forced on (CSM_CPU_KERNELS=1: AMX CPUs too). With OMP_NUM_THREADS=1 every time is the thread's
CPU time (robust to others' load on a shared machine; the frame then runs on one core). Each csm kernel call and each depth-decoder pass
is timed with perf_counter around it; "other" is the rest. Also prints the depth decoder's bytes per pass
against the CPU's caches (lscpu), and the GB/s its kernels reach against the backbone's: a decoder served
from cache would stream faster than one read from memory.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import time

os.environ.setdefault("CSM_CPU_KERNELS", "1")

import torch  # noqa: E402

from csm import CsmForConditionalGeneration, cpu_kernels  # noqa: E402
from csm.config import CsmConfig  # noqa: E402


def size(module) -> int:
    seen = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="int8", choices=["int8", "int4", "bf16"])
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny config: checks the script, measures nothing")
    ap.add_argument(
        "--heads-ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: ms/frame with the heads quantized against fp32 heads, alternating, this many rounds",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from reference_models import tiny_csm_config

        config = CsmConfig.from_dict(tiny_csm_config(32))
    else:
        config = CsmConfig()
    model = CsmForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.heads_ab:
        return heads_ab(model, config, args)
    model.quantize(args.scheme)
    print(
        f"variant {cpu_kernels.variant()}, kernels {cpu_kernels.available()}, {torch.get_num_threads()} threads"
    )

    # one thread: its CPU time, which others' load on a shared machine does not inflate (wall time otherwise)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    state = {"where": "other"}
    spent = collections.Counter()
    calls = collections.Counter()
    real_linear = cpu_kernels.linear

    def timed_linear(*a, **k):
        t = clock()
        y = real_linear(*a, **k)
        spent[state["where"] + " kernels"] += clock() - t
        calls[state["where"] + " kernels"] += 1
        return y

    cpu_kernels.linear = timed_linear
    dd = model.depth_decoder.model
    real_run = dd.run_layers
    backbone = model.backbone_model
    real_backbone_run = backbone.run_layers

    def wrap(run, where):
        def timed(*a, **k):
            saved, state["where"] = state["where"], where
            t = clock()
            try:
                return run(*a, **k)
            finally:
                spent[where + " pass"] += clock() - t
                calls[where + " pass"] += 1
                state["where"] = saved

        return timed

    dd.run_layers = wrap(real_run, "depth")
    backbone.run_layers = wrap(real_backbone_run, "backbone")
    ids = torch.randint(4, config.text_vocab_size, (1, 32))
    greedy = dict(do_sample=False, depth_decoder_do_sample=False)

    def run(n):
        with torch.inference_mode():
            model.generate(input_ids=ids, max_new_tokens=n, **greedy)

    import warnings

    warnings.simplefilter("ignore")
    run(2)
    per = collections.defaultdict(list)
    walls = []
    for _ in range(args.repeats):
        parts = {}
        for n in (args.frames, 1):
            spent.clear()
            calls.clear()
            t = clock()
            run(n)
            parts[n] = (clock() - t, dict(spent), dict(calls))
        f = args.frames - 1
        walls.append(1000 * (parts[args.frames][0] - parts[1][0]) / f)
        for key in parts[args.frames][1]:
            per[key].append(1000 * (parts[args.frames][1][key] - parts[1][1].get(key, 0)) / f)
        per_calls = {k: (parts[args.frames][2][k] - parts[1][2].get(k, 0)) / f for k in parts[args.frames][2]}
    med = {k: statistics.median(v) for k, v in per.items()}
    wall = statistics.median(walls)
    print(f"ms/frame {wall:.1f} (median of {args.repeats})")
    for k in sorted(med):
        print(f"  {k}: {med[k]:.1f} ms/frame, {per_calls.get(k, 0):.0f} calls/frame")
    depth_other = med.get("depth pass", 0) - med.get("depth kernels", 0)
    bb_other = med.get("backbone pass", 0) - med.get("backbone kernels", 0)
    outside = wall - med.get("depth pass", 0) - med.get("backbone pass", 0) - med.get("other kernels", 0)
    passes = per_calls.get("depth pass", 31) or 31
    print(
        f"depth decoder: {med.get('depth pass', 0):.1f} ms in {passes:.0f} passes, of which kernels "
        f"{med.get('depth kernels', 0):.1f}, other {depth_other:.1f} ({1000 * depth_other / passes:.0f} us a pass)"
    )
    print(
        f"backbone: other than kernels {bb_other:.1f} ms; outside both: the heads' and projector's kernels "
        f"{med.get('other kernels', 0):.1f} ms, the rest (sampling, embeddings, codes, Python) {outside:.1f} ms "
        f"= {1000 * outside / 32:.0f} us per codebook"
    )
    rest = depth_other + bb_other + outside
    print(f"not csm's kernels: {rest:.1f} ms of {wall:.1f} ({100 * rest / wall:.0f}%)")
    heads = model.depth_decoder.codebooks_head
    per_pass = size(dd.layers) + size(dd.inputs_embeds_projector) + size(heads) // (config.num_codebooks - 1)
    bb = size(backbone.layers) + size(model.lm_head)
    print(
        f"bytes: depth decoder {per_pass / 2**20:.1f} MiB a pass (layers, projector, one head), "
        f"backbone {bb / 2**20:.1f} MiB a frame"
    )
    if med.get("depth kernels") and med.get("backbone kernels"):
        d_gbs = per_pass * passes / (med["depth kernels"] / 1000) / 1e9
        b_gbs = bb / (med["backbone kernels"] / 1000) / 1e9
        print(f"kernels' streaming: depth decoder {d_gbs:.1f} GB/s, backbone {b_gbs:.1f} GB/s")
    caches = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(
        "caches: "
        + "; ".join(
            line.split(":")[0].strip() + " " + line.split(":")[1].strip()
            for line in caches.splitlines()
            if "cache" in line.lower()
        )
    )


def heads_ab(model, config, args) -> None:
    """The same model's frames with `lm_head` and the codebook heads quantized and with them in fp32, swapped
    in place and alternated (the rest quantized either way)."""
    from csm.quant import HEADS, QuantConfig, choose_modules, make_heads, make_linear, quantize_modules

    quant = QuantConfig(args.scheme)
    quant.modules = [m for m in choose_modules(model, quant) if m not in HEADS]
    quantize_modules(model, quant)
    float_heads = (model.lm_head, model.depth_decoder.codebooks_head)
    q_heads = (make_linear(model.lm_head, quant), make_heads(model.depth_decoder.codebooks_head, quant))
    ids = torch.randint(4, config.text_vocab_size, (1, 32))
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter

    def frame_ms():
        def run(n):
            with torch.inference_mode():
                model.generate(
                    input_ids=ids, max_new_tokens=n, do_sample=False, depth_decoder_do_sample=False
                )

        run(2)
        t = clock()
        run(args.frames)
        long = clock() - t
        t = clock()
        run(1)
        return 1000 * (long - (clock() - t)) / (args.frames - 1)

    import warnings

    warnings.simplefilter("ignore")
    ratios = []
    for turn in range(args.heads_ab):
        times = {}
        for name in ("quantized", "fp32") if turn % 2 == 0 else ("fp32", "quantized"):
            model.lm_head, model.depth_decoder.codebooks_head = (
                q_heads if name == "quantized" else float_heads
            )
            times[name] = frame_ms()
        ratios.append(times["fp32"] / times["quantized"])
        print(
            f"round {turn + 1}: heads quantized {times['quantized']:.1f} ms/frame, fp32 heads {times['fp32']:.1f}"
        )
    print(f"fp32 heads / quantized heads, median of {len(ratios)} rounds: {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
