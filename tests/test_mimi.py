"""Mimi codec: parity with the reference (transformers' MimiModel) on random weights, streaming, batching, errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csm.mimi import MimiConfig, MimiModel

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32,
    num_filters=4,
    codebook_size=16,
    codebook_dim=8,
    vector_quantization_hidden_dimension=8,
    num_quantizers=4,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    upsample_groups=32,
)


def reference_model(seed: int = 0, **config) -> torch.nn.Module:
    """The reference MimiModel with random weights everywhere, codebooks and layer scales included
    (its own init leaves codebooks at zero and scales at 0.01, which would hide mistakes)."""
    torch.manual_seed(seed)
    model = transformers.MimiModel(transformers.MimiConfig(**config)).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("embed_sum"):
                buffer.normal_()
            elif name.endswith("cluster_usage"):
                buffer.uniform_(0.5, 2.0)
        for name, param in model.named_parameters():
            if name.endswith("layer_scale.scale"):
                param.normal_(0, 0.3)
            elif "layernorm" in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def converted(reference, tmp_path) -> MimiModel:
    reference.save_pretrained(tmp_path / "reference")
    return MimiModel.from_pretrained(tmp_path / "reference")


def random_audio(batch: int, samples: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, samples, generator=generator) * 0.3).clamp(-1, 1)


def random_codes(model: MimiModel, batch: int, frames: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, model.config.num_quantizers, frames)
    return torch.randint(0, model.config.codebook_size, shape, generator=generator)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    reference = reference_model(**SMALL)
    return reference, converted(reference, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    reference = reference_model()
    return reference, converted(reference, tmp_path_factory.mktemp("full"))


# Parity with the reference.


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_codes_and_audio_match_reference_on_small_config(tmp_path, kv_heads):
    reference = reference_model(**{**SMALL, "num_key_value_heads": kv_heads})
    ours = converted(reference, tmp_path)
    audio = random_audio(2, 24000 + 777)
    with torch.no_grad():
        expected = reference.encode(audio).audio_codes
        codes = ours.encode(audio).audio_codes
        torch.testing.assert_close(codes, expected, rtol=0, atol=0)
        torch.testing.assert_close(
            ours.decode(codes).audio_values, reference.decode(codes).audio_values, rtol=0, atol=1e-4
        )


def test_codes_and_audio_match_reference_on_default_config(full_size):
    reference, ours = full_size
    audio = random_audio(1, 2 * 24000 + 321)
    with torch.no_grad():
        expected = reference.encode(audio).audio_codes
        codes = ours.encode(audio).audio_codes
        assert codes.shape == expected.shape == (1, 32, 26)
        assert (codes == expected).float().mean() >= 0.999
        torch.testing.assert_close(
            ours.decode(codes).audio_values, reference.decode(codes).audio_values, rtol=0, atol=1e-3
        )


@pytest.mark.parametrize(
    "variant",
    [
        dict(use_causal_conv=False, pad_mode="reflect"),
        dict(trim_right_ratio=0.5),
        dict(pad_mode="replicate"),
        dict(use_conv_shortcut=True, num_residual_layers=2, compress=4),
        dict(upsampling_ratios=[4, 3], kernel_size=5, residual_kernel_size=5, dilation_growth_rate=3),
        dict(vector_quantization_hidden_dimension=32, codebook_dim=32, num_semantic_quantizers=2),
        dict(hidden_act="relu", attention_bias=True, head_dim=8, num_attention_heads=4),
    ],
)
def test_config_variants_match_reference(tmp_path, variant):
    reference = reference_model(**{**SMALL, **variant})
    ours = converted(reference, tmp_path)
    audio = random_audio(2, 5000)
    with torch.no_grad():
        codes = ours.encode(audio).audio_codes
        torch.testing.assert_close(codes, reference.encode(audio).audio_codes, rtol=0, atol=0)
        torch.testing.assert_close(
            ours.decode(codes).audio_values, reference.decode(codes).audio_values, rtol=0, atol=1e-3
        )


def test_config_without_resampling_runs():
    # frame_rate equal to the SEANet rate drops downsample/upsample (the reference cannot run this one).
    ours = MimiModel(MimiConfig.from_dict({**SMALL, "frame_rate": 25.0})).eval()
    assert ours.downsample is None and ours.upsample is None and ours.samples_per_frame == 960
    codes = ours.encode(random_audio(1, 3000)).audio_codes
    assert codes.shape == (1, 4, 4) and ours.encoded_length(3000) == 4
    assert ours.decode(codes).audio_values.shape == (1, 1, 4 * 960)
    stream = ours.streaming_decoder()
    torch.testing.assert_close(
        torch.cat([stream.step(codes[..., :1]), stream.step(codes[..., 1:])], -1),
        ours.decode(codes).audio_values,
    )


def test_sliding_window_matches_reference_past_the_window(tmp_path):
    # A window of 4 transformer steps, so a short clip runs well past it in both transformers.
    reference = reference_model(**{**SMALL, "sliding_window": 4})
    ours = converted(reference, tmp_path)
    audio = random_audio(1, 30 * 1920)
    with torch.no_grad():
        codes = ours.encode(audio).audio_codes
        torch.testing.assert_close(codes, reference.encode(audio).audio_codes, rtol=0, atol=0)
        torch.testing.assert_close(
            ours.decode(codes).audio_values, reference.decode(codes).audio_values, rtol=0, atol=1e-4
        )


def test_fewer_codebooks_match_reference(small):
    reference, ours = small
    audio = random_audio(1, 9000)
    with torch.no_grad():
        codes = ours.encode(audio, num_quantizers=2).audio_codes
        torch.testing.assert_close(
            codes, reference.encode(audio, num_quantizers=2).audio_codes, rtol=0, atol=0
        )
        torch.testing.assert_close(codes, ours.encode(audio).audio_codes[:, :2])
        torch.testing.assert_close(
            ours.decode(codes).audio_values, reference.decode(codes).audio_values, rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("samples", [1, 959, 960, 1920, 1921, 24000, 100_001])
def test_encoded_length_matches_reference_and_encode(small, samples):
    reference, ours = small
    assert ours.encoded_length(samples) == int(reference.get_encoded_length(torch.tensor(samples)))
    assert ours.encode(random_audio(1, samples)).audio_codes.shape[-1] == ours.encoded_length(samples)
    lengths = torch.tensor([samples, samples + 1])
    assert ours.encoded_length(lengths).tolist() == [
        ours.encoded_length(samples),
        ours.encoded_length(samples + 1),
    ]


def test_sizes(full_size):
    _, ours = full_size
    assert (ours.sampling_rate, ours.frame_rate, ours.samples_per_frame) == (24000, 12.5, 1920)
    assert ours.decode(random_codes(ours, 2, 3)).audio_values.shape == (2, 1, 3 * 1920)


# Checkpoints and configs.


def test_save_pretrained_loads_into_reference(small, tmp_path):
    reference, ours = small
    ours.save_pretrained(tmp_path)
    reloaded = transformers.MimiModel.from_pretrained(tmp_path).eval()
    audio = random_audio(1, 5000)
    with torch.no_grad():
        codes = reloaded.encode(audio).audio_codes
        torch.testing.assert_close(codes, reference.encode(audio).audio_codes, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.decode(codes).audio_values, reference.decode(codes).audio_values)
    assert set(ours.state_dict()) == set(MimiModel.from_pretrained(tmp_path).state_dict())


def test_config_round_trips_through_reference():
    ours = MimiConfig(**SMALL)
    theirs = transformers.MimiConfig(**ours.to_dict())
    assert MimiConfig.from_dict(theirs.to_dict()) == ours
    assert theirs.frame_rate == ours.frame_rate and theirs.frame_size == ours.frame_size
    assert ours.to_dict()["model_type"] == "mimi"
    assert MimiConfig.from_dict(transformers.MimiConfig().to_dict()) == MimiConfig()
    assert MimiConfig.from_dict(transformers.MimiConfig(frame_rate=25.0).to_dict()).frame_rate == 25.0


def test_config_reads_kyutai_and_csm_layouts(tmp_path):
    kyutai = {**MimiConfig().to_dict(), "frame_rate": 12.5, "rope_theta": 10000.0, "torch_dtype": "float32"}
    kyutai.pop("rope_parameters")
    config = MimiConfig.from_dict(kyutai)
    assert config.frame_rate == 12.5 and config.rope_theta == 10000.0
    assert transformers.MimiConfig(**config.to_dict()).frame_rate == 12.5
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "csm", "codec_config": SMALL | {"model_type": "mimi"}})
    )
    assert MimiConfig.from_pretrained(tmp_path) == MimiConfig(**SMALL)


def test_loads_codec_from_csm_checkpoint(small, tmp_path):
    _, ours = small
    from safetensors.torch import save_file

    state = {f"codec_model.{k}": v.contiguous() for k, v in ours.state_dict().items()}
    state["backbone_model.embed_tokens.weight"] = torch.zeros(3, 4)
    save_file(state, tmp_path / "model.safetensors")
    config = {"model_type": "csm", "codec_config": ours.config.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = MimiModel.from_pretrained(tmp_path)
    codes = random_codes(ours, 1, 4)
    torch.testing.assert_close(
        loaded.decode(codes).audio_values, ours.decode(codes).audio_values, rtol=0, atol=0
    )


# Batches.


def test_batched_encode_gives_each_clip_its_own_codes(small):
    reference, ours = small
    lengths = [5 * 1920 + 17, 1920, 3000, 1, 7 * 1920]
    clips = [random_audio(1, n, seed=i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(clips), 1, max(lengths))
    mask = torch.zeros(len(clips), max(lengths), dtype=torch.long)
    for i, clip in enumerate(clips):
        batch[i, :, : clip.shape[-1]] = clip
        batch[i, :, clip.shape[-1] :] = 0.7  # whatever the padding holds must not matter
        mask[i, : clip.shape[-1]] = 1
    codes = ours.encode(batch, padding_mask=mask).audio_codes
    with torch.no_grad():
        for i, clip in enumerate(clips):
            alone = reference.encode(clip).audio_codes[0]
            frames = ours.encoded_length(clip.shape[-1])
            assert alone.shape[-1] == frames
            torch.testing.assert_close(codes[i, :, :frames], alone, rtol=0, atol=0)


def test_batched_encode_on_default_config(full_size):
    reference, ours = full_size
    lengths = [3 * 1920 + 500, 1920 + 1]
    batch = torch.zeros(2, 1, lengths[0])
    mask = torch.zeros(2, lengths[0], dtype=torch.bool)
    clips = [random_audio(1, n, seed=i) for i, n in enumerate(lengths)]
    for i, clip in enumerate(clips):
        batch[i, :, : clip.shape[-1]] = clip
        mask[i, : clip.shape[-1]] = True
    codes = ours.encode(batch, padding_mask=mask).audio_codes
    with torch.no_grad():
        for i, clip in enumerate(clips):
            alone = reference.encode(clip).audio_codes[0]
            assert (codes[i, :, : alone.shape[-1]] == alone).float().mean() >= 0.999


def test_batched_decode_matches_one_by_one(small):
    _, ours = small
    codes = random_codes(ours, 3, 6)
    audio = ours.decode(codes).audio_values
    for i in range(3):
        torch.testing.assert_close(
            audio[i : i + 1], ours.decode(codes[i : i + 1]).audio_values, rtol=0, atol=1e-4
        )


# Streams.


@pytest.mark.parametrize("window", [250, 3])
def test_streaming_decode_equals_full_decode(tmp_path, window):
    reference = reference_model(**{**SMALL, "sliding_window": window})
    ours = converted(reference, tmp_path)
    codes = random_codes(ours, 2, 23)
    expected = ours.decode(codes).audio_values
    stream = ours.streaming_decoder(batch_size=2)
    chunks, start = [], 0
    for n in [1, 2, 0, 3, 1, 1, 5, 1, 9]:
        chunks.append(stream.step(codes[..., start : start + n]))
        assert chunks[-1].shape == (2, 1, n * ours.samples_per_frame)
        start += n
    torch.testing.assert_close(torch.cat(chunks, dim=-1), expected, rtol=0, atol=1e-4)


def test_streaming_decode_on_default_config(full_size):
    _, ours = full_size
    codes = random_codes(ours, 1, 6)
    stream = ours.streaming_decoder(batch_size=1)
    audio = torch.cat([stream.step(codes[..., i : i + 1]) for i in range(6)], dim=-1)
    torch.testing.assert_close(audio, ours.decode(codes).audio_values, rtol=0, atol=1e-4)


@pytest.mark.parametrize("window", [250, 3])
def test_streaming_encode_equals_full_encode(tmp_path, window):
    reference = reference_model(**{**SMALL, "sliding_window": window})
    ours = converted(reference, tmp_path)
    audio = random_audio(2, 9 * 1920 + 1234)
    stream = ours.streaming_encoder(batch_size=2)
    chunks, start = [], 0
    for n in [100, 1920, 0, 5000, 1, 3839, 2000, 7000]:
        chunks.append(stream.step(audio[..., start : start + n]))
        start += n
    chunks.append(stream.flush())
    assert start >= audio.shape[-1]
    torch.testing.assert_close(torch.cat(chunks, dim=-1), ours.encode(audio).audio_codes, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(samples=st.integers(1, 12_000), cuts=st.lists(st.integers(0, 12_000), max_size=6))
def test_streaming_encode_equals_full_encode_for_any_chunking(small, samples, cuts):
    _, ours = small
    audio = random_audio(1, samples)
    stream = ours.streaming_encoder()
    bounds = [0, *sorted(c for c in cuts if c < samples), samples]
    chunks = [stream.step(audio[..., a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    codes = torch.cat([*chunks, stream.flush()], dim=-1)
    torch.testing.assert_close(codes, ours.encode(audio).audio_codes, rtol=0, atol=0)


def test_streaming_encoder_gives_a_frame_per_frame_of_audio(small):
    _, ours = small
    stream = ours.streaming_encoder(batch_size=1, num_quantizers=3)
    audio = random_audio(1, 3 * 1920)
    assert stream.step(audio[..., :1919]).shape == (1, 3, 0)
    assert stream.step(audio[..., 1919:1920]).shape == (1, 3, 1)
    assert stream.step(audio[..., 1920:]).shape == (1, 3, 2)
    assert stream.flush().shape == (1, 3, 0)


def test_streaming_state_stays_the_same_size(small):
    _, ours = small
    stream = ours.streaming_decoder(batch_size=1)

    def sizes():
        out = []
        for state in stream.state._states.values():
            for value in vars(state).values():
                tensors = value if isinstance(value, list) else [value]
                out += [tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor)]
        return out

    stream.step(random_codes(ours, 1, 1))
    before = sizes()
    for i in range(200):  # 400 transformer steps: past the 250-step window
        stream.step(random_codes(ours, 1, 1, seed=i))
    assert sizes() == before


def test_streams_run_side_by_side(small):
    _, ours = small
    a, b = random_codes(ours, 1, 4, seed=3), random_codes(ours, 1, 4, seed=4)
    first, second = ours.streaming_decoder(), ours.streaming_decoder()
    out_a, out_b = [], []
    for i in range(4):
        out_a.append(first.step(a[..., i : i + 1]))
        out_b.append(second.step(b[..., i : i + 1]))
    torch.testing.assert_close(torch.cat(out_a, -1), ours.decode(a).audio_values, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat(out_b, -1), ours.decode(b).audio_values, rtol=0, atol=1e-4)


def test_later_audio_does_not_change_earlier_codes(small):
    _, ours = small
    audio = random_audio(1, 6 * 1920)
    changed = audio.clone()
    changed[..., 4 * 1920 :] = 0.5
    torch.testing.assert_close(
        ours.encode(audio).audio_codes[..., :4], ours.encode(changed).audio_codes[..., :4], rtol=0, atol=0
    )


# Errors.


def test_errors_name_the_problem(small):
    _, ours = small
    with pytest.raises(ValueError, match="1-channel audio, got 2 channels"):
        ours.encode(torch.zeros(1, 2, 1920))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, samples\)"):
        ours.encode(torch.zeros(1920))
    with pytest.raises(ValueError, match="empty"):
        ours.encode(torch.zeros(1, 1, 0))
    with pytest.raises(TypeError, match="float"):
        ours.encode(torch.zeros(1, 1, 1920, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"clip\(s\) \[1\] are empty"):
        ours.encode(torch.zeros(2, 1, 100), padding_mask=torch.tensor([[1] * 100, [0] * 100]))
    with pytest.raises(ValueError, match="right padding"):
        ours.encode(torch.zeros(1, 1, 4), padding_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        ours.encode(torch.zeros(1, 1, 4), padding_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="num_quantizers"):
        ours.encode(torch.zeros(1, 1, 1920), num_quantizers=5)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        ours.decode(torch.full((1, 4, 2), 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        ours.decode(torch.full((1, 4, 2), -1))
    with pytest.raises(ValueError, match="5 codebooks"):
        ours.decode(torch.zeros(1, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        ours.decode(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ours.decode(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="batch size 2"):
        ours.streaming_decoder(batch_size=2).step(torch.zeros(1, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 1"):
        ours.streaming_encoder(batch_size=1).step(torch.zeros(2, 1, 1920))


def test_zero_frames_decode_to_no_audio(small):
    _, ours = small
    assert ours.decode(torch.zeros(2, 4, 0, dtype=torch.long)).audio_values.shape == (2, 1, 0)


def test_bfloat16_weights_encode_and_decode(small, tmp_path):
    _, ours = small
    ours.save_pretrained(tmp_path)
    half = MimiModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert (
        half.quantizer.semantic_residual_vector_quantizer.layers[0].codebook.embed_sum.dtype == torch.float32
    )
    codes = random_codes(ours, 1, 5)
    audio, expected = half.decode(codes).audio_values, ours.decode(codes).audio_values
    assert audio.dtype == torch.bfloat16
    assert (audio.float() - expected).norm() / expected.norm() < 0.05
    assert half.encode(random_audio(1, 4000)).audio_codes.shape == (1, 4, 3)
    assert half.streaming_decoder().step(codes).dtype == torch.bfloat16


@pytest.mark.parametrize("window", [250, 3])
def test_streams_started_apart_decode_in_one_state(tmp_path, window):
    """Rows of one decoder advanced by `step(codes, rows)`: each row's audio is its own stream's."""
    reference = reference_model(**{**SMALL, "sliding_window": window})
    ours = converted(reference, tmp_path)
    clips = [random_codes(ours, 1, 9, seed=s) for s in range(3)]
    decoder = ours.streaming_decoder(batch_size=4)
    out = {r: [] for r in range(3)}
    done = dict.fromkeys(range(3), 0)
    # (rows, frames): row 1 starts two frames late, row 2 in row 0's slot's neighbour after a reset
    plan = [([0], 2), ([0, 1], 1), ([1, 0], 2), ([2], 3), ([0, 1, 2], 2), ([2, 1], 2), ([0], 2), ([1, 2], 2)]
    decoder.reset([3])  # a reset of an unused row changes nothing for the others
    for rows, n in plan:
        codes = torch.cat([clips[r][..., done[r] : done[r] + n] for r in rows])
        audio = decoder.step(codes, rows)
        assert audio.shape == (len(rows), 1, n * ours.samples_per_frame)
        for i, r in enumerate(rows):
            out[r].append(audio[i : i + 1])
            done[r] += n
    for r in range(3):
        codes = clips[r][..., : done[r]]
        torch.testing.assert_close(torch.cat(out[r], -1), ours.decode(codes).audio_values, rtol=0, atol=1e-4)
    # a row reset mid-way starts a fresh stream there
    decoder.reset([1])
    fresh = decoder.step(clips[2][..., :3], [1])
    torch.testing.assert_close(fresh, ours.decode(clips[2][..., :3]).audio_values, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="distinct"):
        decoder.step(clips[0][..., :1].repeat(2, 1, 1), [0, 0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        decoder.reset([4])


def test_a_row_wise_step_that_raises_leaves_every_stream_as_it_was(small, monkeypatch):
    _, ours = small
    codes = random_codes(ours, 2, 5, seed=7)
    decoder = ours.streaming_decoder(batch_size=2)
    first = decoder.step(codes[..., :2], [0, 1])
    seanet = type(ours.decoder).forward

    def exploding(self, x, stream=None):
        raise RuntimeError("boom")  # after the upsampling and the transformer have run their part

    monkeypatch.setattr(type(ours.decoder), "forward", exploding)
    with pytest.raises(RuntimeError, match="boom"):
        decoder.step(codes[..., 2:4], [0, 1])
    monkeypatch.setattr(type(ours.decoder), "forward", seanet)
    rest = torch.cat([decoder.step(codes[0:1, :, 2:5], [0]), decoder.step(codes[1:2, :, 2:5], [1])])
    torch.testing.assert_close(
        torch.cat([first, rest], -1), ours.decode(codes).audio_values, rtol=0, atol=1e-4
    )


def test_streams_started_apart_are_refused_where_convs_pad_by_replication(tmp_path):
    ours = converted(reference_model(**{**SMALL, "pad_mode": "replicate"}), tmp_path)
    codes = random_codes(ours, 2, 3)
    decoder = ours.streaming_decoder(batch_size=2)
    with pytest.raises(ValueError, match="pad_mode='constant'"):
        decoder.step(codes[:1], [0])
    with pytest.raises(ValueError, match="pad_mode='constant'"):
        decoder.reset([1])
    torch.testing.assert_close(
        decoder.step(codes), ours.decode(codes).audio_values, rtol=0, atol=1e-4
    )  # all rows: fine
    with pytest.raises(ValueError, match="pad_mode='constant'"):  # nor once the streams have begun
        decoder.reset([1])
    with pytest.raises(ValueError, match="pad_mode='constant'"):
        decoder.step(codes[:1], [0])


# The reference's API at its edges: output objects, forward, its arguments, config keys.


def test_encode_and_decode_results_index_like_the_reference(small):
    reference, ours = small
    audio = random_audio(2, 5000)
    with torch.no_grad():
        a, b = ours.encode(audio), reference.encode(audio)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # the codes, not batch row 0
        torch.testing.assert_close(a["audio_codes"], b["audio_codes"], rtol=0, atol=0)
        assert len(a.to_tuple()) == 1 and list(a.keys()) == ["audio_codes"]
        codes = a.audio_codes
        x, y = ours.decode(codes), reference.decode(codes)
        torch.testing.assert_close(x[0], y[0], rtol=0, atol=1e-4)  # the audio, not batch row 0
        torch.testing.assert_close(x.to_tuple()[0], y.to_tuple()[0], rtol=0, atol=1e-4)
        (as_tuple,) = ours.decode(codes, return_dict=False)
        torch.testing.assert_close(as_tuple, y.audio_values, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_quantizers", [None, 2])
def test_forward_encodes_then_decodes_like_the_reference(small, num_quantizers):
    reference, ours = small
    audio = random_audio(2, 4500)
    mask = torch.ones(2, 4500, dtype=torch.long)
    with torch.no_grad():
        for kwargs in ({}, {"padding_mask": mask}):
            a = ours(audio, num_quantizers=num_quantizers, **kwargs)
            b = reference(audio, num_quantizers=num_quantizers, **kwargs)
            torch.testing.assert_close(a.audio_codes, b.audio_codes, rtol=0, atol=0)
            assert a.audio_values.shape == b.audio_values.shape == (2, 1, 4500)  # cut to the input
            torch.testing.assert_close(a.audio_values, b.audio_values, rtol=0, atol=1e-4)
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-4)
        given = ours(audio, audio_codes=a.audio_codes)
        torch.testing.assert_close(given.audio_values, a.audio_values, rtol=0, atol=0)
        short = torch.ones(2, 3000)
        torch.testing.assert_close(
            ours.decode(a.audio_codes, padding_mask=short).audio_values,
            reference.decode(a.audio_codes, padding_mask=short).audio_values,
            rtol=0,
            atol=1e-4,
        )


def test_streamed_encode_arguments_give_the_reference_codes(small):
    reference, ours = small
    audio = random_audio(1, 1920 * 6)
    chunks = [audio[..., : 1920 * 2], audio[..., 1920 * 2 : 1920 * 5], audio[..., 1920 * 5 :]]
    with torch.no_grad():
        ours_codes, ref_codes = [], []
        cache, ref_state = None, {}
        for chunk in chunks:
            out = ours.encode(chunk, use_streaming=True, padding_cache=cache)
            cache = out.padding_cache
            ours_codes.append(out.audio_codes)
            r = reference.encode(chunk, use_streaming=True, **ref_state)
            ref_state = dict(padding_cache=r.padding_cache, encoder_past_key_values=r.encoder_past_key_values)
            ref_codes.append(r.audio_codes)
    torch.testing.assert_close(torch.cat(ours_codes, -1), torch.cat(ref_codes, -1), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(ours_codes, -1), ours.encode(audio).audio_codes, rtol=0, atol=0)


def test_streamed_decode_arguments_equal_one_decode(small):
    _, ours = small
    codes = random_codes(ours, 1, 6)
    out, state = [], None
    for part in (codes[..., :2], codes[..., 2:3], codes[..., 3:]):
        step = ours.decode(part, decoder_past_key_values=state, use_streaming=True)
        state = step.decoder_past_key_values
        out.append(step.audio_values)
    torch.testing.assert_close(torch.cat(out, -1), ours.decode(codes).audio_values, rtol=0, atol=1e-4)
    with pytest.raises(TypeError, match="previous decode"):
        ours.decode(codes, decoder_past_key_values=object())


def test_config_keeps_keys_it_does_not_model_like_the_reference(tmp_path):
    ours = MimiConfig(num_quantizers=8, my_note="kept", use_cache=True)
    ref = transformers.MimiConfig(num_quantizers=8, my_note="kept", use_cache=True)
    assert ours.my_note == ref.my_note == "kept"
    assert ours.to_dict()["my_note"] == "kept"
    ours.save_pretrained(tmp_path)
    assert MimiConfig.from_pretrained(tmp_path).my_note == "kept"
    assert transformers.MimiConfig.from_pretrained(tmp_path).my_note == "kept"


def test_from_pretrained_takes_device_map_and_torch_dtype(small, tmp_path):
    reference, ours = small
    reference.save_pretrained(tmp_path)
    half = MimiModel.from_pretrained(tmp_path, device_map="cpu", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    auto = MimiModel.from_pretrained(tmp_path, device_map="auto", dtype="auto")
    assert auto.dtype == torch.float32
    with pytest.raises(ValueError, match="one device"):
        MimiModel.from_pretrained(tmp_path, device_map={"encoder": "cpu", "decoder": "meta"})
