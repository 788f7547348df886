"""The `csm` command in a subprocess (and in-process for errors), on the tiny demo checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from csm.cli import main
from csm.demo import write_demo_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


def run(args, tmp_path, stdin=None):
    env = {
        **os.environ,
        "CSM_VOICES_DIR": str(tmp_path / "voices"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "csm", *args],
        cwd=tmp_path,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def read(path):
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 24000 and audio.ndim == 1 and len(audio) > 0
    return audio


def test_demo_writes_audio_and_says_its_weights_are_random(tmp_path):
    result = run(["demo", "-o", "demo.wav"], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    read(tmp_path / "demo.wav")
    assert b"RANDOM weights" in result.stderr and b"huggingface-cli login" in result.stderr


def test_say_with_context_writes_a_wav_and_a_summary(ckpt, tmp_path):
    sf.write(tmp_path / "ref.wav", np.zeros(9600, np.float32) + 0.01, 16000)  # resampled to 24 kHz
    result = run(
        ["say", "Hello there.", "-o", "out.wav", "--model", str(ckpt), "--context", "ref.wav", "A reference.",
         "--seed", "1", "--temperature", "0.8", "--top-k", "20", "--max-seconds", "0.2", "--device", "cpu"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    read(tmp_path / "out.wav")
    assert b"wrote out.wav" in result.stderr and b"RTF" in result.stderr


def test_voice_create_list_then_say_long_text_from_stdin(ckpt, tmp_path):
    sf.write(tmp_path / "ref.wav", np.zeros(9600, np.float32) + 0.01, 24000)
    created = run(["voice", "create", "narrator", "ref.wav", "A reference.", "--speaker", "2"], tmp_path)
    assert created.returncode == 0, created.stderr.decode()
    listed = run(["voice", "list"], tmp_path)
    assert listed.stdout.startswith(b"narrator") and b"speaker 2" in listed.stdout
    text = b"The first sentence is here. The second sentence is here. The third one ends it."
    result = run(
        [
            "say",
            "--text-file",
            "-",
            "-o",
            "long.flac",
            "--model",
            str(ckpt),
            "--voice",
            "narrator",
            "--max-seconds",
            "0.15",
        ],
        tmp_path,
        stdin=text,
    )
    assert result.returncode == 0, result.stderr.decode()
    read(tmp_path / "long.flac")
    assert b"seed " in result.stderr  # the seed used is printed when none is given
    assert (tmp_path / "voices" / "narrator" / "codes.pt").is_file()


def test_stream_writes_wav_to_stdout(ckpt, tmp_path):
    result = run(
        [
            "say",
            "Hello there.",
            "--stream",
            "--format",
            "wav",
            "--model",
            str(ckpt),
            "--seed",
            "0",
            "--max-seconds",
            "0.15",
            "-q",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout[:4] == b"RIFF" and len(result.stdout) > 44 and (len(result.stdout) - 44) % 2 == 0
    assert b"Traceback" not in result.stderr and b"wrote" not in result.stderr  # -q: no summary


def test_missing_model_is_one_line_error_in_a_subprocess(tmp_path):
    result = run(["say", "Hi.", "-o", "x.wav", "--model", str(tmp_path / "nothing"), "--seed", "0"], tmp_path)
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert result.stderr.decode().strip().splitlines()[-1].startswith("csm: error: no checkpoint folder")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["say", "Hi.", "-o", "x.wav", "--device", "tpu9"], "unknown device"),
        (["say", "Hi.", "-o", "x.wav", "--context", "missing.wav", "words"], "cannot read clip"),
        (["say", "Hi.", "-o", "x.wav", "--max-seconds", "5000"], "more than the model's context"),
        (["say", "   ", "-o", "x.wav"], "empty"),
        (["say", "Hi."], "-o out.wav"),
        (["voice", "create", "v", "missing.wav", "words"], "cannot read clip"),
    ],
)
def test_errors_are_one_line_and_exit_nonzero(ckpt, tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSM_VOICES_DIR", str(tmp_path / "voices"))
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    code = main([*args, "--model", str(ckpt), "--seed", "0"] if args[0] == "say" else args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("csm: error:") and match in err[-1], err


def test_unreadable_audio_is_a_clear_error(ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    monkeypatch.chdir(tmp_path)
    code = main(["say", "Hi.", "-o", "x.wav", "--model", str(ckpt), "--context", "bad.wav", "words"])
    assert code == 2 and "bad.wav" in capsys.readouterr().err


def test_serve_parser_takes_the_server_flags():
    from csm.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9000", "--max-batch-size", "4"])
    assert (args.model, args.host, args.port, args.max_batch_size, args.dtype) == (
        "m",
        "127.0.0.1",
        9000,
        4,
        "auto",
    )


def test_serve_parser_takes_the_shutdown_and_stall_flags():
    from csm.cli import build_parser

    args = build_parser().parse_args(["serve", "--shutdown-grace", "5", "--stall-timeout", "2.5"])
    assert (args.shutdown_grace, args.stall_timeout) == (5.0, 2.5)
    assert build_parser().parse_args(["serve"]).shutdown_grace == 30.0


def test_say_and_serve_take_quantize(ckpt, tmp_path):
    from csm.cli import build_parser
    from csm.server import load_app

    assert build_parser().parse_args(["serve", "--quantize", "int4"]).quantize == "int4"
    with pytest.raises(SystemExit):  # argparse names the choices
        build_parser().parse_args(["say", "hi", "--quantize", "int3"])
    out = tmp_path / "q.wav"
    code = main(["say", "Hello.", "-o", str(out), "--model", str(ckpt), "--quantize", "int8", "--seed", "1",
                 "--max-seconds", "0.2", "--device", "cpu", "-q"])  # fmt: skip
    assert code == 0
    read(out)
    app = load_app(str(ckpt), device="cpu", quantize="int8")
    assert app.state.scheduler.model.quantization.scheme == "int8"


def test_dialogue_and_batch_load_the_model_quantized(ckpt, tmp_path, monkeypatch):
    import json

    import csm.cli.common as cli_common

    loaded = []
    real = cli_common.load_pipeline

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        loaded.append(pipe.model.quantization.scheme if pipe.model.quantization else None)
        return pipe

    monkeypatch.setattr(cli_common, "load_pipeline", spy)
    (tmp_path / "talk.txt").write_text("[0] Hello there.\n[1] Hi.\n")
    common = ["--model", str(ckpt), "--device", "cpu", "--max-seconds", "0.2", "--seed", "1", "-q"]
    assert main(["dialogue", str(tmp_path / "talk.txt"), "-o", str(tmp_path / "talk.wav"), "--quantize", "int8",
                 *common]) == 0  # fmt: skip
    read(tmp_path / "talk.wav")
    (tmp_path / "lines.jsonl").write_text('{"id": "a", "text": "Hello."}\n')
    out = tmp_path / "job"
    assert (
        main(["batch", str(tmp_path / "lines.jsonl"), "--out", str(out), "--quantize", "int4", *common]) == 0
    )
    assert loaded == ["int8", "int4"]
    assert json.loads((out / "job.json").read_text())["quantize"] == "int4"  # it decides the audio
    (tmp_path / "lines.jsonl").write_text('{"id": "a", "text": "Hello."}\n{"id": "b", "text": "More."}\n')
    assert main(["batch", str(tmp_path / "lines.jsonl"), "--out", str(out), *common]) == 2  # other weights
