"""The server's saved voices: created through the API within a count and a disk cap, read from disk when used
(a few kept in memory, least recently used first out), and never served once deleted on disk."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..voice import VOICE_FILE, Voice, list_voices
from .speech import ApiError

log = logging.getLogger("csm.server")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it is missing)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:  # removed while we walk
                pass
    return total


def voice_bytes(voice: Voice) -> int:
    """Memory a voice holds: its clips' audio and the codes encoded for them."""
    audio = sum(a.nbytes for a, _ in voice.clips)
    codes = sum(c.numel() * c.element_size() for cs in voice._codes.values() for c in cs)
    return audio + codes


class VoiceStore:
    """Voices in `root`, one folder each. At most `max_voices` voices and `max_bytes` bytes on disk are made
    through `create`; `get` reads a voice's folder again when its voice.json changed, keeps the last
    `cache_size` voices used in memory, and says 404 for one that is gone. Messages never name a server path."""

    def __init__(
        self,
        root: Path,
        max_voices: int = 100,
        max_bytes: int = 512 << 20,
        cache_size: int = 8,
        cache_bytes: int = 64 << 20,
        max_seconds: float = 120.0,
    ):
        self.root, self.max_voices, self.max_bytes, self.cache_size = root, max_voices, max_bytes, cache_size
        self.cache_bytes, self.max_seconds = cache_bytes, max_seconds
        self._cache: OrderedDict[str, tuple[int, Voice]] = OrderedDict()  # name -> (voice.json mtime, voice)
        self._lock = threading.Lock()  # the caps' check and the rename into place are one step

    def names(self) -> list[str]:
        return list_voices(self.root)

    def cached(self) -> list[str]:
        """Names of the voices held in memory, least recently used first."""
        with self._lock:
            return list(self._cache)

    def get(self, name: str, param: str = "voice") -> Voice:
        """The saved voice `name` (a checked name); ApiError 404 when there is none, 500 when it is damaged."""
        try:
            stamp = (self.root / name / VOICE_FILE).stat().st_mtime_ns
        except OSError:
            with self._lock:
                self._cache.pop(name, None)
            known = ", ".join(self.names()) or "none saved yet"
            raise ApiError(
                404, f"unknown voice {name!r} (saved voices: {known}; or a speaker number)", param=param
            ) from None
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(name)
                return hit[1]
        try:  # bounded: a voice made on disk by hand may list any clips (see Voice.load)
            voice = Voice.load(self.root / name, max_seconds=self.max_seconds)
        except (
            Exception
        ) as e:  # the server's data is broken: say which voice, log where (never to the client)
            log.error("saved voice %r cannot be read from %s: %s", name, self.root / name, e)
            raise ApiError(
                500,
                f"the saved voice {name!r} is damaged (its voice.json or a clip cannot be read); "
                "the server's operator must recreate or remove it",
                "server_error",
                param=param,
            ) from None
        self._remember(name, stamp, voice)
        return voice

    def _remember(self, name: str, stamp: int, voice: Voice) -> None:
        """Keep `voice` in memory, within `cache_size` voices and `cache_bytes` bytes of their audio and codes
        (least recently used out first; a voice larger than the whole budget is not kept)."""
        with self._lock:
            self._cache.pop(name, None)
            if voice_bytes(voice) > self.cache_bytes:
                return
            self._cache[name] = (stamp, voice)
            while len(self._cache) > self.cache_size or (
                sum(voice_bytes(v) for _, v in self._cache.values()) > self.cache_bytes
            ):
                self._cache.popitem(last=False)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(voice_bytes(v) for _, v in self._cache.values())

    def create(self, name: str, speaker: int, audio: np.ndarray, transcript: str) -> Voice:
        """Save a new voice: written aside, then renamed into place, so a racing create of the same name gets
        409 and a reader never sees half a voice. ApiError 409 when the name is taken or a cap is reached."""
        try:
            voice = Voice(name, speaker, [(audio, transcript)])
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        self.root.mkdir(parents=True, exist_ok=True)
        self.check_room(name, 0)  # before writing anything
        partial = (
            self.root / f".new-{uuid.uuid4().hex}"
        )  # not a voice name: names start with a letter or digit
        try:
            voice.save(partial)
            size = folder_bytes(partial)
            with self._lock:
                self.check_room(name, size)
                try:
                    os.rename(partial, self.root / name)  # fails when the name appeared meanwhile
                except OSError:
                    raise self._taken(name) from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        voice.folder = self.root / name
        self._remember(name, (voice.folder / VOICE_FILE).stat().st_mtime_ns, voice)
        return voice

    @staticmethod
    def _taken(name: str) -> ApiError:
        return ApiError(409, f"a voice named {name!r} exists already", param="name", code="voice_exists")

    def check_room(self, name: str, size: int = 0) -> None:
        """ApiError 409 when `name` is taken or a new voice of `size` bytes would pass a cap."""
        if (self.root / name).exists():
            raise self._taken(name)
        count = len(self.names())
        if count >= self.max_voices:
            raise ApiError(
                409,
                f"the server holds {count} saved voices, its limit; the operator must remove some first",
                code="voice_limit_reached",
            )
        used = folder_bytes(self.root) - size  # the new voice's own partial folder is inside root
        if used + size > self.max_bytes:
            raise ApiError(
                409,
                f"saved voices would take {(used + size) / 2**20:.1f} MB of the server's "
                f"{self.max_bytes / 2**20:.1f} MB; the operator must remove some first",
                code="voice_limit_reached",
            )
