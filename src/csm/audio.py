"""Reading, resampling and writing audio: mono float32 waveforms at the codec's rate (24 kHz)."""

from __future__ import annotations

import io
import math
import numbers
import os
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLING_RATE = 24_000
MAX_CHANNELS = 8  # a 2-D array with both sides longer than this is not (channels, samples)

AudioLike = str | os.PathLike | bytes | np.ndarray | torch.Tensor | Sequence[float]

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


def _downmix(audio: np.ndarray, source: str) -> np.ndarray:
    """(C, T) -> (T,), averaging channels with a warning when there are several."""
    if audio.shape[0] > 1:
        warnings.warn(f"{source} has {audio.shape[0]} channels; averaging them to mono", stacklevel=3)
        return audio.mean(axis=0)
    return audio[0]


def _read_file(source: str | os.PathLike | bytes) -> tuple[np.ndarray, int, str]:
    """Decode a file, URL or in-memory file into ((C, T) float32, rate, name for messages)."""
    if isinstance(source, (bytes, bytearray)):
        name, handle = "audio bytes", io.BytesIO(source)
    elif str(source).startswith(("http://", "https://")):
        name = str(source)
        try:
            with urllib.request.urlopen(name, timeout=30) as response:
                handle = io.BytesIO(response.read())
        except Exception as e:
            raise ValueError(f"could not download audio from {name}: {e}") from None
    else:
        path = Path(source).expanduser()
        name = str(path)
        if not path.is_file():
            raise ValueError(f"audio file not found: {name}")
        handle = path
    try:
        with sf.SoundFile(handle) as f:
            rate = f.samplerate
            audio = f.read(dtype="float32", always_2d=True).T  # (C, T)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"could not read audio from {name} ({e}); wav, flac, ogg and mp3 are supported "
            f"(libsndfile {sf.__libsndfile_version__})"
        ) from None
    return audio, rate, name


def _array_to_channels(audio: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """Any numeric array-like as (C, T) float32; integer PCM is scaled to [-1, 1]."""
    if isinstance(audio, torch.Tensor):
        if audio.is_complex():
            raise ValueError("audio tensor is complex; pass real samples")
        audio = audio.detach().to("cpu", torch.float32).numpy()
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
    audio: AudioLike, sampling_rate: int | None = None, target_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """Load a file path, URL, file bytes, numpy array or tensor as mono float32 at `target_rate`.

    sampling_rate: the rate of an array input (default: already `target_rate`); files carry their own.
    Several channels are averaged with a warning. Raises ValueError for unreadable, empty or non-finite audio.
    """
    if sampling_rate is not None and (
        not isinstance(sampling_rate, numbers.Integral)
        or isinstance(sampling_rate, bool)
        or sampling_rate <= 0
    ):
        raise ValueError(f"sampling_rate must be a positive integer in Hz, got {sampling_rate!r}")
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)):
        channels, rate, name = _read_file(audio)
    else:
        channels, rate, name = _array_to_channels(audio), int(sampling_rate or target_rate), "audio array"
    if channels.size == 0:
        raise ValueError(f"{name} is empty: it has no samples")
    if not np.isfinite(channels).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    mono = _downmix(channels, name)
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
        if isinstance(item, torch.Tensor):
            item = item.detach().to("cpu", torch.float32).numpy()
        item = np.asarray(item, dtype=np.float32)
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
