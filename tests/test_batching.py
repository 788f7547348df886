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
        embed=lambda: model.embed_inputs(ids, audio_codes=None)[0],
        max_frames=frames,
        backbone=config.backbone,
        depth_decoder=config.depth_decoder,
        seed=seed,
    )


def run(core: BatchCore, jobs: list[RowJob]) -> dict[int, tuple]:
    """Run jobs to their end; returns {index: ("done", audio, codes) or ("error", exception)}."""
    index = {id(j): i for i, j in enumerate(jobs)}
    audio = {i: [] for i in range(len(jobs))}
    out = {}
    for job in jobs:
        core.add(job)
    while core.live_rows():
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


def solo(setup, i: int):
    core = BatchCore(setup[0], max_batch_size=1)
    try:
        return run(core, [job_for(setup, TEXTS[i], seed=i)])[0]
    finally:
        core.close()


def assert_same_as_solo(setup, results, rows):
    for i in rows:
        kind, audio, codes = results[i]
        _, audio_alone, codes_alone = solo(setup, i)
        assert kind == "done"
        torch.testing.assert_close(codes, codes_alone, rtol=0, atol=0)
        np.testing.assert_allclose(audio, audio_alone, atol=1e-5)


def test_one_rows_decode_failure_leaves_the_other_rows_unchanged(setup, monkeypatch):
    core = BatchCore(setup[0], max_batch_size=4, chunk_frames=2)
    jobs = [job_for(setup, t, seed=i) for i, t in enumerate(TEXTS)]
    flush = core._flush
    calls = {"n": 0}

    def failing_flush(b, row):
        calls["n"] += 1
        if row.job is jobs[2] and row.job.frames >= 4:
            raise RuntimeError("codec exploded")
        return flush(b, row)

    monkeypatch.setattr(core, "_flush", failing_flush)
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
