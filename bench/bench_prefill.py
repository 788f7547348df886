"""Prefill on the CPU at csm-1b size: csm's weight-streaming kernels (before) against csm.gemm's matrix
products (after), per weight scheme, with torch.mm's dense rate measured in the same run.

    flock /tmp/csm-bench.lock python bench/bench_prefill.py            # 128 and 512 positions, every scheme
    flock /tmp/csm-bench.lock python bench/bench_prefill.py --rows     # the crossover per scheme, rows 1..512
    ... --threads 1 --clock cpu    # one thread in CPU time: what a loaded, shared machine cannot spoil
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 flock /tmp/csm-bench.lock python bench/bench_prefill.py
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 ...   # on an AMX CPU: oneDNN as on one with avx512_bf16 only (Zen 4)

Prefill is the backbone (16 layers of csm-1b's shapes, random weights, KV cache as the engine fills it) over T
positions: what grows with the prompt; the frame after it costs the same on either path. csm's kernels are
forced on (they are the default on x86 CPUs without AMX, where "today" is measured in the issue), so
"stream" is what those CPUs run today. Variants: the fp32 model (oneDNN on plain fp32 weights), and per
scheme on a float32 model (16-bit weights "bf16w", the CPU default; "int8"; "int4", groups of 32) the
stream and the GEMM path, alternating, rotated each round; "bf16w-bf16" is the GEMM path with
CSM_PREFILL_BF16=1 (bf16 arithmetic), with how far its output moves from the fp32 arithmetic's. The rate is
the linear layers' 2·T·params over the whole prefill's time (attention and norms included), and "dense" is
torch.mm on the same shapes with weights already in the GEMM's dtype: the machine's rate for that
arithmetic, in the same round.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from csm import cpu_kernels, gemm
from csm.config import CsmConfig
from csm.llama import Transformer, fuse_projections
from csm.quant import QuantConfig, make_linear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
# (N, K) of each product as it runs (q/k/v and gate/up fused), backbone then depth decoder
BACKBONE_SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]
DEPTH_SHAPES = [(1536, 1024), (1024, 1024), (16384, 1024), (1024, 8192), (1024, 2048)]
SCHEMES = {"bf16w": QuantConfig("bf16"), "int8": QuantConfig("int8"), "int4": QuantConfig("int4", 32)}


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN's primitive cache, first-touch of buffers
    times = []
    for _ in range(repeats):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return min(times)  # the machine is shared: the least disturbed run


def machine() -> str:
    flags = cpu_kernels.cpu_flags()
    isa = sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2")))
    name = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "?")  # fmt: skip
    return f"{name}, {torch.get_num_threads()} threads, flags {' '.join(isa)}, torch capability " + (
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 arithmetic used: {gemm.bf16_arithmetic()}"
    )


# ---- the whole prefill ----------------------------------------------------------------------------------


def backbone(seed: int = 0) -> Transformer:
    cfg = CsmConfig()
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # a bf16 checkpoint loaded as fp32 (the CPU default's case): bf16 values
                p.copy_(p.normal_(0, 0.02).bfloat16())
    model.setup_caches(1, 1024, torch.float32)
    return model


def quantized(source: Transformer, config: QuantConfig) -> Transformer:
    """A copy of `source` whose layers' linears are `config`'s (the rest shared)."""
    model = Transformer(source.cfg).eval()
    model.load_state_dict(source.state_dict(), assign=True)  # same tensors, no copy
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            layer.set_submodule(name, make_linear(source.layers[i].get_submodule(name), config))
    fuse_projections(model)
    model.setup_caches(1, 1024, torch.float32)
    return model


def prefill(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    T = h.shape[1]
    pos = torch.arange(T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    with torch.inference_mode():
        return model.run_layers(h, pos, mask, input_pos=pos)


def dense_seconds(T: int, dtype: torch.dtype, repeats: int) -> float:
    """torch.mm over one layer's products at T rows, weights already in `dtype`, times the layers."""
    x = {K: torch.randn(T, K).to(dtype) for K in (2048, 8192)}
    ws = [torch.randn(N, K).to(dtype) for N, K in BACKBONE_SHAPES]
    return 16 * sum(best_of(lambda w=w: torch.mm(x[w.shape[1]], w.t()), repeats) for w in ws)


def full(args) -> None:
    print(machine(), flush=True)
    flops = {T: 2 * T * 16 * sum(N * K for N, K in BACKBONE_SHAPES) for T in args.positions}
    fp32 = backbone()
    rows: dict[tuple, list[float]] = {}
    moved: dict[int, list[float]] = {}
    names = [{"bf16": "bf16w"}.get(s, s) for s in args.schemes if s != "fp16"]
    for rnd in range(args.rounds):
        for scheme in names[rnd % len(names) :] + names[: rnd % len(names)]:
            measure(fp32, quantized(fp32, SCHEMES[scheme]), scheme, rnd, args, rows, moved)
            gc.collect()
        print(f"round {rnd + 1} done", flush=True)
    report(rows, flops, moved, args)


def measure(fp32, model, scheme: str, rnd: int, args, rows: dict, moved: dict) -> None:
    """One round of `scheme`'s variants (and the fp32 model, the dense products) at each T, rotated."""
    for T in args.positions:
        h = torch.randn(1, T, fp32.cfg.hidden_size, generator=torch.Generator().manual_seed(T))
        runs = {
            "fp32": lambda h=h: prefill(fp32, h),
            f"{scheme} stream": lambda h=h: streamed(model, h),
            f"{scheme} gemm": lambda h=h: prefill(model, h),
        }
        if scheme == "bf16w" and gemm.bf16_arithmetic():
            runs["bf16w-bf16 gemm"] = lambda h=h: bf16_prefill(model, h)
        order = list(runs)[rnd % len(runs) :] + list(runs)[: rnd % len(runs)]
        flops = 2 * T * 16 * sum(N * K for N, K in BACKBONE_SHAPES)
        for name in order:
            rows.setdefault((name, T), []).append(best_of(runs[name], args.repeats))
            print(
                f"  {name} T={T}: {rows[name, T][-1]:.2f} s, {flops / rows[name, T][-1] / 1e9:.0f} GFLOP/s",
                flush=True,
            )
        for dtype in (torch.float32, torch.bfloat16):
            rows.setdefault((f"dense {dtype}", T), []).append(dense_seconds(T, dtype, args.repeats))
            print(
                f"  dense {dtype} T={T}: {flops / rows[f'dense {dtype}', T][-1] / 1e9:.0f} GFLOP/s",
                flush=True,
            )
        if scheme == "bf16w" and rnd == 0:  # how far the prefill's output moves from the fp32 model's
            ref = prefill(fp32, h).double()
            moved[T] = [rel(prefill(model, h), ref)]
            if gemm.bf16_arithmetic():
                moved[T].append(rel(bf16_prefill(model, h), ref))
                moved[T].append(rel(streamed(model, h), ref))


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def streamed(model, h):
    with gemm.streaming_only():
        return prefill(model, h)


def bf16_prefill(model, h):
    with gemm.bf16_for_fp32():
        return prefill(model, h)


def report(rows, flops, moved, args) -> None:
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"\nbest of {args.repeats}, median over {args.rounds} rounds; GFLOP/s = linear layers' 2*T*params / time"
    )
    print("| variant | T | s | GFLOP/s | / dense fp32 | / dense bf16 | / stream | / fp32 model |")
    print("|---|---|---|---|---|---|---|---|")
    for T in args.positions:
        d32, d16 = med[("dense torch.float32", T)], med[("dense torch.bfloat16", T)]
        for (name, t), s in med.items():
            if t != T:
                continue
            stream = med.get((name.split()[0].split("-")[0] + " stream", T))
            print(
                f"| {name} | {T} | {s:.2f} | {flops[T] / s / 1e9:.0f} | {d32 / s:.2f} | {d16 / s:.2f} | "
                f"{(stream / s) if stream else float('nan'):.2f}x | {med[('fp32', T)] / s:.2f}x |"
            )
    for T, errors in moved.items():
        print(
            f"T={T}: the last hidden state's relative difference from the fp32 model's: bf16w GEMM (fp32 "
            f"arithmetic) {errors[0]:.2e}"
            + (
                f", bf16w GEMM in bf16 {errors[1]:.2e}, bf16w stream {errors[2]:.2e}"
                if len(errors) > 1
                else ""
            )
        )


# ---- the crossover per scheme ---------------------------------------------------------------------------


def layers(config: QuantConfig, shapes, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    out = []
    for N, K in shapes:
        lin = nn.Linear(K, N, bias=False).eval()
        nn.init.normal_(lin.weight, std=0.02)
        out.append(make_linear(lin, config))
    return out


def crossover(args) -> None:
    print(machine(), flush=True)
    cases = [(s, torch.float32) for s in args.schemes]
    if gemm.bf16_arithmetic():
        cases += [(s, torch.bfloat16) for s in args.schemes if s != "fp16"]
    for scheme, dtype in cases:
        config = QuantConfig(scheme, 32 if scheme == "int4" else None)
        for part, shapes in (("backbone", BACKBONE_SHAPES), ("depth decoder", DEPTH_SHAPES)):
            mods = layers(config, shapes)
            line, first = [], None
            for M in args.row_counts:
                xs = [torch.randn(M, K, dtype=dtype) for _, K in shapes]

                def run(ms=mods, xs=xs):
                    with torch.inference_mode():
                        for m, x in zip(ms, xs):
                            m(x)

                times = {"stream": [], "gemm": []}
                for _ in range(args.rounds):
                    with gemm.streaming_only():
                        times["stream"].append(best_of(run, args.repeats))
                    saved, gemm.threshold = gemm.threshold, lambda scheme, dtype: 1  # the GEMM at any rows
                    try:
                        times["gemm"].append(best_of(run, args.repeats))
                    finally:
                        gemm.threshold = saved
                ratio = statistics.median(times["stream"]) / statistics.median(times["gemm"])
                line.append(f"{M}:{ratio:.2f}")
                first = M if ratio >= 1 and first is None else (None if ratio < 1 else first)
            arith = "bf16" if dtype == torch.bfloat16 else "fp32"
            print(f"{scheme} weights, {arith} arithmetic, {part}: stream time / GEMM time at rows "
                  f"{' '.join(line)}; GEMM from {first} rows on", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rows", action="store_true", help="the crossover per scheme instead of the whole prefill"
    )
    p.add_argument("--positions", type=int, nargs="+", default=[128, 512])
    p.add_argument(
        "--row-counts", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512]
    )
    p.add_argument("--schemes", nargs="+", default=["bf16", "int8", "int4"], help="--rows: which weights")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch's threads (default: as set up)")
    p.add_argument("--tile-bytes", type=int, default=None, help="csm.gemm.TILE_BYTES (default: as set)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, which others' load does not inflate (use with --threads 1)",
    )
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tile_bytes:
        gemm.TILE_BYTES = args.tile_bytes
    print(
        f"clock {args.clock}, rounds {args.rounds}, best of {args.repeats}, tile {gemm.TILE_BYTES} B",
        flush=True,
    )
    with cpu_kernels.forced(True):
        crossover(args) if args.rows else full(args)


if __name__ == "__main__":
    main()
