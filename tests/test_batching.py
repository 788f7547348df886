"""The batching core on the demo checkpoint: rows run together, and one row's fault stays in that row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm.batching import BatchCore, RowJob
from csm.demo import write_demo_checkpoint
from csm.generate import GenerationConfig
from csm.model import CsmForConditionalGeneration
from csm.processor import CsmProcessor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_demo_checkpoint(tmp_path_factory.mktemp("batching") / "demo")
    model = CsmForConditionalGeneration.from_pretrained(folder).eval()
    return model, CsmProcessor.from_pretrained(folder)


def job_for(setup, text: str, seed: int, frames: int = 6) -> RowJob:
    model, processor = setup
    conversation = [{"role": "0", "content": [{"type": "text", "text": text}]}]
    ids = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    config = GenerationConfig.from_model(model)
    return RowJob(
        embed=lambda: model.embed_inputs(ids.to(model.device), audio_codes=None)[0],  # ids where the model is
        max_frames=frames,
        backbone=config.backbone,
        depth_decoder=config.depth_decoder,
        seed=seed,
    )


def run(core: BatchCore, jobs: list[RowJob]) -> dict[int, tuple]:
    """Run jobs to their end, each added when a row is free; returns {index: ("done", audio, codes) or
    ("error", exception)}."""
    index = {id(j): i for i, j in enumerate(jobs)}
    audio = {i: [] for i in range(len(jobs))}
    out = {}
    waiting = list(jobs)
    while waiting or core.live_rows():
        while waiting and core.free_rows():  # a job starts as soon as a row is free
            core.add(waiting.pop(0))
        for event in core.step():
            i = index[id(event.job)]
            if event.kind == "audio":
                audio[i].append(event.audio)
            elif event.kind == "done":
                out[i] = ("done", np.concatenate(audio[i]), torch.stack(event.job.codes))
            else:
                out[i] = ("error", event.error)
    return out


TEXTS = ["The first row.", "A second one here.", "Third.", "And the fourth row speaks."]


def solo(setup, i: int, frames: int = 6):
    core = BatchCore(setup[0], max_batch_size=1)
    try:
        return run(core, [job_for(setup, TEXTS[i], seed=i, frames=frames)])[0]
    finally:
        core.close()


def assert_same_as_solo(setup, results, rows, frames=lambda i: 6):
    for i in rows:
        kind, audio, codes = results[i]
        _, audio_alone, codes_alone = solo(setup, i, frames(i))
        assert kind == "done"
        torch.testing.assert_close(codes, codes_alone, rtol=0, atol=0)
        np.testing.assert_allclose(audio, audio_alone, atol=1e-5)


@pytest.mark.parametrize("batched_decode", [False, True])
def test_one_rows_decode_failure_leaves_the_other_rows_unchanged(setup, monkeypatch, batched_decode):
    core = BatchCore(setup[0], max_batch_size=4, chunk_frames=2, batched_decode=batched_decode)
    jobs = [job_for(setup, t, seed=i) for i, t in enumerate(TEXTS)]
    decode = core._decode

    def failing_decode(group):
        if any(core.job(b) is jobs[2] and jobs[2].frames >= 4 for b, _ in group):
            raise RuntimeError("codec exploded")  # batched: the shared call fails, then row 2's alone
        return decode(group)

    monkeypatch.setattr(core, "_decode", failing_decode)
    results = run(core, jobs)
    core.close()
    assert results[2][0] == "error" and "codec exploded" in str(results[2][1])
    assert_same_as_solo(setup, results, [0, 1, 3])


def test_a_step_that_raises_for_one_row_fails_that_row_alone(setup, monkeypatch):
    core = BatchCore(setup[0], max_batch_size=4, chunk_frames=2)
    jobs = [job_for(setup, t, seed=i) for i, t in enumerate(TEXTS)]
    step = core.engine.step
    poisoned = {"row": None, "after": 3}

    def faulty_step(hidden, *args):
        b = poisoned["row"]
        if b is not None and core.rows[b] is not None and core.rows[b].job.frames >= poisoned["after"]:
            if hidden[b].abs().sum() > 0:  # the poisoned row takes part in this step
                raise RuntimeError("bad row state")
        return step(hidden, *args)

    monkeypatch.setattr(core.engine, "step", faulty_step)
    for job in jobs:
        core.add(job)
    poisoned["row"] = next(b for b in core.live_rows() if core.job(b) is jobs[1])
    results, audio = {}, {i: [] for i in range(4)}
    while core.live_rows():
        for event in core.step():
            i = jobs.index(event.job)
            if event.kind == "audio":
                audio[i].append(event.audio)
            elif event.kind == "done":
                results[i] = ("done", np.concatenate(audio[i]), torch.stack(event.job.codes))
            else:
                results[i] = ("error", event.error)
    core.close()
    assert results[1][0] == "error" and "bad row state" in str(results[1][1])
    assert_same_as_solo(setup, results, [0, 2, 3])


def test_a_failing_prefill_leaves_the_row_free_and_the_batch_running(setup):
    core = BatchCore(setup[0], max_batch_size=2)
    good = job_for(setup, TEXTS[0], seed=0)
    bad = job_for(setup, TEXTS[1], seed=1)
    bad.embed = lambda: (_ for _ in ()).throw(ValueError("cannot embed"))
    with pytest.raises(ValueError, match="cannot embed"):
        core.add(bad)
    assert core.free_rows() == [0, 1]
    results = run(core, [good])
    core.close()
    assert_same_as_solo(setup, results, [0])


def test_a_row_whose_consumer_is_behind_waits_as_codes_then_decodes_all_at_its_end(setup):
    core = BatchCore(setup[0], max_batch_size=1, chunk_frames=2)
    job = job_for(setup, TEXTS[3], seed=3, frames=10)
    core.eos = -1  # never ends early: all 10 frames
    taken = []
    job.wants_audio = lambda: len(taken) < 2  # the consumer holds at most two chunks, never takes them
    run_events = []
    core.add(job)
    while core.live_rows():
        for event in core.step():
            run_events.append(event)
            if event.kind == "audio":
                taken.append(event)
    core.close()
    sizes = [e.codes.shape[1] for e in run_events if e.kind == "audio"]
    assert sizes == [2, 2, 6] and run_events[-1].kind == "done"
    assert sum(len(e.audio) for e in taken) == 10 * 1920


def test_a_passing_step_fault_is_retried_and_fails_no_row(setup, monkeypatch):
    core = BatchCore(setup[0], max_batch_size=4, chunk_frames=2)
    jobs = [job_for(setup, t, seed=i) for i, t in enumerate(TEXTS)]
    step, calls = core.engine.step, {"n": 0}

    def flaky_step(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # one bad step (e.g. a transient device error), not tied to a row
            raise RuntimeError("transient")
        return step(*args)

    monkeypatch.setattr(core.engine, "step", flaky_step)
    results = run(core, jobs)
    core.close()
    assert calls["n"] > 3
    assert_same_as_solo(setup, results, [0, 1, 2, 3])


# ---- batched decode: one codec call for the rows, each row its own stream -----------------------------


def test_batched_decode_gives_each_row_its_solo_audio(setup):
    core = BatchCore(setup[0], max_batch_size=2, chunk_frames=4, batched_decode=True)
    assert core.decoder is not None
    calls = []
    step = core.decoder.step
    core.decoder.step = lambda codes, rows: calls.append(list(rows)) or step(codes, rows)
    jobs = [job_for(setup, t, seed=i, frames=6 + 3 * i) for i, t in enumerate(TEXTS)]
    results = run(core, jobs)  # two rows: the later jobs start in freed rows, at other steps
    core.close()
    assert max(len(rows) for rows in calls) == 2  # rows did decode together
    assert_same_as_solo(setup, results, [0, 1, 2, 3], frames=lambda i: 6 + 3 * i)


def test_batched_decode_keeps_the_consumer_behind_and_a_row_without_audio(setup):
    core = BatchCore(setup[0], max_batch_size=3, chunk_frames=2, batched_decode=True)
    slow = job_for(setup, TEXTS[3], seed=3, frames=10)
    taken = []
    slow.wants_audio = lambda: len(taken) < 2
    silent = job_for(setup, TEXTS[1], seed=1)
    silent.decode = False
    events = {"slow": [], "silent": []}
    core.add(slow), core.add(silent)
    while core.live_rows():
        for event in core.step():
            key = "slow" if event.job is slow else "silent"
            events[key].append(event)
            if event.job is slow and event.kind == "audio":
                taken.append(event)
    core.close()
    assert [e.codes.shape[1] for e in events["slow"] if e.kind == "audio"] == [2, 2, 6]
    assert sum(len(e.audio) for e in taken) == 10 * 1920
    assert all(e.audio is None for e in events["silent"]) and events["silent"][-1].kind == "done"


def test_batched_decode_ends_the_row_whose_codes_the_codec_refuses_alone(setup, monkeypatch):
    core = BatchCore(setup[0], max_batch_size=4, chunk_frames=2, batched_decode=True)
    jobs = [job_for(setup, t, seed=i) for i, t in enumerate(TEXTS)]
    next_frame = core._next_frame

    def poisoned(live, events):
        codes = next_frame(live, events)
        for b in core.live_rows():
            if core.job(b) is jobs[2] and core.job(b).frames == 2:
                codes = codes.clone()
                codes[b, 5] = 4000  # past the codec's codebook: cannot be decoded
        return codes

    monkeypatch.setattr(core, "_next_frame", poisoned)
    results = run(core, jobs)
    core.close()
    assert results[2][0] == "error" and "codes must lie in" in str(results[2][1])
    assert_same_as_solo(setup, results, [0, 1, 3])


def test_a_shared_decode_that_fails_only_together_is_retried_row_by_row(setup):
    core = BatchCore(setup[0], max_batch_size=2, chunk_frames=2, batched_decode=True)
    step, calls = core.decoder.step, []

    def fails_together(codes, rows):
        calls.append(len(rows))
        if len(rows) > 1 and calls.count(2) == 2:  # e.g. out of memory for the batch, once
            raise RuntimeError("out of memory")
        return step(codes, rows)

    core.decoder.step = fails_together
    results = run(core, [job_for(setup, t, seed=i) for i, t in enumerate(TEXTS[:2])])
    core.close()
    assert calls.count(2) > 2 and calls.count(1) >= 2  # failed once together, then one by one
    assert_same_as_solo(setup, results, [0, 1])


def test_a_decode_that_fails_for_every_row_alone_ends_them_all(setup):
    core = BatchCore(setup[0], max_batch_size=2, chunk_frames=2, batched_decode=True)

    def broken(codes, rows):
        raise RuntimeError("device lost")

    core.decoder.step = broken
    results = run(core, [job_for(setup, t, seed=i) for i, t in enumerate(TEXTS[:2])])
    assert {r[0] for r in results.values()} == {"error"}
    assert core.live_rows() == [] and core.free_rows() == [0, 1]
    core.close()
