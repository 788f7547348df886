"""Reading, resampling and writing audio: mono float32 waveforms at the codec's rate (24 kHz)."""

from __future__ import annotations

import io
import math
import numbers
import os
import re
import sys
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import soundfile as sf
import soxr

if TYPE_CHECKING:
    import torch

SAMPLING_RATE = 24_000
MAX_CHANNELS = 8  # a 2-D array with both sides longer than this is not (channels, samples)
MAX_CLIP_SECONDS = 60.0  # the longest clip read as context (server uploads, dialogue scripts)
MAX_BOUNDED_RATE = 384_000  # the highest rate a file read under a length limit may have
_BLOCK_SAMPLES = 1 << 20  # samples (over all channels) decoded at a time
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports about 2**63 frames when a header does not say

AudioLike = Union[str, os.PathLike, bytes, np.ndarray, "torch.Tensor", Sequence[float]]  # noqa: UP007


def _tensor_as_numpy(x):
    """A torch tensor as a float32 numpy array; anything else as it is. torch is not imported for this: when
    it is not loaded, nothing can be a tensor (light commands such as `csm voice list` never load it)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError("audio tensor is complex; pass real samples")
        return x.detach().to("cpu", torch.float32).numpy()
    return x


# Extensions soundfile does not map to a container by itself.
_EXTRA_FORMATS = {".opus": ("OGG", "OPUS"), ".pcm": ("RAW", "PCM_16"), ".raw": ("RAW", "PCM_16")}
_FLOAT_SUBTYPES = {"FLOAT", "DOUBLE", "VORBIS", "OPUS", "MPEG_LAYER_III"}


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Resample mono audio with soxr (HQ), to exactly ceil(len * target / orig) samples."""
    if orig_rate == target_rate:
        return audio
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_rate} -> {target_rate}")
    num_samples = math.ceil(audio.shape[-1] * target_rate / orig_rate)
    out = soxr.resample(audio, orig_rate, target_rate, quality="soxr_hq")
    # soxr can be a sample short or long; librosa (and the reference) pad/trim to the exact length.
    out = np.pad(out, (0, max(0, num_samples - out.shape[-1])))[:num_samples]
    return np.ascontiguousarray(out, dtype=np.float32)


class AudioTooLong(ValueError):
    """A clip holds more audio than the caller allows: found from the file's header, or while decoding it."""

    def __init__(self, name: str, limit: float, seconds: float | None = None):
        self.name, self.limit, self.seconds = name, limit, seconds
        length = (
            f"is {seconds:.1f} s long" if seconds is not None else f"holds more than {limit:g} s of audio"
        )
        super().__init__(f"{name} {length}; the limit is {limit:g} s: trim it to a shorter clip")


def _downmix(audio: np.ndarray, source: str) -> np.ndarray:
    """(C, T) -> (T,), averaging channels with a warning when there are several."""
    if audio.shape[0] > 1:
        warnings.warn(f"{source} has {audio.shape[0]} channels; averaging them to mono", stacklevel=3)
        return audio.mean(axis=0)
    return audio[0]


def _libsndfile_message(e: Exception) -> str:
    """What went wrong, without the repr of the in-memory file (and its address) libsndfile's prefix holds."""
    text = e.error_string if isinstance(e, sf.LibsndfileError) else str(e)
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", text)


def _open_source(source: str | os.PathLike | bytes) -> tuple[object, str]:
    """A file, URL or in-memory file as something soundfile opens, and its name for messages."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), "audio bytes"
    if str(source).startswith(("http://", "https://")):
        name = str(source)
        try:
            with urllib.request.urlopen(name, timeout=30) as response:
                return io.BytesIO(response.read()), name
        except Exception as e:
            raise ValueError(f"could not download audio from {name}: {e}") from None
    path = Path(source).expanduser()
    name = str(path)
    if not path.exists():
        raise ValueError(f"audio file not found: {name}")
    if path.is_dir():
        raise ValueError(f"{name} is a folder, not an audio file")
    if not path.is_file():  # reading a FIFO would wait for a writer; a device could be endless
        raise ValueError(f"{name} is not a regular file (a pipe, socket or device): give an audio file")
    return path, name


def audio_header(source: str | os.PathLike | bytes) -> tuple[int, int, int | None]:
    """A file's (sampling rate, channels, frames or None when its header does not say), from its header alone:
    nothing is decoded. Raises ValueError when it is no audio file libsndfile reads."""
    handle, name = _open_source(source)
    try:
        with sf.SoundFile(handle) as f:
            frames = f.frames if 0 < f.frames < _UNKNOWN_FRAMES else None
            return f.samplerate, f.channels, frames
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"could not read audio from {name} ({_libsndfile_message(e)}); wav, flac, ogg and mp3 are supported"
        ) from None


def _read_file(
    source: str | os.PathLike | bytes, max_seconds: float | None = None
) -> tuple[np.ndarray, int, str]:
    """Decode a file, URL or in-memory file into ((T,) float32 mono, rate, name for messages).

    With `max_seconds`, a header that declares more is refused before any decoding, and decoding stops as soon
    as it passes the limit (a header can be missing or lie): memory stays within the limit's worth of mono
    samples at the file's rate, whatever the file claims.
    """
    handle, name = _open_source(source)
    try:
        with sf.SoundFile(handle) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            limit = None
            if max_seconds is not None:
                if rate > MAX_BOUNDED_RATE:
                    raise ValueError(
                        f"{name} has a sampling rate of {rate} Hz; the limit is {MAX_BOUNDED_RATE} Hz: "
                        "resample it first"
                    )
                limit = math.floor(max_seconds * rate)
                if 0 < frames < _UNKNOWN_FRAMES and frames > limit:  # libsndfile's "unknown" is huge
                    raise AudioTooLong(name, max_seconds, frames / rate)
            block = max(1024, _BLOCK_SAMPLES // channels)  # a few MB per block, whatever the channel count
            parts, total = [], 0
            while True:
                data = f.read(block, dtype="float32", always_2d=True)  # (T, C)
                if not len(data):
                    break
                total += len(data)
                if limit is not None and total > limit:
                    raise AudioTooLong(name, max_seconds)
                parts.append(data.T.mean(axis=0) if channels > 1 else data[:, 0].copy())  # as _downmix
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"could not read audio from {name} ({_libsndfile_message(e)}); wav, flac, ogg and mp3 are supported "
            f"(libsndfile {sf.__libsndfile_version__})"
        ) from None
    if channels > 1:
        warnings.warn(f"{name} has {channels} channels; averaging them to mono", stacklevel=3)
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return audio, rate, name


def _array_to_channels(audio: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """Any numeric array-like as (C, T) float32; integer PCM is scaled to [-1, 1]."""
    audio = _tensor_as_numpy(audio)
    try:
        audio = np.asarray(audio)
    except ValueError as e:
        raise ValueError(f"audio is not a rectangular array of samples: {e}") from None
    if audio.dtype.kind in "iu":
        info = np.iinfo(audio.dtype)
        middle = (int(info.max) + int(info.min) + 1) / 2  # 0 for signed, 128 for uint8
        audio = (audio.astype(np.float64) - middle) / (int(info.max) - middle + 1)
    elif audio.dtype.kind != "f":
        raise ValueError(f"audio samples must be numbers, got an array of dtype {audio.dtype}")
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 1:
        return audio[None]
    if audio.ndim != 2:
        raise ValueError(f"audio must be 1-D (samples,) or 2-D (channels, samples), got shape {audio.shape}")
    if min(audio.shape) > MAX_CHANNELS:
        raise ValueError(
            f"audio of shape {audio.shape} is ambiguous: pass mono (samples,) or (channels, samples) "
            f"with at most {MAX_CHANNELS} channels"
        )
    # The short side holds the channels: (C, T) like torch, or (T, C) like soundfile.
    return audio if audio.shape[0] <= audio.shape[1] else audio.T


def load_audio(
    audio: AudioLike,
    sampling_rate: int | None = None,
    target_rate: int = SAMPLING_RATE,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Load a file path, URL, file bytes, numpy array or tensor as mono float32 at `target_rate`.

    sampling_rate: the rate of an array input (default: already `target_rate`); files carry their own.
    max_seconds: refuse longer audio with AudioTooLong, for files before decoding more than the limit.
    Several channels are averaged with a warning. Raises ValueError for unreadable, empty or non-finite audio.
    """
    if sampling_rate is not None and (
        not isinstance(sampling_rate, numbers.Integral)
        or isinstance(sampling_rate, bool)
        or sampling_rate <= 0
    ):
        raise ValueError(f"sampling_rate must be a positive integer in Hz, got {sampling_rate!r}")
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)):
        mono, rate, name = _read_file(audio, max_seconds)
    else:
        channels, rate, name = _array_to_channels(audio), int(sampling_rate or target_rate), "audio array"
        if max_seconds is not None and channels.shape[1] > max_seconds * rate:
            raise AudioTooLong(name, max_seconds, channels.shape[1] / rate)
        mono = _downmix(channels, name) if channels.size else channels.reshape(-1)
    if mono.size == 0:
        raise ValueError(f"{name} is empty: it has no samples")
    if not np.isfinite(mono).all():  # a NaN or infinity in any channel survives the average
        raise ValueError(f"{name} contains NaN or infinite samples")
    return np.ascontiguousarray(resample(mono, rate, target_rate), dtype=np.float32)


def _as_waveforms(audio, count: int) -> list[np.ndarray]:
    """A waveform, a list of them, or a (B, T) batch as a list of 1-D float32 arrays."""
    if isinstance(audio, (list, tuple)) and audio and not isinstance(audio[0], (int, float)):
        items = list(audio)
    elif count > 1 and getattr(audio, "ndim", 0) == 2:
        items = list(audio)
    else:
        items = [audio]
    out = []
    for i, item in enumerate(items):
        item = np.asarray(_tensor_as_numpy(item), dtype=np.float32)
        if item.ndim == 2 and 1 in item.shape:
            item = item.reshape(-1)
        if item.ndim != 1:
            raise ValueError(
                f"audio {i} has shape {item.shape}; save_audio takes mono (samples,) or (1, samples)"
            )
        if item.size == 0:
            raise ValueError(f"audio {i} is empty: there are no samples to write")
        out.append(item)
    return out


def audio_format(path: str | os.PathLike) -> tuple[str, str]:
    """The soundfile format and subtype that a file name's extension asks for; ValueError when there is none."""
    path = Path(path)
    fmt, subtype = _EXTRA_FORMATS.get(path.suffix.lower(), (None, None))
    if fmt is None:
        fmt = path.suffix.lstrip(".").upper()
        if not fmt or fmt not in sf.available_formats():
            raise ValueError(f"cannot tell the audio format of {path}: use .wav, .flac, .ogg, .opus or .mp3")
    return fmt, subtype or sf.default_subtype(fmt)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Encoded audio (`data`) into `path` as `save_audio_atomic` writes a waveform: through a temporary file
    of mkstemp's in its folder (O_EXCL, an unpredictable name), renamed into place."""
    import tempfile

    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.partial-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_audio_atomic(path: str | os.PathLike, audio, sampling_rate: int = SAMPLING_RATE, sync: bool = False):
    """Write one waveform to `path` through a temporary file in its folder, then rename it into place: the
    temporary file is made by `tempfile.mkstemp` (O_EXCL, an unpredictable name, mode 0600) and written through
    its descriptor, so a symlink planted at a predictable name cannot redirect the write. The temporary name is
    `.<stem>.partial-<random><suffix>`. Raises ValueError or OSError naming `path`, never the temporary file."""
    import tempfile

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {path.parent} does not exist")
    fmt, subtype = audio_format(path)
    waveform = _as_waveforms(audio, 1)[0]
    if subtype not in _FLOAT_SUBTYPES:
        waveform = np.clip(waveform, -1.0, 1.0)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.partial-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w+b") as f:
            try:
                sf.write(f, waveform, sampling_rate, format=fmt, subtype=subtype)
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                raise ValueError(f"could not write {path} as {fmt}/{subtype}: {e}") from None
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a file made by open() would be
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask: read where Linux says it (setting it to read it would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_audio(
    audio: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    sampling_rate: int = SAMPLING_RATE,
) -> None:
    """Write one waveform to a path, or several to as many paths; the format follows each extension.

    wav and flac are written as 16-bit PCM (samples clipped to [-1, 1]); ogg, opus and mp3 are lossy.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise ValueError("path_or_paths must be a path or a non-empty list of paths")
    waveforms = _as_waveforms(audio, len(paths))
    if len(waveforms) != len(paths):
        raise ValueError(f"got {len(waveforms)} audio(s) but {len(paths)} path(s); pass one path per audio")
    for waveform, path in zip(waveforms, paths, strict=True):
        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"cannot write {path}: folder {path.parent} does not exist")
        fmt, subtype = audio_format(path)
        if subtype not in _FLOAT_SUBTYPES:
            waveform = np.clip(waveform, -1.0, 1.0)  # integer PCM would wrap around instead of clipping
        try:
            sf.write(path, waveform, sampling_rate, format=fmt, subtype=subtype)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise ValueError(f"could not write {path} as {fmt}/{subtype}: {e}") from None
