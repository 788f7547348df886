"""Incremental audio encoders for HTTP responses: float32 chunks in, bytes out as they become ready.

pcm and wav are written by hand (wav with an open-ended header, as OpenAI streams it); mp3, opus (in Ogg)
and aac (ADTS) go through PyAV; flac goes through soundfile once the audio is complete, because a FLAC
header carries the total length.
"""

from __future__ import annotations

import io
import struct

import numpy as np

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_AV = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac")}


def to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")


class _Sink:
    """A write-only file for PyAV: without seek, muxers write a stream instead of patching headers."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class AudioEncoder:
    """`push(chunk)` and `finish()` return the bytes of `fmt` ready so far; concatenated they form one file."""

    def __init__(self, fmt: str, sampling_rate: int):
        if fmt not in FORMATS:
            raise ValueError(f"unsupported response_format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.fmt, self.rate = fmt, sampling_rate
        self.started = False
        self.held: list[np.ndarray] = []  # flac only
        if fmt in _AV:
            import av

            container, codec = _AV[fmt]
            self.sink = _Sink()
            self.container = av.open(self.sink, mode="w", format=container)
            self.stream = self.container.add_stream(codec, rate=sampling_rate)
            self.stream.layout = "mono"
            self.pts = 0

    def push(self, audio: np.ndarray) -> bytes:
        if self.fmt == "flac":
            self.held.append(audio)
            return b""
        if self.fmt in ("pcm", "wav"):
            head = b""
            if self.fmt == "wav" and not self.started:
                head = wav_header(self.rate)
            self.started = True
            return head + to_int16(audio).tobytes()
        return self._encode(audio)

    def finish(self) -> bytes:
        if self.fmt == "flac":
            import soundfile as sf

            audio = np.concatenate(self.held) if self.held else np.zeros(0, np.float32)
            buf = io.BytesIO()
            sf.write(buf, to_int16(audio), self.rate, format="FLAC", subtype="PCM_16")
            return buf.getvalue()
        if self.fmt == "wav":
            return b"" if self.started else wav_header(self.rate)
        if self.fmt == "pcm":
            return b""
        out = b""
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        return out + self.sink.take()

    def _encode(self, audio: np.ndarray) -> bytes:
        import av

        if len(audio) == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(to_int16(audio)[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.rate, self.pts
        self.pts += len(audio)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        return self.sink.take()


def wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header with open-ended sizes (0xFFFFFFFF), for a stream of unknown length."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", unknown)
    )
