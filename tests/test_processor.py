import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import AUDIO_EOS_ID, AUDIO_ID, BOS_ID, EOS_ID, write_reference_processor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csm.checkpoint import CheckpointError
from csm.processor import BatchInputs, CodecGeometry, CsmProcessor

SLOW_OK = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("processor")
    write_reference_processor(path)
    return path


@pytest.fixture(scope="module")
def ref(folder):
    from transformers import CsmProcessor as ReferenceProcessor

    return ReferenceProcessor.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def ours(folder):
    return CsmProcessor.from_pretrained(folder)


def clip(samples: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)


def turn(role, text, audio=None):
    content = [{"type": "text", "text": text}]
    if audio is not None:
        content.append({"type": "audio", "audio": audio})
    return {"role": role, "content": content}


CONTEXT = [
    turn("0", "Hello there.", clip(4096, 1)),
    turn("1", "How are you doing today?", clip(30000, 2)),
    turn("0", "Fine, thanks! And you?", clip(1921, 3)),
    turn("1", "The quick brown fox."),
]


def assert_same(reference, ours):
    assert list(ours) == list(reference.keys())
    for name in reference:
        assert ours[name].dtype == reference[name].dtype, name
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, msg=name)


def test_loads_reference_files_with_csm_special_tokens(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert (ours.audio_token_id, ours.audio_eos_token_id) == (AUDIO_ID, AUDIO_EOS_ID)
    assert ours.sampling_rate == 24000 and ours.chat_template is not None


def test_renders_the_template_like_the_reference(ref, ours):
    rendered = ours.apply_chat_template(CONTEXT, tokenize=False)
    assert rendered == ref.apply_chat_template(CONTEXT, tokenize=False)
    assert rendered.startswith("<|begin_of_text|>[0]Hello there.<|end_of_text|><|AUDIO|><|audio_eos|>")


def test_single_conversation_with_several_clips_matches_reference(ref, ours):
    expected = ref.apply_chat_template(CONTEXT, tokenize=True, return_dict=True)
    assert_same(expected, ours.apply_chat_template(CONTEXT, tokenize=True, return_dict=True))
    assert ours.apply_chat_template(CONTEXT, tokenize=True, return_dict=True)[
        "input_values_cutoffs"
    ].tolist() == [[4096, 34096, 36017]]


def test_batch_of_conversations_of_different_lengths_matches_reference(ref, ours):
    batch = [CONTEXT, [turn("1", "Short.")], CONTEXT[1:], [turn("0", "Hi.", clip(2000)), turn("1", "Bye.")]]
    assert_same(
        ref.apply_chat_template(batch, tokenize=True, return_dict=True),
        ours.apply_chat_template(batch, tokenize=True, return_dict=True),
    )
    ids = ours.apply_chat_template(batch, tokenize=True, return_dict=False)
    assert torch.equal(ids, ref.apply_chat_template(batch, tokenize=True))


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0])
def test_labels_match_reference_under_the_same_seed(ref, ours, ratio):
    batch = [CONTEXT, CONTEXT[2:]]
    torch.manual_seed(7)
    expected = ref.apply_chat_template(
        batch, tokenize=True, return_dict=True, output_labels=True, depth_decoder_labels_ratio=ratio
    )
    torch.manual_seed(7)
    got = ours.apply_chat_template(
        batch, tokenize=True, return_dict=True, output_labels=True, depth_decoder_labels_ratio=ratio
    )
    assert_same(expected, got)
    labels = got["labels"]
    assert set(labels.unique().tolist()) <= {-101, -100, AUDIO_ID, AUDIO_EOS_ID}
    assert ((labels == -101).sum() > 0) == (ratio < 1.0)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_call_with_text_and_audio_matches_reference(ref, ours, add_special_tokens):
    text = ["[0]Hello<|AUDIO|> and<|AUDIO|>", "[1]no audio here", "[0]one more<|AUDIO|>"]
    audio = [clip(3000), clip(5000, 1), clip(100, 2)]
    kwargs = dict(output_labels=True, add_special_tokens=add_special_tokens)
    assert_same(ref(text, audio=audio, **kwargs), ours(text, audio=audio, **kwargs))
    assert_same(ref("[0]Only text.", **kwargs), ours("[0]Only text.", **kwargs))


def test_audio_files_are_loaded_like_the_reference(tmp_path, ref, ours):
    stereo_16k = tmp_path / "a.wav"
    sf.write(stereo_16k, np.stack([clip(8000), clip(8000, 5)], axis=1), 16000)
    mono_24k = tmp_path / "b.flac"
    sf.write(mono_24k, clip(6000, 4), 24000)
    conv = [
        {
            "role": "0",
            "content": [{"type": "text", "text": "From a file."}, {"type": "audio", "path": str(stereo_16k)}],
        },
        {
            "role": "1",
            "content": [{"type": "text", "text": "Another."}, {"type": "audio", "url": str(mono_24k)}],
        },
        turn("0", "Now speak."),
    ]
    expected = ref.apply_chat_template(conv, tokenize=True, return_dict=True)
    with pytest.warns(UserWarning, match="channels"):
        assert_same(expected, ours.apply_chat_template(conv, tokenize=True, return_dict=True))


def test_tensor_audio_int_roles_and_block_order_are_accepted(ours):
    expected = ours.apply_chat_template(CONTEXT, tokenize=True, return_dict=True)
    friendly = [
        {"role": int(t["role"]), "content": [{**b, "audio": torch.from_numpy(b["audio"])} if "audio" in b else b
                                             for b in reversed(t["content"])]}
        for t in CONTEXT
    ]  # fmt: skip
    for name, value in ours.apply_chat_template(friendly, tokenize=True, return_dict=True).items():
        assert torch.equal(value, expected[name]), name


def test_arrays_at_another_rate_are_resampled(ours):
    conv = [turn("0", "Hi.", clip(16000)), turn("1", "Bye.")]
    conv[0]["content"][1]["sampling_rate"] = 16000
    assert ours.apply_chat_template(conv, tokenize=True, return_dict=True)["input_values"].shape[-1] == 24000
    assert ours("[0]x<|AUDIO|>", audio=clip(16000), sampling_rate=16000)["input_values"].shape[-1] == 24000


def test_frame_count_matches_reference_geometry(ref, ours):
    kwargs = ref.audio_kwargs["encoded_length_kwargs"]
    for n in [*range(1, 4000, 7), 24000, 24001, 240000]:
        assert ours.num_audio_frames(n) == ref._get_encoded_length(n, **kwargs), n
    assert CodecGeometry().num_frames(1920) == 1 and CodecGeometry().num_frames(24000) == 13


def test_saved_files_are_read_by_the_reference_and_by_us(tmp_path, ours):
    from transformers import CsmProcessor as ReferenceProcessor

    ours.save_pretrained(tmp_path)
    reloaded_ref = ReferenceProcessor.from_pretrained(str(tmp_path))
    reloaded = CsmProcessor.from_pretrained(tmp_path)
    expected = ours.apply_chat_template(
        [CONTEXT, CONTEXT[3:]], tokenize=True, return_dict=True, output_labels=True
    )
    torch.manual_seed(0)
    assert_same(
        reloaded_ref.apply_chat_template(
            [CONTEXT, CONTEXT[3:]], tokenize=True, return_dict=True, output_labels=True
        ),
        expected,
    )
    assert_same(
        expected,
        reloaded.apply_chat_template(
            [CONTEXT, CONTEXT[3:]], tokenize=True, return_dict=True, output_labels=True
        ),
    )


def test_template_found_in_tokenizer_config_and_context_from_config_json(tmp_path, folder, ours):
    for name in ("tokenizer.json", "processor_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ours.chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    loaded = CsmProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == ours.chat_template and loaded.max_length == 64


def test_tokens_named_only_in_tokenizer_config_are_added_like_the_reference(tmp_path, folder):
    from transformers import CsmProcessor as ReferenceProcessor

    for name in ("tokenizer.json", "processor_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"300": {"content": "<|laugh|>", "special": True, "normalized": False}}
    config["extra_special_tokens"] = ["<|sigh|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    text = ["[0]ha <|laugh|> oh<|sigh|>!", "[1]x"]
    assert_same(
        ReferenceProcessor.from_pretrained(str(tmp_path))(text), CsmProcessor.from_pretrained(tmp_path)(text)
    )


def test_batch_inputs_move_and_cast_only_floating_tensors(ours):
    inputs = ours.apply_chat_template(CONTEXT, tokenize=True, return_dict=True)
    assert isinstance(inputs, BatchInputs) and inputs.input_ids is inputs["input_ids"]
    half = inputs.to("cpu").to(torch.float16)
    assert half.input_values.dtype == torch.float16 and half.input_ids.dtype == torch.long
    assert half["input_values_cutoffs"].dtype == torch.long
    assert inputs.to("cpu", torch.bfloat16).input_values.dtype == torch.bfloat16
    with pytest.raises(AttributeError, match="labels"):
        _ = inputs.labels


def test_save_audio_writes_one_file_per_path(tmp_path, ours):
    ours.save_audio([torch.zeros(240), torch.zeros(480)], [tmp_path / "a.wav", tmp_path / "b.mp3"])
    assert sf.info(tmp_path / "a.wav").frames == 240 and (tmp_path / "b.mp3").stat().st_size > 0


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([turn("speaker", "Hi.")], r"turn 0: role must be a speaker id"),
        ([turn("-1", "Hi.")], r"turn 0: role"),
        ([turn(True, "Hi.")], r"turn 0: role"),
        ([{"role": "0", "content": "Hi."}], r"turn 0: content must be a list"),
        (
            [turn("0", "context without audio"), turn("1", "Hi.")],
            r"turn 0: a context turn needs one text block and one",
        ),
        (
            [{"role": "0", "content": [{"type": "audio", "audio": clip(100)}]}, turn("1", "Hi.")],
            r"turn 0: .*0 text",
        ),
        ([turn("0", "a", clip(100)), turn("1", "b", clip(100)), {"role": "1"}], r"turn 2: a turn is a dict"),
        (
            [turn("0", "Hi.", clip(10)), {"role": "1", "content": [{"type": "image", "url": "x"}]}],
            r"turn 1: content",
        ),
        (
            [{"role": "0", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}],
            r"turn 0: an audio block",
        ),
        ([turn("0", "sneaky <|AUDIO|>")], r"turn 0: text contains the reserved token"),
        ([turn("0", "Hi.", np.zeros(0)), turn("1", "x")], r"turn 0: audio array is empty"),
        (
            [turn("0", "Hi.", "/no/such/file.wav"), turn("1", "x")],
            r"turn 0: audio file not found: /no/such/file.wav",
        ),
        ([turn("0", "bad \ud800 surrogate")], r"turn 0: text is not valid unicode"),
        ([], r"non-empty list of turns"),
        ({"role": "0", "content": []}, r"non-empty list of turns"),
    ],
)
def test_bad_conversations_raise_value_error_naming_the_turn(ours, conversation, message):
    with pytest.raises(ValueError, match=message):
        ours.apply_chat_template(conversation, tokenize=True, return_dict=True)


def test_bad_conversation_in_a_batch_names_conversation_and_turn(ours):
    with pytest.raises(ValueError, match=r"conversation 1, turn 0: role"):
        ours.apply_chat_template([CONTEXT, [turn("x", "Hi.")]], tokenize=True, return_dict=True)


def test_unreadable_audio_file_names_turn_and_path(tmp_path, ours):
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"turn 1: could not read audio from .*junk.mp3"):
        ours.apply_chat_template(
            [CONTEXT[0], turn("1", "Hi.", str(junk)), turn("0", "x")], tokenize=True, return_dict=True
        )


def test_too_long_conversation_names_the_overflowing_turn(folder):
    short = CsmProcessor.from_pretrained(folder, max_length=50)
    with pytest.raises(ValueError, match=r"is \d+ tokens .* context of 50; it overflows at turn 1"):
        short.apply_chat_template(CONTEXT, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match=r"text 0 is \d+ tokens"):
        short("[0]" + "word " * 100)


def test_call_errors_are_value_errors(ours):
    with pytest.raises(ValueError, match="2 <|AUDIO|> placeholder.* 1 audio clip"):
        ours("[0]a<|AUDIO|>b<|AUDIO|>", audio=[clip(100)])
    with pytest.raises(ValueError, match="0 .*placeholder.* 1 audio clip"):
        ours("[0]no placeholder", audio=clip(100))
    with pytest.raises(ValueError, match="text 0 is empty"):
        ours("")
    with pytest.raises(ValueError, match="string or a non-empty list"):
        ours([])
    with pytest.raises(ValueError, match="text 1: text must be a string"):
        ours(["ok", 3])
    with pytest.raises(ValueError, match="depth_decoder_labels_ratio"):
        ours("[0]x", output_labels=True, depth_decoder_labels_ratio=1.5)


def test_missing_or_partial_folders_raise_checkpoint_errors(tmp_path, folder):
    with pytest.raises(CheckpointError):
        CsmProcessor.from_pretrained(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        CsmProcessor.from_pretrained(tmp_path)
    assert issubclass(CheckpointError, ValueError)


odd_text = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        ["", " ", "{{ bos_token }}", "{% for x in y %}", "[0]", "\n\t", "ünïcødé 日本語 🙂", "<|", "|>"]
    ),
    st.text(alphabet="ab {}%#[]<>|", min_size=200, max_size=600),
)


@SLOW_OK
@given(texts=st.lists(odd_text, min_size=1, max_size=3), role=st.integers(0, 12))
def test_odd_text_gives_reference_inputs_or_value_error(ref, ours, texts, role):
    conv = [turn(str(role), t, clip(500 + 100 * i, i)) for i, t in enumerate(texts[:-1])] + [
        turn(str(role), texts[-1])
    ]
    try:
        got = ours.apply_chat_template(conv, tokenize=True, return_dict=True)
    except ValueError:
        assert any(
            "<|AUDIO|>" in t or "<|audio_eos|>" in t or any(0xD800 <= ord(ch) <= 0xDFFF for ch in t)
            for t in texts
        )
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.apply_chat_template(conv, tokenize=True, return_dict=True)
    assert_same(expected, got)


odd_audio = st.one_of(
    st.integers(1, 6000).map(lambda n: np.full(n, 0.5, dtype=np.float64)),
    st.integers(1, 3000).map(lambda n: clip(n, n)),
    st.sampled_from(
        [np.zeros(0), np.array([np.inf]), np.zeros((3, 2, 1)), np.array([1e30, -1e30]), "missing.wav"]
    ),
)


@SLOW_OK
@given(audios=st.lists(odd_audio, min_size=1, max_size=3))
def test_odd_audio_gives_reference_inputs_or_value_error(ref, ours, audios):
    conv = [turn(str(i % 2), f"turn {i}", a) for i, a in enumerate(audios)] + [turn("0", "end")]
    try:
        got = ours.apply_chat_template(conv, tokenize=True, return_dict=True, output_labels=True)
    except ValueError:
        return
    assert got["input_values"].shape[0] == 1 and torch.isfinite(got["input_values"]).all()
    torch.manual_seed(0)
    expected = ref.apply_chat_template(conv, tokenize=True, return_dict=True, output_labels=True)
    assert_same(expected, got)


# The reference's API at its edges.


def test_defaults_render_then_return_input_ids_like_the_reference(ours, ref):
    assert ours.apply_chat_template(CONTEXT) == ref.apply_chat_template(CONTEXT)
    ids = ours.apply_chat_template(CONTEXT, tokenize=True)
    assert isinstance(ids, torch.Tensor)
    assert torch.equal(ids, ref.apply_chat_template(CONTEXT, tokenize=True))


def test_rendering_takes_audio_blocks_without_audio_like_the_reference(ours, ref):
    conv = [
        {"role": "0", "content": [{"type": "text", "text": "Hi."}, {"type": "audio"}]},
        {"role": "1", "content": [{"type": "text", "text": "Hello."}]},
    ]
    assert ours.apply_chat_template(conv, tokenize=False) == ref.apply_chat_template(conv, tokenize=False)
    with pytest.raises(ValueError, match="needs exactly one of 'audio'"):
        ours.apply_chat_template(conv, tokenize=True)


@pytest.mark.parametrize(
    "conversation",
    [
        [turn("speaker", "Hi.")],
        [turn("0", "Hi."), turn("1", "Hello.")],  # a context turn without audio
        [{"role": "0", "content": [{"type": "audio", "audio": clip(1920)}]}],  # a last turn without text
    ],
)
def test_malformed_conversations_raise_what_the_reference_raises_and_a_value_error(ours, ref, conversation):
    import jinja2

    with pytest.raises(jinja2.TemplateError):
        ref.apply_chat_template(conversation, tokenize=False)
    for tokenize in (False, True):
        with pytest.raises(jinja2.TemplateError) as caught:
            ours.apply_chat_template(conversation, tokenize=tokenize)
        assert isinstance(caught.value, ValueError) and "turn" in str(caught.value)


def test_generation_prompt_and_continued_final_message_like_the_reference(ours, ref):
    for kwargs in (dict(add_generation_prompt=True), dict(continue_final_message=True)):
        assert ours.apply_chat_template(CONTEXT, **kwargs) == ref.apply_chat_template(CONTEXT, **kwargs)
        assert_same(
            ref.apply_chat_template(CONTEXT, tokenize=True, return_dict=True, **kwargs),
            ours.apply_chat_template(CONTEXT, tokenize=True, return_dict=True, **kwargs),
        )
    assert not ours.apply_chat_template(CONTEXT, continue_final_message=True).endswith("<|end_of_text|>")


def test_padding_max_length_and_return_tensors_like_the_reference(ours, ref):
    batch = [CONTEXT, CONTEXT[3:]]
    text_only = [CONTEXT[3:], [turn("0", "Hi.")]]  # the reference's padding="max_length" fails with audio
    kwargs = dict(tokenize=True, return_dict=True, padding="max_length", max_length=20)
    expected = ref.apply_chat_template(text_only, **kwargs)
    got = ours.apply_chat_template(text_only, **kwargs)
    assert got["input_ids"].shape[-1] == 20
    assert_same(expected, got)
    with_audio = ours.apply_chat_template(batch, **{**kwargs, "max_length": 120})
    longest = ours.apply_chat_template(batch, tokenize=True, return_dict=True)
    width = longest["input_ids"].shape[-1]
    assert with_audio["input_ids"].shape[-1] == 120 and width < 120
    assert torch.equal(with_audio["input_ids"][:, -width:], longest["input_ids"])  # left padding
    assert not with_audio["attention_mask"][:, :-width].any()
    with pytest.raises(ValueError, match="more than max_length"):
        ours.apply_chat_template(batch, **{**kwargs, "max_length": 10})
    with pytest.raises(ValueError, match="only supports"):
        ref.apply_chat_template(batch, tokenize=True, return_tensors="np")
    with pytest.raises(ValueError, match="PyTorch tensors only"):
        ours.apply_chat_template(batch, tokenize=True, return_tensors="np")


def test_call_with_return_tensors_like_the_reference(ours, ref):
    texts = ["[0]Hello there.<|AUDIO|>", "[1]How are you?"]
    audio = [clip(5000, 4)]
    expected = ref(texts, audio=audio, return_tensors="pt")
    assert_same(expected, ours(texts, audio=audio, return_tensors="pt"))


def test_tokenizer_is_called_like_the_reference_tokenizer(ours, ref):
    tok, reference = ours.tokenizer, ref.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        reference.pad_token_id,
        reference.bos_token_id,
        reference.eos_token_id,
    )
    text = "The quick brown fox. How are you?"
    assert tok(text)["input_ids"] == reference(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    batch = [text, "Hello."]
    got = tok(batch, padding=True, return_tensors="pt")
    expected = reference(batch, padding=True, return_tensors="pt")
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(got[name], expected[name]), name
    ids = got["input_ids"][0]
    assert tok.decode(ids) == reference.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert tok.convert_tokens_to_ids("<|AUDIO|>") == reference.convert_tokens_to_ids("<|AUDIO|>")


def test_model_input_names_are_the_references(ref, ours):
    assert ours.model_input_names == ref.model_input_names
    assert ours.tokenizer.model_input_names == ref.tokenizer.model_input_names
    inputs = ours(text="[0]Hello.", audio=None)
    assert set(inputs) <= set(ours.model_input_names)
