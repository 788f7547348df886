"""Kernel-like ops per frame at batch 1: what bounds a graphed frame step on a GPU (~3 us a launch).

    python bench/bench_kernels.py                          # eager op count, bf16 and fp32, csm-1b layer counts
    python bench/bench_kernels.py --compiled               # + inductor's generated kernels (CPU: C++ kernels)

The model has csm-1b's layer counts (16 backbone layers, 4 depth-decoder layers run 31 times a frame, 32
codebooks, 2051 ids per codebook) and head counts, but a narrow width: an op count does not depend on width.
One frame step of the engine runs under torch.profiler on the CPU; an op is "kernel-like" when it is an
operator with no operator under it and is not a view, a shape query or an allocation. On a GPU each is (at
least) one kernel launch. Attention is counted as a GPU runs it (SDPA; the CPU's bf16 decoding runs a few
products instead, `--cpu-attention`).

`--compiled` compiles the same frame step with torch.compile (inductor, as `compile=True` on the CPU) and prints
`torch._inductor.metrics.generated_kernel_count`: on the CPU those are C++ kernels, a proxy for the Triton
kernels a GPU compile generates (the matrix products stay library calls and are counted apart).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_models import LLAMA3_ROPE, tiny_codec_config  # noqa: E402

import csm.llama  # noqa: E402
from csm.config import CsmConfig  # noqa: E402
from csm.engine import FrameEngine, Sampling  # noqa: E402
from csm.model import CsmForConditionalGeneration  # noqa: E402

# Not kernels: views and reshapes that alias, shape queries, allocations without a fill.
NOT_KERNELS = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::transpose",
    "aten::permute", "aten::expand", "aten::expand_as", "aten::slice", "aten::select", "aten::unsqueeze",
    "aten::squeeze", "aten::as_strided", "aten::detach", "aten::alias", "aten::t", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::unbind", "aten::empty",
    "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::lift_fresh", "aten::view_as_real",
    "aten::view_as_complex", "aten::contiguous", "aten::diagonal", "aten::result_type", "aten::size",
    "aten::stride", "aten::numel", "aten::dim", "aten::is_nonzero", "aten::movedim", "aten::flatten",
    "aten::unflatten", "aten::view_as", "aten::broadcast_to", "aten::_has_compatible_shallow_copy_type",
    "aten::to", "aten::type_as", "aten::set_", "aten::retain_grad", "aten::requires_grad_",
}  # fmt: skip
# No kernel of their own: conjugate/negation bits, CPU scalars for Python numbers.
NO_OPS = {"aten::resolve_conj", "aten::resolve_neg", "aten::scalar_tensor"}
# One kernel on a GPU, whatever the CPU build runs under it (rms_norm is fused there; a CPU reduction fills
# its output before reducing into it).
FUSED_ON_GPU = {
    "aten::rms_norm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::sum", "aten::mean",
    "aten::argmax", "aten::amax", "aten::max",
}  # fmt: skip
CPU_ATTENTION = {"aten::bmm", "aten::matmul", "aten::_softmax", "aten::softmax", "aten::masked_fill"}


def sdpa(q, k, v, mask):
    """What a GPU runs where the CPU's bf16 decoding runs csm.llama.one_query_attention."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def narrow_csm_1b(dtype: torch.dtype, codebooks: int = 32) -> CsmForConditionalGeneration:
    """csm-1b's layer and head counts at a small width, random weights (their values do not matter)."""
    config = CsmConfig.from_dict(
        dict(
            num_codebooks=codebooks,
            hidden_size=256,
            intermediate_size=512,
            head_dim=8,
            text_vocab_size=512,
            rope_parameters=dict(LLAMA3_ROPE),
            depth_decoder_config=dict(
                num_codebooks=codebooks,
                backbone_hidden_size=256,
                hidden_size=128,
                intermediate_size=256,
                head_dim=16,
            ),
            codec_config=tiny_codec_config(codebooks),
        )
    )
    torch.manual_seed(0)
    model = CsmForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.prepack_weights = False  # a GPU has no prepacked weights; products count the same either way
    return model


def kernel_like(events) -> collections.Counter:
    """Per operator name, how many calls run a kernel: an operator that is not a view, shape query,
    allocation or no-op, and has no such operator under it (rms_norm and attention count as one)."""
    counts: collections.Counter = collections.Counter()

    def visit(e) -> bool:  # counts the kernels under e (or e itself); says whether there were any
        if e.name in FUSED_ON_GPU:
            counts[e.name] += 1
            return True
        below = [visit(c) for c in e.cpu_children]
        if any(below):
            return True
        if "::" in e.name and e.name not in NOT_KERNELS and e.name not in NO_OPS:
            counts[e.name] += 1
            return True
        return False

    for e in events:
        if e.cpu_parent is None:
            visit(e)
    return counts


def engine_for(model, compiled: bool) -> FrameEngine:
    engine = FrameEngine(model, batch_size=1, max_seq_len=128, compile=compiled)
    greedy = Sampling(do_sample=False)
    engine.backbone_sampling.set(slice(None), greedy)
    engine.depth_sampling.set(slice(None), greedy)
    with torch.inference_mode():
        embeds = model.embed_text_tokens(torch.randint(4, 500, (1, 16)))
    engine.prefill(embeds)
    return engine


def count_eager(dtype: torch.dtype) -> collections.Counter:
    model = narrow_csm_1b(dtype)
    engine = engine_for(model, compiled=False)
    for _ in range(2):
        engine.next_frame()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.next_frame()
    return kernel_like(prof.events())


def count_compiled(dtype: torch.dtype, codebooks: int) -> tuple[int, collections.Counter, float]:
    from torch._inductor import metrics

    model = narrow_csm_1b(dtype, codebooks)
    engine = engine_for(model, compiled=True)
    metrics.reset()
    t = time.perf_counter()
    engine.next_frame()
    seconds = time.perf_counter() - t
    generated = metrics.generated_kernel_count
    engine.next_frame()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.next_frame()
    return generated, kernel_like(prof.events()), seconds


def show(title: str, counts: collections.Counter, top: int) -> None:
    total = sum(counts.values())
    attention = sum(n for name, n in counts.items() if name in CPU_ATTENTION)
    print(f"{title}: {total} kernel-like ops per frame ({attention} of them bmm/softmax/masked_fill)")
    print("   " + ", ".join(f"{n} {name.split('::')[-1]}" for name, n in counts.most_common(top)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--compiled", action="store_true", help="also count inductor's generated kernels")
    ap.add_argument(
        "--compile-codebooks",
        type=int,
        nargs="+",
        default=[32],
        help="codebooks of the compiled model; two or more also extrapolate to 32 (a 2-core CPU compiles the "
        "32-codebook frame for a long time; the count is linear in the depth-decoder steps)",
    )
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument(
        "--cpu-attention",
        action="store_true",
        help="bf16 decoding attention as the CPU runs it (a few products) instead of SDPA, as a GPU runs it",
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if not args.cpu_attention:
        csm.llama.one_query_attention = sdpa
    print(f"torch {torch.__version__}, csm-1b layer counts at a narrow width, batch 1, one frame")
    for name in args.dtype:
        show(f"eager {name}", count_eager(getattr(torch, name)), args.top)
    if args.compiled:
        for name in args.dtype:
            counts = {}
            for k in args.compile_codebooks:
                generated, externs, seconds = count_compiled(getattr(torch, name), k)
                counts[k] = generated
                print(
                    f"compiled {name}, {k} codebooks: {generated} generated kernels (inductor, CPU C++; first "
                    f"frame {seconds:.0f} s with compile); ops outside them per frame: {sum(externs.values())}"
                )
                print(
                    "   " + ", ".join(f"{n} {op.split('::')[-1]}" for op, n in externs.most_common(args.top))
                )
            if len(counts) >= 2:  # a frame is the backbone step plus K - 1 identical depth steps
                (k1, c1), (k2, c2) = sorted(counts.items())[:2]
                per_step = (c2 - c1) / (k2 - k1)
                print(
                    f"compiled {name}, 32 codebooks by extrapolation: {c1 + per_step * (32 - k1):.0f} generated "
                    f"kernels ({per_step:.1f} per depth-decoder step)"
                )


if __name__ == "__main__":
    main()
