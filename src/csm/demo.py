"""A tiny random-weight CSM checkpoint built on the fly: the whole path runs offline in seconds.

Its weights are random, so its audio is noise. It exists to check an install (`csm demo`) and to give
tests and benchmarks a checkpoint without the hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import CsmConfig
from .model import CsmForConditionalGeneration
from .processor import CsmProcessor

DEMO_VERSION = 1  # bump when the demo checkpoint changes, so stale caches are not reused
TEXT_VOCAB = 300
SPECIAL_TOKENS = ["<|end_of_text|>", "<|begin_of_text|>", "<|AUDIO|>", "<|audio_eos|>"]  # ids 0..3
CODEC_ENTRIES = 2048  # Mimi's codebook size

# The csm-1b chat template, in short: each turn is `<bos>[speaker]text<eos>`, then its audio if any.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not message['role'] is string or not message['role'].isdigit() -%}"
    "{{- raise_exception('The role must be a stringified integer speaker id') -}}"
    "{%- endif -%}"
    "{{- bos_token + '[' + message['role'] + ']' + message['content'][0]['text'] + eos_token -}}"
    "{%- if message['content'] | length > 1 -%}{{- '<|AUDIO|><|audio_eos|>' -}}{%- endif -%}"
    "{%- endfor -%}"
)
_PRETOKENIZE = (
    r"'(?:s|t|re|ve|m|ll|d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+(?!\S)|\s+"
)
_CORPUS = [
    "Hello from the tiny demo model. Its weights are random, so what it says is noise.",
    "Speech comes out of a backbone and a depth decoder, one frame at a time, then through the codec.",
    "The quick brown fox jumps over the lazy dog; we listen and then it answers.",
]


def demo_config() -> CsmConfig:
    """Two-layer backbone and depth decoder, 8 codebooks, and a small Mimi with the real frame geometry."""
    rope = dict(rope_type="default", rope_theta=500000.0)
    return CsmConfig.from_dict(
        dict(
            num_codebooks=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            text_vocab_size=TEXT_VOCAB,
            max_position_embeddings=2048,
            bos_token_id=1,
            pad_token_id=2,
            eos_token_id=0,
            audio_token_id=2,
            audio_eos_token_id=3,
            rope_parameters=dict(rope),
            depth_decoder_config=dict(
                num_codebooks=8,
                backbone_hidden_size=64,
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=9,
                rope_parameters=dict(rope),
            ),
            codec_config=dict(
                hidden_size=32,
                num_filters=8,
                num_residual_layers=1,
                upsampling_ratios=[8, 6, 5, 4],
                upsample_groups=32,
                num_hidden_layers=2,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=4,
                head_dim=8,
                codebook_size=CODEC_ENTRIES,
                codebook_dim=16,
                vector_quantization_hidden_dimension=16,
                num_quantizers=8,
                num_semantic_quantizers=1,
                sliding_window=250,
            ),
        )
    )


def demo_model(seed: int = 0) -> CsmForConditionalGeneration:
    """A random-weight tiny CSM."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the codec's default conv init
    model = CsmForConditionalGeneration(demo_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("codec_model.") and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        for name, b in model.codec_model.named_buffers():
            if name.endswith("embed_sum"):
                b.copy_(torch.randn(b.shape, generator=generator))
    model.generation_config = {"max_new_tokens": 125, "do_sample": True, "temperature": 0.9, "top_k": 50}
    return model


def demo_tokenizer() -> Tokenizer:
    """A byte-level BPE of 300 ids trained on a few sentences; the CSM special tokens are ids 0-3."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return tokenizer


def default_demo_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "csm" / f"demo-v{DEMO_VERSION}"


def _is_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("config.json", "model.safetensors", "tokenizer.json"))


def write_demo_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """Write (or reuse) the tiny demo checkpoint: model and processor in one folder; returns the folder.

    path: where to write it (default ~/.cache/csm/demo-v1). A folder that already holds other files is
    never overwritten.
    """
    folder = Path(path).expanduser() if path is not None else default_demo_dir()
    if _is_complete(folder) and (folder / "DEMO").is_file():
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not a csm demo checkpoint; pass an empty or new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".csm-demo-", dir=folder.parent))
    try:
        demo_model().save_pretrained(staging)
        CsmProcessor(demo_tokenizer(), CHAT_TEMPLATE).save_pretrained(staging)
        (staging / "DEMO").write_text("tiny random-weight CSM written by csm.demo; its audio is noise\n")
        if folder.exists():
            folder.rmdir()
        try:
            staging.rename(folder)
        except OSError:  # another process won the race: use its copy
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
