import os
import time
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from hostile import peak_rss_growth, silent_flac
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from csm.audio import SAMPLING_RATE, AudioTooLong, load_audio, resample, save_audio


def tone(seconds: float = 0.25, rate: int = SAMPLING_RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return wave if channels == 1 else np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)


def test_wav_at_24khz_round_trips_within_16_bit_precision(tmp_path):
    wave = tone()
    save_audio(wave, tmp_path / "a.wav")
    loaded = load_audio(tmp_path / "a.wav")
    assert loaded.dtype == np.float32 and loaded.shape == wave.shape
    np.testing.assert_allclose(loaded, wave, atol=1 / 32768)


def test_stereo_16khz_file_is_downmixed_and_resampled_like_the_reference(tmp_path):
    from transformers.audio_utils import load_audio as reference_load_audio

    path = tmp_path / "stereo.flac"
    sf.write(path, tone(0.3, 16000, channels=2), 16000)
    with pytest.warns(UserWarning, match="2 channels"):
        ours = load_audio(str(path))
    expected = reference_load_audio(str(path), sampling_rate=SAMPLING_RATE, backend="soundfile")
    assert ours.shape == (int(np.ceil(0.3 * 16000 * 1.5)),)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("ext", ["ogg", "mp3", "opus", "flac"])
def test_compressed_formats_are_written_and_read_back(tmp_path, ext):
    path = tmp_path / f"a.{ext}"
    save_audio(torch.from_numpy(tone(0.5)), path)
    loaded = load_audio(path)
    assert loaded.ndim == 1 and loaded.dtype == np.float32
    assert abs(len(loaded) - 12000) < 2500  # codecs add a little padding or delay
    assert np.abs(loaded).max() > 0.2


def test_arrays_are_taken_at_24khz_unless_a_rate_is_given():
    wave = tone(0.1, 16000)
    assert load_audio(wave).shape == wave.shape
    assert load_audio(wave, sampling_rate=16000).shape == (2400,)
    np.testing.assert_array_equal(load_audio(wave, sampling_rate=16000), resample(wave, 16000, 24000))


def test_tensors_integers_and_channel_layouts_become_mono_float32():
    wave = tone(0.05)
    np.testing.assert_allclose(load_audio(torch.from_numpy(wave).to(torch.bfloat16)), wave, atol=4e-3)
    pcm = (wave * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm), wave, atol=1e-4)
    assert load_audio(wave[None]).shape == wave.shape  # (1, T)
    assert load_audio(wave[:, None]).shape == wave.shape  # (T, 1)
    with pytest.warns(UserWarning, match="averaging"):
        both = load_audio(np.stack([wave, -wave]))  # (C, T)
    np.testing.assert_allclose(both, 0, atol=1e-7)
    with pytest.warns(UserWarning):
        assert load_audio(np.stack([wave, wave], axis=1)).shape == wave.shape  # (T, C)
    assert load_audio([0.0, 0.5, -0.5]).tolist() == [0.0, 0.5, -0.5]


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(0), "empty"),
        (np.array([0.0, np.nan]), "NaN"),
        (np.zeros((2, 3, 4)), "1-D"),
        (np.zeros((100, 200)), "ambiguous"),
        (np.array(["a", "b"]), "numbers"),
        (torch.zeros(3, dtype=torch.complex64), "complex"),
    ],
)
def test_bad_arrays_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        load_audio(bad)


@pytest.mark.parametrize("rate", [0, -16000, "16k", True])
def test_bad_sampling_rates_raise_value_error(rate):
    with pytest.raises(ValueError, match="sampling_rate must be a positive integer"):
        load_audio(np.zeros(10), sampling_rate=rate)


def test_unreadable_missing_and_empty_files_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="not found: .*missing.wav"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio" * 10)
    with pytest.raises(ValueError, match="could not read audio from .*junk.wav"):
        load_audio(junk)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), SAMPLING_RATE)
    with pytest.raises(ValueError, match="empty.wav is empty"):
        load_audio(empty)


def test_file_bytes_load_like_the_file(tmp_path):
    save_audio(tone(), tmp_path / "a.flac")
    np.testing.assert_array_equal(
        load_audio((tmp_path / "a.flac").read_bytes()), load_audio(tmp_path / "a.flac")
    )


def test_save_many_audios_to_many_paths(tmp_path):
    paths = [tmp_path / "a.wav", tmp_path / "b.flac"]
    save_audio([torch.zeros(100), np.ones((1, 50)) * 0.5], paths)
    assert [sf.info(p).frames for p in paths] == [100, 50]
    save_audio(torch.zeros(2, 30), [tmp_path / "c.wav", tmp_path / "d.wav"])  # a (B, T) batch
    assert sf.info(tmp_path / "d.wav").frames == 30
    assert sf.info(tmp_path / "d.wav").samplerate == SAMPLING_RATE


def test_saving_clips_instead_of_wrapping_around(tmp_path):
    save_audio(np.array([1.5, -2.0, 0.25], dtype=np.float32), tmp_path / "loud.wav")
    np.testing.assert_allclose(sf.read(tmp_path / "loud.wav")[0], [32767 / 32768, -1.0, 0.25], atol=1e-4)


def test_save_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="2 path"):
        save_audio(np.zeros(10), [tmp_path / "a.wav", tmp_path / "b.wav"])
    with pytest.raises(ValueError, match="format"):
        save_audio(np.zeros(10), tmp_path / "a.xyz")
    with pytest.raises(ValueError, match="does not exist"):
        save_audio(np.zeros(10), tmp_path / "nope" / "a.wav")
    with pytest.raises(ValueError, match="mono"):
        save_audio(np.zeros((3, 10)), tmp_path / "a.wav")
    with pytest.raises(ValueError, match="audio 0 is empty"):
        save_audio(np.zeros(0), tmp_path / "a.flac")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    audio=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int16, np.uint8, np.float16]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40),
    ),
    rate=st.sampled_from([None, 8000, 24000, 44100]),
)
def test_any_array_gives_mono_float32_or_value_error(audio, rate):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = load_audio(audio, sampling_rate=rate)
    except ValueError:
        return
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) > 0 and np.isfinite(out).all()


# ---- length limits: a small file may hold hours of audio ---------------------------------------------


def test_a_header_declaring_more_than_the_limit_is_refused_before_decoding():
    # The bomb: a FLAC whose header says 60 minutes of 96 kHz stereo (decoded whole: 5 GB).
    bomb = silent_flac(1.0, claim=3600.0)
    with peak_rss_growth() as growth:
        start = time.perf_counter()
        with pytest.raises(AudioTooLong, match=r"audio bytes is 3600\.0 s long; the limit is 60 s"):
            load_audio(bomb, max_seconds=60.0)
        assert time.perf_counter() - start < 1.0
        assert growth() < 100


@pytest.mark.parametrize("claim", [0.0, None])  # a header that does not say, one that tells the truth
def test_decoding_stops_once_the_limit_is_passed_whatever_the_header_says(claim):
    bomb = silent_flac(70.0, claim=claim)  # 70 s at 96 kHz stereo: 54 MB of float32 if decoded whole
    with peak_rss_growth() as growth:
        with pytest.raises(AudioTooLong, match="the limit is 20 s"):
            load_audio(bomb, max_seconds=20.0)
        assert growth() < 30  # 20 s of mono at 96 kHz is 7.7 MB, plus a block


def test_audio_within_the_limit_loads_as_without_one(tmp_path):
    path = tmp_path / "clip.flac"
    t = np.arange(48_000) / 48_000
    sf.write(path, np.stack([np.sin(2 * np.pi * 300 * t), np.cos(2 * np.pi * 500 * t)], axis=1), 48_000)
    with pytest.warns(UserWarning, match="2 channels"):
        bounded = load_audio(path, max_seconds=1.0)
    with pytest.warns(UserWarning, match="2 channels"):
        np.testing.assert_array_equal(bounded, load_audio(path))
    with pytest.raises(AudioTooLong, match=r"clip.flac is 1.0 s long; the limit is 0.5 s"):
        load_audio(path, max_seconds=0.5)
    with pytest.raises(AudioTooLong, match=r"audio array is 2.0 s long; the limit is 1.5 s"):
        load_audio(np.zeros(48_000, np.float32), sampling_rate=24_000, max_seconds=1.5)


def test_folders_fifos_and_undecodable_bytes_say_what_they_are(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an audio file"):
        load_audio(tmp_path)
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):  # never blocks waiting for a writer
        load_audio(fifo)
    with pytest.raises(ValueError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError) as e:
        load_audio(b"RIFF0000WAVEnot really audio")
    assert " at 0x" not in str(e.value) and "audio bytes" in str(e.value)
