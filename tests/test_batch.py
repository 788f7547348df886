"""`csm batch` on the tiny demo checkpoint: files and manifest, bad lines, resume after a kill, batch
invariance, and the same job on a local Ray instance."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csm.batch import OutputDir, read_requests
from csm.batch.runner import Synthesizer
from csm.cli import main
from csm.demo import write_demo_checkpoint

RATE = 24000
TEXTS = [
    "Hello there.",
    "The first sentence is right here. And the second sentence follows it closely.",
    "Speech comes out one frame at a time.",
    "A short one.",
    "We listen, and then it answers in the voice of the speaker.",
    "Seven.",
    "The quick brown fox jumps over the lazy dog. Then it sleeps for a while, as foxes do.",
    "Nine lines of text and one bad one.",
    "How are you doing today?",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("batch") / "ckpt")


@pytest.fixture(autouse=True)
def voices(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_VOICES_DIR", str(tmp_path / "voices"))


@pytest.fixture(autouse=True)
def one_thread():
    """Every run here on one torch thread, as each Ray worker (--cpus-per-worker 1) and the killed child:
    the thread count moves the last bit of the codec's arithmetic, and one thread is fastest on the tiny model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lines(n: int | None = None):
    out = [{"id": f"u{i:02d}", "text": t} for i, t in enumerate(TEXTS)]
    out[2]["seed"] = 7
    out[3]["format"] = "flac"
    out[4]["speaker"] = 1
    return out[:n]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def batch(ckpt, requests, out, *extra):
    return main(["batch", str(requests), "--out", str(out), "--model", str(ckpt), "--device", "cpu",
                 "--dtype", "float32", "--max-seconds", "0.3", "--seed", "3", "-q", *extra])  # fmt: skip


def files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".wav", ".flac")}


def state(out):
    """Each id's current manifest row, without the timing that differs between runs."""
    rows = OutputDir(out).state()
    return {k: {f: v for f, v in r.items() if f != "generation_seconds"} for k, r in rows.items()}


def test_skip_bad_gives_nine_files_and_a_manifest_whose_seconds_match_the_files(ckpt, tmp_path):
    rows = lines()
    rows.insert(5, {"id": "empty", "text": "  "})
    requests = write(tmp_path / "req.jsonl", rows)
    assert batch(ckpt, requests, tmp_path / "out", "--skip-bad", "--batch-size", "4") == 1  # a line failed
    out = tmp_path / "out"
    assert len(files(out)) == 9
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 10
    failed = [r for r in manifest if r["status"] == "failed"]
    assert failed == [{"id": "empty", "line": 6, "status": "failed", "error": failed[0]["error"]}]
    assert "no text" in failed[0]["error"]
    for row in manifest:
        if row["status"] == "ok":
            info = sf.info(out / row["path"])
            assert info.samplerate == RATE and info.frames / RATE == pytest.approx(row["seconds"], abs=1e-4)
            assert row["frames"] > 0 and row["seed"] >= 0 and row["generation_seconds"] >= 0
    by_id = {r["id"]: r for r in manifest}
    assert by_id["u02"]["seed"] == 7 and by_id["u03"]["path"] == "u03.flac"
    assert by_id["u01"]["sentences"] == 2  # long text: sentence by sentence


def test_batch_size_one_and_four_in_another_order_give_identical_files(ckpt, tmp_path):
    rows = lines()
    write(tmp_path / "a.jsonl", rows)
    random.Random(0).shuffle(rows)
    write(tmp_path / "b.jsonl", rows)
    assert batch(ckpt, tmp_path / "a.jsonl", tmp_path / "one", "--batch-size", "1") == 0
    assert batch(ckpt, tmp_path / "b.jsonl", tmp_path / "four", "--batch-size", "4") == 0
    one, four = files(tmp_path / "one"), files(tmp_path / "four")
    assert len(one) == len(TEXTS) and one == four
    a, b = state(tmp_path / "one"), state(tmp_path / "four")
    assert {k: {**r, "line": 0} for k, r in a.items()} == {k: {**r, "line": 0} for k, r in b.items()}


def test_batched_decode_gives_the_same_audio_within_a_16_bit_step_and_is_recorded(ckpt, tmp_path):
    write(tmp_path / "a.jsonl", [r for r in lines() if r.get("format") != "flac"])
    assert batch(ckpt, tmp_path / "a.jsonl", tmp_path / "own", "--batch-size", "4") == 0
    assert (
        batch(ckpt, tmp_path / "a.jsonl", tmp_path / "shared", "--batch-size", "4", "--batched-decode") == 0
    )
    own, shared = files(tmp_path / "own"), files(tmp_path / "shared")
    assert own.keys() == shared.keys() and len(own) >= 4
    for name in own:
        a, _ = sf.read(io.BytesIO(own[name]), dtype="int16")
        b, _ = sf.read(io.BytesIO(shared[name]), dtype="int16")
        assert a.shape == b.shape and np.abs(a.astype(np.int32) - b).max() <= 1, name
    assert json.loads((tmp_path / "shared" / "job.json").read_text())["batched_decode"] is True
    assert batch(ckpt, tmp_path / "a.jsonl", tmp_path / "shared", "--batch-size", "4") == 2  # other settings


KILLER = """
import os, signal, sys
from csm.batch.output import OutputDir
append, count = OutputDir.append, [0]
def append_then_die(self, rows):
    append(self, rows)
    count[0] += len(rows)
    if count[0] >= {after}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crash or an OOM kill
OutputDir.append = append_then_die
from csm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_midway_then_rerun_gives_the_same_files_and_manifest_without_generating_a_line_twice(
    ckpt, tmp_path, monkeypatch
):
    requests = write(tmp_path / "req.jsonl", lines())
    assert batch(ckpt, requests, tmp_path / "whole", "--batch-size", "3") == 0

    out = tmp_path / "out"
    args = ["batch", str(requests), "--out", str(out), "--model", str(ckpt), "--device", "cpu", "--dtype",
            "float32", "--max-seconds", "0.3", "--seed", "3", "-q", "--batch-size", "3"]  # fmt: skip
    env = {**os.environ, "CSM_VOICES_DIR": str(tmp_path / "voices"), "OMP_NUM_THREADS": "1"}
    script = textwrap.dedent(KILLER.format(after=4))
    killed = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()
    first = {r["id"]: r for r in OutputDir(out).rows()}
    assert len(first) == 4 and all(r["status"] == "ok" for r in first.values())
    stamps = {id: os.stat(out / r["path"]).st_mtime_ns for id, r in first.items()}

    started = []
    start = Synthesizer._start
    monkeypatch.setattr(
        Synthesizer, "_start", lambda self, r, on_row: started.append(r.id) or start(self, r, on_row)
    )
    assert main(args) == 0
    assert not set(started) & set(first)  # nothing done before was generated again
    assert sorted(started + list(first)) == sorted(r["id"] for r in lines())
    assert {id: os.stat(out / r["path"]).st_mtime_ns for id, r in first.items()} == stamps
    assert files(out) == files(tmp_path / "whole")
    assert state(out) == state(tmp_path / "whole")
    assert len(OutputDir(out).rows()) == len(TEXTS)  # one row per line
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_rerun_retries_failed_lines_and_skips_done_ones(ckpt, tmp_path, monkeypatch):
    requests = write(tmp_path / "req.jsonl", lines(4))
    write_audio = OutputDir.write_audio

    def disk_full_for_u01(self, filename, audio, rate):
        if filename.startswith("u01."):
            raise OSError(28, "No space left on device")
        return write_audio(self, filename, audio, rate)

    monkeypatch.setattr(OutputDir, "write_audio", disk_full_for_u01)
    assert batch(ckpt, requests, tmp_path / "out") == 1  # a line failed: the exit status says so
    rows = OutputDir(tmp_path / "out").state()
    assert rows["u01"]["status"] == "failed" and "No space left" in rows["u01"]["error"]
    monkeypatch.setattr(OutputDir, "write_audio", write_audio)
    started = []
    start = Synthesizer._start
    monkeypatch.setattr(
        Synthesizer, "_start", lambda self, r, on_row: started.append(r.id) or start(self, r, on_row)
    )
    assert batch(ckpt, requests, tmp_path / "out") == 0
    assert started == ["u01"]
    assert all(r["status"] == "ok" for r in OutputDir(tmp_path / "out").state().values())


def test_bad_lines_stop_the_job_before_any_work_naming_their_lines(ckpt, tmp_path, capsys):
    rows = [*lines(3), "{not json", {"id": "u00", "text": "again"}]
    requests = write(tmp_path / "req.jsonl", rows)
    assert batch(ckpt, requests, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "req.jsonl:4: not valid JSON" in err and "req.jsonl:5: duplicate id 'u00' (first on line 1)" in err
    assert "nothing was generated" in err and "--skip-bad" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "row, match",
    [
        ({"id": "a", "text": "Hi.", "voice": "nobody"}, "unknown voice 'nobody'"),
        ({"id": "a", "text": "Hi.", "format": "aiff"}, "format 'aiff' is not one of wav, flac"),
        ({"id": "a", "text": ""}, "has no text"),
        ({"text": "Hi."}, "id None is missing"),
        ({"id": "../evil", "text": "Hi."}, "not a file name"),
        ({"id": "a", "text": "Hi.", "speeker": 1}, "unknown field(s) speeker"),
        ({"id": "a", "text": "Hi.", "speaker": -1}, "speaker must be a non-negative integer"),
        ({"id": "a", "text": "Hi.", "seed": "7"}, "seed must be a non-negative integer"),
        ([1, 2], "expected a JSON object"),
        ({"id": "d", "turns": [{"speaker": 0, "text": "Hi.", "audio": "nope.wav"}, {"speaker": 1, "text": "Yo."}]},
         "turn 0: clip not found"),
        ({"id": "d", "turns": [{"speaker": 0, "text": "Hi."}], "voices": {"1": "bob"}},
         "voice 'bob' is bound to speaker 1, who never speaks"),
        ({"id": "d", "turns": [{"speaker": 0, "text": " "}]}, "turn 0 has no text"),
        ({"id": "d", "turns": [{"speaker": 0, "text": "Hi.", "tone": "warm"}]}, "turn 0: a turn is"),
        ({"id": "d", "turns": [{"speaker": 0, "text": "Hi."}], "text": "Hi."}, '"text" or "turns"'),
        ({"id": "d", "turns": [{"speaker": 0, "text": "Hi."}], "speaker": 1}, 'takes no "speaker"'),
        ({"id": "d", "turns": [{"speaker": 0, "text": "Hi."}], "pause": -1}, "pause must be between 0 and 60"),
        ({"id": "d", "turns": []}, "turns must be a non-empty list"),
    ],
)  # fmt: skip
def test_each_bad_line_gets_a_clear_error_with_its_line_number(tmp_path, row, match):
    requests = write(tmp_path / "req.jsonl", [{"id": "ok", "text": "Fine."}, row])
    good, bad = read_requests(requests, job_seed=0)
    assert [g.id for g in good] == ["ok"]
    assert len(bad) == 1 and bad[0].line == 2 and match in bad[0].error


def test_a_line_seed_depends_on_the_job_seed_and_its_id_alone(tmp_path):
    requests = write(tmp_path / "req.jsonl", lines(3))
    reversed_requests = write(tmp_path / "rev.jsonl", lines(3)[::-1])
    seeds = {r.id: r.seed for r in read_requests(requests, job_seed=5)[0]}
    assert seeds == {r.id: r.seed for r in read_requests(reversed_requests, job_seed=5)[0]}
    assert seeds["u02"] == 7 and seeds["u00"] != seeds["u01"]
    assert seeds["u00"] != read_requests(requests, job_seed=6)[0][0].seed


def test_an_out_folder_of_other_files_or_another_jobs_settings_is_refused_untouched(ckpt, tmp_path, capsys):
    requests = write(tmp_path / "req.jsonl", lines(2))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert batch(ckpt, requests, mine) == 2
    assert "not a csm batch folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    assert batch(ckpt, requests, tmp_path / "out") == 0
    before = files(tmp_path / "out")
    assert batch(ckpt, requests, tmp_path / "out", "--temperature", "0.5") == 2
    err = capsys.readouterr().err
    assert "other settings (temperature: None there, 0.5 now)" in err
    assert files(tmp_path / "out") == before


def test_a_job_that_finished_no_line_may_start_again_with_other_settings(ckpt, tmp_path, capsys):
    requests = write(tmp_path / "req.jsonl", [{"id": "x", "text": ""}, *lines(1)])
    assert batch(ckpt, requests, tmp_path / "out", "--skip-bad", "--temperature", "-1") == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err and not (tmp_path / "out").exists()
    OutputDir.open(tmp_path / "out", {"model": "another", "seed": 3}).close()  # as if killed before any line
    assert batch(ckpt, requests, tmp_path / "out", "--skip-bad") == 1  # line 1 is bad
    assert json.loads((tmp_path / "out" / "job.json").read_text())["model"] == str(ckpt.resolve())
    assert OutputDir(tmp_path / "out").done() == {"u00"}


def test_unknown_voice_flag_and_missing_requests_file_are_one_line_errors(ckpt, tmp_path, capsys):
    requests = write(tmp_path / "req.jsonl", lines(1))
    assert batch(ckpt, requests, tmp_path / "out", "--voice", "ghost") == 2
    assert "unknown voice 'ghost'" in capsys.readouterr().err
    assert batch(ckpt, tmp_path / "missing.jsonl", tmp_path / "out") == 2
    assert "cannot read" in capsys.readouterr().err


def test_ray_without_ray_installed_says_how_to_install_it(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    requests = write(tmp_path / "req.jsonl", lines(1))
    assert batch(ckpt, requests, tmp_path / "out", "--ray") == 2
    assert "pip install 'csm-speech[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ray_gives_the_same_audio_per_id_as_one_process(ckpt, tmp_path):
    ray = pytest.importorskip("ray")
    dialogue = {
        "id": "talk",
        "turns": [{"speaker": 0, "text": "Hi there."}, {"speaker": 1, "text": "Hello!"}],
    }
    requests = write(tmp_path / "req.jsonl", [*lines(6), dialogue])
    assert batch(ckpt, requests, tmp_path / "local", "--batch-size", "2") == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        assert batch(ckpt, requests, tmp_path / "ray", "--batch-size", "2", "--ray", "--workers", "2") == 0
    finally:
        ray.shutdown()
    assert files(tmp_path / "ray") == files(tmp_path / "local") and len(files(tmp_path / "local")) == 7
    assert state(tmp_path / "ray") == state(tmp_path / "local")
    deadline = time.time() + 20
    while descendants() and time.time() < deadline:
        time.sleep(0.5)
    assert not descendants(), f"Ray left processes behind: {descendants()}"


def descendants() -> list[str]:
    """Commands of the live processes below this one (Linux /proc; empty elsewhere)."""
    parent, names = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if rest[0] != "Z":  # a zombie is gone, only not yet reaped
            pid = int(stat.parent.name)
            parent[pid], names[pid] = int(rest[1]), name
    mine, found = {os.getpid()}, True
    while found:
        found = {p for p, pp in parent.items() if pp in mine and p not in mine}
        mine |= found
    return sorted(names[p] for p in mine - {os.getpid()})


def test_bad_requests_are_reported_before_the_model_loads(tmp_path, capsys):
    requests = write(tmp_path / "req.jsonl", ['{"id": "a"}'])
    assert (
        main(["batch", str(requests), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]) == 2
    )
    assert "req.jsonl:1:" in capsys.readouterr().err


def test_a_lines_audio_is_what_the_pipeline_says_for_its_text_seed_and_voice(ckpt, tmp_path):
    from csm.pipeline import pipeline
    from csm.voice import Voice

    clip = np.sin(np.arange(9600) / 9.0).astype(np.float32) * 0.1
    Voice("alice", 1, [(clip, "A reference clip.")]).save(tmp_path / "voices" / "alice")
    rows = [dict(r, seed=11 + i) for i, r in enumerate(lines(2))]  # u01: two sentences, the second in context
    rows.append(
        {"id": "v", "text": "Spoken in a saved voice. Two sentences of it.", "voice": "alice", "seed": 3}
    )
    assert batch(ckpt, write(tmp_path / "req.jsonl", rows), tmp_path / "out", "--batch-size", "2") == 0
    tts = pipeline("text-to-audio", model=ckpt, device="cpu", dtype="float32")
    for row in rows:
        with pytest.warns(UserWarning, match="without end-of-audio"):  # random weights never end a sentence
            expected = tts(row["text"], seed=row["seed"], voice=row.get("voice"), max_seconds=0.3)["audio"]
        audio, _ = sf.read(tmp_path / "out" / f"{row['id']}.wav", dtype="float32")
        assert len(audio) == len(expected)
        np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=1.01 / 32767)  # 16-bit rounding


def test_the_run_ends_with_a_summary_and_a_rerun_says_what_was_done_before(ckpt, tmp_path, capsys):
    requests = write(tmp_path / "req.jsonl", lines(2))
    argv = ["batch", str(requests), "--out", str(tmp_path / "out"), "--model", str(ckpt), "--device", "cpu",
            "--max-seconds", "0.3", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "csm batch: 2 line(s) to generate, 0 done before, 0 bad; seed 3" in err
    seconds = sum(r["seconds"] for r in OutputDir(tmp_path / "out").rows())
    assert f"csm batch: 2 ok, 0 failed, 0 done before, 0 bad line(s): {seconds:.1f} s of audio in" in err
    assert "audio-s/s" in err and "lines/s" in err
    assert main(argv) == 0
    assert "csm batch: 0 ok, 0 failed, 2 done before" in capsys.readouterr().err


def test_a_dialogue_line_is_the_mix_csm_dialogue_makes_with_its_turns_in_the_manifest(ckpt, tmp_path):
    from csm.pipeline import pipeline
    from csm.voice import Voice

    clip = np.sin(np.arange(9600) / 7.0).astype(np.float32) * 0.1
    Voice("bob", 0, [(clip, "A reference clip.")]).save(tmp_path / "voices" / "bob")
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "q.wav", clip, RATE)
    turns = [
        {"speaker": 1, "text": "So, how did it go?", "audio": "clips/q.wav"},
        {"speaker": 0, "text": "Better than I hoped. The first part was easy."},
        {"speaker": 1, "text": "Great to hear."},
    ]
    rows = [*lines(2), {"id": "talk", "turns": turns, "voices": {"0": "bob"}, "pause": 0.2, "seed": 5}]
    assert batch(ckpt, write(tmp_path / "req.jsonl", rows), tmp_path / "out", "--batch-size", "2") == 0
    row = OutputDir(tmp_path / "out").state()["talk"]
    audio, _ = sf.read(tmp_path / "out" / "talk.wav", dtype="float32")
    assert row["status"] == "ok" and row["seconds"] == pytest.approx(len(audio) / RATE, abs=1e-4)
    assert [(t["index"], t["speaker"], t["seed"]) for t in row["turns"]] == [(1, 0, 6), (2, 1, 7)]
    assert row["turns"][1]["start"] == pytest.approx(row["turns"][0]["end"] + 0.2, abs=1e-4)

    tts = pipeline("text-to-audio", model=ckpt, device="cpu", dtype="float32")
    given = [dict(t, audio=str(tmp_path / t["audio"])) if "audio" in t else t for t in turns]
    with pytest.warns(UserWarning, match="without end-of-audio"):
        talk = tts.converse(given, voices={0: "bob"}, seed=5, pause=0.2, max_seconds=0.3)
    assert len(audio) == len(talk.audio)
    np.testing.assert_allclose(audio, np.clip(talk.audio, -1, 1), atol=1.01 / 32767)
    assert row["turns"] == talk.manifest["turns"]


def test_a_line_changed_since_its_audio_was_made_is_made_again_and_said(ckpt, tmp_path, monkeypatch, capsys):
    rows = lines(4)
    requests = write(tmp_path / "req.jsonl", rows)
    out = tmp_path / "out"
    assert batch(ckpt, requests, out) == 0
    before = files(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rows[0]["text"] = "Something else entirely."
    rows[1]["speaker"] = 2
    rows[3].pop("format")  # u03.flac becomes u03.wav
    write(requests, rows)
    started = []
    start = Synthesizer._start
    monkeypatch.setattr(
        Synthesizer, "_start", lambda self, r, on_row: started.append(r.id) or start(self, r, on_row)
    )
    capsys.readouterr()
    assert main(["batch", str(requests), "--out", str(out), "--model", str(ckpt), "--device", "cpu",
                 "--dtype", "float32", "--max-seconds", "0.3", "--seed", "3"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "3 line(s) changed since their audio was made, made again: u00 (line 1), u01 (line 2), u03" in err
    assert sorted(started) == ["u00", "u01", "u03"]
    after = files(out)
    assert after["u02.wav"] == before["u02.wav"] and (out / "u02.wav").stat().st_mtime_ns == stamps["u02.wav"]
    assert after["u00.wav"] != before["u00.wav"] and after["u01.wav"] != before["u01.wav"]
    assert "u03.flac" not in after and "u03.wav" in after  # the old format's file is gone
    current = OutputDir(out).state()
    assert {r["path"] for r in current.values()} == set(after)
    started.clear()
    assert batch(ckpt, requests, out) == 0 and started == []  # now all of them are what was asked


def test_a_changed_line_keeps_its_old_file_until_the_new_one_is_written(ckpt, tmp_path, monkeypatch):
    rows = lines(2)
    requests = write(tmp_path / "req.jsonl", rows)
    out = tmp_path / "out"
    assert batch(ckpt, requests, out) == 0
    old = (out / "u00.wav").read_bytes()
    write(requests, [dict(rows[0], text="Changed."), rows[1]])
    write_audio = OutputDir.write_audio

    def disk_full(self, filename, audio, rate):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OutputDir, "write_audio", disk_full)
    assert batch(ckpt, requests, out) == 1
    assert (out / "u00.wav").read_bytes() == old
    monkeypatch.setattr(OutputDir, "write_audio", write_audio)
    assert batch(ckpt, requests, out) == 0 and (out / "u00.wav").read_bytes() != old


def test_a_voice_folder_is_never_written_into_codes_stay_in_memory(ckpt, tmp_path):
    from csm.voice import Voice

    clip = np.sin(np.arange(9600) / 9.0).astype(np.float32) * 0.1
    alice = Voice("alice", 1, [(clip, "A reference clip.")]).save(tmp_path / "voices" / "alice")
    bob = Voice("bob", 0, [(clip[::-1].copy(), "Another clip.")]).save(tmp_path / "elsewhere" / "bob")
    listing = {p: {f.name: f.stat().st_mtime_ns for f in p.iterdir()} for p in (alice, bob)}
    dialogue = {"id": "d", "turns": [{"speaker": 0, "text": "Hi."}, {"speaker": 1, "text": "Yo."}],
                "voices": {"0": "alice", "1": str(bob)}}  # fmt: skip
    rows = [
        {"id": "a", "text": "In alice's voice.", "voice": "alice"},
        {"id": "b", "text": "Default."},
        dialogue,
    ]
    requests = write(tmp_path / "req.jsonl", rows)
    assert batch(ckpt, requests, tmp_path / "out", "--voice", str(bob)) == 0
    assert {p: {f.name: f.stat().st_mtime_ns for f in p.iterdir()} for p in (alice, bob)} == listing
    assert not list((tmp_path / "out").glob("**/codes.pt"))


def test_skip_bad_exits_1_and_a_rerun_does_not_repeat_the_bad_rows(ckpt, tmp_path, capsys):
    requests = write(tmp_path / "req.jsonl", [*lines(2), "{not json", {"id": "x", "text": " "}])
    out = tmp_path / "out"
    assert batch(ckpt, requests, out, "--skip-bad") == 1  # lines failed: the exit status says so
    assert "fix the 2 bad line(s)" in capsys.readouterr().err
    rows = OutputDir(out).rows()
    assert [(r["line"], r["status"]) for r in rows if r["status"] == "failed"] == [
        (3, "failed"),
        (4, "failed"),
    ]
    assert batch(ckpt, requests, out, "--skip-bad") == 1
    assert OutputDir(out).rows() == rows  # the same bad lines: no new rows
    write(requests, [*lines(2), {"id": "x", "text": "Fixed."}])
    assert batch(ckpt, requests, out) == 0
    assert OutputDir(out).state()["x"]["status"] == "ok"


def test_text_that_is_not_utf8_is_a_bad_line_named_by_its_number(ckpt, tmp_path, capsys):
    requests = tmp_path / "req.jsonl"
    requests.write_bytes(
        b'{"id": "a", "text": "Fine."}\n{"id": "b", "text": "caf\xe9"}\n{"id": "c", "text": "Ok."}\n'
    )
    good, bad = read_requests(requests, job_seed=0)
    assert [g.id for g in good] == ["a", "c"]
    assert [(b.line, b.error) for b in bad] == [
        (2, "not valid UTF-8 (byte 0xe9 at column 25); save the file as UTF-8")
    ]
    assert batch(ckpt, requests, tmp_path / "out") == 2
    assert "req.jsonl:2: not valid UTF-8" in capsys.readouterr().err


def test_a_csv_file_is_read_by_its_header(ckpt, tmp_path):
    requests = tmp_path / "lines.csv"
    requests.write_bytes(
        b"\xef\xbb\xbfid,text,speaker,seed,format\n"  # a spreadsheet's byte-order mark
        b'a1,"Hello, there.",1,7,flac\n'
        b"\n"
        b'a2,"Two lines\nof text.",,,\n'
        b"a3,Three.,x,,\n"
        b"a4,Four.,0,1,wav,extra\n"
    )
    good, bad = read_requests(requests, job_seed=0)
    assert [(g.id, g.line, g.text, g.speaker, g.seed, g.format) for g in good] == [
        ("a1", 2, "Hello, there.", 1, 7, "flac"),
        ("a2", 4, "Two lines\nof text.", None, good[1].seed, "wav"),
    ]
    assert [(b.line, b.id) for b in bad] == [(6, "a3"), (7, None)]
    assert "speaker must be a non-negative integer, got 'x'" in bad[0].error and "more than" in bad[1].error
    assert batch(ckpt, requests, tmp_path / "out", "--skip-bad") == 1
    assert {p.name for p in (tmp_path / "out").iterdir() if p.suffix in (".wav", ".flac")} == {
        "a1.flac",
        "a2.wav",
    }


@pytest.mark.parametrize(
    "header, match",
    [("id,words\n", "unknown column(s) 'words'"), ("text\n", "no id or text column"),
     ("id,text,turns\n", "a dialogue needs a JSON-lines file")],
)  # fmt: skip
def test_a_csv_without_the_columns_it_needs_is_refused_by_its_header(tmp_path, header, match):
    (tmp_path / "lines.csv").write_text(header + "a,Hi.\n")
    with pytest.raises(ValueError, match=r"lines\.csv:1: .*") as e:
        read_requests(tmp_path / "lines.csv", job_seed=0)
    assert match in str(e.value)


def test_a_csv_named_otherwise_is_told_to_be_named_csv(tmp_path):
    (tmp_path / "lines.txt").write_text("id,text\na,Hi.\n")
    _, bad = read_requests(tmp_path / "lines.txt", job_seed=0)
    assert "a CSV file must be named *.csv" in bad[0].error


def test_an_out_folder_that_cannot_be_made_is_one_clear_line_before_the_model_loads(tmp_path, capsys):
    requests = write(tmp_path / "req.jsonl", lines(1))
    (tmp_path / "a-file").write_text("")
    for out in ("/proc/corpus", str(tmp_path / "a-file" / "corpus")):
        code = main(["batch", str(requests), "--out", out, "--model", str(tmp_path / "no-model")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"--out {out}: cannot create this folder" in err[0] and "Errno" not in err[0]


def test_temperature_zero_is_greedy_for_text_and_dialogue_lines(ckpt, tmp_path):
    dialogue = {"id": "d", "turns": [{"speaker": 0, "text": "Hi."}, {"speaker": 1, "text": "Yo."}]}
    requests = write(tmp_path / "req.jsonl", [*lines(2), dialogue])
    assert batch(ckpt, requests, tmp_path / "out", "--temperature", "0") == 0
    assert json.loads((tmp_path / "out" / "job.json").read_text())["temperature"] == 0
    assert all(r["status"] == "ok" for r in OutputDir(tmp_path / "out").state().values())


def test_ctrl_c_says_how_many_lines_are_done_and_a_rerun_makes_the_rest(ckpt, tmp_path, monkeypatch, capsys):
    requests = write(tmp_path / "req.jsonl", lines(6))
    append, count = OutputDir.append, [0]

    def append_then_ctrl_c(self, rows):
        append(self, rows)
        count[0] += len(rows)
        if count[0] >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(OutputDir, "append", append_then_ctrl_c)
    assert batch(ckpt, requests, tmp_path / "out", "--batch-size", "1") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("csm batch: interrupted: 2 of 6 line(s) made in this run, 0 before; 4 left"), (
        err
    )
    assert "4 left" in err[-1] and "rerun the same command" in err[-1], err
    assert len(OutputDir(tmp_path / "out").done()) == 2
    monkeypatch.setattr(OutputDir, "append", append)
    assert batch(ckpt, requests, tmp_path / "out", "--batch-size", "1") == 0
    assert len(OutputDir(tmp_path / "out").done()) == 6
