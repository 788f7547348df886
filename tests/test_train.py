"""Fine-tuning: data checks and caching, the loss against the reference, LoRA, resume, and torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import reference_processor, write_reference_processor
from reference_models import quiet_transformers, write_reference_csm

from csm import CsmForConditionalGeneration
from csm.audio import load_audio
from csm.processor import CsmProcessor
from csm.train import FinetuneConfig, add_finetune_arguments, finetune, run_finetune
from csm.train import data as D
from csm.train import distributed as dist
from csm.train.lora import LoraConfig, apply_lora, load_adapter, lora_state_dict, merge_lora, save_adapter
from csm.train.recipe import lr_factor, make_batch, prepare_data, weighted_loss

TEXTS = ["Hello from Sesame!", "How are you doing today?", "The quick brown fox.", "I think that is the one."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models train faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random checkpoint with its processor files, both written by the reference."""
    path = tmp_path_factory.mktemp("tiny-csm")
    write_reference_csm(path)
    write_reference_processor(path)
    return path


def write_clip(path: Path, seconds: float, pitch: float, seed: int) -> None:
    t = np.arange(int(24000 * seconds)) / 24000
    noise = np.random.default_rng(seed).standard_normal(len(t))
    sf.write(path, (0.3 * np.sin(2 * np.pi * pitch * t) + 0.02 * noise).astype(np.float32), 24000)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny) -> Path:
    """Four generated clips of 0.5-1.1 s (speakers 0 and 1, one line with a context turn), encoded once."""
    folder = tmp_path_factory.mktemp("data")
    lines = []
    for i, text in enumerate(TEXTS):
        write_clip(folder / f"clip{i}.wav", 0.5 + 0.2 * i, 150 + 40 * i, i)
        lines.append({"audio": f"clip{i}.wav", "text": text, "speaker": i % 2})
    lines[3]["context"] = [{"audio": "clip0.wav", "text": TEXTS[0], "speaker": 0}]
    (folder / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = FinetuneConfig(model=str(tiny), data=str(folder / "train.jsonl"), out=str(folder / "unused"),
                            prepare_only=True, progress=False)  # fmt: skip
    finetune(config)
    return folder / "train.jsonl"


def run(tiny, data, out, **kw) -> list[dict]:
    kw = {"steps": 6, "batch_size": 2, "lr": 1e-3, "progress": False, "device": "cpu", **kw}
    finetune(FinetuneConfig(model=str(tiny), data=str(data), out=str(out), **kw))
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ---- data -----------------------------------------------------------------------------------------------


def test_data_errors_name_the_line_and_the_problem(tmp_path):
    write_clip(tmp_path / "ok.wav", 0.3, 200, 0)
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    lines = [
        {"audio": "ok.wav", "text": "fine", "speaker": 0},
        {"audio": "missing.wav", "text": "where is it"},
        {"audio": "broken.wav", "text": "unreadable"},
        {"audio": "ok.wav", "text": "   "},
        {"audio": "ok.wav", "text": "ctx", "context": [{"audio": "ok.wav", "text": ""}]},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    with pytest.raises(D.DataError) as e:
        D.read_jsonl(data)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "train.jsonl:2: audio file missing.wav not found" in msg
    assert "train.jsonl:3: audio file broken.wav is not readable" in msg
    assert "train.jsonl:4: text is empty" in msg
    assert "train.jsonl:5 context 0: text is empty" in msg
    assert "train.jsonl:6: not valid JSON" in msg


def test_clip_longer_than_context_fails_before_encoding(tiny, tmp_path, monkeypatch):
    write_clip(tmp_path / "long.wav", 3.0, 200, 0)  # 38 frames
    (tmp_path / "train.jsonl").write_text(json.dumps({"audio": "long.wav", "text": "a long one"}) + "\n")
    samples = D.read_jsonl(tmp_path / "train.jsonl")
    processor = CsmProcessor.from_pretrained(tiny)
    with pytest.raises(D.DataError, match=r"train.jsonl:1: \d+ tokens \(text and 38 audio frames\), more than the "
                       r"model's context of 30"):  # fmt: skip
        D.check_lengths(samples, processor, max_length=30)
    D.check_lengths(samples, processor, max_length=2048)


def test_codes_are_cached_by_content_and_codec(tiny, dataset, monkeypatch):
    model = CsmForConditionalGeneration.from_pretrained(tiny)
    samples = D.read_jsonl(dataset)
    digests = D.clip_digests(samples)
    folder = D.cache_folder(dataset, D.codec_fingerprint(model.codec_model))
    assert folder.parent == dataset.parent / ".csm_cache"
    assert D.missing_clips(digests, folder) == {}  # the fixture encoded them all
    codes = D.load_codes(digests, folder)
    clip = dataset.parent / "clip2.wav"
    wav = torch.from_numpy(load_audio(clip))[None, None]
    torch.testing.assert_close(codes[clip].long(), model.codec_model.encode(wav).audio_codes[0].T)
    weights = model.codec_model.state_dict()
    next(v for v in weights.values() if v.is_floating_point()).add_(1.0)
    assert D.codec_fingerprint(model.codec_model) != folder.name


def test_batches_cover_every_example_with_similar_lengths():
    lengths = [10, 500, 12, 480, 11, 490, 13, 470, 9]
    epoch0 = D.epoch_batches(lengths, global_batch=2, seed=0, epoch=0, bucket=64)
    assert epoch0 == D.epoch_batches(lengths, global_batch=2, seed=0, epoch=0, bucket=64)
    assert epoch0 != D.epoch_batches(lengths, global_batch=2, seed=0, epoch=1, bucket=64)
    assert len(epoch0) == 5 and all(len(b) == 2 for b in epoch0)
    assert set(sum(epoch0, [])) == set(range(9))
    spread = max(abs(lengths[a] - lengths[b]) for a, b in epoch0)
    assert spread < 400  # at most the filled-up last batch mixes short and long


def test_labels_keep_the_reference_semantics():
    audio, eos = 2, 3
    ids = torch.tensor([1, 5, 6, 0] + [audio] * 32 + [eos])
    labels = D.labels_for(D.Example(ids, []), audio, eos, depth_ratio=1 / 16, seed=7)
    assert (labels[:4] == -100).all() and labels[-1] == eos
    assert int((labels == -101).sum()) == 30 and int((labels == audio).sum()) == 2  # 32 - int(32 * 15/16)
    assert torch.equal(labels, D.labels_for(D.Example(ids, []), audio, eos, 1 / 16, seed=7))


def test_lr_warms_up_then_follows_a_cosine():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:], strict=False))
    assert math.isclose(f[12], 0.1 + 0.9 * 0.5, rel_tol=1e-9) and math.isclose(f[20], 0.1)


# ---- the loss against the reference ---------------------------------------------------------------------


def test_tokens_and_loss_on_a_batch_equal_the_reference(tiny, dataset):
    """Our data path (cached codes, our labels) gives the reference's loss on the same labels."""
    quiet_transformers()
    from transformers import CsmForConditionalGeneration as RefCsm

    model = CsmForConditionalGeneration.from_pretrained(tiny)
    processor = CsmProcessor.from_pretrained(tiny)
    d = dist.Dist(0, 1, torch.device("cpu"))
    config = FinetuneConfig(model=str(tiny), data=str(dataset), out="unused", batch_size=4, progress=False)
    examples = prepare_data(str(dataset), model, processor, d, config)
    batch = make_batch(examples, [0, 1, 3, 2], seed=3, epoch=0, model_config=model.config,
                       pad_id=processor.pad_token_id, depth_ratio=1 / 16)  # fmt: skip
    assert (batch.labels == -101).any() and (batch.labels == 2).any()

    # The reference processor, fed the same conversations with the audio loaded, makes the same tokens.
    samples = D.read_jsonl(dataset)
    conversations = [
        [{"role": str(t.speaker), "content": [{"type": "text", "text": t.text},
                                                {"type": "audio", "audio": load_audio(t.audio)}]} for t in s.turns]
        for s in (samples[i] for i in [0, 1, 3, 2])
    ]  # fmt: skip
    ref_inputs = reference_processor().apply_chat_template(conversations, tokenize=True, return_dict=True)
    width = ref_inputs["input_ids"].shape[1]
    ref_labels = torch.full_like(ref_inputs["input_ids"], -100)
    for b, i in enumerate([0, 1, 3, 2]):
        n = len(examples[i])
        assert (
            ref_inputs["input_ids"][b, width - n :].tolist() == examples[i].input_ids.tolist()
        )  # left padded
        ref_labels[b, width - n :] = batch.labels[b, :n]

    ref = RefCsm.from_pretrained(tiny).eval()
    with torch.no_grad():
        expected = ref(**ref_inputs, labels=ref_labels)
        ours = model(input_ids=batch.input_ids, labels=batch.labels, audio_codes=batch.audio_codes)
        totals = (batch.backbone_targets, batch.depth_targets)
        weighted, _, _ = weighted_loss(model, batch, totals, torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(ours.backbone_loss, expected.backbone_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.depth_decoder_loss, expected.depth_decoder_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weighted, expected.loss, rtol=1e-5, atol=1e-5)


# ---- LoRA -----------------------------------------------------------------------------------------------


def forward_outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    codes = torch.randint(1, 100, (2, 6, cfg.num_codebooks), generator=g)
    labels = codes.clone()
    with torch.no_grad():
        out = model(input_ids=codes, labels=labels)
    return out.logits, out.depth_decoder_logits


def test_merged_lora_gives_the_same_logits_as_the_adapted_model(tiny, tmp_path):
    model = CsmForConditionalGeneration.from_pretrained(tiny)
    before = forward_outputs(model)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    assert len(names) == 2 * 2 * 7  # backbone and depth decoder, two layers each, seven projections
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(forward_outputs(model), before)  # B starts at zero
    for p in lora_state_dict(model).values():
        p.copy_(torch.randn_like(p) * 0.2)
    adapted = forward_outputs(model)
    assert not torch.allclose(adapted[0], before[0])
    save_adapter(model, LoraConfig(rank=4, alpha=8.0), tmp_path / "adapter")

    merged = merge_lora(model)
    assert not any("lora_" in n for n in merged.state_dict())
    # W + BA against xW + (xA)B: the same sums in another order (fp32; a few of 172k logits differ by ~1e-5)
    torch.testing.assert_close(forward_outputs(merged), adapted, rtol=1e-4, atol=1e-4)

    fresh = CsmForConditionalGeneration.from_pretrained(tiny)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(forward_outputs(merge_lora(fresh)), adapted, rtol=1e-4, atol=1e-4)
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA" and keys["r"] == 4


def test_lora_targets_that_match_nothing_are_an_error(tiny):
    model = CsmForConditionalGeneration.from_pretrained(tiny)
    with pytest.raises(ValueError, match="no linear layer .* matches LoRA targets"):
        apply_lora(model, LoraConfig(target_modules=["qkv"]))
    names = apply_lora(model, LoraConfig(target_modules=["depth_decoder.model.layers.0.mlp.up_proj"]))
    assert names == ["depth_decoder.model.layers.0.mlp.up_proj"]


# ---- the recipe -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank, lr, most", [(0, 3e-3, 0.5), (16, 5e-3, 0.9)], ids=["full", "lora"])
def test_training_lowers_the_loss_clearly(tiny, dataset, tmp_path, lora_rank, lr, most):
    """24 steps on four clips. Random init starts near 2 ln(2051) = 15.3: full fine-tuning brings it to about 6;
    LoRA, whose random heads stay frozen, to about 13.3."""
    log = run(
        tiny, dataset, tmp_path / "out", steps=24, batch_size=4, lr=lr, lora_rank=lora_rank, save_every=100
    )
    first, last = log[0]["loss"], log[-1]["loss"]
    print(f"loss {first:.3f} -> {last:.3f} ({last / first:.2f} of the start)")
    assert first > 14.5 and last < most * first, (first, last)


def test_output_is_a_merged_checkpoint_both_libraries_load(tiny, dataset, tmp_path):
    out = tmp_path / "out"
    log = run(tiny, dataset, out, steps=4, lr=2e-2, val=str(dataset), eval_every=2, save_every=100)
    assert "val_loss" in log[1] and "val_loss" in log[3] and "val_loss" not in log[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    ours = CsmForConditionalGeneration.from_pretrained(out)
    base = CsmForConditionalGeneration.from_pretrained(tiny)
    adapted = CsmForConditionalGeneration.from_pretrained(tiny)
    load_adapter(adapted, out / "adapter")
    torch.testing.assert_close(forward_outputs(ours), forward_outputs(adapted), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(forward_outputs(ours)[0], forward_outputs(base)[0])

    quiet_transformers()
    from transformers import CsmForConditionalGeneration as RefCsm

    ref = RefCsm.from_pretrained(out).eval()
    codes = torch.randint(1, 100, (1, 5, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            ref(input_ids=codes).logits, ours(input_ids=codes).logits, rtol=1e-4, atol=1e-4
        )
    assert CsmProcessor.from_pretrained(out).audio_token_id == 2


def test_gradient_accumulation_and_checkpointing_match_one_big_batch(tiny, dataset, tmp_path):
    big = run(tiny, dataset, tmp_path / "big", steps=3, batch_size=4, save_every=100)
    small = run(tiny, dataset, tmp_path / "small", steps=3, batch_size=2, grad_accum=2, save_every=100)
    recomputed = run(tiny, dataset, tmp_path / "ckpt", steps=3, batch_size=4, save_every=100,
                     activation_checkpointing=True)  # fmt: skip
    for a, b, c in zip(big, small, recomputed, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        assert math.isclose(a["loss"], c["loss"], rel_tol=1e-6) and math.isclose(
            a["grad_norm"], c["grad_norm"], rel_tol=1e-5
        )


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_weights(tiny, dataset, tmp_path, monkeypatch):
    kw = dict(steps=7, batch_size=2, save_every=3, lora_dropout=0.2, lr=5e-3, keep_checkpoints=5)
    straight = run(tiny, dataset, tmp_path / "straight", **kw)

    real = D.collate
    calls = {"n": 0}

    def collate_then_stop(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:  # dies in step 6, after the step-3 checkpoint
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(D, "collate", collate_then_stop)
    with pytest.raises(Interrupt):
        run(tiny, dataset, tmp_path / "resumed", **kw)
    monkeypatch.setattr(D, "collate", real)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-0000003"]
    resumed = run(tiny, dataset, tmp_path / "resumed", resume=True, **kw)

    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a = CsmForConditionalGeneration.from_pretrained(tmp_path / "straight").state_dict()
    b = CsmForConditionalGeneration.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="global_batch"):
        run(tiny, dataset, tmp_path / "resumed", resume=True, **{**kw, "batch_size": 4})
    with pytest.raises(ValueError, match="not empty"):
        run(tiny, dataset, tmp_path / "resumed", **kw)


def test_cli_flags_build_the_config(tiny, dataset, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    args = parser.parse_args(["--model", str(tiny), "--data", str(dataset), "--out", str(tmp_path / "o"),
                              "--steps", "2", "--lora-rank", "0", "--lora-targets", "q_proj, v_proj",
                              "--activation-checkpointing", "--no-progress", "--device", "cpu"])  # fmt: skip
    assert run_finetune(args) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file() and not (tmp_path / "o" / "adapter").exists()
    bad = parser.parse_args(
        ["--model", str(tiny), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p")]
    )
    assert run_finetune(bad) == 2
    assert "nope.jsonl not found" in capsys.readouterr().err


# ---- several processes ----------------------------------------------------------------------------------


def torchrun(tiny, data, out, *flags) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "csm.train",
           "--model", str(tiny), "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress", *flags]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora-ddp", "full-fsdp"])
def test_torchrun_two_processes_match_one_process(tiny, dataset, tmp_path, lora_rank):
    """Global batch 4: two processes of 2 (gloo) against one process of 2 x 2 accumulated."""
    common = dict(steps=4, lr=1e-3, lora_rank=lora_rank, save_every=2, val=str(dataset), eval_every=2)
    one = run(tiny, dataset, tmp_path / "one", batch_size=2, grad_accum=2, **common)
    two = torchrun(tiny, dataset, tmp_path / "two", "--steps", "4", "--lr", "1e-3", "--batch-size", "2",
                   "--lora-rank", str(lora_rank), "--save-every", "2", "--val", str(dataset), "--eval-every", "2")  # fmt: skip
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "backbone_loss", "depth_decoder_loss", "val_loss"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a, b)
    a = CsmForConditionalGeneration.from_pretrained(tmp_path / "one").state_dict()
    b = CsmForConditionalGeneration.from_pretrained(tmp_path / "two").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


class Planted:
    """A pickle that runs code when unpickled (as a planted optimizer.pt would)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo planted > planted.txt",))


def test_resume_never_unpickles_code_from_a_planted_optimizer_file(tmp_path, monkeypatch):
    from csm.train.recipe import load_optimizer_state, save_optimizer_state

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [Planted()]}, path)
    with pytest.raises(ValueError, match="not loaded"):
        load_optimizer_state(path)
    assert not (tmp_path / "planted.txt").exists()
    with pytest.raises(ValueError, match="not a tensor"):
        save_optimizer_state({"state": {}, "param_groups": [Interrupt()]}, path)
    torch.save({"anything": 1}, path)
    with pytest.raises(ValueError, match="not an optimizer state"):
        load_optimizer_state(path)
    # What the trainer saves round-trips through weights_only=True.
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), betas=(0.9, 0.95))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_optimizer_state(opt.state_dict(), path)
    assert load_optimizer_state(path)["param_groups"][0]["betas"] == (0.9, 0.95)
