"""Conversations: each turn spoken in the context of the turns before it (`tts.converse`, `Conversation`).

A turn with audio was already spoken: it goes into the context as it is (its clip encoded once). A turn without
audio is spoken sentence by sentence; each sentence is generated after the bound voices' clips, the earlier
turns (text and audio, given or generated: generated audio is carried as its codes) and the sentences of the
turn before it, the oldest turns dropped first when the context window is full (see `csm.planner`). The
turn then joins the context of the next turns as one turn.

Seeds: with a conversation seed S, turn i (counting every turn, given ones too) uses S + i, and its sentence j
uses S + i + j, as `tts(text, seed=S + i)` would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .audio import load_audio
from .chunking import (
    CROSSFADE_MS,
    MAX_CHUNK_CHARS,
    MAX_TEXT_CHARS,
    CrossfadeStream,
    crossfade_join,
    progress_bar,
    split_sentences,
)
from .dialogue import speaker_id  # noqa: F401 (kept importable from here)
from .planner import Turn, TurnError, voice_turns
from .voice import Voice, encode_audio

PAUSE_SECONDS = 0.3


@dataclass
class SpokenTurn:
    """One turn of a conversation: who, what, its audio (24 kHz float32) and how it came to be."""

    index: int  # its place in the conversation, given turns counted
    speaker: int
    text: str
    audio: np.ndarray  # generated: its sentences joined with crossfades; given: the clip
    given: bool = False  # the audio was given (a turn that was already spoken): context only
    seed: int | None = None  # generated: the seed that makes it again (sentence j uses seed + j)
    frames: int = 0  # generated codec frames (12.5 per second)


@dataclass
class DialogueAudio:
    """A spoken dialogue: the mix, every turn, and the manifest (per turn: start and end in the mix)."""

    audio: np.ndarray  # the spoken turns (and given ones, when asked) joined with pauses
    sampling_rate: int
    turns: list[SpokenTurn]
    manifest: dict


class Conversation:
    """A conversation kept across calls: `add` records a turn (spoken by someone, with its audio; or spoken
    now, without), `say` and `stream` speak a reply in the context of every turn so far. The context window is
    managed here: the oldest turns leave it first, the voices' clips stay.

        conv = tts.conversation(voices={0: "alice"}, seed=1)
        conv.add(1, "Hi, did you get my message?", audio="question.wav")   # what the user said
        reply = conv.say(0, "I did! Let's talk tomorrow.")                 # float32, 24 kHz
    """

    def __init__(
        self,
        tts,
        voices: dict | None = None,
        seed: int | None = None,
        fixed: list[Turn] | None = None,
        frame_policy: str = "keep",
        **options,
    ):
        """voices: {speaker: Voice, saved voice name or folder}; seed: see the module; fixed: more turns kept
        in every prompt; frame_policy: "keep" drops old turns so that a sentence's whole frame budget fits (a
        turn is never cut short by a long history), "fit" keeps history and shrinks the budget (see
        csm.planner); options: temperature, top_k, top_p, do_sample, max_seconds,
        max_new_tokens, max_chunk_chars, crossfade_ms, progress (a bar over each turn's sentences)."""
        for name in ("speaker", "voice", "context", "seed"):
            if name in options:
                raise TypeError(
                    f"a conversation takes no {name!r} option: bind voices with voices={{0: ...}}"
                )
        self.tts, self.opts, self.frame_policy = tts, tts._options(options), frame_policy
        self.seed = None if seed is None else int(seed)
        self.voices: dict[int, Voice] = {}
        self.fixed: list[Turn] = []
        for key, value in sorted(
            (voices or {}).items(), key=lambda kv: speaker_id(kv[0], "a voice's speaker")
        ):
            speaker = speaker_id(key, "a voice's speaker")
            voice = tts._voice(value)
            if not isinstance(voice, Voice):
                raise ValueError(
                    f"speaker {speaker}: a voice is a Voice or a saved voice's name, got {value!r}"
                )
            self.voices[speaker] = voice
            self.fixed += voice_turns(voice, voice.codes(tts.model), speaker=speaker)
        self.fixed += list(fixed or [])
        self.history: list[Turn] = []  # earlier turns, oldest first; trimmed as the window fills
        self.turns: list[SpokenTurn] = []

    @property
    def sampling_rate(self) -> int:
        return self.tts.sampling_rate

    # ---- turns ------------------------------------------------------------------------------------

    def add(self, speaker: int, text: str, audio=None, seed: int | None = None) -> SpokenTurn:
        """Record a turn. With `audio` (a path, array at 24 kHz or tensor) it was spoken already and becomes
        context as it is; without, it is spoken now, in context (as `say`). Returns the turn."""
        if audio is None:
            self.say(speaker, text, seed=seed)
            return self.turns[-1]
        speaker, text = self._check(speaker, text)
        try:
            clip = load_audio(audio)
        except (ValueError, OSError) as e:
            raise TurnError(len(self.turns), f"cannot read its audio: {e}") from None
        codes = encode_audio(self.tts.model, clip)  # once: the clip stays in the context as these codes
        self.history.append(Turn(speaker, text, clip, codes))
        self.turns.append(SpokenTurn(len(self.turns), speaker, text, clip, given=True))
        return self.turns[-1]

    def say(self, speaker: int, text: str, seed: int | None = None) -> np.ndarray:
        """Speak `text` as `speaker` in the context of the conversation; returns float32 audio at 24 kHz."""
        for _ in self._speak(speaker, text, seed, chunk_frames=None):
            pass
        return self.turns[-1].audio

    def stream(
        self, speaker: int, text: str, chunk_frames: int = 4, seed: int | None = None
    ) -> Iterator[np.ndarray]:
        """`say`, yielding audio as it is generated. Stopping early records what was spoken so far."""
        joiner = CrossfadeStream(self.sampling_rate, float(self.opts.get("crossfade_ms", CROSSFADE_MS)))
        current = None
        for sentence, last, piece in self._speak(speaker, text, seed, chunk_frames):
            if sentence != current:
                joiner.start_sentence(last)
                current = sentence
            out = joiner.push(piece)
            if len(out):
                yield out
        tail = joiner.finish()
        if len(tail):
            yield tail

    def _check(self, speaker, text) -> tuple[int, str]:
        index = len(self.turns)
        try:
            speaker = speaker_id(speaker)
        except ValueError as e:
            raise TurnError(index, str(e)) from None
        if not isinstance(text, str) or not text.strip():
            raise TurnError(index, "the text is empty: there is nothing to say")
        if len(text) > MAX_TEXT_CHARS:
            raise TurnError(index, f"the text has {len(text)} characters, more than {MAX_TEXT_CHARS}")
        return speaker, " ".join(text.split())

    def _speak(self, speaker, text, seed, chunk_frames: int | None):
        """Speak a turn sentence by sentence: yields (sentence, is_last, audio piece); records the turn when
        done, or when the consumer stops early (what was made is what was said)."""
        speaker, text = self._check(speaker, text)
        tts, opts = self.tts, self.opts
        index = len(self.turns)
        if seed is None and self.seed is not None:
            seed = self.seed + index
        chunks = split_sentences(text, int(opts.get("max_chunk_chars") or MAX_CHUNK_CHARS))
        made: list[tuple[str, list, list]] = []  # (sentence, audio pieces, codes pieces) as generated
        done: list[Turn] = []  # this turn's sentences, carried into the next sentences' context
        parts, codes = [], []
        try:
            with torch.inference_mode():
                for j, chunk in enumerate(progress_bar(chunks, opts.get("progress"))):
                    parts, codes = [], []
                    carried = [*self.history, *done]
                    try:
                        prompt = tts._prompt([chunk], speaker, self.fixed, carried, opts, self.frame_policy)
                    except ValueError as e:  # no room in the context even without history
                        raise TurnError(index, str(e)) from None
                    dropped, older = len(carried) - len(prompt.carried), len(self.history)
                    self.history, done = self.history[dropped:], done[max(0, dropped - older) :]
                    sentence_seed = None if seed is None else seed + j
                    if chunk_frames is None:
                        pieces = tts._generate(prompt, opts, sentence_seed)
                    else:
                        pieces = tts._stream(prompt, opts, sentence_seed, chunk_frames)
                    for piece, piece_codes in pieces:
                        parts.append(piece)
                        codes.append(piece_codes)
                        yield j, j == len(chunks) - 1, piece
                    made.append((chunk, parts, codes))
                    if sum(len(c) for c in codes):
                        done.append(Turn(speaker, chunk, np.concatenate(parts), torch.cat(codes)))
                    parts, codes = [], []
        except GeneratorExit:
            if parts:  # the sentence being spoken when the listener stopped
                made.append((chunks[len(made)], parts, codes))
            self._record(speaker, made, seed)
            raise
        self._record(speaker, made, seed)

    def _record(self, speaker: int, made: list[tuple[str, list, list]], seed: int | None) -> None:
        """The turn as spoken: into the record, and into the context as one turn."""
        audios = [np.concatenate(parts) if parts else np.zeros(0, np.float32) for _, parts, _ in made]
        codes = [c for m in made for c in m[2]]
        frames = sum(len(c) for c in codes)
        text = " ".join(m[0] for m in made)
        if frames:
            self.history.append(Turn(speaker, text, np.concatenate(audios), torch.cat(codes)))
        ms = float(self.opts.get("crossfade_ms", CROSSFADE_MS))
        audio = crossfade_join(audios, self.sampling_rate, ms)
        self.turns.append(SpokenTurn(len(self.turns), speaker, text, audio, seed=seed, frames=frames))

    # ---- the whole ----------------------------------------------------------------------------------

    def result(self, pause: float = PAUSE_SECONDS, given: bool = False) -> DialogueAudio:
        """The conversation so far: its generated turns (and, with `given`, the given ones) joined with `pause`
        seconds of silence, and the manifest."""
        if not (isinstance(pause, (int, float)) and 0 <= pause <= 60):
            raise ValueError(f"pause must be between 0 and 60 seconds, got {pause!r}")
        rate = self.sampling_rate
        gap = np.zeros(round(pause * rate), np.float32)
        pieces, entries, at = [], [], 0
        for turn in self.turns:
            if turn.given and not given:
                continue
            if pieces:
                pieces.append(gap)
                at += len(gap)
            entries.append(turn_entry(turn, at, rate))
            pieces.append(turn.audio)
            at += len(turn.audio)
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        voices = {s: v.name for s, v in self.voices.items()}
        manifest = dialogue_manifest(entries, len(audio), rate, pause, self.seed, voices)
        return DialogueAudio(audio, rate, list(self.turns), manifest)


def turn_entry(turn: SpokenTurn, start: int, rate: int) -> dict:
    """A turn's manifest entry; `start` in samples of the mix."""
    entry = manifest_entry(
        turn.index, turn.speaker, turn.text, start, start + len(turn.audio), rate, turn.seed
    )
    entry["frames"] = turn.frames
    if turn.given:
        entry["given"] = True
    return entry


def manifest_entry(
    index: int, speaker: int, text: str, start: int, end: int, rate: int, seed: int | None, frames: int = 0
) -> dict:
    """One turn of a dialogue manifest: start and end in seconds of the mix (from samples), seed, frames."""
    return {
        "index": index,
        "speaker": speaker,
        "text": text,
        "start": round(start / rate, 6),
        "end": round(end / rate, 6),
        "seed": seed,
        "frames": frames,
    }


def dialogue_manifest(entries: list[dict], samples: int, rate: int, pause: float, seed, voices: dict) -> dict:
    """A dialogue's manifest: the mix's length and how it was made, and its turns' entries."""
    return {
        "sampling_rate": rate,
        "seconds": round(samples / rate, 6),
        "pause": pause,
        "seed": seed,
        "voices": {str(s): name for s, name in voices.items()},
        "turns": entries,
    }


def dialogue_turns(turns) -> list[tuple[int, str, object]]:
    """(speaker, text, audio or None) of each turn: dicts {"speaker", "text", "audio"?} or objects with those
    attributes (`csm.dialogue.ScriptTurn`)."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError("turns must be a non-empty list of {'speaker', 'text', 'audio'?} turns")
    out = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict):
            unknown = set(turn) - {"speaker", "text", "audio"}
            if unknown or "speaker" not in turn or "text" not in turn:
                raise ValueError(
                    f"turn {i}: a turn is {{'speaker': 0, 'text': ..., 'audio': optional}}, got keys "
                    f"{', '.join(sorted(turn))}"
                )
            out.append((turn["speaker"], turn["text"], turn.get("audio")))
        elif all(hasattr(turn, k) for k in ("speaker", "text", "audio")):
            out.append((turn.speaker, turn.text, turn.audio))
        else:
            raise ValueError(
                f"turn {i}: expected a dict with 'speaker' and 'text', got {type(turn).__name__}"
            )
    return out


def converse(
    tts,
    turns,
    voices: dict | None = None,
    seed: int | None = None,
    pause: float = PAUSE_SECONDS,
    progress=None,
    **options,
) -> DialogueAudio:
    """Speak a dialogue (see `TextToAudioPipeline.converse`); `progress`: a bar over the turns."""
    checked = dialogue_turns(turns)
    speakers = {speaker_id(s, f"turn {i}: speaker") for i, (s, _, _) in enumerate(checked)}
    for key, value in (voices or {}).items():
        if speaker_id(key, "a voice's speaker") not in speakers:
            raise ValueError(
                f"voice {value if isinstance(value, (str, os.PathLike)) else getattr(value, 'name', value)!r} is "
                f"bound to speaker {key}, who never speaks (speakers: {', '.join(map(str, sorted(speakers)))})"
            )
    if all(audio is not None for _, _, audio in checked):
        raise ValueError("every turn has its audio already: give at least one turn without audio to speak")
    conversation = Conversation(tts, voices=voices, seed=seed, **options)
    for speaker, text, audio in progress_bar(checked, progress, unit="turn"):
        conversation.add(speaker, text, audio)
    return conversation.result(pause)
