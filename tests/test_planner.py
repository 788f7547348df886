"""The turn planner: prompts equal the reference processor's, trimming keeps the newest turns and fixed clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import reference_processor, write_reference_processor

from csm import CsmProcessor
from csm.planner import Turn, plan_prompt

SPF = 1920  # samples per codec frame


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proc")
    write_reference_processor(folder)
    return CsmProcessor.from_pretrained(folder)


def turn(speaker: int, text: str, frames: int, seed: int = 0) -> Turn:
    rng = np.random.default_rng(seed)
    audio = (rng.standard_normal(frames * SPF) * 0.1).astype(np.float32)
    codes = torch.from_numpy(rng.integers(0, 2048, (frames, 8)))
    return Turn(speaker, text, audio, codes)


def history(n: int, frames: int = 3) -> list[Turn]:
    return [turn(i % 2, f"Turn number {i} is here.", frames, seed=i) for i in range(n)]


def test_prompt_equals_the_reference_chat_template_with_codes_in_turn_order(processor):
    fixed = [turn(0, "A voice clip.", 4, seed=10)]
    carried = history(3)
    prompt = plan_prompt(processor, fixed, carried, speaker=1, text="What now?", frames=20, limit=2048)
    conversation = [t.as_message() for t in fixed + carried]
    conversation.append({"role": "1", "content": [{"type": "text", "text": "What now?"}]})
    expected = reference_processor().apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert prompt.input_ids.tolist() == expected["input_ids"].tolist()
    assert prompt.attention_mask.tolist() == expected["attention_mask"].tolist()
    assert [c.data_ptr() for c in prompt.audio_codes] == [t.codes.data_ptr() for t in fixed + carried]
    assert prompt.carried == carried and prompt.frames == 20


def test_trimming_drops_the_oldest_carried_turns_and_keeps_the_fixed_ones(processor):
    fixed = [turn(0, "A voice clip.", 5, seed=10)]
    carried = history(6, frames=4)
    whole = plan_prompt(processor, fixed, carried, 1, "Next.", frames=1, limit=2048).length
    limit = whole - 12  # a little less than everything: some turns must go
    prompt = plan_prompt(
        processor, fixed, carried, 1, "Next.", frames=10, limit=limit, policy="keep", slide=0
    )
    assert prompt.context[0] is fixed[0]
    assert 0 < len(prompt.carried) < len(carried)
    assert prompt.carried == carried[-len(prompt.carried) :]  # the newest ones, in order
    assert prompt.length + prompt.frames <= limit
    # The fewest turns dropped: one more turn would not fit.
    more = plan_prompt(processor, fixed, carried[-len(prompt.carried) - 1 :], 1, "Next.", 1, 4096)
    assert more.length + 10 > limit


def test_the_bisection_drops_exactly_as_many_turns_as_dropping_one_by_one(processor):
    fixed = [turn(1, "Clip.", 2, seed=3)]
    carried = [turn(i % 3, "Words " * (i % 4 + 1), i % 5 + 1, seed=i) for i in range(12)]
    full = plan_prompt(processor, fixed, carried, 0, "Go on.", frames=1, limit=4096).length
    for limit in range(full - 60, full + 2, 7):
        kept = list(carried)
        while kept and plan_prompt(processor, fixed, kept, 0, "Go on.", 1, 4096).length + 5 > limit:
            kept.pop(0)
        prompt = plan_prompt(
            processor, fixed, carried, 0, "Go on.", frames=5, limit=limit, policy="keep", slide=0
        )
        assert prompt.carried == kept


def test_policies_decide_between_history_and_frame_budget(processor):
    carried = history(4)
    full = plan_prompt(processor, [], carried, 0, "Next.", frames=1, limit=4096).length
    limit = full + 10
    fit = plan_prompt(processor, [], carried, 0, "Next.", frames=50, limit=limit, policy="fit")
    assert fit.carried == carried and fit.frames == 10  # all history kept, budget shrunk to the room
    keep = plan_prompt(processor, [], carried, 0, "Next.", frames=50, limit=limit, policy="keep")
    assert len(keep.carried) < len(carried) and keep.frames == 50  # history trimmed for the budget
    alone = plan_prompt(processor, [], [], 0, "Next.", frames=1, limit=4096).length
    short = plan_prompt(processor, [], carried, 0, "Next.", frames=50, limit=alone + 5, policy="keep")
    assert short.carried == [] and short.frames == 5  # no history left: the budget shrinks
    with pytest.raises(ValueError, match="context of"):
        plan_prompt(processor, [], carried, 0, "Next.", frames=50, limit=alone + 5, policy="exact")
    with pytest.raises(ValueError, match="policy"):
        plan_prompt(processor, [], carried, 0, "Next.", frames=5, limit=4096, policy="shrink")


def test_fixed_turns_are_never_dropped_even_when_they_overflow(processor):
    fixed = [turn(0, "A long voice clip.", 30, seed=1)]
    with pytest.raises(ValueError, match="Shorten the text or the voice clips"):
        plan_prompt(processor, fixed, history(2), 0, "Next.", frames=5, limit=30)


def test_a_batch_of_texts_shares_the_context_and_repeats_its_codes_per_row(processor):
    carried = history(2)
    prompt = plan_prompt(processor, [], carried, 0, ["One.", "A longer second text."], frames=5, limit=2048)
    assert prompt.input_ids.shape[0] == 2 and prompt.attention_mask[0, 0] == 0  # left-padded
    assert len(prompt.audio_codes) == 4
    assert prompt.audio_codes[2] is carried[0].codes


def test_codes_not_yet_encoded_are_refused_when_asked_for(processor):
    pending = Turn(0, "A clip.", np.zeros(3 * SPF, np.float32))
    prompt = plan_prompt(processor, [pending], [], 0, "Hi.", frames=5, limit=2048)
    assert prompt.length > 3
    with pytest.raises(ValueError, match="no codes"):
        _ = prompt.audio_codes


def test_turn_stays_importable_from_the_pipeline():
    from csm.pipeline import Turn as PipelineTurn

    assert PipelineTurn is Turn


def test_history_leaves_in_slides_so_later_prompts_begin_with_the_same_turns(processor):
    fixed = [turn(1, "Clip.", 2, seed=3)]
    carried = [turn(i % 2, "Some words here " * (i % 3 + 1), i % 4 + 2, seed=i) for i in range(30)]
    # The window a conversation outgrows: each new turn is planned after all the turns before it.
    limit, slide = 240, 60
    starts = []
    for n in range(1, len(carried) + 1):
        history = carried[:n]
        prompt = plan_prompt(processor, fixed, history, 0, "Go on.", 5, limit, "keep", slide=slide)
        fewest = plan_prompt(processor, fixed, history, 0, "Go on.", 5, limit, "keep", slide=0)
        assert prompt.length + prompt.frames <= limit
        assert len(prompt.carried) <= len(fewest.carried)  # at least the fewest turns leave
        starts.append(n - len(prompt.carried))  # index of the first turn kept
        # The cut sits on the grid: the first turn kept starts at a multiple of `slide` positions or later,
        # and the turn before it started short of that multiple.
        first = starts[-1]
        if first:
            whole = plan_prompt(processor, fixed, history, 0, "Go on.", 1, 4096).length
            at = whole - plan_prompt(processor, fixed, history[first:], 0, "Go on.", 1, 4096).length
            before = whole - plan_prompt(processor, fixed, history[first - 1 :], 0, "Go on.", 1, 4096).length
            assert before // slide < at // slide  # a multiple of `slide` in (before, at]
    # The first turn kept moves rarely and only forward: fewer moves than dropping the fewest turns makes.
    fewest_starts = [
        n - len(plan_prompt(processor, fixed, carried[:n], 0, "Go on.", 5, limit, "keep", slide=0).carried)
        for n in range(1, len(carried) + 1)
    ]
    assert starts == sorted(starts) and starts[-1] > 0

    def moves(xs):
        return sum(a != b for a, b in zip(xs, xs[1:]))

    assert moves(starts) < moves(fewest_starts)
