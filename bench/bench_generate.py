"""Frame-loop speed against the reference (transformers) on the same random weights, in one run.

    python bench/bench_generate.py --size tiny --batch 1
    python bench/bench_generate.py --size full --dtype float32 --batch 1 8 --frames 4 --repeats 3

ms per frame is (time for F frames - time for 1 frame) / (F - 1): prefill cancels out. Greedy decoding
on both sides, median of `--repeats` runs. For the full size it also prints the memory-bandwidth bound:
bytes of weights read per frame over the machine's measured matrix-vector bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_models import LLAMA3_ROPE, quiet_transformers, tiny_csm_config  # noqa: E402

from csm import CsmForConditionalGeneration  # noqa: E402
from csm.llama import PackedWeight, packable, packed_linear  # noqa: E402

GREEDY = dict(do_sample=False, depth_decoder_do_sample=False)


def reference_model(size: str, dtype: torch.dtype):
    from transformers import CsmConfig
    from transformers import CsmForConditionalGeneration as Reference

    quiet_transformers()
    config = CsmConfig(**tiny_csm_config(32)) if size == "tiny" else CsmConfig()
    if size == "full":
        config.rope_parameters = dict(LLAMA3_ROPE)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Reference(config).to(dtype).eval()
    with torch.no_grad():  # as a trained model would: never pick ids the codec lacks
        model.lm_head.weight[2048:] = 0
        model.depth_decoder.codebooks_head.weight[..., 2048:] = 0
    return model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ms_per_frame(generate, prompt, frames: int, repeats: int) -> float:
    generate(prompt, 2)  # warm-up
    long = timed(lambda: generate(prompt, frames), repeats)
    short = timed(lambda: generate(prompt, 1), repeats)
    return 1000 * (long - short) / (frames - 1)


def weight_bytes_per_frame(model) -> int:
    """Bytes of weights one frame reads: backbone layers + lm_head once, depth layers K-1 times, heads."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    backbone = size(model.backbone_model.layers) + size(model.lm_head)
    dd = model.depth_decoder.model
    depth = size(dd.layers) + size(dd.inputs_embeds_projector)
    head = model.depth_decoder.codebooks_head.weight
    return backbone + (model.config.num_codebooks - 1) * (depth + head[0].numel() * head.element_size())


def matvec_bandwidth(dtype: torch.dtype) -> float:
    """Bytes per second matrix-vector products stream on this machine: the best over the model's large
    shapes and over the plain and the oneDNN-prepacked product, and csm's bf16 kernel where it can run (the
    fastest reader of memory here, so the bound is the memory's, not one kernel's). Each shape cycles
    through copies adding up to 512 MB, so no product runs from cache."""
    from csm import cpu_kernels

    best = 0.0
    for n, k in ((8192, 2048), (2048, 8192), (8192, 1024), (1024, 8192), (8192, 8192)):
        ws = [torch.randn(n, k, dtype=dtype) for _ in range(max(2, (512 << 20) // (n * k * 4)))]
        x = torch.randn(1, k, dtype=dtype)
        kernels = [(ws, torch.nn.functional.linear)]
        if packable(ws[0]):
            kernels.append(([PackedWeight(w, [w]).tensors[0] for w in ws], packed_linear))
        if dtype == torch.bfloat16 and cpu_kernels.kernels() is not None:
            kernels.append((ws, lambda x, w: cpu_kernels.linear(x, w, torch.bfloat16)))
        for mats, product in kernels:
            turn = iter(range(1 << 30))
            t = timed(lambda: product(x, mats[next(turn) % len(mats)]), 4 * len(mats))  # noqa: B023
            best = max(best, n * k * ws[0].element_size() / t)
        del ws, kernels
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in text tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--compile", action="store_true", help="ours with the frame step compiled (torch.compile)"
    )
    ap.add_argument("--no-prepack", action="store_true", help="ours without oneDNN-prepacked weights (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ref = reference_model(args.size, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = CsmForConditionalGeneration.from_pretrained(tmp, dtype=dtype)
    ours.prepack_weights = not args.no_prepack

    def run_ours(ids, n):
        ours.generate(input_ids=ids, max_new_tokens=n, compile=args.compile, **GREEDY)

    def run_ref(ids, n):
        with torch.no_grad():
            ref.generate(input_ids=ids, max_new_tokens=n, **GREEDY)

    import warnings

    warnings.simplefilter("ignore")
    print(
        f"size={args.size} dtype={args.dtype} threads={torch.get_num_threads()} frames={args.frames} "
        f"repeats={args.repeats} compile={args.compile} prepack={not args.no_prepack}"
    )
    if args.size == "full":
        bw = matvec_bandwidth(dtype)
        bound = 1000 * weight_bytes_per_frame(ours) / bw
        print(
            f"weights read per frame: {weight_bytes_per_frame(ours) / 1e9:.2f} GB; matvec bandwidth {bw / 1e9:.1f} GB/s; "
            f"bandwidth bound {bound:.0f} ms/frame"
        )
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(4, ours.config.text_vocab_size, (batch, args.prompt), generator=g)
        a = ms_per_frame(run_ours, prompt, args.frames, args.repeats)
        b = ms_per_frame(run_ref, prompt, args.frames, args.repeats)
        line = f"batch {batch}: ours {a:.1f} ms/frame, reference {b:.1f} ms/frame, speed-up {b / a:.2f}x"
        if args.size == "full":
            line += f", ours / bandwidth bound {a / bound:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
