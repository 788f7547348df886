"""CUDA graphs: a graphed engine's step (static shapes, the rows in use in a bucket) gives the eager codes.

A graph itself needs CUDA. On CPU, the static, bucketed step that a graph would capture runs eagerly
(`CUDAGraphed` passes through off CUDA) and is checked against the dynamic step; on CUDA the real graphs are.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_batching import TEXTS, job_for, run

import csm.engine as engine_module
from csm.batching import BatchCore
from csm.cuda_graph import CUDAGraphed
from csm.demo import write_demo_checkpoint
from csm.engine import (
    FrameEngine,
    RowSampling,
    Sampling,
    sample,
    use_compile,
    use_cuda_graph,
    use_inductor_cache,
)
from csm.model import CsmForConditionalGeneration
from csm.processor import CsmProcessor


def needs_cuda(test):
    """A CUDA-only test: skipped without CUDA, selected by `pytest -m gpu` (bench/gpu_suite.sh)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


GREEDY = dict(do_sample=False, depth_decoder_do_sample=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("graphs") / "demo")


def load(checkpoint, device="cpu"):
    model = CsmForConditionalGeneration.from_pretrained(checkpoint, device=device).eval()
    return model, CsmProcessor.from_pretrained(checkpoint)


@pytest.fixture
def static_step(monkeypatch):
    """Engines asked for graphs build the graphed (static, bucketed) step even on CPU, where it runs eagerly."""
    monkeypatch.setattr(engine_module, "graphs_enabled", lambda device: True)


def prompts(model, processor, texts):
    conversations = [
        [{"role": str(i % 2), "content": [{"type": "text", "text": t}]}] for i, t in enumerate(texts)
    ]
    inputs = processor.apply_chat_template(conversations, tokenize=True, return_dict=True)
    return {k: inputs[k].to(model.device) for k in ("input_ids", "attention_mask")}


def check_generate(model, processor):
    inputs = prompts(model, processor, TEXTS[:3])  # left-padded: different lengths
    for options in (GREEDY, dict(seed=3), dict(seed=4, temperature=1.3, top_k=7, top_p=0.8)):
        eager = model.generate(**inputs, max_new_tokens=10, cuda_graph=False, **options)
        graphed = model.generate(**inputs, max_new_tokens=10, cuda_graph=True, **options)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    engine = model._kept_engine  # kept on the model and reused: one graph per sampling setting and bucket
    assert engine.graphed and {key[0] for key in engine.graphs} == {3}


def check_batching(model, processor):
    setup = (model, processor)
    texts = [*TEXTS, "A fifth one joins when a row is free."]

    def jobs():  # the last rows end first, so the rows in use shrink to 2, then 1; the fifth runs alone
        return [job_for(setup, t, seed=i, frames=max(9 - 2 * i, 4)) for i, t in enumerate(texts)]

    def outcome(cuda_graph):
        core = BatchCore(model, max_batch_size=4, cuda_graph=cuda_graph)
        try:
            first, rest = jobs()[:4], jobs()[4:]
            out = run(core, first)
            out.update({4 + i: r for i, r in run(core, rest).items()})
            return out, core.engine
        finally:
            core.close()

    eager, _ = outcome(False)
    graphed, engine = outcome(True)
    assert engine.graphed
    for i in range(len(texts)):
        assert graphed[i][0] == eager[i][0] == "done"
        torch.testing.assert_close(graphed[i][2], eager[i][2], rtol=0, atol=0)
        np.testing.assert_allclose(graphed[i][1], eager[i][1], atol=1e-4)
    assert {key[0] for key in engine.graphs} >= {1, 4}  # and 2 unless end-of-audio came early


def test_static_bucketed_step_gives_the_dynamic_codes_for_generate(checkpoint, static_step):
    check_generate(*load(checkpoint))


def test_static_bucketed_step_gives_the_dynamic_codes_in_continuous_batching(checkpoint, static_step):
    check_batching(*load(checkpoint))


@pytest.mark.slow  # a cold CPU compile takes minutes
def test_compiled_static_bucketed_step_gives_the_dynamic_codes(checkpoint, static_step):
    """The compiled step inside the bucketed (graphed on CUDA) engine: compile=True with graphs."""
    model, processor = load(checkpoint)
    inputs = prompts(model, processor, TEXTS[:3])
    eager = model.generate(**inputs, max_new_tokens=4, cuda_graph=False, **GREEDY)
    compiled = model.generate(**inputs, max_new_tokens=4, cuda_graph=True, compile=True, **GREEDY)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    engine = model._kept_engine
    assert engine.graphed and engine.compiled and {key[0] for key in engine.graphs} == {3}


def test_rows_in_use_run_in_the_smallest_bucket(checkpoint, static_step):
    model, _ = load(checkpoint)
    engine = FrameEngine(model, batch_size=12, max_seq_len=64, cuda_graph=True)
    assert engine.rows_bucket() == 1  # nothing in use: the smallest
    for used, bucket in [(1, 1), (2, 2), (3, 4), (5, 8), (9, 12), (12, 12)]:
        engine.next_slot_bound = [5 if row == used - 1 else 0 for row in range(12)]
        assert engine.rows_bucket() == bucket
    engine.next_slot_bound[11] = 0  # freed: only row 0..used-1 that are in use count
    engine.next_slot_bound[1] = 7
    assert engine.rows_bucket() == 2


def test_a_step_captured_for_a_rounded_top_k_draws_what_the_exact_one_draws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=g)
    noise = torch.empty(3, 300).exponential_(generator=g)
    rows = RowSampling(3, 300, "cpu")
    rows.set(0, Sampling(top_k=50))
    rows.set(1, Sampling(top_k=5, temperature=0.7))
    rows.set(2, Sampling(do_sample=False))
    view = rows.rows(3)
    assert (rows.max_top_k, view.max_top_k) == (50, 64)
    torch.testing.assert_close(sample(logits, view, noise), sample(logits, rows, noise), rtol=0, atol=0)
    assert rows.rows(2).temperature.data_ptr() == rows.temperature.data_ptr()  # set() still reaches a view


def test_graph_helper_runs_eagerly_off_cuda():
    calls = []

    def double(x):
        calls.append(1)
        return x * 2

    step = CUDAGraphed(double)
    torch.testing.assert_close(step(torch.ones(3)), torch.full((3,), 2.0))
    assert step.graph is None and step.enabled is False and len(calls) == 1


def test_graphs_are_on_by_default_on_cuda_and_an_environment_variable_turns_them_off(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device, not a GPU: only its type is read
    for name in ("CSM_CUDA_GRAPH", "NO_CUDA_GRAPH"):
        monkeypatch.delenv(name, raising=False)
    assert use_cuda_graph(cuda, None) and not use_cuda_graph(cuda, False) and not use_cuda_graph(cpu, None)
    monkeypatch.setenv("CSM_CUDA_GRAPH", "0")
    assert not use_cuda_graph(cuda, None) and use_cuda_graph(cuda, True)
    monkeypatch.setenv("CSM_CUDA_GRAPH", "1")
    monkeypatch.setenv("NO_CUDA_GRAPH", "1")
    assert not use_cuda_graph(cuda, None) and not use_cuda_graph(cuda, True)


def test_compiling_is_a_flag_off_by_default(monkeypatch):
    for name in ("CSM_COMPILE", "NO_TORCH_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    assert not use_compile(None) and use_compile(True)
    monkeypatch.setenv("CSM_COMPILE", "1")
    assert use_compile(None) and not use_compile(False)
    monkeypatch.setenv("NO_TORCH_COMPILE", "1")
    assert not use_compile(None) and not use_compile(True)


def test_compiled_steps_are_cached_on_disk_under_the_users_cache_folder(monkeypatch, tmp_path):
    import torch._inductor.config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    use_inductor_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "csm" / "inductor")
    assert torch._inductor.config.fx_graph_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    use_inductor_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_server_start_reports_load_compile_and_capture_times(checkpoint, static_step):
    from csm.generate import GenerationConfig

    model, _ = load(checkpoint)
    core = BatchCore(model, max_batch_size=3, cuda_graph=True)
    config = GenerationConfig.from_model(model)
    assert core.engine.capture_graphs(config.backbone, config.depth_decoder) == [1, 2, 3]
    timings = core.engine.timings
    assert timings.load_s > 0 and timings.capture_s > 0 and timings.compile_s == 0 and timings.graphs == 3
    assert timings.summary().startswith(f"load {timings.load_s:.1f} s, compile 0.0 s, capture ")
    core.close()


# ---- on a GPU --------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_graphs_give_the_eager_codes_for_generate(checkpoint):
    check_generate(*load(checkpoint, "cuda"))


@needs_cuda
def test_cuda_graphs_give_the_eager_codes_in_continuous_batching(checkpoint):
    check_batching(*load(checkpoint, "cuda"))


@needs_cuda
def test_a_graph_refuses_inputs_of_another_shape_and_no_cuda_graph_turns_it_off(monkeypatch):
    step = CUDAGraphed(lambda x: x * 2 + 1, name="affine")
    x = torch.arange(4.0, device="cuda")
    torch.testing.assert_close(step(x), x * 2 + 1)
    y = torch.randn(4, device="cuda")
    torch.testing.assert_close(step(y), y * 2 + 1)  # a replay with new inputs copied in
    assert step.graph is not None
    with pytest.raises(ValueError, match="affine: input 0 is \\(5,\\)"):
        step(torch.ones(5, device="cuda"))
    monkeypatch.setenv("NO_CUDA_GRAPH", "1")
    off = CUDAGraphed(lambda x: x + 1)
    torch.testing.assert_close(off(x), x + 1)
    assert off.graph is None


@needs_cuda
def test_a_server_engine_captures_every_bucket_at_start(checkpoint):
    from csm.generate import GenerationConfig

    model, _ = load(checkpoint, "cuda")
    core = BatchCore(model, max_batch_size=6, cuda_graph=True)
    config = GenerationConfig.from_model(model)
    assert core.engine.capture_graphs(config.backbone, config.depth_decoder) == [1, 2, 4, 6]
    core.close()
