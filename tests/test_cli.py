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
    assert b"RANDOM weights" in result.stderr and b"hf auth login" in result.stderr


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
        (
            ["say", "Hi.", "-o", "x.wav", "--context", "missing.wav", "words"],
            "--context missing.wav: no such",
        ),
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


# ---- the first hour (issue 22): refuse before the work, keep what was made, say what exists ----------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["say", "Hi.", "-o", "/nonexistent/dir/x.wav"], "folder /nonexistent/dir does not exist"),
        (["say", "Hi.", "-o", "/proc/x.wav"], "cannot write /proc/x.wav"),
        (["say", "Hi.", "-o", "x.xyz"], "cannot tell the audio format of x.xyz"),
        (["say", "Hi.", "-o", "somedir"], "somedir is a folder"),
        (["dialogue", "talk.txt", "-o", "/nonexistent/t.wav"], "folder /nonexistent does not exist"),
        (["dialogue", "talk.txt", "-o", "/proc/t.wav"], "cannot write /proc/t.wav"),
        (["dialogue", "talk.txt", "-o", "t.wav", "--turns-dir", "/proc/turns"], "--turns-dir /proc/turns"),
        (["batch", "lines.jsonl", "--out", "/proc/corpus"], "--out /proc/corpus: cannot create this folder"),
        (["finetune", "--data", "data.jsonl", "--out", "/proc/run"], "--out /proc/run"),
        (["voice", "create", "v", "ref.wav", "Words.", "--voices-dir", "/proc/voices"], "/proc/voices"),
        (["demo", "-o", "/nonexistent/demo.wav"], "folder /nonexistent does not exist"),
    ],
)
def test_every_output_is_checked_before_any_model_loads(tmp_path, monkeypatch, capsys, args, match):
    """The model named does not exist: an error about it would mean the output was checked too late."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSM_VOICES_DIR", str(tmp_path / "voices"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "somedir").mkdir()
    (tmp_path / "talk.txt").write_text("[0] Hello there.\n[1] Hi.\n")
    (tmp_path / "lines.jsonl").write_text('{"id": "a", "text": "Hello."}\n')
    (tmp_path / "data.jsonl").write_text('{"text": "Hello.", "audio": "ref.wav"}\n')
    sf.write(tmp_path / "ref.wav", np.zeros(9600, np.float32) + 0.01, 24000)
    model = [] if args[0] in ("voice", "demo") else ["--model", str(tmp_path / "no-such-model")]
    code = main([*args, *model])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err, err
    assert match in err[-1] and "Errno" not in err[-1] and ".partial" not in err[-1], err
    assert "no-such-model" not in err[-1] and "loading" not in "\n".join(err), err
    assert not list(tmp_path.glob("**/*.partial*")) and not (tmp_path / "x.xyz").exists()


def test_an_unwritable_output_names_the_file_and_how_to_fix_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["say", "Hi.", "-o", "/proc/x.wav", "--model", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("csm: error: cannot write /proc/x.wav") and "-o" in err


def test_temperature_zero_is_greedy_and_a_negative_one_names_the_flag(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(ckpt), "--device", "cpu", "--max-seconds", "0.2", "-q"]
    assert main(["say", "Hello.", "-o", "a.wav", "--temperature", "0", "--seed", "1", *common]) == 0
    assert "do_sample" not in capsys.readouterr().err
    read(tmp_path / "a.wav")
    code = main(["say", "Hello.", "-o", "b.wav", "--temperature", "-1", "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and "--temperature must be >= 0 (0: greedy)" in err and "do_sample" not in err
    assert "--temperature" in build_parser_help("say") and "greedy" in build_parser_help("say")


def build_parser_help(command: str) -> str:
    from csm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())


def test_the_frame_cap_warning_names_the_cli_flag_and_not_when_the_cap_was_asked_for(
    ckpt, tmp_path, monkeypatch, capsys
):
    from csm.pipeline import TextToAudioPipeline

    frames = TextToAudioPipeline._frames  # the default budget, from the text, made short to keep this fast
    monkeypatch.setattr(
        TextToAudioPipeline,
        "_frames",
        lambda self, opts, text: frames(self, opts, text) if opts.get("max_seconds") else (4, False),
    )
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(ckpt), "--seed", "1", "--device", "cpu"]
    assert main(["say", "Hi. And more.", "-o", "a.wav", "--max-seconds", "0.2", *common]) == 0
    given = capsys.readouterr().err
    assert "warning" not in given and "max_new_tokens" not in given, given
    assert "1 sentence(s) stopped at --max-seconds 0.2" in given  # said once, in the summary
    assert main(["say", "Hi. And more. Three sentences in all.", "-o", "b.wav", *common]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "--max-seconds" in warned[0] and "max_new_tokens" not in warned[0], warned


def test_a_misspelled_flag_prints_the_subcommands_usage(tmp_path):
    result = run(["say", "Hi.", "-o", "x.wav", "--sed", "1"], tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 2 and "usage: csm say" in err and "--sed" in err, err
    result = run(["batch", "lines.jsonl", "--out", "o", "--bach-size", "2"], tmp_path)
    assert "usage: csm batch" in result.stderr.decode()


def test_stream_to_a_terminal_is_refused_with_a_hint(ckpt, tmp_path):
    import pty

    leader, follower = pty.openpty()
    try:
        env = {**os.environ, "CSM_VOICES_DIR": str(tmp_path / "voices")}
        result = subprocess.run(
            [sys.executable, "-m", "csm", "say", "Hi", "--stream", "--model", str(tmp_path / "none")],
            cwd=tmp_path, env=env, stdout=follower, stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip
    finally:
        os.close(follower)
        os.close(leader)
    err = result.stderr.decode()
    assert result.returncode == 2 and "stdout is a terminal" in err and "aplay" in err and "-o" in err, err


def test_demo_says_where_its_checkpoint_and_audio_are_and_what_to_run_next(tmp_path):
    result = run(["demo"], tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert not (tmp_path / "csm-demo.wav").exists()  # nothing left in the current folder
    ckpt_dir = tmp_path / "cache" / "csm" / "demo-v1"
    wav = tmp_path / "cache" / "csm" / "csm-demo.wav"
    read(wav)
    assert f"checkpoint: {ckpt_dir}" in err and f"wrote {wav}" in err
    assert f'csm say "Hello." -o hello.wav --model {ckpt_dir}' in err
    assert "hf auth login" in err and "huggingface-cli" not in err


def test_long_text_says_its_size_up_front_and_shows_frames_within_a_sentence(ckpt, tmp_path):
    text = " ".join(f"This is sentence number {i} of the text." for i in range(12))
    result = run(["say", "--text-file", "-", "-o", "long.wav", "--model", str(ckpt), "--seed", "1",
                  "--max-seconds", "0.3"], tmp_path, stdin=text.encode())  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 0, err
    first = [line for line in err.splitlines() if line.startswith("csm: ")][0]
    assert "12 sentences" in first and "of speech" in first, err  # before loading the model
    assert err.index("12 sentences") < err.index("loading")
    assert "frame 4/4" in err  # progress within a sentence: frames made / its budget
    assert "to go" in err  # a time estimate once frames were measured
    # stderr is a pipe here, as in a log: whole lines, no carriage-return redraws, none broken by another
    assert "\r" not in err and all(line.startswith("csm") for line in err.splitlines()), err
    assert len(err.splitlines()) < 40, err
    read(tmp_path / "long.wav")


def test_ctrl_c_writes_the_finished_sentences_as_a_valid_file_and_exits_130(ckpt, tmp_path):
    import re
    import signal
    import threading

    text = " ".join(f"This is sentence number {i} of a long text." for i in range(400))
    env = {
        **os.environ,
        "CSM_VOICES_DIR": str(tmp_path / "voices"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "csm", "say", "--text-file", "-", "-o", "long.wav", "--model", str(ckpt),
         "--seed", "1", "--max-seconds", "0.3", "--device", "cpu"],
        cwd=tmp_path, env=env, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdin.write(text.encode())
    proc.stdin.close()
    err, started = [], threading.Event()

    def read_stderr():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            err.append(chunk.decode(errors="replace"))
            done = re.findall(r"csm say: (\d+)/400 sentences", "".join(err))
            if done and int(done[-1]) >= 3:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(120), "".join(err)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, "".join(err)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    message = "".join(err).splitlines()[-1]
    match = re.search(
        r"interrupted: wrote the (\d+) finished sentence\(s\) \(([\d.]+) s of audio\) to long.wav", message
    )
    assert match, message
    audio = read(tmp_path / "long.wav")  # a valid file, not a torn one
    assert int(match[1]) >= 3 and len(audio) / 24000 == pytest.approx(float(match[2]), abs=0.05)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# ---- every input checked before the model loads -----------------------------------------------------


def blocking_checkpoint(ckpt, folder):
    """The demo checkpoint with its weights behind a named pipe: a command that reaches the model load
    blocks there (and the test times out), so an error back in time proves the check came first."""
    folder.mkdir()
    for f in ckpt.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    os.mkfifo(folder / "model.safetensors")
    return folder


BAD_INPUTS = [
    (["say", "Hi.", "--voice", "nobody"], "--voice nobody: no voice named 'nobody'"),
    (["say", "Hi.", "--context", "missing.wav", "Words."], "--context missing.wav: no such file"),
    (["say", "Hi.", "--context", "ref.wav", "  "], "the transcript is empty"),
    (["say", "Hi.", "--context", "bad.wav", "Words."], "bad.wav"),
    (["say", "Hi.", "--speaker", "-1"], "--speaker must be"),
    (["say", "-f", "big.txt"], "more than the 100,000 csm say takes at once"),
    (["say", "-f", "latin1.txt"], "latin1.txt is not UTF-8 text (byte 0xe9"),
    (["serve", "--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
    (["batch", "lines.jsonl", "--out", "o", "--speaker", "-1"], "--speaker must be"),
    (["batch", "lines.jsonl", "--out", "o", "--context", "bad.wav", "Words."], "cannot read clip bad.wav"),
    (["dialogue", "talk.txt", "-o", "t.wav", "--voice", "0=nobody"], "no voice named 'nobody'"),
]


def bad_input_files(folder):
    sf.write(folder / "ref.wav", np.zeros(9600, np.float32) + 0.01, 24000)
    (folder / "bad.wav").write_bytes(b"not audio")
    (folder / "big.txt").write_text("Word. " * 20_000)
    (folder / "latin1.txt").write_bytes("Café au lait.".encode("latin-1"))
    (folder / "lines.jsonl").write_text('{"id": "a", "text": "Hello."}\n')
    (folder / "talk.txt").write_text("[0] Hello.\n")


@pytest.mark.parametrize(("args", "match"), BAD_INPUTS)
def test_say_and_serve_check_every_input_before_the_model(tmp_path, monkeypatch, capsys, args, match):
    """The model named does not exist: an error about it would mean the input was checked too late."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSM_VOICES_DIR", str(tmp_path / "voices"))
    bad_input_files(tmp_path)
    out = ["-o", "x.wav"] if args[0] == "say" else []
    code = main([*args, *out, "--model", str(tmp_path / "no-such-model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and match in err[-1] and "no-such-model" not in err[-1], err


@pytest.mark.slow
@pytest.mark.parametrize(("args", "match"), BAD_INPUTS)
def test_say_and_serve_refuse_bad_input_before_the_model_loads(ckpt, tmp_path, args, match):
    import time

    blocked = blocking_checkpoint(ckpt, tmp_path / "blocked")
    bad_input_files(tmp_path)
    out = ["-o", "x.wav"] if args[0] == "say" else []
    started = time.perf_counter()
    result = run([*args, *out, "--model", str(blocked)], tmp_path)  # a load would block past the timeout
    took = time.perf_counter() - started
    err = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, err
    assert match in err[-1] and "Traceback" not in result.stderr.decode(), err
    assert not any("loading" in line for line in err), err
    print(f"refused in {took:.1f} s (interpreter start included)")


def test_serve_on_a_busy_port_is_refused_before_the_model_loads(ckpt, tmp_path):
    import socket

    blocked = blocking_checkpoint(ckpt, tmp_path / "blocked")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(["serve", "--model", str(blocked), "--port", str(port)], tmp_path)
    err = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, err
    assert err[-1] == (
        f"csm: error: port {port} on 127.0.0.1 is in use (another csm serve?): stop that server, or pick "
        "another with --port (--port 0: any free port)"
    )


def test_messages_speak_in_flags_and_dtype_takes_short_names(ckpt, tmp_path, monkeypatch, capsys):
    from csm.cli.common import cli_words

    assert cli_words(
        "quantized weights on CPU need a float32 or bfloat16 model; pass dtype=torch.bfloat16"
    ) == ("quantized weights on CPU need a float32 or bfloat16 model; --dtype bfloat16")
    assert cli_words(
        "generation reached max_new_tokens=125 frames without end-of-audio in some rows; their audio may be "
        "cut short (raise max_new_tokens or max_seconds)"
    ).endswith(
        "reached its frame budget (125 frames) without end-of-audio in some rows; their audio may be cut short (raise --max-seconds)"
    )
    monkeypatch.chdir(tmp_path)
    for short in ("bf16", "fp32", "FP16", "half"):
        assert main(["say", "Hi.", "-o", "x.wav", "--model", "no-such-model", "--dtype", short]) == 2
        assert "no checkpoint folder" in capsys.readouterr().err  # the flag was taken: the model is next
    with pytest.raises(SystemExit):
        main(["say", "Hi.", "-o", "x.wav", "--dtype", "bf17"])
    assert "use bfloat16 (bf16), float16 (fp16), float32 (fp32) or auto" in capsys.readouterr().err
    assert main(["say", "Hi.", "-o", "a.flac", "--format", "pcm", "--model", "no-such-model"]) == 2
    assert (
        "--format pcm is for stdout (--stream or -o -); a file's format is its extension: -o a.flac is FLAC"
        in (capsys.readouterr().err)
    )
    # A quantized-model advice from the loader reaches the CLI user in flags.
    code = main(["say", "Hi.", "-o", "x.wav", "--model", str(ckpt), "--quantize", "int8", "--dtype", "fp16",
                 "--device", "cpu", "--seed", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "dtype=torch" not in err[-1] and "--dtype bfloat16" in err[-1], err


def test_a_failed_write_keeps_the_audio_and_says_where(ckpt, tmp_path, monkeypatch, capsys):
    import errno

    import csm.audio

    def disk_full(path, audio, rate, **kwargs):  # the output's write: its temporary file filled the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(csm.audio, "save_audio_atomic", disk_full)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "out").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    code = main(["say", "Hello there.", "-o", "out/x.wav", "--model", str(ckpt), "--seed", "1", "--max-seconds",
                 "0.3", "--device", "cpu", "-q"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("csm: error: cannot write out/x.wav: No space left on device"), (
        err
    )
    kept = list((tmp_path / "tmp").glob("csm-unsaved-*.wav"))
    assert len(kept) == 1 and f"the audio is kept in {kept[0]}" in err[-1], err
    assert len(read(kept[0])) == 4 * 1920
    assert not list((tmp_path / "out").iterdir())


def test_no_room_for_the_audio_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100_000, 100_000))
    monkeypatch.chdir(tmp_path)
    code = main(["say", "Hello there, " * 500, "-o", "x.wav", "--model", "no-such-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "0.1 MB free in" in err[-1] and "write elsewhere" in err[-1], err


def test_voice_rename_and_delete(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSM_VOICES_DIR", str(tmp_path / "voices"))
    sf.write(tmp_path / "ref.wav", np.zeros(9600, np.float32) + 0.01, 24000)
    for name in ("alice", "bob"):
        assert main(["voice", "create", name, "ref.wav", "Words."]) == 0
    assert main(["voice", "rename", "alice", "carol"]) == 0
    capsys.readouterr()
    assert main(["voice", "list"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["bob", "carol"]
    from csm.voice import Voice

    assert Voice.named("carol").name == "carol"
    assert main(["voice", "rename", "bob", "carol"]) == 2
    assert "a voice named 'carol' already exists" in capsys.readouterr().err
    assert main(["voice", "delete", "carol", "nobody"]) == 2  # every name checked before any is deleted
    assert (
        "no voice named 'nobody' in" in capsys.readouterr().err and (tmp_path / "voices" / "carol").is_dir()
    )
    assert main(["voice", "delete", "carol", "bob"]) == 0
    assert not list((tmp_path / "voices").iterdir())
    assert main(["voice", "delete", "../x"]) == 2


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["sya", "Hi."], "did you mean say?"),
        (["say", "Hi.", "-o", "x.wav", "--temp", "0.5"], "did you mean --temperature?"),
        (["say", "Hi.", "-o", "x.wav", "--seeed", "1"], "did you mean --seed?"),
        (["voice", "lst"], "did you mean list?"),
        (["say", "Hi.", "-o", "x.wav", "--quantize", "in8"], "did you mean int8?"),
    ],
)
def test_abbreviated_or_misspelled_commands_and_flags_are_refused_with_the_nearest(args, hint, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err[-1].endswith(f"({hint})"), err


def test_saved_weights_have_their_siblings_permissions(tmp_path):
    import stat

    from reference_models import tiny_csm_config

    from csm import CsmConfig, CsmForConditionalGeneration

    CsmForConditionalGeneration(CsmConfig.from_dict(tiny_csm_config())).save_pretrained(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044, modes


def test_speed_and_aac_as_the_server_has_them(ckpt, tmp_path, monkeypatch, capsys):
    av = pytest.importorskip("av")
    monkeypatch.chdir(tmp_path)
    base = ["--model", str(ckpt), "--seed", "2", "--max-seconds", "0.5", "--device", "cpu", "-q"]
    assert main(["say", "Hello there.", "-o", "normal.wav", *base]) == 0
    assert main(["say", "Hello there.", "-o", "fast.wav", "--speed", "2", *base]) == 0
    normal, fast = read(tmp_path / "normal.wav"), read(tmp_path / "fast.wav")
    assert len(fast) == pytest.approx(len(normal) / 2, abs=2)
    assert main(["say", "Hello there.", "-o", "x.aac", *base]) == 0
    with av.open(str(tmp_path / "x.aac")) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "aac" and stream.rate == 24000
        decoded = sum(frame.samples for frame in container.decode(stream))
    assert decoded >= len(normal)
    assert main(["say", "Hi.", "-o", "x.wav", "--speed", "5", "--model", "no-such-model"]) == 2
    assert "--speed must be between 0.25 and 4.0" in capsys.readouterr().err


def test_light_commands_do_not_load_torch(tmp_path):
    """`csm voice list`, `--help` and a refused flag answer without importing torch (seconds at every start)."""
    sf.write(tmp_path / "ref.wav", np.zeros(9600, np.float32) + 0.01, 24000)
    assert run(["voice", "create", "alice", "ref.wav", "Words."], tmp_path).returncode == 0
    script = (
        "import sys\nfrom csm.cli import main\n"
        "for argv in (['voice', 'list'], ['--help'], ['say', '--temp', '1'], ['voice', 'delete', 'nobody']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    env = {**os.environ, "CSM_VOICES_DIR": str(tmp_path / "voices")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    out = result.stdout.decode()
    assert out.strip().splitlines()[-1] == "no torch", (out, result.stderr.decode())
    assert "alice\tspeaker 0\t1 clip(s), 0.4 s" in out
    import csm

    assert callable(csm.pipeline) and csm.CsmForConditionalGeneration.can_generate()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_finetune_on_an_absent_gpu_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["finetune", "--model", "m", "--data", "d.jsonl", "--out", "run", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["csm: error: --device cuda: device 'cuda' asked for, but this machine has no "
                                 "CUDA GPU usable by torch"], err  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def hour_long(tmp_path_factory):
    """An hour of silence as a small FLAC, once with a header that says so and once with one that does not."""
    sys.path.insert(0, os.path.dirname(__file__))
    from hostile import silent_flac

    folder = tmp_path_factory.mktemp("long")
    (folder / "said.flac").write_bytes(silent_flac(1.0, rate=24_000, channels=1, claim=3600.0))
    (folder / "unsaid.flac").write_bytes(silent_flac(70.0, claim=0.0))
    return folder


@pytest.mark.parametrize("clip", ["said.flac", "unsaid.flac"])
@pytest.mark.parametrize("command", ["voice", "say", "batch"])
def test_an_hour_long_clip_is_refused_in_one_line_everywhere(ckpt, tmp_path, hour_long, clip, command):
    path = str(hour_long / clip)
    if command == "voice":
        args = ["voice", "create", "long", path, "Silence."]
    elif command == "say":
        args = ["say", "Hi.", "-o", "out.wav", "--model", str(ckpt), "--context", path, "Silence.",
                "--device", "cpu"]  # fmt: skip
    else:
        line = {
            "id": "a",
            "turns": [{"speaker": 0, "text": "Silence.", "audio": path}, {"speaker": 1, "text": "Hi."}],
        }
        (tmp_path / "r.jsonl").write_text(__import__("json").dumps(line) + "\n")
        args = ["batch", "r.jsonl", "-o", "out", "--model", str(ckpt), "--device", "cpu"]
    result = run(args, tmp_path)
    err = result.stderr.decode()
    assert b"Traceback" not in result.stderr, err
    assert "60 s" in err or "60 s" in (tmp_path / "out" / "manifest.jsonl").read_text(), err
    assert not (tmp_path / "voices" / "long").exists()
    if command != "batch":
        assert result.returncode == 2, err


def test_a_symlink_planted_at_a_temporary_name_is_never_written_through(tmp_path):
    from csm.batch.output import _write_atomic
    from csm.cli.common import write_audio

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in (
        ".out.partial.wav",
        ".out.partial-1.wav",
        ".job.json.partial",
        f".out.partial-{os.getpid()}.wav",
    ):
        (shared / name).symlink_to(victim)
    write_audio(shared / "out.wav", np.zeros(2400, np.float32), 24000)
    _write_atomic(shared / "job.json", b"{}")
    from csm.batch.output import OutputDir

    OutputDir.write_audio(type("D", (), {"path": shared})(), "line.wav", np.zeros(2400, np.float32), 24000)
    assert victim.read_text() == "precious"
    assert read(shared / "out.wav").shape == (2400,) and (shared / "job.json").read_text() == "{}"
    assert read(shared / "line.wav").shape == (2400,)
    left = sorted(p.name for p in shared.iterdir() if not p.is_symlink())
    assert left == ["job.json", "line.wav", "out.wav"]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert (shared / "out.wav").stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would make it
