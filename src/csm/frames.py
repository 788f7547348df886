"""What a generated frame may hold, and where a row's audio ends: the one rule every caller uses.

The heads score `vocab_size` ids per codebook (2051 on csm-1b) but the codec decodes only the first
`codebook_size` (2048); the ids above are the pad id and two unused slots. Sampling draws from the
decodable ids alone, so no draw ever yields a frame the codec cannot turn into audio. The reference draws
from all of them and then fails in its codec decode; where its greedy pick is decodable, ours is the same.

A row's audio ends at its end-of-audio frame (codebooks 0..K-2 all `eos`, the test the reference stops a
row on) or at a pad frame (a row that has already ended); neither is audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FrameRule:
    """The ids a frame may hold (`0 <= id < codebook_size`) and the end-of-audio test."""

    codebook_size: int  # ids the codec can decode, in every codebook
    eos: int  # the end-of-audio frame holds this id in codebooks 0..K-2
    pad: int  # fills the frames of a row that has ended

    @classmethod
    def of(cls, model) -> FrameRule:
        cfg = model.config
        entries = cfg.vocab_size
        codec = getattr(model, "codec_model", None)
        if codec is not None:
            entries = min(entries, codec.config.codebook_size)
        return cls(entries, cfg.codebook_eos_token_id, cfg.codebook_pad_token_id)

    def decodable_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores (..., V) of the ids a frame may hold, (..., codebook_size); their index is the id."""
        return logits[..., : self.codebook_size]

    def is_end_of_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (...): True at an end-of-audio frame."""
        return (codes[..., :-1] == self.eos).all(-1)

    def ends(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (...): True where there is no audio: an end-of-audio frame or a pad frame."""
        return self.is_end_of_audio(codes) | (codes == self.pad).any(-1)

    def lengths(self, codes: torch.Tensor) -> list[int]:
        """Frames of audio per row of codes (B, F, K): up to (not including) its first ended frame."""
        ended = self.ends(codes)  # (B, F)
        first = torch.where(
            ended.any(-1),
            ended.float().argmax(-1),
            torch.full_like(ended[:, 0], codes.shape[1], dtype=torch.long),
        )
        return first.tolist()
