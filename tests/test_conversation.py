"""Conversations in Python: prompts equal the reference's for the turns before, trimming, seeds, the mix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from fixtures import reference_processor, write_reference_processor

from csm.demo import write_demo_checkpoint
from csm.pipeline import pipeline
from csm.planner import TurnError
from csm.voice import Voice

SHORT = 0.3  # seconds per sentence: a few frames keep every test fast


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    folder = write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")
    return pipeline("text-to-audio", model=folder, device="cpu")


def clip(seconds: float = 0.4, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(24000 * seconds)) * 0.1).astype(np.float32)


def spy_generate(monkeypatch, model) -> list[dict]:
    """Record every generate call's arguments and its codes."""
    calls, generate = [], model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append({**kwargs, "out": out})
        return out

    monkeypatch.setattr(model, "generate", spy)
    return calls


DIALOGUE = [
    {"speaker": 0, "text": "Hello there.", "audio": clip(0.5, 1)},
    {"speaker": 1, "text": "Oh, hi!"},
    {"speaker": 0, "text": "How are you doing?"},
    {"speaker": 1, "text": "Pretty good, thanks."},
]


def test_each_turn_prompt_equals_the_reference_chat_template_of_the_turns_before(csm_checkpoint, monkeypatch):
    folder, ref = csm_checkpoint
    write_reference_processor(folder)
    tts = pipeline("text-to-audio", model=folder)
    calls = spy_generate(monkeypatch, tts.model)
    result = tts.converse(DIALOGUE, seed=3, max_seconds=SHORT)
    assert len(calls) == 3 and all(t.frames > 0 for t in result.turns[1:])
    ref_codes_of_clip = ref.codec_model.encode(torch.from_numpy(DIALOGUE[0]["audio"])[None, None])
    ref_codes_of_clip = ref_codes_of_clip.audio_codes[0].T  # (F, K)
    for n, call in zip((1, 2, 3), calls, strict=True):
        conversation = [
            {
                "role": str(t["speaker"]),
                "content": [
                    {"type": "text", "text": t["text"]},
                    {"type": "audio", "audio": result.turns[i].audio},
                ],
            }
            for i, t in enumerate(DIALOGUE[:n])
        ]
        conversation.append(
            {"role": str(DIALOGUE[n]["speaker"]), "content": [{"type": "text", "text": DIALOGUE[n]["text"]}]}
        )
        expected = reference_processor().apply_chat_template(conversation, tokenize=True, return_dict=True)
        assert call["input_ids"].tolist() == expected["input_ids"].tolist()
        assert call["attention_mask"].tolist() == expected["attention_mask"].tolist()
        codes = call["audio_codes"]
        assert len(codes) == n
        torch.testing.assert_close(
            codes[0].cpu(), ref_codes_of_clip
        )  # the given clip, encoded as the reference does
        for i in range(1, n):  # generated turns: the codes generated for them, not their audio encoded again
            made = calls[i - 1]["out"][0, : result.turns[i].frames]
            assert torch.equal(codes[i], made)
        # and the audio the reference would be given for them is the audio we made
        cutoffs = expected["input_values_cutoffs"][0].tolist()
        values = expected["input_values"][0, 0].numpy()
        for i in range(1, n):
            np.testing.assert_array_equal(values[cutoffs[i - 1] : cutoffs[i]], result.turns[i].audio)


def test_trimming_drops_the_oldest_turns_and_keeps_every_voice_clip(tts, monkeypatch):
    alice = Voice("alice", 0, [(clip(0.3, 7), "A clip of Alice.")])
    calls = spy_generate(monkeypatch, tts.model)
    turns = [{"speaker": i % 2, "text": f"Turn number {i} says a few words."} for i in range(6)]
    monkeypatch.setattr(tts.model.config, "max_position_embeddings", 140)
    result = tts.converse(turns, voices={0: alice}, seed=0, max_seconds=SHORT)
    made = [call["out"][0, : t.frames] for call, t in zip(calls, result.turns, strict=True)]
    voice_codes = alice.codes(tts.model)[0]
    kept = []
    for n, call in enumerate(calls):
        codes = call["audio_codes"]
        assert torch.equal(codes[0], voice_codes)  # the voice's clip is in every prompt
        carried = codes[1:]
        assert all(torch.equal(c, m) for c, m in zip(carried, made[n - len(carried) : n], strict=True))
        assert call["input_ids"].shape[1] + call["max_new_tokens"] <= 140
        kept.append(len(carried))
    assert kept[:2] == [0, 1] and max(kept) < len(calls) - 1  # the window filled: older turns left


def test_a_seeded_dialogue_is_reproducible_and_the_mix_is_turns_plus_pauses(tts):
    turns = [
        {"speaker": 0, "text": "First one."},
        {"speaker": 1, "text": "Second one."},
        {"speaker": 0, "text": "Third."},
    ]
    a = tts.converse(turns, seed=5, max_seconds=SHORT, pause=0.25)
    b = tts.converse(turns, seed=5, max_seconds=SHORT, pause=0.25)
    c = tts.converse(turns, seed=6, max_seconds=SHORT, pause=0.25)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert not np.array_equal(a.audio, c.audio)
    gap = round(0.25 * 24000)
    assert len(a.audio) == sum(len(t.audio) for t in a.turns) + 2 * gap
    entries = a.manifest["turns"]
    assert [e["seed"] for e in entries] == [5, 6, 7] and [e["speaker"] for e in entries] == [0, 1, 0]
    for entry, turn in zip(entries, a.turns, strict=True):
        start, end = round(entry["start"] * 24000), round(entry["end"] * 24000)
        np.testing.assert_array_equal(a.audio[start:end], turn.audio)
        assert entry["frames"] == turn.frames and (end - start) == turn.frames * 1920
    assert not a.audio[round(entries[0]["end"] * 24000) : round(entries[1]["start"] * 24000)].any()


def test_say_after_add_gives_the_audio_of_converse(tts):
    turns = [
        {"speaker": 0, "text": "Did you get my message?", "audio": clip(0.4, 3)},
        {"speaker": 1, "text": "I did, yes."},
        {"speaker": 0, "text": "Great. See you then."},
    ]
    whole = tts.converse(turns, seed=11, max_seconds=SHORT)
    conv = tts.conversation(seed=11, max_seconds=SHORT)
    assert conv.add(0, turns[0]["text"], audio=turns[0]["audio"]).given
    first = conv.say(1, turns[1]["text"])
    second = conv.say(0, turns[2]["text"])
    np.testing.assert_array_equal(first, whole.turns[1].audio)
    np.testing.assert_array_equal(second, whole.turns[2].audio)
    np.testing.assert_array_equal(conv.result().audio, whole.audio)
    assert [t.given for t in whole.turns] == [True, False, False]
    assert [e["index"] for e in whole.manifest["turns"]] == [1, 2]  # given turns are context, not in the mix


def test_a_streamed_reply_equals_the_said_one_and_joins_the_context(tts):
    said = tts.conversation(seed=2, max_seconds=0.8, max_chunk_chars=20)
    said.say(0, "Hello there, friend.")
    expected = said.say(1, "First part is here. Second part is here.")
    streamed = tts.conversation(seed=2, max_seconds=0.8, max_chunk_chars=20)
    streamed.say(0, "Hello there, friend.")
    pieces = list(streamed.stream(1, "First part is here. Second part is here.", chunk_frames=2))
    assert len(pieces) > 2
    np.testing.assert_allclose(np.concatenate(pieces), expected, atol=1e-3)
    assert len(streamed.history) == 2 and streamed.turns[-1].frames == said.turns[-1].frames


def test_a_stream_stopped_early_records_what_was_spoken(tts):
    conv = tts.conversation(seed=4, max_seconds=0.8)
    stream = conv.stream(0, "A long reply that the listener interrupts.", chunk_frames=2)
    heard = next(stream)
    stream.close()
    assert len(conv.turns) == 1 and 0 < conv.turns[0].frames < 10
    assert len(conv.turns[0].audio) >= len(heard)
    assert conv.history[-1].codes.shape[0] == conv.turns[0].frames  # the context holds what was said
    conv.say(1, "Sorry, go on.")  # and the conversation goes on from there
    assert len(conv.turns) == 2


@pytest.mark.parametrize("seed", range(5))
def test_sampled_dialogues_never_raise_and_give_finite_audio(tts, seed):
    turns = [
        {"speaker": 0, "text": "Hi! How are you?"},
        {"speaker": 1, "text": "Fine. Long day, though; lots of meetings and then the train was late."},
        {"speaker": 0, "text": "Oh no."},
    ]
    result = tts.converse(
        turns, seed=seed, temperature=0.6 + 0.3 * seed, top_k=[1, 5, 50, 0, 2048][seed], max_seconds=SHORT
    )
    assert np.isfinite(result.audio).all() and result.audio.dtype == np.float32
    assert len(result.turns) == 3 and all(t.frames <= 4 * 2 for t in result.turns)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda tts: tts.converse([{"speaker": 0, "text": ""}]), "turn 0: the text is empty"),
        (lambda tts: tts.converse([{"speaker": -1, "text": "Hi."}]), "speaker"),
        (lambda tts: tts.converse([{"speaker": 0, "text": "Hi.", "voice": "x"}]), "turn 0"),
        (lambda tts: tts.converse([{"speaker": 0, "text": "Hi.", "audio": clip()}]), "at least one turn"),
        (
            lambda tts: tts.converse(
                [{"speaker": 0, "text": "Hi."}], voices={1: Voice("v", 0, [(clip(), "x")])}
            ),
            "never speaks",
        ),
        (
            lambda tts: tts.converse(
                [{"speaker": 0, "text": "Hi.", "audio": "missing.wav"}, {"speaker": 1, "text": "Yo."}]
            ),
            "turn 0: cannot read",
        ),
        (lambda tts: tts.conversation(voice="alice"), "voices="),
    ],
)
def test_bad_dialogues_get_one_line_errors(tts, call, match):
    with pytest.raises((ValueError, TypeError), match=match) as e:
        call(tts)
    assert "\n" not in str(e.value)


def test_a_turn_too_long_for_the_context_names_the_turn(tts, monkeypatch):
    monkeypatch.setattr(tts.model.config, "max_position_embeddings", 30)
    conv = tts.conversation(seed=0, max_seconds=SHORT)
    conv.say(0, "Hi.")
    with pytest.raises(TurnError, match="turn 1: .*context") as e:
        conv.say(1, "This turn has far too many words to fit in a context of thirty positions at all.")
    assert e.value.index == 1


def test_a_turn_keeps_its_whole_frame_budget_when_the_window_fills(tts, monkeypatch):
    """Dialogues drop old turns rather than cut a turn short; the pipeline's long text shrinks the budget."""
    asked, generate = [], tts.model.generate

    def three_frames(**kw):  # record the budget, generate only 3 frames (fast)
        asked.append((kw["input_ids"].shape[1], kw["max_new_tokens"], len(kw["audio_codes"] or [])))
        return generate(**{**kw, "max_new_tokens": 3})

    monkeypatch.setattr(tts.model, "generate", three_frames)
    monkeypatch.setattr(tts.model.config, "max_position_embeddings", 300)
    turns = [{"speaker": i % 2, "text": f"Turn {i} is short."} for i in range(8)]
    tts.converse(turns, seed=0)
    budget = asked[0][1]
    assert budget > 100 and all(frames == budget for _, frames, _ in asked)  # never shrunk
    assert all(length + frames <= 300 for length, frames, _ in asked)
    assert max(n for *_, n in asked) < 7  # old turns left instead
    asked.clear()
    tts(" ".join(t["text"] for t in turns), seed=0, max_chunk_chars=20)
    assert min(frames for _, frames, _ in asked) < budget  # long text keeps its sentences, shrinks the budget
