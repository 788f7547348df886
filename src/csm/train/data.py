"""Fine-tuning data: JSON-lines datasets, Mimi codes cached beside them, tokenized examples, length-bucketed batches.

A line is `{"audio": "clip.wav", "text": "...", "speaker": 0, "context": [{"audio": ..., "text": ..., "speaker": ...}]}`;
audio paths are relative to the file. Every clip is encoded once and cached under `.csm_cache/<codec>/<sha256>`
next to the data, so later runs and epochs never run the codec.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from ..audio import SAMPLING_RATE, load_audio

CACHE_DIR_NAME = ".csm_cache"
IGNORE = -100  # position not scored
BACKBONE_ONLY = -101  # audio frame scored on codebook 0 by the backbone, skipped by the depth decoder


class DataError(ValueError):
    """A dataset line the recipe cannot use, with the file and line in the message."""


@dataclass
class Turn:
    audio: Path
    text: str
    speaker: int
    num_samples: int  # at 24 kHz, from the file's header


@dataclass
class Sample:
    """One dataset line: context turns, then the target turn last."""

    turns: list[Turn]
    where: str  # "train.jsonl:3", for messages


@dataclass
class Example:
    """A tokenized sample: ids with one audio token per frame, and the codes of its clips in order."""

    input_ids: torch.Tensor  # (L,)
    clips: list[torch.Tensor]  # each (F_i, K), int16

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    labels: torch.Tensor  # (B, T): -100, -101, or the audio / audio-eos token id
    audio_codes: list[torch.Tensor]  # per clip (F_i, K), row-major
    backbone_targets: int  # positions the backbone loss averages over
    depth_targets: int  # frames the depth-decoder loss averages over
    num_tokens: int  # without padding

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            [c.to(device) for c in self.audio_codes],
            self.backbone_targets,
            self.depth_targets,
            self.num_tokens,
        )


# ---- reading and checking ---------------------------------------------------------------------------


def _turn(d, base: Path, where: str, problems: list[str]) -> Turn | None:
    if not isinstance(d, dict):
        problems.append(f"{where}: expected an object with audio, text and speaker, got {type(d).__name__}")
        return None
    audio, text, speaker = d.get("audio"), d.get("text"), d.get("speaker", 0)
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: text is empty or missing; every clip needs its transcript")
    if isinstance(speaker, str) and speaker.isdigit():
        speaker = int(speaker)
    if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
        problems.append(f"{where}: speaker must be a non-negative integer, got {speaker!r}")
    if not isinstance(audio, str) or not audio:
        problems.append(f"{where}: audio must be a path to a sound file, got {audio!r}")
        return None
    path = (base / audio).expanduser()
    if not path.is_file():
        problems.append(f"{where}: audio file {audio} not found (looked at {path})")
        return None
    try:
        info = sf.info(str(path))
    except Exception as e:
        problems.append(f"{where}: audio file {audio} is not readable ({str(e).strip() or type(e).__name__})")
        return None
    if info.frames <= 0:
        problems.append(f"{where}: audio file {audio} is empty")
        return None
    num_samples = -(-info.frames * SAMPLING_RATE // info.samplerate)
    return Turn(
        path,
        text.strip() if isinstance(text, str) else "",
        speaker if isinstance(speaker, int) else 0,
        num_samples,
    )


def read_jsonl(path: str | os.PathLike) -> list[Sample]:
    """Parse and check a dataset file; raise one DataError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {path} not found")
    samples, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg})")
            continue
        context = d.get("context", []) if isinstance(d, dict) else []
        if not isinstance(context, list):
            problems.append(f"{where}: context must be a list of turns")
            context = []
        turns = [_turn(c, path.parent, f"{where} context {i}", problems) for i, c in enumerate(context)]
        turns.append(_turn(d, path.parent, where, problems))
        if all(t is not None for t in turns):
            samples.append(Sample(turns, where))
    if problems:
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems[:20]) + more)
    if not samples:
        raise DataError(f'{path} has no samples; each line is {{"audio": ..., "text": ..., "speaker": 0}}')
    return samples


# ---- code cache ---------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def codec_fingerprint(codec: torch.nn.Module) -> str:
    """A short hash of the codec's config and weights: codes cached under another codec are never reused."""
    h = hashlib.sha256()
    config = getattr(codec, "config", None)
    h.update(
        json.dumps(config.to_dict() if hasattr(config, "to_dict") else repr(config), sort_keys=True).encode()
    )
    for name, t in sorted(codec.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_folder(data_file: Path, fingerprint: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or data_file.parent / CACHE_DIR_NAME) / fingerprint


def _cache_path(folder: Path, digest: str) -> Path:
    return folder / f"{digest}.safetensors"


def clip_digests(samples: list[Sample]) -> dict[Path, str]:
    """sha256 of every audio file the samples use."""
    return {t.audio: file_digest(t.audio) for s in samples for t in s.turns}


def missing_clips(digests: dict[Path, str], folder: Path) -> dict[str, Path]:
    """digest -> a file with that content, for the clips not in the cache yet."""
    todo = {}
    for path, digest in digests.items():
        if not _cache_path(folder, digest).is_file():
            todo.setdefault(digest, path)
    return todo


@torch.no_grad()
def encode_clips(todo: dict[str, Path], codec, folder: Path, progress: bool = False) -> None:
    """Encode each clip alone (as the reference does) and write its codes (F, K) to the cache, atomically."""
    from tqdm import tqdm

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the code cache {folder} ({e.strerror}); choose another with --cache-dir"
        ) from None
    for digest, path in tqdm(sorted(todo.items()), desc="encoding audio", disable=not progress or not todo):
        try:
            wav = torch.from_numpy(load_audio(path, target_rate=SAMPLING_RATE))
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        codes = codec.encode(wav.to(codec.device, codec.dtype)[None, None]).audio_codes[0].T  # (F, K)
        tmp = folder / f".{digest}.{os.getpid()}.tmp"
        save_file({"codes": codes.to(torch.int16).cpu().contiguous()}, tmp, metadata={"source": path.name})
        os.replace(tmp, _cache_path(folder, digest))


def load_codes(digests: dict[Path, str], folder: Path) -> dict[Path, torch.Tensor]:
    """Cached codes (F, K) per audio file, kept as int16 (Mimi's codes are < 2048) until batched."""
    return {path: load_file(_cache_path(folder, d))["codes"] for path, d in digests.items()}


# ---- tokenizing ---------------------------------------------------------------------------------------


def tokenize(sample: Sample, frames: list[int], processor, max_length: int) -> torch.Tensor:
    """Render the sample with the checkpoint's chat template and put `frames[i]` audio tokens for clip i.

    Gives the ids `CsmProcessor.apply_chat_template` gives for the same conversation with the audio loaded.
    """
    dummy = np.zeros(1, dtype=np.float32)  # rendering only needs to know each turn has audio
    conversation = [
        {
            "role": str(t.speaker),
            "content": [{"type": "text", "text": t.text}, {"type": "audio", "audio": dummy}],
        }
        for t in sample.turns
    ]
    parts = processor.apply_chat_template(conversation, tokenize=False).split(processor.audio_token)
    if len(parts) != len(frames) + 1:
        raise DataError(
            f"{sample.where}: the chat template placed {len(parts) - 1} audio tokens for {len(frames)} clips"
        )
    text = parts[0] + "".join(processor.audio_token * n + p for n, p in zip(frames, parts[1:], strict=True))
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > max_length:
        raise DataError(
            f"{sample.where}: {len(ids)} tokens (text and {sum(frames)} audio frames), more than the "
            f"model's context of {max_length}; shorten the clip, drop context turns or split the line"
        )
    return torch.tensor(ids, dtype=torch.long)


def check_lengths(samples: list[Sample], processor, max_length: int) -> None:
    """Raise for samples that cannot fit the context, from the files' lengths, before any encoding."""
    problems = []
    for s in samples:
        try:
            tokenize(s, [processor.num_audio_frames(t.num_samples) for t in s.turns], processor, max_length)
        except DataError as e:
            problems.append(str(e))
    if problems:
        raise DataError(f"{len(problems)} sample(s) do not fit:\n" + "\n".join(problems[:20]))


def build_examples(
    samples: list[Sample], codes: dict[Path, torch.Tensor], processor, max_length: int
) -> list[Example]:
    """Tokenize every sample with its clips' cached codes."""
    out = []
    for s in samples:
        clips = [codes[t.audio] for t in s.turns]
        out.append(Example(tokenize(s, [len(c) for c in clips], processor, max_length), clips))
    return out


def labels_for(
    example: Example, audio_id: int, audio_eos_id: int, depth_ratio: float, seed: int
) -> torch.Tensor:
    """Labels with the reference's semantics: every audio frame and end-of-audio frame is learned; all but
    a `depth_ratio` share of the audio frames (drawn with `seed`) are -101, learned by the backbone only."""
    ids = example.input_ids
    audio = ids == audio_id
    labels = torch.where(audio | (ids == audio_eos_id), ids, IGNORE)
    frames = audio.nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    skipped = frames[torch.randperm(len(frames), generator=g)[: int(len(frames) * (1 - depth_ratio))]]
    labels[skipped] = BACKBONE_ONLY
    return labels


def collate(examples: list[Example], labels: list[torch.Tensor], pad_id: int) -> Batch:
    """Right-pad into a batch: real tokens keep positions 0..L-1 and never attend to padding."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    padded = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for b, (e, lab) in enumerate(zip(examples, labels, strict=True)):
        input_ids[b, : len(e)] = e.input_ids
        padded[b, : len(e)] = lab
    return Batch(
        input_ids,
        padded,
        [c.long() for e in examples for c in e.clips],
        backbone_targets=int((padded[:, 1:] != IGNORE).sum()),
        depth_targets=int((padded >= 0).sum()),
        num_tokens=sum(len(e) for e in examples),
    )


# ---- batching -----------------------------------------------------------------------------------------


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def epoch_batches(
    lengths: list[int], global_batch: int, seed: int, epoch: int, bucket: int = 64
) -> list[list[int]]:
    """The epoch's global batches of example indices, of similar lengths, in a seeded order.

    Shuffle, sort windows of `bucket` batches by length, cut them into batches, shuffle the batches. The last
    batch is filled up from the start of the epoch, so every step has `global_batch` examples.
    """
    rng = random.Random(mix_seed(seed, epoch))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    steps = -(-len(order) // global_batch)
    while len(order) < steps * global_batch:
        order += order[: steps * global_batch - len(order)]
    window = global_batch * bucket
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return -(-num_examples // global_batch)
