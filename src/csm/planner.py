"""Turn planning: which turns go into a prompt, trimmed to the model's context window.

Every caller that speaks in context (long text in the pipeline, dialogues, the server, batch synthesis) builds
its prompts here:

    prompt = plan_prompt(processor, fixed, carried, speaker=1, text="Oh, hi!", frames=150, limit=2048)
    out = model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                         audio_codes=prompt.audio_codes, max_new_tokens=prompt.frames)
    carried = [*prompt.carried, Turn(1, "Oh, hi!", audio, codes)]   # the history for the next prompt

`fixed` turns (a voice's reference clips) are always kept; `carried` turns (earlier sentences or turns, with
the audio made for them) are dropped oldest first until the prompt and its frames fit in `limit` positions.
Generated audio is carried as the codes it was decoded from, never encoded again: a turn's audio only counts
its frames for the chat template.

How the frame budget meets the window is the caller's choice (`policy`):
- "fit": keep as much history as leaves room for one frame; the budget shrinks to the room left.
- "keep": drop history until the whole budget fits; with no history left, shrink it to the room (long text,
  dialogues and the server: a late sentence is never cut short because minutes of speech fill the window).
- "exact": drop history until the whole budget fits, else raise (the pipeline when the user fixed the length).

History leaves in large steps (`slide` positions, a quarter of the window by default): when turns must go,
the planner drops up to the first turn that starts at least the next multiple of `slide` positions into the
carried history. Every later prompt then begins with the same turns until the window fills again, so their
keys and values are found in the prefix store (csm.prefix_cache) instead of the whole history being prefilled
again after each turn; a client that resends its whole history gets the same cut each time, since the grid is
counted from its first turn. A slide costs one prefill of the history kept (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .voice import encode_audio

FramePolicy = Literal["fit", "keep", "exact"]
POLICIES = ("fit", "keep", "exact")
SLIDE_FRACTION = 4  # history leaves a quarter of the window at a time


@dataclass
class Turn:
    """One context turn: who spoke, what they said, its audio (24 kHz mono) and that audio's codes (F, K).

    `codes` may stay None until the turn is about to be generated against (the server encodes saved voices on
    the model's thread); the audio alone fixes how many frames the turn takes in the prompt."""

    speaker: int
    text: str
    audio: np.ndarray
    codes: torch.Tensor | None = None

    def as_message(self) -> dict:
        """The turn as a chat-template message (text and audio)."""
        return {
            "role": str(self.speaker),
            "content": [{"type": "text", "text": self.text}, {"type": "audio", "audio": self.audio}],
        }


class TurnError(ValueError):
    """A turn that cannot be spoken or added; `index` is its place in the conversation."""

    def __init__(self, index: int, message: str):
        super().__init__(f"turn {index}: {message}")
        self.index, self.message = index, message


def voice_turns(voice, codes: list[torch.Tensor] | None = None, speaker: int | None = None) -> list[Turn]:
    """A voice's reference clips as context turns, spoken by `speaker` (default: the voice's own); `codes`
    from `voice.codes(model)`, or None to encode later."""
    speaker = voice.speaker if speaker is None else speaker
    codes = codes if codes is not None else [None] * len(voice.clips)
    return [Turn(speaker, text, audio, c) for (audio, text), c in zip(voice.clips, codes, strict=True)]


def encode_turns(model, turns: list[Turn]) -> None:
    """Encode the audio of the turns that have no codes yet (given clips), once: their codes are kept."""
    for turn in turns:
        if turn.codes is None:
            turn.codes = encode_audio(model, turn.audio)


@dataclass
class Prompt:
    """Model inputs for the next text after its context, the frames it may take, and the history kept."""

    input_ids: torch.Tensor  # (B, T), left-padded
    attention_mask: torch.Tensor  # (B, T)
    context: list[Turn]  # the fixed turns, then the carried turns kept: their audio, in prompt order
    carried: list[Turn]  # the carried turns kept (the newest ones of those given)
    frames: int  # frame budget: prompt + frames <= limit

    @property
    def length(self) -> int:
        """Positions the prompt takes (T)."""
        return self.input_ids.shape[1]

    @property
    def audio_codes(self) -> list[torch.Tensor] | None:
        """Codes (F_i, K) of each context turn, repeated for every row, as `generate(audio_codes=...)` takes
        them; None without context. Every turn's codes must be set."""
        codes = [t.codes for t in self.context]
        if any(c is None for c in codes):
            raise ValueError("a context turn has no codes yet: encode its audio first")
        return codes * self.input_ids.shape[0] or None


def plan_prompt(
    processor,
    fixed: list[Turn],
    carried: list[Turn],
    speaker: int,
    text: str | list[str],
    frames: int,
    limit: int,
    policy: FramePolicy = "fit",
    slide: int | None = None,
) -> Prompt:
    """The prompt for `speaker` saying `text` (a list: one row each, same context) after the `fixed` turns and
    the newest `carried` turns that fit with `frames` (see the module's `policy`) in `limit` positions, older
    turns dropped in steps of `slide` positions (default: limit // SLIDE_FRACTION; 0: the fewest turns).
    Raises ValueError when not even the fixed turns and the text leave room for the frames."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    texts = [text] if isinstance(text, str) else list(text)
    need = 1 if policy == "fit" else frames

    def conversations(drop: int) -> list[list[dict]]:
        conv = [t.as_message() for t in [*fixed, *carried[drop:]]]
        return [[*conv, {"role": str(speaker), "content": [{"type": "text", "text": x}]}] for x in texts]

    def fits(length: int, frames_needed: int) -> bool:
        within = processor.max_length is None or length <= processor.max_length  # else the processor refuses
        return within and length + frames_needed <= limit

    tokenized: dict[int, list[list[int]]] = {}

    def measure(drop: int) -> int:
        """Prompt positions with the `drop` oldest carried turns left out. The ids are the processor's (the
        rendered template, each audio placeholder once per frame), made without loading or copying audio."""
        if drop in tokenized:
            return max(len(ids) for ids in tokenized[drop])
        rendered = processor.apply_chat_template(conversations(drop), tokenize=False)
        clips = [t.audio for t in [*fixed, *carried[drop:]]]  # only their lengths are read
        tokenized[drop] = processor._tokenize(rendered, [clips] * len(texts), False)
        return max(len(ids) for ids in tokenized[drop])

    # Fewer turns never make a longer prompt, so the fewest to drop is found by bisection.
    drop, lo, hi = 0, 1, len(carried)
    if not fits(measure(0), need):
        drop = None
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(measure(mid), need):
                drop, hi = mid, mid - 1
            else:
                lo = mid + 1
        if drop is None:
            drop = len(carried)
            shortest = measure(drop)
            if not (policy == "keep" and fits(shortest, 1)):
                raise ValueError(
                    f"the text and its context take {shortest} tokens and {need} frame(s) must follow: more "
                    f"than the model's context of {limit}. Shorten the text or the voice clips, or lower "
                    "max_seconds."
                )
    slide = limit // SLIDE_FRACTION if slide is None else slide
    if 0 < drop < len(carried) and slide > 0:
        drop = on_grid(drop, len(carried), slide, measure)
    if drop not in tokenized:
        measure(drop)
    inputs = processor._encode(tokenized[drop], [[] for _ in texts], False, 1.0)  # padded ids and mask
    length = inputs["input_ids"].shape[1]
    kept = list(carried[drop:])
    return Prompt(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        context=[*fixed, *kept],
        carried=kept,
        frames=min(frames, limit - length),
    )


def on_grid(fewest: int, turns: int, slide: int, measure) -> int:
    """The turns to drop, at least `fewest`: up to the first turn that starts at or past the next multiple of
    `slide` positions into the carried history (`measure(d)`: the prompt's positions with d turns dropped,
    fewer for more dropped; the first turn's start is measure(0) - measure(d))."""
    whole = measure(0)
    step = -(-(whole - measure(fewest)) // slide) * slide  # the grid line at or after the fewest drop
    lo, hi, drop = fewest, turns, turns
    while lo <= hi:  # the first turn starting at or past that line
        mid = (lo + hi) // 2
        if whole - measure(mid) >= step:
            drop, hi = mid, mid - 1
        else:
            lo = mid + 1
    return drop
