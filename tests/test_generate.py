"""The frame loop against the reference's generate, and its own promises: seeds, streaming, guards."""

import pytest
import torch
from fixtures import write_reference_processor
from reference_models import reference_csm

import csm.llama
from csm import CsmForConditionalGeneration
from csm.engine import FrameEngine, RowSampling, Sampling, sample
from csm.llama import FusedLinear, Packable, packable
from csm.processor import CsmProcessor

GREEDY = dict(do_sample=False, depth_decoder_do_sample=False)


def clip(seconds, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(int(24000 * seconds), generator=g)).numpy()


def conversations():
    """Two rows of different lengths: one with two audio context turns, one with text only."""
    with_context = [
        {
            "role": "0",
            "content": [
                {"type": "text", "text": "Hello from Sesame."},
                {"type": "audio", "audio": clip(0.4, 1)},
            ],
        },
        {
            "role": "1",
            "content": [{"type": "text", "text": "How are you?"}, {"type": "audio", "audio": clip(0.25, 2)}],
        },
        {"role": "0", "content": [{"type": "text", "text": "The quick brown fox."}]},
    ]
    plain = [{"role": "1", "content": [{"type": "text", "text": "I think so."}]}]
    return [with_context, plain]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    ref = reference_csm(seed=5)
    ref.save_pretrained(path)
    write_reference_processor(path)
    processor = CsmProcessor.from_pretrained(path)
    inputs = processor.apply_chat_template(conversations(), tokenize=True, return_dict=True)
    return CsmForConditionalGeneration.from_pretrained(path), ref, inputs


def reference_inputs(inputs):
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "input_values", "input_values_cutoffs")}


def test_greedy_codes_match_reference_with_audio_context(setup):
    ours, ref, inputs = setup
    expected = ref.generate(**reference_inputs(inputs), max_new_tokens=6, **GREEDY)
    got = ours.generate(**inputs, max_new_tokens=6, **GREEDY)
    assert got.shape == (2, 6, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_greedy_audio_matches_reference(setup):
    ours, ref, inputs = setup
    expected = ref.generate(**reference_inputs(inputs), max_new_tokens=4, output_audio=True, **GREEDY)
    got = ours.generate(**inputs, max_new_tokens=4, output_audio=True, **GREEDY)
    assert len(got) == 2
    for a, b in zip(got, expected):
        assert a.shape == b.shape == (4 * 1920,)
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not packable(torch.zeros(1)), reason="oneDNN is not available")
def test_greedy_codes_match_reference_with_every_weight_prepacked(setup, monkeypatch):
    ours, ref, inputs = setup
    monkeypatch.setattr(csm.llama, "PACK_MIN_NUMEL", 0)  # the tiny model's matrices are below the default
    expected = ref.generate(**reference_inputs(inputs), max_new_tokens=6, **GREEDY)
    try:
        ours.prepack()  # fp32 is packed only on request: the frame loop reads it plain
        got = ours.generate(**inputs, max_new_tokens=6, **GREEDY)
        fused = {id(p) for m in ours.modules() if isinstance(m, FusedLinear) for p in m.parts}  # run as one
        unpacked = [
            m for m in ours.modules() if isinstance(m, Packable) and m.packed is None and id(m) not in fused
        ]
    finally:
        ours.unpack()
    assert not unpacked
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not packable(torch.zeros(1)), reason="oneDNN is not available")
def test_greedy_codes_match_reference_with_fp32_weights_read_plain_at_batch_1(setup, monkeypatch):
    """The frame loop does not prepack fp32: oneDNN reads the plain weights (csm.llama.onednn_reads_plain)."""
    ours, ref, inputs = setup
    monkeypatch.setattr(csm.llama, "PACK_MIN_NUMEL", 0)  # the tiny model's matrices are below the default
    plain_reads = []

    def spy(x, weight, bias=None):
        plain_reads.append(not weight.is_mkldnn)
        return csm.llama.torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    monkeypatch.setattr(csm.llama, "packed_linear", spy)
    row = {k: inputs[k][1:] for k in ("input_ids", "attention_mask")}  # the text-only row
    expected = ref.generate(**row, max_new_tokens=6, **GREEDY)
    ours.unpack()
    got = ours.generate(**row, max_new_tokens=6, **GREEDY)
    assert not any(getattr(m, "packed", None) is not None for m in ours.modules())
    assert plain_reads and all(plain_reads)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def ending(tmp_path_factory):
    """A model whose depth decoder always says 0, so a frame ends the audio when the backbone says 0."""
    path = tmp_path_factory.mktemp("eos")
    ref = reference_csm(seed=1)
    with torch.no_grad():
        ref.depth_decoder.model.norm.weight.zero_()  # all-zero logits: argmax picks code 0
        ref.lm_head.weight[0] *= 4.0  # rows then end at frames 2, 7 and never
    ref.save_pretrained(path)
    return CsmForConditionalGeneration.from_pretrained(path), ref


def padded_prompts():
    ids = torch.full((3, 10), 2)
    mask = torch.zeros(3, 10, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate([10, 6, 3]):
        ids[i, 10 - n :] = torch.randint(4, 300, (n,), generator=g)
        mask[i, 10 - n :] = 1
    return ids, mask


def test_rows_end_independently_and_are_padded_like_the_reference(ending):
    ours, ref = ending
    ids, mask = padded_prompts()
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=0, **GREEDY)
    with pytest.warns(UserWarning, match="without end-of-audio"):
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **GREEDY)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    ended = (got[..., :-1] == 0).all(-1)
    assert ended[0].any() and ended[1].any() and not ended[2].any()  # the fixture covers both cases
    first = int(ended[0].float().argmax())
    assert (got[0, first + 1 :] == 2050).all()

    audio = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, output_audio=True, **GREEDY)
    ref_audio = ref.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, output_audio=True, eos_token_id=0, **GREEDY
    )
    for a, b in zip(audio, ref_audio):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_generation_stops_when_every_row_has_ended(ending):
    ours, ref = ending
    ids, mask = padded_prompts()
    got = ours.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=40, **GREEDY)
    expected = ref.generate(
        input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=40, eos_token_id=0, **GREEDY
    )
    assert got.shape[1] < 40
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_seeded_sampling_is_reproducible(setup):
    ours, _, inputs = setup
    a = ours.generate(**inputs, max_new_tokens=5, seed=7)
    b = ours.generate(**inputs, max_new_tokens=5, seed=7)
    c = ours.generate(**inputs, max_new_tokens=5, seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_streaming_equals_generate_for_the_same_seed(setup):
    ours, _, inputs = setup
    whole = ours.generate(**inputs, max_new_tokens=7, seed=3, output_audio=True)
    chunks = list(ours.generate_stream(**inputs, max_new_tokens=7, seed=3, chunk_frames=3))
    assert len(chunks) == 3  # 3 + 3 + 1 frames
    for row in range(2):
        streamed = torch.cat([c[row] for c in chunks])
        torch.testing.assert_close(streamed, whole[row], atol=1e-4, rtol=1e-4)
    codes = ours.generate(**inputs, max_new_tokens=7, seed=3)
    pairs = list(ours.generate_stream(**inputs, max_new_tokens=7, seed=3, chunk_frames=3, with_codes=True))
    for row in range(2):
        assert torch.equal(torch.cat([c[row] for _, c in pairs]), codes[row])


def test_streaming_cuts_each_row_at_its_end(ending):
    ours, _ = ending
    ids, mask = padded_prompts()
    whole = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, output_audio=True, **GREEDY)
    chunks = list(
        ours.generate_stream(input_ids=ids, attention_mask=mask, max_new_tokens=12, chunk_frames=5, **GREEDY)
    )
    for row in range(3):
        streamed = torch.cat([c[row] for c in chunks])
        assert streamed.shape == whole[row].shape
        torch.testing.assert_close(streamed, whole[row], atol=1e-4, rtol=1e-4)


def test_prompt_plus_frames_beyond_context_is_refused_before_work(setup):
    ours, _, inputs = setup
    with pytest.raises(ValueError, match="more than the model's 2048"):
        ours.generate(**inputs, max_new_tokens=2048)
    with pytest.raises(ValueError, match="more than the model's 2048"):
        ours.generate(**inputs, max_seconds=200.0)


def test_max_seconds_sets_the_frame_budget(setup):
    ours, _, inputs = setup
    with pytest.warns(UserWarning, match="without end-of-audio"):
        codes = ours.generate(**inputs, max_seconds=0.4, **GREEDY)
    assert codes.shape[1] == 5  # 0.4 s at 12.5 frames per second


def test_bad_sampling_arguments_are_clear(setup):
    ours, _, inputs = setup
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ours.generate(**inputs, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(**inputs, depth_decoder_top_p=1.5)
    with pytest.raises(ValueError, match="num_beams=4: beam search is not supported"):
        ours.generate(**inputs, num_beams=4)


def test_sampling_respects_top_k_and_greedy_rows():
    logits = torch.randn(3, 100)
    p = RowSampling(3, 100, "cpu")
    p.set(0, Sampling(do_sample=True, temperature=1.0, top_k=1))
    p.set(1, Sampling(do_sample=False))
    p.set(2, Sampling(do_sample=True, temperature=1.0, top_k=5))
    top5 = logits[2].topk(5).indices
    for _ in range(20):
        noise = torch.empty(3, 100).exponential_()
        got = sample(logits, p, noise)
        assert got[0] == logits[0].argmax() and got[1] == logits[1].argmax()
        assert got[2] in top5


def test_a_freed_row_leaves_the_attention_window_and_its_neighbour_unchanged(setup):
    ours = setup[0]
    g = torch.Generator().manual_seed(3)
    long, short = (torch.randn(1, T, ours.config.hidden_size, generator=g) for T in (40, 5))

    def greedy_engine(batch):
        engine = FrameEngine(ours, batch, 64)
        engine.backbone_sampling.set(slice(None), Sampling(do_sample=False))
        engine.depth_sampling.set(slice(None), Sampling(do_sample=False))
        return engine

    alone = greedy_engine(1)
    alone.prefill(short)
    expected = torch.stack([alone.next_frame()[0] for _ in range(6)])
    shared = greedy_engine(2)
    shared.prefill(long, rows=slice(0, 1))
    shared.prefill(short, rows=slice(1, 2))
    got = [shared.next_frame()[1] for _ in range(3)]
    shared.free(0)
    assert max(shared.next_slot_bound) == 5 + 3  # the long row no longer widens the window
    got += [shared.next_frame()[1] for _ in range(3)]
    torch.testing.assert_close(torch.stack(got), expected, rtol=0, atol=0)
    assert (shared.next_frame()[0] == ours.config.codebook_pad_token_id).all()


def test_precomputed_audio_codes_stand_in_for_audio(setup):
    ours, _, inputs = setup
    codes, mask = ours.encode_audio_context(inputs["input_values"], inputs["input_values_cutoffs"])
    clips = [c[m] for c, m in zip(codes, mask)]
    text_only = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    a = ours.generate(**text_only, audio_codes=clips, max_new_tokens=3, **GREEDY)
    b = ours.generate(**inputs, max_new_tokens=3, **GREEDY)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_frame_step_gives_the_eager_codes_and_compiles_once(setup):
    """torch.compile of the whole frame step (minutes on CPU; CUDA graphs on a GPU)."""
    import torch._dynamo

    ours, _, inputs = setup
    eager = ours.generate(**inputs, max_new_tokens=4, **GREEDY)
    torch._dynamo.reset()
    compiled = ours.generate(**inputs, max_new_tokens=4, compile=True, **GREEDY)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again = ours.generate(**inputs, max_new_tokens=4, compile=True, **GREEDY)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # reused, not recompiled


@pytest.mark.gpu
@pytest.mark.slow  # a cold compile; bench/bench_gpu.py checks the compiled step at csm-1b size too
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_and_graphed_step_gives_the_eager_codes_on_cuda(tmp_path):
    ref = reference_csm(seed=5)
    ref.save_pretrained(tmp_path)
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path, device="cuda")
    ids = torch.randint(4, 300, (2, 12), device="cuda")
    eager = ours.generate(
        input_ids=ids, max_new_tokens=6, cuda_graph=False, **GREEDY
    )  # graphs are the default
    graphed = ours.generate(input_ids=ids, max_new_tokens=6, compile=True, **GREEDY)  # compiled, then graphed
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


# A fp32 model of ~300 MB: layers large enough to be prepacked (csm.llama.PACK_MIN_NUMEL), run in a process of
# its own so its peak RSS is its own. Prints the weights' bytes and how far RSS peaked above its level before
# generate, in bytes.
PEAK_DURING_GENERATE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from reference_models import tiny_csm_config
from csm import CsmForConditionalGeneration
from csm.config import CsmConfig

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

torch.manual_seed(0)
config = tiny_csm_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=64)
config["depth_decoder_config"].update(backbone_hidden_size=1024, hidden_size=1024, intermediate_size=2048,
                                      num_attention_heads=16, num_key_value_heads=4, head_dim=64)
model = CsmForConditionalGeneration(CsmConfig(**config)).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
ids = torch.randint(0, 200, (int(sys.argv[2]), 16))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the RSS now
before = status("VmRSS")
model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, depth_decoder_do_sample=False)
print(weights, status("VmHWM") - before)
"""


@pytest.mark.skipif(not packable(torch.zeros(1)), reason="oneDNN is not available")
@pytest.mark.parametrize("batch", [1, 4])
def test_fp32_generate_holds_no_second_copy_of_the_weights(batch):
    """Peak RSS of an fp32 generate stays within 1.3x the weights at one row and at several: oneDNN reads
    the plain weights (csm.llama.onednn_reads_plain) instead of prepacked copies, which cost the weights
    once more."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", PEAK_DURING_GENERATE, str(Path(__file__).parent), str(batch)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    weights, growth = map(int, done.stdout.split())
    assert weights > 250e6  # large enough that a copy of the weights stands out from the frame loop's buffers
    assert growth < 0.3 * weights, (growth / 1e6, weights / 1e6)
