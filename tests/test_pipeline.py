"""Pipeline, voices and long text on the tiny random-weight demo checkpoint (and one reference-written one)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from csm.demo import write_demo_checkpoint
from csm.pipeline import crossfade_join, pipeline, split_sentences
from csm.voice import Voice, list_voices

SHORT = 0.15  # seconds per sentence: a couple of frames keeps every test fast


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")
    return pipeline("text-to-audio", model=folder, device="cpu")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def clip(seconds: float = 0.4, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(24000 * seconds)) * 0.1).astype(np.float32)


def test_pipeline_returns_float32_mono_audio_at_24khz(pipe):
    out = pipe("Hello there.", max_seconds=SHORT, seed=0)
    assert set(out) == {"audio", "sampling_rate"}
    assert out["sampling_rate"] == 24000
    assert out["audio"].dtype == np.float32 and out["audio"].ndim == 1
    assert len(out["audio"]) % 1920 == 0 and np.isfinite(out["audio"]).all()


def test_pipeline_batches_a_list_and_a_seed_repeats(pipe):
    outs = pipe(["Hello there.", "How are you?"], max_seconds=SHORT, seed=3)
    assert isinstance(outs, list) and len(outs) == 2
    again = pipe(["Hello there.", "How are you?"], max_seconds=SHORT, seed=3)
    np.testing.assert_array_equal(outs[0]["audio"], again[0]["audio"])


def test_pipeline_works_on_a_reference_written_checkpoint(csm_checkpoint):
    from fixtures import write_reference_processor

    folder, _ = csm_checkpoint
    write_reference_processor(folder)
    out = pipeline("text-to-audio", model=folder)("Hello there.", max_seconds=SHORT, seed=0)
    assert out["sampling_rate"] == 24000 and out["audio"].dtype == np.float32


def test_split_sentences_cuts_long_sentences_and_merges_short_ones():
    text = "Hi. This is one sentence!  And, a second, much longer sentence that goes on and on? Yes."
    chunks = split_sentences(text, max_chars=30, min_chars=5)
    assert chunks[0] == "Hi. This is one sentence!"
    assert all(len(c) <= 30 for c in chunks)
    assert " ".join(chunks) == " ".join(text.split())
    assert split_sentences("   ") == []
    assert split_sentences("x" * 50, max_chars=20) == ["x" * 50]  # one word cannot be cut


def test_crossfade_join_overlaps_by_ten_ms_without_jumps():
    a, b = np.ones(1000, np.float32), -np.ones(1000, np.float32)
    joined = crossfade_join([a, b], 24000, 10.0)
    assert len(joined) == 2000 - 240
    assert np.abs(np.diff(joined)).max() < 0.01


def test_long_text_is_split_and_each_sentence_carries_the_previous_ones(pipe, monkeypatch):
    calls = []
    generate = pipe.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(pipe.model, "generate", spy)
    text = "The first sentence is here. The second sentence is here. The third one ends it."
    out = pipe(text, max_seconds=SHORT, seed=0, max_chunk_chars=30)
    assert len(calls) == 3
    carried = [0 if c["audio_codes"] is None else len(c["audio_codes"]) for c in calls]
    assert carried == [0, 1, 2]
    assert len(out["audio"]) > 0


def test_carried_context_drops_the_oldest_sentence_when_the_window_is_full(pipe, monkeypatch):
    calls = []
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    monkeypatch.setattr(pipe.model.config, "max_position_embeddings", 40)
    pipe(
        "First words here now. Second words here now. Third words here now.",
        max_seconds=SHORT,
        seed=0,
        max_chunk_chars=25,
    )
    carried = [0 if c["audio_codes"] is None else len(c["audio_codes"]) for c in calls]
    assert carried[0] == 0 and max(carried) < len(calls) - 1


def test_voice_saves_loads_and_caches_its_codes(pipe, tmp_path):
    voice = Voice("narrator", 1, [(clip(), "A reference clip.")])
    folder = voice.save(tmp_path / "narrator")
    out = pipe("Hello there.", voice=folder, max_seconds=SHORT, seed=0)
    assert len(out["audio"]) > 0
    assert (folder / "codes.pt").is_file()
    loaded = Voice.load(folder)
    assert loaded.speaker == 1 and loaded.clips[0][1] == "A reference clip."
    assert loaded._codes, "codes are read back from codes.pt"
    torch.testing.assert_close(loaded.codes(pipe.model)[0], voice.codes(pipe.model)[0])
    assert list_voices(tmp_path) == ["narrator"]


def test_voice_refuses_to_overwrite_a_different_voice(tmp_path):
    Voice("a", 0, [(clip(), "One.")]).save(tmp_path / "v")
    with pytest.raises(ValueError, match="different voice"):
        Voice("b", 0, [(clip(), "Two.")]).save(tmp_path / "v")
    Voice("b", 0, [(clip(), "Two.")]).save(tmp_path / "v", overwrite=True)


def test_context_clips_and_stream_give_audio(pipe):
    chunks = list(
        pipe.stream(
            "First part is here. Second part is here.",
            max_seconds=SHORT,
            seed=1,
            max_chunk_chars=20,
            context=[(clip(0.2), "Context.")],
        )
    )
    assert chunks and all(c.dtype == np.float32 for c in chunks)


def test_stream_gives_the_audio_of_a_call(pipe):
    """Sentence by sentence, with each sentence carried as context and 10 ms crossfades at the joins."""
    text = "First part is here. Second part is here. And a third."
    options = dict(max_seconds=0.8, seed=3, max_chunk_chars=20)  # several pieces per sentence
    expected = pipe(text, **options)["audio"]
    streamed = np.concatenate(list(pipe.stream(text, chunk_frames=2, **options)))
    assert streamed.shape == expected.shape
    np.testing.assert_allclose(streamed, expected, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(text=""), "empty"),
        (dict(text="Hi.", speaker=-1), "speaker"),
        (dict(text="Hi.", max_seconds=0), "max_seconds"),
        (dict(text="Hi.", voice="no-such-voice"), "no voice"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, match):
    text = kwargs.pop("text")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        pipe(text, **kwargs)


def test_unknown_device_and_task_are_refused(pipe):
    with pytest.raises(ValueError, match="unknown device"):
        pipeline("text-to-audio", model="x", device="tpu9")
    with pytest.raises(ValueError, match="unknown task"):
        pipeline("translation", model="x")
