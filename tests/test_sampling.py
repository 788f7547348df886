"""Sampling as users run it: every draw gives decodable frames and finite audio, on heads that can score any id.

The checkpoints here keep random scores for the ids past the codec's 2048 entries (a user's random or badly
trained model): before the frame rule, most seeds drew such an id and the codec decode raised.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import write_reference_processor
from reference_models import reference_csm, write_reference_csm

from csm import CsmForConditionalGeneration, CsmProcessor
from csm.frames import FrameRule
from csm.pipeline import pipeline

SETTINGS = {
    "default": {},
    "hot, no top-k": dict(temperature=2.0, top_k=0, depth_decoder_temperature=2.0, depth_decoder_top_k=0),
    "cold": dict(temperature=0.05, depth_decoder_temperature=0.05),
    "top-k 1": dict(top_k=1, depth_decoder_top_k=1),
    "top-p": dict(top_p=0.3, depth_decoder_top_p=0.95, top_k=0),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("any-id")
    ref = write_reference_csm(path, seed=3, decodable_heads=False)
    write_reference_processor(path)
    return path, ref


@pytest.fixture(scope="module")
def model(ckpt):
    return CsmForConditionalGeneration.from_pretrained(ckpt[0])


@pytest.fixture(scope="module")
def batch(ckpt):
    processor = CsmProcessor.from_pretrained(ckpt[0])
    texts = ["Format test.", "Hello there, how are you?", "I think so.", "The quick brown fox."]
    conversations = [
        [{"role": str(i % 2), "content": [{"type": "text", "text": t}]}] for i, t in enumerate(texts)
    ]
    return processor.apply_chat_template(conversations, tokenize=True, return_dict=True)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def assert_playable(audio) -> None:
    audio = torch.as_tensor(audio)
    assert audio.dim() == 1 and audio.numel() % 1920 == 0
    assert torch.isfinite(audio).all()


def test_the_checkpoint_really_scores_undecodable_ids_high(model):
    """The fixture is what the test needs: undecodable ids win some argmaxes."""
    scores = model.lm_head.weight[2048:].norm(dim=-1)
    assert (scores > 0).all()
    rule = FrameRule.of(model)
    assert (rule.codebook_size, rule.eos, rule.pad) == (2048, 0, 2050)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_batches_of_four_always_decode(model, batch, name):
    for seed in range(4):
        codes = model.generate(**batch, max_new_tokens=10, seed=seed, **SETTINGS[name])
        finished = codes == 2050
        assert ((codes >= 0) & (codes < 2048) | finished).all(), f"seed {seed}: undecodable id drawn"
        audio = model.generate(**batch, max_new_tokens=10, seed=seed, output_audio=True, **SETTINGS[name])
        assert len(audio) == 4
        for row in audio:
            assert_playable(row)


def test_greedy_takes_the_best_decodable_id_where_the_reference_takes_an_undecodable_one(tmp_path):
    """The one deliberate difference from the reference: its argmax may land on 2048-2050, ours never does."""
    greedy = dict(do_sample=False, depth_decoder_do_sample=False)
    ids = torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = reference_csm(seed=4)
    best = int(ref.generate(input_ids=ids, max_new_tokens=1, **greedy)[0, 0, 1])
    with torch.no_grad():  # id 2049 now scores twice codebook 1's greedy pick
        head = ref.depth_decoder.codebooks_head.weight  # (K-1, D, V)
        head[0, :, 2049] = 2 * head[0, :, best]
    expected = ref.generate(input_ids=ids, max_new_tokens=1, **greedy)
    assert int(expected[0, 0, 1]) == 2049, "fixture: the reference should now pick 2049"
    ref.save_pretrained(tmp_path)
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path)
    got = ours.generate(input_ids=ids, max_new_tokens=1, **greedy)
    assert int(got[0, 0, 0]) == int(expected[0, 0, 0]) and int(got[0, 0, 1]) == best
    assert (got < 2048).all()


@pytest.mark.parametrize("name", ["default", "hot, no top-k"])
def test_streamed_audio_is_always_finite_and_equals_generate(model, batch, name):
    for seed in range(3):
        chunks = list(
            model.generate_stream(**batch, max_new_tokens=10, seed=seed, chunk_frames=3, **SETTINGS[name])
        )
        whole = model.generate(**batch, max_new_tokens=10, seed=seed, output_audio=True, **SETTINGS[name])
        for row in range(4):
            streamed = torch.cat([c[row] for c in chunks])
            assert_playable(streamed)
            torch.testing.assert_close(streamed, whole[row], atol=1e-4, rtol=1e-4)


def test_pipeline_speaks_under_any_seed(ckpt):
    tts = pipeline("text-to-audio", model=str(ckpt[0]), device="cpu")
    for seed in range(8):
        out = tts("Format test. And a second sentence.", seed=seed, max_seconds=0.6, temperature=1.5, top_k=0)
        assert out["audio"].dtype == np.float32 and out["audio"].size > 0
        assert np.isfinite(out["audio"]).all()


def test_csm_say_with_the_seeds_that_used_to_fail(ckpt, tmp_path):
    env = {
        **os.environ,
        "CSM_VOICES_DIR": str(tmp_path / "voices"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    for seed in (1, 2):
        out = tmp_path / f"say{seed}.wav"
        done = subprocess.run(
            [sys.executable, "-m", "csm", "say", "Format test.", "--model", str(ckpt[0]), "--seed", str(seed)]
            + ["--max-seconds", "2", "-o", str(out)],
            env=env,
            capture_output=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr.decode()
        audio, rate = sf.read(out, dtype="float32")
        assert rate == 24000 and audio.size > 0 and np.isfinite(audio).all()
