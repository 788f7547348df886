"""Fine-tuning: `csm finetune` / `python -m csm.train` / `finetune(FinetuneConfig(...))`."""

from __future__ import annotations

import argparse
import os
import sys

from .data import DataError
from .lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter
from .recipe import FinetuneConfig, finetune

__all__ = [
    "DataError",
    "FinetuneConfig",
    "LoraConfig",
    "add_finetune_arguments",
    "apply_lora",
    "finetune",
    "load_adapter",
    "merge_lora",
    "run_finetune",
    "save_adapter",
]


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The `csm finetune` flags."""
    d = FinetuneConfig(model="", data="", out="")
    parser.add_argument(
        "--model", required=True, help="checkpoint folder or hub id to start from (e.g. sesame/csm-1b)"
    )
    parser.add_argument(
        "--data",
        required=True,
        help='training JSON lines: {"audio": "clip.wav", "text": "...", "speaker": 0}',
    )
    parser.add_argument("--val", help="validation JSON lines, scored every --eval-every steps")
    parser.add_argument(
        "--out", required=True, help="output folder: merged checkpoint, adapter/, checkpoints/, log.jsonl"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps to train")
    length.add_argument("--epochs", type=int, help="passes over the data (default 1)")
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="examples per forward, per process"
    )
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum, help="forwards per optimizer step")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 with LoRA, 2e-5 full)")
    parser.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices"
    )
    parser.add_argument(
        "--warmup-steps", type=int, help="linear warmup steps before the cosine (default 5%%)"
    )
    parser.add_argument(
        "--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a share of the peak"
    )
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm")
    parser.add_argument(
        "--lora-rank", type=int, default=d.lora_rank, help="LoRA rank; 0 for full fine-tuning"
    )
    parser.add_argument(
        "--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (scale = alpha / rank)"
    )
    parser.add_argument(
        "--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input"
    )
    parser.add_argument(
        "--lora-targets",
        default=",".join(d.lora_targets),
        help="comma-separated linear layers that get adapters",
    )
    parser.add_argument(
        "--depth-decoder-ratio", type=float, default=d.depth_decoder_ratio,
        help="share of audio frames the depth decoder trains on (default 1/16, as Sesame trained)",
    )  # fmt: skip
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                        help="auto: bf16 autocast where the GPU supports it, else fp32")  # fmt: skip
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute activations: less memory"
    )
    parser.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps between validation losses"
    )
    parser.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    parser.add_argument(
        "--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept on disk"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for data order, labels and dropout")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument(
        "--cache-dir", help="where encoded audio is cached (default: .csm_cache next to the data)"
    )
    parser.add_argument("--prepare-only", action="store_true", help="encode and cache the audio, then stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or messages")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        model=args.model, data=args.data, out=args.out, val=args.val, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        depth_decoder_ratio=args.depth_decoder_ratio, precision=args.precision,
        activation_checkpointing=args.activation_checkpointing, eval_every=args.eval_every,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed, resume=args.resume,
        device=args.device, cache_dir=args.cache_dir, prepare_only=args.prepare_only,
        progress=not args.no_progress,
    )  # fmt: skip


def run_finetune(args: argparse.Namespace) -> int:
    """Run `csm finetune`; errors in the data or settings print one message and return 2."""
    from ..checkpoint import CheckpointError

    main = os.environ.get("RANK", "0") == "0"  # under torchrun, one process speaks
    try:
        out = finetune(config_from_args(args))
    except (DataError, CheckpointError, ValueError) as e:
        if main:
            print(f"csm finetune: error: {e}", file=sys.stderr)
        return 2
    if main and not args.no_progress:
        print(f"done: the fine-tuned checkpoint is in {out}")
    return 0
