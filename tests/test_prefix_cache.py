"""The prefix store: a prompt that begins as an earlier one prefills only what is new, with the same output
(against the reference, and with CSM_PREFIX_CACHE=0), in generate, conversations, long text, batches and the
server; a joining prompt is prefilled in slices while other rows keep their frames."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import write_reference_processor
from reference_models import reference_csm
from serving import demo_checkpoint, serve

from csm import CsmForConditionalGeneration
from csm.batching import BatchCore, RowJob
from csm.engine import Sampling
from csm.pipeline import pipeline
from csm.prefix_cache import PrefixStore, chain, content_of, cuts, prefix_stats, store_for
from csm.processor import CsmProcessor

GREEDY = dict(do_sample=False, depth_decoder_do_sample=False)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def clip(seconds, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(int(24000 * seconds), generator=g)).numpy()


def turns(n: int) -> list[dict]:
    """A voice clip, then n turns with audio (user and agent alternating), then the text to speak."""
    conv = [
        {
            "role": "0",
            "content": [{"type": "text", "text": "A voice."}, {"type": "audio", "audio": clip(0.4, 1)}],
        }
    ]
    for i in range(n):
        conv.append(
            {
                "role": str(1 - i % 2),
                "content": [
                    {"type": "text", "text": f"Turn {i} said."},
                    {"type": "audio", "audio": clip(0.2, 10 + i)},
                ],
            }
        )
    return [*conv, {"role": "0", "content": [{"type": "text", "text": "And now this."}]}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix")
    ref = reference_csm(seed=5)
    ref.save_pretrained(path)
    write_reference_processor(path)
    return CsmForConditionalGeneration.from_pretrained(path), ref, CsmProcessor.from_pretrained(path)


def inputs_for(processor, conv):
    return processor.apply_chat_template([conv], tokenize=True, return_dict=True)


def reference_inputs(inputs):
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "input_values", "input_values_cutoffs")}


# ---- the store alone ------------------------------------------------------------------------------------


def fake_content(segments: list[list[int]], bos: int = 7) -> torch.Tensor:
    """Content (T, 3) of segments of token ids, each starting with `bos`."""
    ids = [t for seg in segments for t in [bos, *seg]]
    content = torch.zeros(len(ids), 3, dtype=torch.long)
    content[:, 0] = torch.tensor(ids)
    return content


def kv_of(content: torch.Tensor):
    """A made-up cache whose values say which position and token they stand for: (L=1, 2, 1, n, 2)."""

    def read(start, stop):
        pos = torch.arange(start, stop, dtype=torch.float32)
        tok = content[start:stop, 0].float()
        return torch.stack([pos, tok], -1)[None, None, None].expand(1, 2, 1, -1, -1).clone()

    return read


def test_the_longest_stored_prefix_is_found_segment_by_segment():
    store = PrefixStore(1 << 20, page_positions=2)  # segments span pages, the last one partly filled
    a = fake_content([[1, 2], [3, 4, 5], [6]])
    starts = cuts(a, 7, None)
    assert starts == [0, 3, 7]
    store.insert(a, starts, len(a), b"w", kv_of(a), lambda i: torch.full((2,), float(i)))
    # The same first two turns, then another: the first two are found, their values where they were.
    b = fake_content([[1, 2], [3, 4, 5], [9, 9]])
    hit = store.lookup(b, cuts(b, 7, None), b"w")
    assert hit.positions == 7 and hit.hidden is None
    assert torch.cat([store.kv(blk) for blk in hit.blocks], 3)[0, 0, 0, :, 0].tolist() == list(range(7))
    assert torch.cat([kv for blk in hit.blocks for kv, _ in store.pieces(blk)], 3)[
        0, 0, 0, :, 1
    ].tolist() == [7, 1, 2, 7, 3, 4, 5]
    # A changed first turn: nothing matches, though later segments are equal (keys chain).
    c = fake_content([[1, 3], [3, 4, 5], [6]])
    assert store.lookup(c, cuts(c, 7, None), b"w").positions == 0
    # Other weights: nothing matches.
    assert store.lookup(a, starts, b"v").positions == 0
    # The whole prompt found: its last state comes with it, nothing is left to prefill.
    whole = store.lookup(a, starts, b"w")
    assert whole.positions == len(a) and whole.hidden.tolist() == [len(a) - 1.0] * 2
    stats = store.stats()
    assert (stats["hits"], stats["misses"]) == (2, 2)
    assert stats["positions_saved"] == 7 + len(a)


def test_a_prompt_found_whole_without_its_last_state_prefills_its_last_segment():
    store = PrefixStore(1 << 20)
    a = fake_content([[1, 2], [3, 4]])
    store.insert(a, cuts(a, 7, None), len(a), b"w", kv_of(a))  # no states: a generated turn's way
    assert store.lookup(a, cuts(a, 7, None), b"w").positions == 3


def test_the_store_never_holds_more_than_its_bound_and_keeps_what_is_used():
    page = kv_of(fake_content([[1, 2, 3]]))(0, 4).nbytes  # a page of four positions
    store = PrefixStore(10 * page, page_positions=4)
    voice = [5, 5, 5]
    for i in range(200):
        content = fake_content([voice, [100 + i]])
        store.lookup(content, cuts(content, 7, None), b"w")
        store.insert(content, cuts(content, 7, None), len(content), b"w", kv_of(content))
        assert store.bytes <= store.max_bytes
        assert store.pool.allocated * store.pool.page_bytes <= store.max_bytes  # the memory it holds, too
    assert store.stats()["evictions"] > 0
    # The voice every prompt begins with was used last by each lookup's end: it is still there.
    content = fake_content([voice, [999]])
    assert store.lookup(content, cuts(content, 7, None), b"w").positions == 4
    # A block larger than the whole bound is not kept at all.
    big = fake_content([list(range(50))])
    store.insert(big, cuts(big, 7, None), len(big), b"w", kv_of(big))
    assert store.bytes <= store.max_bytes and store.lookup(big, [0], b"w").positions == 0


def test_keys_chain_over_every_segment_before():
    a = fake_content([[1], [2]])
    b = fake_content([[3], [2]])
    ka, kb = chain(a, cuts(a, 7, None), len(a), b"r"), chain(b, cuts(b, 7, None), len(b), b"r")
    assert ka[0][2] != kb[0][2] and ka[1][2] != kb[1][2]  # same last segment, other history


def test_content_places_audio_frames_and_the_end_of_audio_frame(setup):
    model, _, processor = setup
    inputs = inputs_for(processor, turns(1))
    cfg = model.config
    _, content = model.embed_prompt(
        inputs["input_ids"], inputs["input_values"], inputs["input_values_cutoffs"]
    )
    ids = inputs["input_ids"][0]
    audio = ids == cfg.audio_token_id
    assert content.shape == (1, len(ids), 1 + cfg.num_codebooks)
    codes, mask = model.encode_audio_context(inputs["input_values"], inputs["input_values_cutoffs"])
    assert content[0, audio, 1:].tolist() == codes[mask].tolist()
    assert bool((content[0, ids == cfg.audio_eos_token_id, 1:] == cfg.codebook_eos_token_id).all())
    assert not content[0, ~audio & (ids != cfg.audio_eos_token_id), 1:].any()
    assert (
        content_of(cfg, torch.zeros(1, 3, cfg.num_codebooks, dtype=torch.long), None)[0, :, 0].tolist()
        == [-1] * 3
    )


# ---- the model's output ----------------------------------------------------------------------------------


def fresh_store(model):
    model._prefix_store = None
    return store_for(model)


def test_greedy_codes_match_the_reference_when_the_prompt_begins_with_stored_turns(setup):
    model, ref, processor = setup
    store = fresh_store(model)
    model.generate(
        **inputs_for(processor, turns(1)), max_new_tokens=3, **GREEDY
    )  # stores the voice and turn 0
    inputs = inputs_for(processor, turns(3))
    before = store.stats()["positions_saved"]
    got = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    assert store.stats()["positions_saved"] > before  # the voice and the first turn were not prefilled
    expected = ref.generate(**reference_inputs(inputs), max_new_tokens=6, **GREEDY)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fp32_logits_with_the_store_equal_those_without_it(setup, monkeypatch):
    model, _, processor = setup
    store = fresh_store(model)
    inputs = inputs_for(processor, turns(4))
    model.generate(**inputs_for(processor, turns(3)), max_new_tokens=2, **GREEDY)
    warm = model.generate(
        **inputs, max_new_tokens=5, return_dict_in_generate=True, output_logits=True, **GREEDY
    )
    assert store.stats()["hits"] >= 1
    monkeypatch.setenv("CSM_PREFIX_CACHE", "0")
    cold = model.generate(
        **inputs, max_new_tokens=5, return_dict_in_generate=True, output_logits=True, **GREEDY
    )
    assert prefix_stats(model)["enabled"] is False
    torch.testing.assert_close(warm.sequences, cold.sequences, rtol=0, atol=0)
    for a, b in zip(warm.logits, cold.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_seeded_sampling_gives_the_same_codes_with_and_without_the_store(setup, monkeypatch, seed):
    model, _, processor = setup
    fresh_store(model)
    model.generate(**inputs_for(processor, turns(2)), max_new_tokens=2, seed=seed)
    inputs = inputs_for(processor, turns(3))
    warm = model.generate(**inputs, max_new_tokens=8, seed=seed)
    monkeypatch.setenv("CSM_PREFIX_CACHE", "0")
    cold = model.generate(**inputs, max_new_tokens=8, seed=seed)
    torch.testing.assert_close(warm, cold, rtol=0, atol=0)


def test_batched_rows_each_take_their_stored_prefix(setup, monkeypatch):
    model, _, processor = setup
    fresh_store(model)
    convs = [turns(2), turns(3)]
    convs[1][-1] = {"role": "0", "content": [{"type": "text", "text": "Other text!"}]}
    model.generate(**inputs_for(processor, turns(1)), max_new_tokens=2, **GREEDY)
    inputs = processor.apply_chat_template(convs, tokenize=True, return_dict=True)
    warm = model.generate(**inputs, max_new_tokens=5, **GREEDY)
    monkeypatch.setenv("CSM_PREFIX_CACHE", "0")
    cold = model.generate(**inputs, max_new_tokens=5, **GREEDY)
    torch.testing.assert_close(warm, cold, rtol=0, atol=0)


# ---- conversations, long text ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    return pipeline("text-to-audio", model=demo_checkpoint(tmp_path_factory), device="cpu")


def converse(tts, seed, sample=True):
    conv = tts.conversation(seed=seed, do_sample=sample, max_seconds=0.4)
    conv.add(0, "I am the voice.", audio=clip(0.4, 3))
    out = []
    for i in range(3):
        conv.add(1, f"User turn {i}.", audio=clip(0.3, 20 + i))
        out.append(conv.say(0, f"Answer {i}. Two sentences."))
        out.append(np.concatenate(list(conv.stream(0, f"Streamed {i}.", chunk_frames=1))))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_conversation_sounds_the_same_with_and_without_the_store(tts, monkeypatch, seed):
    fresh_store(tts.model)
    warm = converse(tts, seed)
    stats = prefix_stats(tts.model)
    # Six prompts: only the first reads the voice; each later one reads only the user's new turn and text.
    assert (stats["hits"], stats["misses"]) == (5, 1)
    assert stats["positions_saved"] > 2 * stats["positions_prefilled"]
    monkeypatch.setenv("CSM_PREFIX_CACHE", "0")
    cold = converse(tts, seed)
    assert len(warm) == len(cold)
    for a, b in zip(warm, cold):
        np.testing.assert_array_equal(a, b)


def test_a_turn_just_spoken_is_not_prefilled_again(tts):
    store = fresh_store(tts.model)
    conv = tts.conversation(seed=4, do_sample=False, max_seconds=0.4)
    conv.add(1, "Hello there.", audio=clip(0.3, 5))
    conv.say(0, "Hi.")
    spoken = conv.turns[-1].frames
    assert spoken > 0
    before = store.stats()
    conv.say(1, "And you?")
    after = store.stats()
    # The first prompt and the frames spoken after it are found; only the spoken turn's end-of-audio position
    # and the new text are prefilled.
    first_prompt = before["positions_prefilled"]  # the store was empty: all of it was prefilled
    assert after["hits"] == before["hits"] + 1
    assert after["positions_saved"] - before["positions_saved"] == first_prompt + spoken


def test_long_text_reads_each_sentence_once(tts, monkeypatch):
    store = fresh_store(tts.model)
    text = "First one here. Then a second. A third follows. And the last."
    warm = tts(text, seed=9, max_seconds=0.3, max_chunk_chars=20)["audio"]  # a sentence each
    stats = store.stats()
    assert stats["hits"] == 3 and stats["misses"] == 1
    monkeypatch.setenv("CSM_PREFIX_CACHE", "0")
    np.testing.assert_array_equal(warm, tts(text, seed=9, max_seconds=0.3, max_chunk_chars=20)["audio"])


# ---- prefill in slices ----------------------------------------------------------------------------------


def job(model, processor, conv, seed, frames=10):
    inputs = inputs_for(processor, conv)

    def embed():
        return model.embed_prompt(inputs["input_ids"], inputs["input_values"], inputs["input_values_cutoffs"])

    return RowJob(
        embed=embed, max_frames=frames, backbone=Sampling(), depth_decoder=Sampling(), seed=seed, decode=False
    )


def test_a_joining_prompt_is_prefilled_in_slices_and_the_running_row_never_misses_a_frame(setup, monkeypatch):
    model, _, processor = setup
    monkeypatch.setenv("CSM_PREFIX_CACHE", "0")  # every position of the joining prompt is prefilled
    alone = {}
    for name, conv, seed, frames in (("running", turns(0), 3, 40), ("joining", turns(4), 4, 12)):
        core = BatchCore(model, max_batch_size=2, max_seq_len=512)
        j = job(model, processor, conv, seed, frames=frames)
        core.add(j)
        while core.live_rows():
            core.step()
        alone[name] = torch.stack(j.codes)
    core = BatchCore(model, max_batch_size=2, max_seq_len=512, prefill_chunk=5)
    running = job(model, processor, turns(0), 3, frames=40)
    core.add(running)
    core.step()
    joining = job(model, processor, turns(4), 4, frames=12)
    core.add(joining)
    assert core.prefilling  # another row is generating: the prompt goes in a slice per step
    slices = 0
    while core.prefilling:
        had = len(running.codes)
        core.step()
        slices += 1
        assert len(running.codes) == had + 1  # a frame every step
    T = inputs_for(processor, turns(4))["input_ids"].shape[1]
    assert slices == -(-T // 5)
    while core.live_rows():
        core.step()
    torch.testing.assert_close(torch.stack(running.codes), alone["running"], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(joining.codes), alone["joining"], rtol=0, atol=0)


def test_prefill_chunk_is_checked():
    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchCore.__init__(object.__new__(BatchCore), None, prefill_chunk=0)


# ---- the server --------------------------------------------------------------------------------------------


def wav_b64(seconds: float, seed: int) -> str:
    buf = io.BytesIO()
    sf.write(buf, clip(seconds, seed), 24000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory)


def test_a_client_that_resends_its_history_gets_the_same_audio_and_reuses_it(checkpoint, tmp_path, caplog):
    history = [{"speaker": i % 2, "text": f"Turn {i}.", "audio": wav_b64(0.3, 30 + i)} for i in range(4)]
    bodies = [
        {
            "model": "csm",
            "input": f"Reply {n}.",
            "seed": n,
            "response_format": "pcm",
            "context": history[: n + 1],
        }
        for n in range(4)
    ]
    audio = {}
    for mb in (None, 0):
        with serve(checkpoint, tmp_path, max_frames=6, prefix_cache_mb=mb) as client:
            audio[mb] = [client.post("/v1/audio/speech", json=b).content for b in bodies]
            cache = client.get("/health").json()["scheduler"]["prefix_cache"]
        if mb is None:
            assert cache["enabled"] and cache["hits"] >= 3 and cache["positions_saved"] > 0
            assert 0 < cache["bytes"] <= cache["max_bytes"]
        else:
            assert not cache["enabled"] and cache["hits"] == 0
    assert all(len(a) > 0 for a in audio[None])
    assert audio[None] == audio[0]


def test_batched_requests_sound_the_same_with_and_without_the_store(checkpoint, tmp_path):
    """Concurrent requests share a context: rows join while others generate (slices) and take stored turns;
    each row decodes alone (--no-batched-decode), so its audio depends on nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    history = [{"speaker": i % 2, "text": f"Turn {i}.", "audio": wav_b64(0.3, 50 + i)} for i in range(3)]
    bodies = [
        {
            "model": "csm",
            "input": f"Reply number {n}.",
            "seed": 10 + n,
            "response_format": "pcm",
            "context": history[: 1 + n % 3],
        }
        for n in range(6)
    ]
    audio = {}
    for mb in (None, 0):
        with serve(checkpoint, tmp_path, max_frames=8, prefix_cache_mb=mb, batched_decode=False) as client:
            with ThreadPoolExecutor(6) as pool:
                audio[mb] = list(pool.map(lambda b: client.post("/v1/audio/speech", json=b).content, bodies))
            stats = client.get("/health").json()["scheduler"]
        assert stats["completed"] == 6 and stats["max_active_rows"] >= 2  # they were batched
        if mb is None:
            assert stats["prefix_cache"]["hits"] >= 3
    assert all(len(a) > 0 for a in audio[None])
    assert audio[None] == audio[0]
