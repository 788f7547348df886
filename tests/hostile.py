"""What hostile clients send, built in code: small audio files that decode to a lot of audio, and a peak-memory
probe for the tests that bound what such input may cost."""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
import soundfile as sf


def silent_flac(seconds: float, rate: int = 96_000, channels: int = 2, claim: float | None = None) -> bytes:
    """`seconds` of silence as a FLAC file (tiny: silence compresses to almost nothing); `claim`: the length
    its header declares instead (0: unknown, as a streamed FLAC says)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate * 10, channels), np.int16)
        left = int(seconds * rate)
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    data = buf.getvalue()
    return data if claim is None else claim_length(data, claim, rate)


def claim_length(flac: bytes, seconds: float, rate: int) -> bytes:
    """The FLAC file with its header declaring `seconds` at `rate` (0: unknown, as a streamed FLAC says)."""
    data = bytearray(flac)
    # STREAMINFO is the first metadata block: its total sample count is the low 36 bits of bytes 10-17.
    at = data.index(b"fLaC") + 4 + 4 + 10
    packed = int.from_bytes(data[at : at + 8], "big") & ~((1 << 36) - 1)
    data[at : at + 8] = (packed | int(seconds * rate)).to_bytes(8, "big")
    return bytes(data)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


@contextmanager
def peak_rss_growth():
    """Yields a function giving how far this process's peak RSS rose above its RSS at entry, in MB (Linux: the
    peak is reset at entry through /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    yield lambda: _status_mb("VmHWM") - base
