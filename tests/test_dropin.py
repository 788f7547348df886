"""The reference's public API at its edges: outputs, padding, long positions, loading arguments, generate's
options. Each test runs the reference (transformers) and ours on the same random weights."""

import json

import pytest
import torch
from reference_models import BOS, PAD, TEXT_VOCAB, reference_csm, tiny_csm_config

from csm import CsmConfig, CsmForConditionalGeneration


@pytest.fixture(scope="module")
def pair(csm_checkpoint):
    path, ref = csm_checkpoint
    return CsmForConditionalGeneration.from_pretrained(path), ref


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def padded_ids(lengths, T, side):
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, span] = torch.randint(4, TEXT_VOCAB, (n,))
        ids[i, span.start] = BOS
        mask[i, span] = 1
    return ids, mask


# ---- forward outputs ------------------------------------------------------------------------------


def test_outputs_read_like_the_reference_by_name_position_and_tuple(pair):
    ours, ref = pair
    codes = torch.randint(0, 2048, (2, 6, 8))
    labels = torch.randint(0, 2048, (2, 6, 8))
    with torch.no_grad():
        for kwargs in ({}, {"labels": labels}):
            a, b = ours(input_ids=codes, **kwargs), ref(input_ids=codes, use_cache=False, **kwargs)
            assert list(a.keys()) == list(b.keys())
            for i, (x, y) in enumerate(zip(a.to_tuple(), b.to_tuple(), strict=True)):
                close(x, y)
                close(a[i], b[i])
            close(a["logits"], b["logits"])
            close(a[0], b[0])  # the loss when there are labels, else the logits
            as_tuple = ours(input_ids=codes, return_dict=False, **kwargs)
            assert isinstance(as_tuple, tuple) and len(as_tuple) == len(b.to_tuple())
            close(as_tuple[0], b[0])
    with pytest.raises(KeyError, match="loss"):
        ours(input_ids=codes)["loss"]


def test_hidden_states_and_position_ids_match_reference(pair):
    ours, ref = pair
    codes = torch.randint(0, 2048, (2, 7, 8))
    labels = torch.randint(0, 2048, (2, 7, 8))
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        a = ours(input_ids=codes, labels=labels, output_hidden_states=True, position_ids=positions)
        b = ref(
            input_ids=codes, labels=labels, output_hidden_states=True, position_ids=positions, use_cache=False
        )
    close(a.logits, b.logits)
    close(a.loss, b.loss)
    for name in ("hidden_states", "depth_decoder_hidden_states"):
        assert len(getattr(a, name)) == len(getattr(b, name)) == 3
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            close(x, y)


def test_forward_past_max_position_embeddings_matches_reference(pair):
    ours, ref = pair
    limit = ours.config.max_position_embeddings
    codes = torch.randint(0, 2048, (1, 3, 8))
    positions = torch.arange(limit - 1, limit + 2)[None]  # the last two past the table
    with torch.no_grad():
        close(
            ours(input_ids=codes, position_ids=positions).logits,
            ref(input_ids=codes, position_ids=positions, use_cache=False).logits,
        )
        # and the normal path is unchanged afterwards
        close(ours(input_ids=codes).logits, ref(input_ids=codes, use_cache=False).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_positions_give_the_reference_logits_and_loss(pair, side):
    ours, ref = pair
    ids, mask = padded_ids([9, 5, 2], 9, side)
    labels = torch.randint(0, 2048, (3, 9, 8))  # every position labelled: padded queries are scored too
    with torch.no_grad():
        a = ours(inputs_embeds=ref.embed_text_tokens(ids), attention_mask=mask, labels=labels)
        b = ref(inputs_embeds=ref.embed_text_tokens(ids), attention_mask=mask, labels=labels, use_cache=False)
    close(a.logits, b.logits)
    close(a.loss, b.loss, 1e-5)


# ---- generate -------------------------------------------------------------------------------------

GREEDY = dict(do_sample=False, depth_decoder_do_sample=False)


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("dropin-gen")
    ref = reference_csm(seed=5)
    ref.save_pretrained(path)
    return CsmForConditionalGeneration.from_pretrained(path), ref, path


def test_code_prompt_frames_come_first_as_in_the_reference(gen_pair):
    ours, ref, _ = gen_pair
    prompt = torch.randint(0, 2048, (2, 5, 8))
    expected = ref.generate(input_ids=prompt, max_new_tokens=4, **GREEDY)
    got = ours.generate(input_ids=prompt, max_new_tokens=4, **GREEDY)
    assert got.shape == expected.shape == (2, 9, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    audio = ours.generate(input_ids=prompt, max_new_tokens=4, output_audio=True, **GREEDY)
    ref_audio = ref.generate(input_ids=prompt, max_new_tokens=4, output_audio=True, **GREEDY)
    for a, b in zip(audio, ref_audio, strict=True):
        assert a.shape == b.shape == (9 * 1920,)
        close(a, b, 1e-3)


@pytest.mark.parametrize("trial", range(6))
def test_right_padded_prompts_generate_the_reference_codes(gen_pair, trial):
    ours, ref, _ = gen_pair
    torch.manual_seed(trial)
    ids, mask = padded_ids([8, 5, 3], 8, "right")
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_return_dict_in_generate_with_scores_and_logits(gen_pair):
    ours, ref, _ = gen_pair
    ids, mask = padded_ids([7, 4], 7, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
    kwargs.update(output_scores=True, output_logits=True)
    a = ours.generate(**kwargs, **GREEDY)
    b = ref.generate(**kwargs, **GREEDY)
    torch.testing.assert_close(a.sequences, b.sequences, rtol=0, atol=0)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for name in ("scores", "logits"):
        assert len(getattr(a, name)) == len(getattr(b, name)) == 3
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            close(x, y)
    # Sampling: the first frame's processed scores (temperature, top-k, top-p) are the reference's.
    sampling = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    a = ours.generate(**kwargs, **sampling, seed=0)
    b = ref.generate(**kwargs, **sampling)
    close(a.scores[0], b.scores[0])
    close(a.logits[0], b.logits[0])
    audio = ours.generate(**kwargs, **GREEDY, output_audio=True)
    assert len(audio.audio) == 2 and audio["audio"] is audio.audio


def test_num_return_sequences_repeats_each_row_as_the_reference(gen_pair):
    ours, ref, _ = gen_pair
    ids, mask = padded_ids([6, 3], 6, "left")
    # top_k=1 sampling is deterministic, so both libraries give the same rows despite their own RNGs.
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_return_sequences=2)
    kwargs.update(do_sample=True, top_k=1, depth_decoder_do_sample=False)
    got, expected = ours.generate(**kwargs), ref.generate(**kwargs)
    assert got.shape == expected.shape == (4, 3, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs sampling"):
        ours.generate(input_ids=ids, max_new_tokens=2, num_return_sequences=2, **GREEDY)


def test_generation_config_reads_as_attributes_and_min_new_tokens_is_the_references(gen_pair):
    ours, ref, _ = gen_pair
    ids, mask = padded_ids([5, 5], 5, "left")
    saved = dict(ours.generation_config)
    try:
        ours.generation_config.max_new_tokens = 3
        ours.generation_config.do_sample = False
        ours.generation_config.depth_decoder_do_sample = False
        assert ours.generation_config["max_new_tokens"] == 3 and ours.generation_config.top_k == 50
        got = ours.generate(input_ids=ids, attention_mask=mask, min_new_tokens=2)
    finally:
        ours.generation_config = saved
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=2, **GREEDY)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        ours.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=-1)


def test_fresh_model_saves_a_generation_config_the_reference_reads(tmp_path):
    from transformers import CsmForConditionalGeneration as Reference

    config = CsmConfig.from_dict(tiny_csm_config())
    CsmForConditionalGeneration(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 125 and saved["depth_decoder_top_k"] == 50
    ref = Reference.from_pretrained(tmp_path)
    assert ref.generation_config.do_sample and ref.generation_config.temperature == pytest.approx(0.9)
    assert ref.generation_config.top_k == 50
    assert ref.depth_decoder.generation_config.do_sample
    assert ref.depth_decoder.generation_config.top_k == 50
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.generation_config.max_new_tokens == 125


# ---- loading --------------------------------------------------------------------------------------


def test_from_pretrained_takes_device_map_and_torch_dtype_as_the_model_card(csm_checkpoint):
    from transformers import CsmForConditionalGeneration as Reference

    path, _ = csm_checkpoint
    ref = Reference.from_pretrained(path, torch_dtype=torch.bfloat16)  # its device_map needs accelerate
    for kwargs in (
        dict(device_map="cpu", torch_dtype=torch.bfloat16),
        dict(device_map="auto", dtype="bfloat16"),
        dict(device_map={"": "cpu"}, dtype=torch.bfloat16),
    ):
        ours = CsmForConditionalGeneration.from_pretrained(path, **kwargs)
        assert ours.dtype == ref.dtype == torch.bfloat16
        assert ours.device.type == (
            "cuda" if torch.cuda.is_available() and kwargs["device_map"] == "auto" else "cpu"
        )
    codes = torch.randint(0, 2048, (1, 4, 8))
    with torch.no_grad():
        close(ours(input_ids=codes).logits.float(), ref(input_ids=codes).logits.float(), 2e-2)
    with pytest.raises(ValueError, match="one device"):
        CsmForConditionalGeneration.from_pretrained(path, device_map={"a": "cpu", "b": "meta"})
    with pytest.raises(ValueError, match="disagree"):
        CsmForConditionalGeneration.from_pretrained(path, dtype=torch.float32, torch_dtype=torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="lacks"):
            CsmForConditionalGeneration.from_pretrained(path, device_map="cuda")


# ---- the entry points transformers' own tests and tools call ----------------------------------------


def test_can_generate_and_config_methods_answer_as_the_references(csm_checkpoint):
    from transformers import CsmConfig as RefConfig
    from transformers import CsmForConditionalGeneration as Reference
    from transformers import MimiModel as RefMimi

    from csm.mimi import MimiModel

    assert CsmForConditionalGeneration.can_generate() is Reference.can_generate() is True
    assert MimiModel.can_generate() is RefMimi.can_generate() is False
    path, _ = csm_checkpoint
    ours, ref = CsmConfig.from_pretrained(path), RefConfig.from_pretrained(path)
    assert sorted(CsmConfig.sub_configs) == sorted(RefConfig.sub_configs) == sorted(ours.sub_configs)
    assert ours.depth_decoder_config.sub_configs == ref.depth_decoder_config.sub_configs == {}
    assert ours.codec_config.sub_configs == {}
    for a, b in ((ours, ref), (ours.depth_decoder_config, ref.depth_decoder_config)):
        assert a.is_encoder_decoder is b.is_encoder_decoder is False
        assert a.get_text_config() is a and b.get_text_config() is b
        assert a.get_text_config(decoder=True) is a
    diff, ref_diff = ours.to_diff_dict(), ref.to_diff_dict()
    for key in ("num_codebooks", "hidden_size", "text_vocab_size", "audio_token_id", "model_type"):
        assert diff[key] == ref_diff[key]
    for key in ("hidden_size", "num_hidden_layers", "model_type"):
        assert diff["depth_decoder_config"][key] == ref_diff["depth_decoder_config"][key]
        assert diff["codec_config"][key] == ref_diff["codec_config"][key]
    assert CsmConfig.from_dict(diff) == ours


def test_outputs_are_dicts_as_transformers_model_outputs_are(pair):
    import pickle

    ours, ref = pair
    codes = torch.randint(0, 2048, (2, 5, 8))
    labels = torch.randint(0, 2048, (2, 5, 8))
    with torch.no_grad():
        a = ours(input_ids=codes, labels=labels)
        b = ref(input_ids=codes, labels=labels, use_cache=False)
    assert isinstance(a, dict) and isinstance(b, dict)
    assert list(a.keys()) == list(b.keys()) == list(dict(a)) == list({**a})
    assert [k for k, _ in a.items()] == list(b.keys()) and len(a) == len(b)
    close(dict(a)["loss"], dict(b)["loss"])
    assert "loss" in a and "attentions" not in a and a.get("attentions") is None
    a.attentions = (torch.zeros(1),)  # a field set later takes its declared place, as keys go
    assert list(a.keys())[:3] == ["loss", "logits", "attentions"]
    assert list(pickle.loads(pickle.dumps(a)).keys()) == list(a.keys())
    with pytest.raises(TypeError):
        a.pop("loss")


def test_forward_returns_the_eager_attention_weights_of_the_reference(tmp_path):
    from reference_models import AUDIO, AUDIO_EOS

    ref = reference_csm(seed=3)
    ref.set_attn_implementation("eager")
    ref.save_pretrained(tmp_path)
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = padded_ids([7, 4], 7, "left")
    codes = torch.randint(0, 2048, (2, 6, 8))
    labels = torch.randint(0, 2048, (2, 6, 8))
    assert AUDIO != AUDIO_EOS
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=True)
        b = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        real = mask.bool()[:, None, :, None]  # a padded query: the reference's eager softmax of nothing
        assert len(a.attentions) == len(b.attentions) == 2
        for x, y in zip(a.attentions, b.attentions, strict=True):
            assert x.shape == y.shape == (2, 4, 7, 7)
            close(x * real, y * real)
        close(a.logits[mask.bool()], b.logits[mask.bool()])
        a = ours(input_ids=codes, labels=labels, output_attentions=True)
        b = ref(input_ids=codes, labels=labels, output_attentions=True, use_cache=False)
    assert list(a.keys()) == list(b.keys())
    for name in ("attentions", "depth_decoder_attentions"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            close(x, y)


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_returns_the_references_attentions_and_hidden_states_per_frame(tmp_path, side):
    ref = reference_csm(seed=5)
    ref.set_attn_implementation("eager")
    ref.save_pretrained(tmp_path)
    ours = CsmForConditionalGeneration.from_pretrained(tmp_path)
    torch.manual_seed(1)
    ids, mask = padded_ids([6, 4], 6, side)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
    kwargs.update(output_attentions=True, output_hidden_states=True, num_beams=1, use_cache=True, **GREEDY)
    a, b = ours.generate(**kwargs), ref.generate(**kwargs)
    torch.testing.assert_close(a.sequences, b.sequences, rtol=0, atol=0)
    assert [k for k in a.keys()] == [k for k in b.keys() if k != "past_key_values"]
    assert len(a.hidden_states) == len(b.hidden_states) == len(a.attentions) == 3
    real = mask.bool()
    for step, (xs, ys) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        assert len(xs) == len(ys) == 3  # embeddings, each layer's output (the last normed)
        for x, y in zip(xs, ys, strict=True):
            assert x.shape == y.shape
            close(x[real] if step == 0 else x, y[real] if step == 0 else y)
    for step, (xs, ys) in enumerate(zip(a.attentions, b.attentions, strict=True)):
        for x, y in zip(xs, ys, strict=True):
            assert x.shape == y.shape == ((2, 4, 6, 6) if step == 0 else (2, 4, 1, 6 + step))
            rows = real[:, None, :, None] if step == 0 else torch.ones((), dtype=torch.bool)
            close(x * rows, y * rows)
    plain = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, use_cache=False, **GREEDY)
    torch.testing.assert_close(plain, a.sequences, rtol=0, atol=0)
    with pytest.raises(ValueError, match="beam search"):
        ours.generate(input_ids=ids, max_new_tokens=2, num_beams=4)


def test_generate_warnings_point_at_the_callers_line_not_torchs(gen_pair):
    import warnings

    ours, _, _ = gen_pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.generate(input_ids=torch.tensor([[BOS, 5, 6]]), max_new_tokens=1, **GREEDY)
        for _ in ours.generate_stream(input_ids=torch.tensor([[BOS, 5, 6]]), max_new_tokens=1, **GREEDY):
            pass
    assert [w.filename for w in caught] == [__file__, __file__], [(w.filename, w.lineno) for w in caught]
