"""Voices: a speaker id and reference clips with their transcripts, kept as CSM keeps a voice, as audio context.

A saved voice is a small folder: `voice.json`, `clip_0.wav`, ... and, once used with a model, `codes.pt`
holding each clip's codec codes keyed by the codec's fingerprint, so clips are encoded once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import MAX_CLIP_SECONDS, SAMPLING_RATE, load_audio, save_audio

if TYPE_CHECKING:
    import torch

VOICE_FILE = "voice.json"
CODES_FILE = "codes.pt"


MAX_VOICE_CLIPS = 64  # clips a voice file may list
MAX_VOICE_FILE_BYTES = 1 << 20  # a voice.json: names and transcripts


def voices_dir() -> Path:
    """Where named voices live: $CSM_VOICES_DIR, else ~/.local/share/csm/voices."""
    env = os.environ.get("CSM_VOICES_DIR")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "csm" / "voices"


def codec_fingerprint(model) -> str:
    """A short hash of the codec's config and a sample of its weights: codes from one codec fit only it."""
    import torch

    codec = model.codec_model
    h = hashlib.sha256(json.dumps(codec.config.to_dict(), sort_keys=True, default=str).encode())
    for _, p in list(codec.named_parameters())[:4]:
        h.update(p.detach().flatten()[:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def encode_audio(model, audio: np.ndarray) -> torch.Tensor:
    """A 24 kHz mono clip's codec codes (F, K) on the model's device: what it is as audio context."""
    import torch

    codec = model.codec_model
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None]
        return codec.encode(x.to(codec.device, codec.dtype)).audio_codes[0].T.to(model.device)


@dataclass
class Voice:
    """A speaker id and reference clips (mono float32 at 24 kHz, transcript)."""

    name: str
    speaker: int = 0
    clips: list[tuple[np.ndarray, str]] = field(default_factory=list)
    folder: Path | None = None
    _codes: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    store_codes: bool = field(
        default=True, repr=False
    )  # False: codes stay in memory, the folder is untouched

    def __post_init__(self):
        if not self.clips:
            raise ValueError(f"voice {self.name!r} needs at least one reference clip with its transcript")
        if not isinstance(self.speaker, int) or self.speaker < 0:
            raise ValueError(f"speaker must be a non-negative integer, got {self.speaker!r}")
        clips = []
        for i, (audio, text) in enumerate(self.clips):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f"voice {self.name!r}: clip {i} needs its transcript (the words spoken in it)"
                )
            clips.append((load_audio(audio), text.strip()))
        self.clips = clips

    @classmethod
    def from_files(
        cls,
        name: str,
        speaker: int,
        clips: list[tuple[str | os.PathLike, str]],
        max_seconds: float | None = MAX_CLIP_SECONDS,
    ) -> Voice:
        """A voice from audio files (any rate, any channels: resampled to 24 kHz mono) and their transcripts.
        Each clip may hold `max_seconds` of audio (refused from its header, or while decoding: an hour of
        silence in a small FLAC is never decoded into gigabytes)."""
        loaded = []
        for path, text in clips:
            try:
                loaded.append((load_audio(path, max_seconds=max_seconds), text))
            except (ValueError, OSError) as e:
                raise ValueError(f"cannot read clip {path}: {e}") from None
        return cls(name, speaker, loaded)

    @property
    def seconds(self) -> float:
        return sum(len(a) for a, _ in self.clips) / SAMPLING_RATE

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "speaker": self.speaker,
            "sampling_rate": SAMPLING_RATE,
            "clips": [{"audio": f"clip_{i}.wav", "text": text} for i, (_, text) in enumerate(self.clips)],
        }

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write clips as wav and voice.json; an existing different voice there is kept unless `overwrite`."""
        folder = Path(folder).expanduser()
        if (folder / VOICE_FILE).is_file() and not overwrite:
            if Voice.load(folder).to_json() != self.to_json():
                raise ValueError(
                    f"a different voice is already saved at {folder}; pass overwrite=True to replace it"
                )
        elif folder.exists() and not (folder / VOICE_FILE).is_file() and any(folder.iterdir()):
            raise ValueError(f"{folder} holds other files; choose an empty or new folder for the voice")
        folder.mkdir(parents=True, exist_ok=True)
        for i, (audio, _) in enumerate(self.clips):
            save_audio(audio, folder / f"clip_{i}.wav")
        (folder / CODES_FILE).unlink(missing_ok=True)  # codes of the old clips
        (folder / VOICE_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        self.folder = folder
        for fingerprint, codes in self._codes.items():
            self._store_codes(fingerprint, codes)
        return folder

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        store_codes: bool = True,
        max_seconds: float | None = None,
        max_clips: int = MAX_VOICE_CLIPS,
    ) -> Voice:
        """Read a voice folder written by `save` (or `csm voice create`); with `store_codes=False` the codes
        encoded for it are kept in memory only and nothing is written into the folder. Clips are files of the
        folder itself (never a path out of it); with `max_seconds`, all clips together may hold that much audio
        (checked from each header, then while decoding); more than `max_clips` clips are refused unread."""
        folder = Path(folder).expanduser()
        file = folder / VOICE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no voice at {folder}: {VOICE_FILE} is missing")
        if file.stat().st_size > MAX_VOICE_FILE_BYTES:
            raise ValueError(
                f"{file} is {file.stat().st_size} bytes; a voice file is at most {MAX_VOICE_FILE_BYTES}"
            )
        try:
            meta = json.loads(file.read_text())
            entries = meta["clips"]
            if not isinstance(entries, list) or len(entries) > max_clips:
                raise ValueError(f"{file} lists {len(entries)} clips; a voice may have at most {max_clips}")
            clips, left = [], max_seconds
            for c in entries:
                name = c["audio"]
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise ValueError(f"{file}: clip {name!r} is not a file name in the voice's folder")
                audio = load_audio(folder / name, max_seconds=left)
                if left is not None:
                    left -= len(audio) / SAMPLING_RATE
                clips.append((audio, c["text"]))
            voice = cls(meta.get("name", folder.name), int(meta.get("speaker", 0)), clips, folder=folder)
            voice.store_codes = store_codes
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file} is not a valid voice file: {e}") from None
        cached = folder / CODES_FILE
        if cached.is_file():
            import torch

            try:
                stored = torch.load(cached, map_location="cpu", weights_only=True)
                voice._codes = {k: list(v) for k, v in stored.items() if len(v) == len(clips)}
            except Exception:  # a stale or broken cache is only a cache: encode again
                voice._codes = {}
        return voice

    @classmethod
    def named(cls, name: str, store_codes: bool = True) -> Voice:
        """A voice from the voices folder by name, or from a folder path (`store_codes` as for `load`)."""
        path = Path(name).expanduser()
        if (path / VOICE_FILE).is_file():
            return cls.load(path, store_codes)
        if (voices_dir() / name / VOICE_FILE).is_file():
            return cls.load(voices_dir() / name, store_codes)
        known = ", ".join(list_voices()) or "none saved yet"
        raise FileNotFoundError(
            f"no voice named {name!r} in {voices_dir()} (known: {known}); create it with `csm voice create`"
        )

    def codes(self, model) -> list[torch.Tensor]:
        """Each clip's codes (F_i, K) for this model's codec: encoded once, then cached in memory and on disk."""
        fingerprint = codec_fingerprint(model)
        if fingerprint not in self._codes:
            out = [encode_audio(model, audio).to("cpu") for audio, _ in self.clips]
            self._codes[fingerprint] = out
            self._store_codes(fingerprint, out)
        return [c.to(model.device) for c in self._codes[fingerprint]]

    def _store_codes(self, fingerprint: str, codes: list[torch.Tensor]) -> None:
        if self.folder is None or not self.store_codes:
            return
        import torch

        try:
            torch.save({fingerprint: [c.cpu() for c in codes]}, self.folder / CODES_FILE)
        except OSError:
            pass  # a read-only voice folder still works, just without the cache

    def turns(self) -> list[dict]:
        """The clips as context turns of a CSM conversation."""

        return [
            {
                "role": str(self.speaker),
                "content": [{"type": "text", "text": t}, {"type": "audio", "audio": a}],
            }
            for a, t in self.clips
        ]


def list_voices(folder: str | os.PathLike | None = None) -> list[str]:
    """Names of the voices saved in the voices folder (hidden folders, such as a voice being written, left out)."""
    root = Path(folder).expanduser() if folder is not None else voices_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / VOICE_FILE).is_file())
