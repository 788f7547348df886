"""Malicious checkpoints (issue 32, item 8): configs with absurd sizes, safetensors headers that lie, index
shards outside the folder and chat templates that loop or blow up are refused in one line, before the work."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch

from csm.checkpoint import CheckpointError, load_safetensors, weight_files
from csm.config import CsmConfig
from csm.demo import write_demo_checkpoint
from csm.model import CsmForConditionalGeneration


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("hostile-ckpt") / "ckpt")


def copy_with_config(demo, tmp_path, **changes):
    folder = tmp_path / "ckpt"
    shutil.copytree(demo, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_hidden_layers": 100000}, "num_hidden_layers is 100000"),
        ({"num_hidden_layers": -1}, "num_hidden_layers is -1"),
        ({"max_position_embeddings": 10**9}, "max_position_embeddings"),
        ({"num_attention_heads": 0}, "num_attention_heads is 0"),
        ({"hidden_size": "64"}, "hidden_size is 64"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"num_key_value_heads": 3}, "cannot share"),
        ({"num_hidden_layers": 3}, "the weights hold"),  # in range, but not the layers present
    ],
)
def test_a_config_out_of_bounds_is_refused_before_building(demo, tmp_path, changes, words):
    folder = copy_with_config(demo, tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=words):
        CsmForConditionalGeneration.from_pretrained(folder)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("part", ["depth_decoder_config", "codec_config"])
def test_the_depth_decoder_and_codec_configs_are_bounded_too(part):
    with pytest.raises(CheckpointError, match="num_hidden_layers is 100000"):
        CsmConfig.from_dict({part: {"num_hidden_layers": 100000}})


def write_safetensors(path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.mark.parametrize(
    "header, data, length, words",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**62, "header claims"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "lacks its dtype, shape or data_offsets"),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "needs 8"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
        (  # every tensor on the same bytes
            {k: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} for k in "abc"},
            b"\0" * 8,
            None,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, None, "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None, "the file holds"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8, None, "outside"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
    ids=["length", "no-offsets", "dtype", "size", "negative", "shared", "gap", "tail", "outside", "list"],
)
@pytest.mark.parametrize("reader", ["safetensors", "one-by-one"])
def test_safetensors_headers_are_checked_as_safetensors_does(tmp_path, header, data, length, words, reader):
    write_safetensors(tmp_path / "model.safetensors", header, data, length)
    transform = None if reader == "safetensors" else (lambda name, t: {name: t})
    with pytest.raises(CheckpointError, match=words):
        load_safetensors(tmp_path, transform=transform)


def test_index_shards_are_confined_to_the_folder(tmp_path):
    outside = tmp_path / "outside.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, outside)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for shard in ("../outside.safetensors", str(outside), "sub/x.safetensors"):
        index = {"weight_map": {"a": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="not a file name in"):
            weight_files(folder)


def test_a_bad_checkpoint_is_one_line_and_exit_2_in_the_cli(demo, tmp_path):
    folder = copy_with_config(demo, tmp_path, num_attention_heads=0)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "csm",
            "say",
            "Hi.",
            "-o",
            "out.wav",
            "--model",
            str(folder),
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err and "num_attention_heads is 0" in err, err


@pytest.mark.parametrize(
    "template, words",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "budget"),
        ("{% for c in 'x' * 99999 %}{% for d in 'x' * 99999 %}{% endfor %}{% endfor %}", "budget"),
        ("{{ 'x' * 100000 * 100000 }}", "repeats"),
        ("{{ 'x' | center(1000000000) }}", "filter"),
        ("{{ 'x'.ljust(10 ** 9) }}", "call"),
        ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "characters"),
    ],
)
def test_a_planted_chat_template_is_stopped_by_its_budget(demo, template, words):
    from csm.processor import ConversationError, CsmProcessor

    processor = CsmProcessor.from_pretrained(demo)
    conversation = [{"role": "0", "content": [{"type": "text", "text": "Hi."}]}]
    start = time.perf_counter()
    with pytest.raises(ConversationError, match=words):
        processor.apply_chat_template(conversation, chat_template=template, tokenize=False)
    assert time.perf_counter() - start < 4
