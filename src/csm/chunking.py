"""Long input in chunks: text split into sentence-sized pieces, their audio joined with short crossfades, and a
progress bar over them. Used by the pipeline, conversations, the server and batch jobs alike."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from .audio import SAMPLING_RATE

CROSSFADE_MS = 10.0
MAX_CHUNK_CHARS = 200  # about 10-15 s of speech: what one CSM call says well
MIN_CHUNK_CHARS = 24  # shorter sentences ("Hi.") ride along with the next one
MAX_TEXT_CHARS = 100_000

SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+")
CLAUSE_END = re.compile(r"(?<=[,;:—])\s+")


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cut an over-long sentence at clause marks, then between words, into pieces of at most max_chars."""
    pieces: list[str] = []
    for clause in CLAUSE_END.split(sentence):
        words, current = clause.split(), ""
        for word in words:
            if current and len(current) + 1 + len(word) > max_chars:
                pieces.append(current)
                current = word
            else:
                current = f"{current} {word}" if current else word
        if current:
            pieces.append(current)
    out: list[str] = []  # glue clauses back while they fit
    for piece in pieces:
        if out and len(out[-1]) + 1 + len(piece) <= max_chars:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def split_sentences(
    text: str, max_chars: int = MAX_CHUNK_CHARS, min_chars: int = MIN_CHUNK_CHARS
) -> list[str]:
    """Split text into sentence-sized chunks of at most `max_chars` (long sentences cut at commas, then words);
    a sentence shorter than `min_chars` joins the next one."""
    text = " ".join(text.split())
    if not text:
        return []
    chunks: list[str] = []
    for sentence in SENTENCE_END.split(text):
        sentence = sentence.strip()
        if sentence:
            chunks.extend(_split_long(sentence, max_chars) if len(sentence) > max_chars else [sentence])
    merged: list[str] = []
    for chunk in chunks:
        if merged and len(merged[-1]) < min_chars and len(merged[-1]) + 1 + len(chunk) <= max_chars:
            merged[-1] = f"{merged[-1]} {chunk}"
        else:
            merged.append(chunk)
    return merged


def crossfade_join(
    pieces: Sequence[np.ndarray], sampling_rate: int = SAMPLING_RATE, ms: float = CROSSFADE_MS
) -> np.ndarray:
    """Concatenate waveforms, overlapping each join by `ms` with a linear fade so no click is heard."""
    pieces = [np.asarray(p, dtype=np.float32) for p in pieces if len(p)]
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    out = pieces[0]
    for piece in pieces[1:]:
        n = min(int(sampling_rate * ms / 1000), len(out), len(piece))
        if n == 0:
            out = np.concatenate([out, piece])
            continue
        fade = np.linspace(0.0, 1.0, n, dtype=np.float32)
        mixed = out[-n:] * (1 - fade) + piece[:n] * fade
        out = np.concatenate([out[:-n], mixed, piece[n:]])
    return out


class CrossfadeStream:
    """`crossfade_join` for audio that arrives in pieces: call `start_sentence(last)` before each sentence,
    `push` each piece and emit what it returns, and emit `finish()` at the end. Until the last sentence, the
    latest `ms` of audio is held back to fade into the next one."""

    def __init__(self, sampling_rate: int = SAMPLING_RATE, ms: float = CROSSFADE_MS):
        self.sampling_rate, self.ms = sampling_rate, ms
        self.fade = int(sampling_rate * ms / 1000)
        self.held = np.zeros(0, dtype=np.float32)
        self.fading_in = self.last = False

    def start_sentence(self, last: bool = False) -> None:
        self.fading_in, self.last = True, last

    def push(self, piece: np.ndarray) -> np.ndarray:
        piece = np.asarray(piece, dtype=np.float32)
        if not len(piece):
            return piece
        if self.fading_in and len(self.held):
            piece, self.held = crossfade_join([self.held, piece], self.sampling_rate, self.ms), self.held[:0]
        self.fading_in = False
        joined = np.concatenate([self.held, piece])
        cut = len(joined) if self.last else max(len(joined) - self.fade, 0)
        self.held = joined[cut:]
        return joined[:cut]

    def finish(self) -> np.ndarray:
        held, self.held = self.held, self.held[:0]
        return held


def progress_bar(items: list, progress: bool | Callable | None, unit: str = "sentence"):
    """`items`, wrapped in a tqdm bar when `progress` is True (and there is more than one), or by `progress`
    itself when it is a callable."""
    if callable(progress):
        return progress(items)
    if progress and len(items) > 1:
        from tqdm.auto import tqdm

        return tqdm(items, desc=f"{unit}s", unit=unit, leave=False)
    return items
