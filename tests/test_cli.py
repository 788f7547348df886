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
            done = re.findall(r"\| *(\d+)/400 ", "".join(err))
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
