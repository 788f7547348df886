"""Ablation: one-query bf16 attention (csm.llama.one_query_attention) against PyTorch's SDPA in our frame
step, at the csm-1b size with random weights, after a long prompt. Ours only; the two alternate frame by
frame on one engine, so both see the same cache and machine load.

    python bench/ablate_attention.py --batch 1 8 --prompt 600 300 --frames 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import csm.llama
from csm import CsmConfig, CsmForConditionalGeneration
from csm.engine import FrameEngine, Sampling


def random_full_size_model(dtype: torch.dtype) -> CsmForConditionalGeneration:
    config = CsmConfig()
    with torch.device("meta"):
        model = CsmForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    for module in model.modules():
        if hasattr(module, "compute_buffers"):
            module.compute_buffers("cpu")
    return model


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, nargs="+", default=[600, 300], help="prompt length per batch size")
    ap.add_argument("--frames", type=int, default=5, help="timed frames per variant (the first is dropped)")
    args = ap.parse_args()
    model = random_full_size_model(torch.bfloat16)
    variants = {"one_query_attention": csm.llama.one_query_attention, "sdpa": sdpa}
    for batch, prompt in zip(args.batch, args.prompt, strict=True):
        engine = FrameEngine(model, batch, prompt + 2 * args.frames + 2)
        engine.backbone_sampling.set(slice(None), Sampling(do_sample=False))
        engine.depth_sampling.set(slice(None), Sampling(do_sample=False))
        g = torch.Generator().manual_seed(0)
        embeds = 0.02 * torch.randn(batch, prompt, model.config.hidden_size, generator=g)
        engine.prefill(embeds.to(torch.bfloat16))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.frames):
            for name, attention in variants.items():
                csm.llama.one_query_attention = attention
                start = time.perf_counter()
                engine.next_frame()
                times[name].append(1000 * (time.perf_counter() - start))
        engine.release()
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        print(
            f"bf16 batch {batch}, prompt {prompt}: one-query {medians['one_query_attention']:.0f} ms/frame, "
            f"SDPA {medians['sdpa']:.0f} ms/frame, ratio {medians['sdpa'] / medians['one_query_attention']:.2f}x",
            flush=True,
        )
    csm.llama.one_query_attention = variants["one_query_attention"]


if __name__ == "__main__":
    main()
