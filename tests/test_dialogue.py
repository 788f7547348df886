"""Dialogue scripts (text, JSON, JSON Lines) and `csm dialogue`: the mix, the manifest, per-turn files, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from hostile import peak_rss_growth, silent_flac

from csm.cli import main
from csm.demo import write_demo_checkpoint
from csm.dialogue import ScriptError, load_script, parse_voice_bindings

SCRIPT = (
    "# Two friends meet.\n[0] Hello there.\n\n[1] Oh, hi! How are you?\n  # an aside\n[0] Fine, thanks.\n"
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


def write_clip(path, seconds=0.3):
    audio = (np.random.default_rng(0).standard_normal(int(24000 * seconds)) * 0.1).astype(np.float32)
    sf.write(path, audio, 24000)
    return audio


# ---- the script format -------------------------------------------------------------------------------


def test_a_text_script_skips_blank_lines_and_comments_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "talk.txt"
    path.write_text(SCRIPT)
    turns = load_script(path)
    assert [(t.speaker, t.text, t.line) for t in turns] == [
        (0, "Hello there.", 2),
        (1, "Oh, hi! How are you?", 4),
        (0, "Fine, thanks.", 6),
    ]
    assert all(t.audio is None for t in turns)


def test_json_and_json_lines_scripts_read_clips_relative_to_the_script(tmp_path):
    (tmp_path / "clips").mkdir()
    clip = write_clip(tmp_path / "clips" / "hi.wav")
    turns = [
        {"speaker": 0, "text": "Hi, it's me.", "audio": "clips/hi.wav"},
        {"speaker": "1", "text": "Oh, hello!"},
    ]
    (tmp_path / "talk.json").write_text(json.dumps(turns, indent=2))
    (tmp_path / "talk.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\n")
    for name, lines in (("talk.json", [2, 7]), ("talk.jsonl", [1, 2])):
        parsed = load_script(tmp_path / name)
        assert [(t.speaker, t.text, t.line) for t in parsed] == [
            (0, "Hi, it's me.", lines[0]),
            (1, "Oh, hello!", lines[1]),
        ]
        np.testing.assert_allclose(parsed[0].audio, clip, atol=1e-4)
        assert parsed[1].audio is None


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("a.txt", "[0] Hi.\nhello there\n", r"a\.txt:2: expected `\[SPEAKER\] text`"),
        ("a.txt", "[0] Hi.\n\n[1]   \n", r"a\.txt:3: the turn of speaker 1 has no text"),
        ("a.txt", "# only a comment\n", r"a\.txt:1: the script has no turns"),
        (
            "a.json",
            '[\n {"speaker": 0, "text": "Hi."},\n {"speaker": 1, "text": ""}\n]',
            r"a\.json:3: the turn of speaker 1 has no text",
        ),
        (
            "a.json",
            '[\n {"speaker": 0, "text": "Hi.", "audio": "nope.wav"}\n]',
            r"a\.json:2: audio file nope\.wav not found",
        ),
        (
            "a.json",
            '[\n {"speaker": 0, "text": "Hi."},\n {"speaker": 0 "text": "x"}\n]',
            r"a\.json:3: not valid JSON",
        ),
        ("a.json", '[{"speaker": 0, "text": "Hi.", "voice": "x"}]', r"a\.json:1: unknown key\(s\) voice"),
        ("a.json", '{"turns": []}', r"a\.json:1: a JSON script is a list"),
        ("a.json", '[{"speaker": -2, "text": "Hi."}]', r"a\.json:1: speaker must be"),
        ("a.jsonl", '{"speaker": 0, "text": "Hi."}\n\n[1, 2]\n', r"a\.jsonl:3: a turn is an object"),
    ],
)
def test_bad_scripts_name_the_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ScriptError, match=match) as e:
        load_script(tmp_path / name)
    assert "\n" not in str(e.value)


def test_a_bad_clip_names_the_file_and_line(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"not audio")
    (tmp_path / "a.json").write_text('[\n  {"speaker": 0, "text": "Hi.", "audio": "noise.wav"}\n]')
    with pytest.raises(ScriptError, match=r"a\.json:2: cannot read noise\.wav"):
        load_script(tmp_path / "a.json")


@pytest.mark.parametrize(
    ("clip", "match"),
    [
        # The files: a 30-minute clip (5.9 GB at peak before), a 60-minute 96 kHz stereo FLAC (11.5 GB
        # and still decoding at 300 s). Headers that say so are enough: refused before decoding.
        (
            silent_flac(1.0, rate=24_000, channels=1, claim=1800.0),
            r"long\.flac is 1800\.0 s long; the limit is 60 s",
        ),
        (silent_flac(1.0, claim=3600.0), r"long\.flac is 3600\.0 s long; the limit is 60 s"),
        (silent_flac(70.0, claim=0.0), r"long\.flac holds more than 60 s of audio; the limit is 60 s"),
    ],
)
def test_context_audio_longer_than_the_limit_names_the_line_and_is_never_decoded_whole(tmp_path, clip, match):
    (tmp_path / "long.flac").write_bytes(clip)
    (tmp_path / "a.json").write_text(
        '[\n  {"speaker": 0, "text": "Hi.", "audio": "long.flac"},\n {"speaker": 1, "text": "Yo."}\n]'
    )
    with peak_rss_growth() as growth:
        with pytest.raises(ScriptError, match=r"a\.json:2: .*" + match):
            load_script(tmp_path / "a.json")
        assert growth() < 100


def test_a_folder_or_fifo_as_context_audio_says_what_it_is(tmp_path):
    (tmp_path / "clips").mkdir()
    os.mkfifo(tmp_path / "pipe.wav")
    for clip, match in (("clips", "is a folder, not an audio file"), ("pipe.wav", "not a regular file")):
        (tmp_path / "a.json").write_text(json.dumps([{"speaker": 0, "text": "Hi.", "audio": clip}]))
        with pytest.raises(ScriptError, match=r"a\.json:1: cannot read .*" + match):
            load_script(tmp_path / "a.json")


def test_voice_bindings_name_speakers_of_the_script(tmp_path):
    (tmp_path / "t.txt").write_text("[0] Hi.\n[1] Yo.\n")
    turns = load_script(tmp_path / "t.txt")
    assert parse_voice_bindings(["0=alice", "1=bob"], turns, "t.txt") == {0: "alice", 1: "bob"}
    with pytest.raises(ScriptError, match="speaker 2 never speaks in t.txt"):
        parse_voice_bindings(["2=carol"], turns, "t.txt")
    with pytest.raises(ScriptError, match="SPEAKER=VOICE"):
        parse_voice_bindings(["alice"], turns, "t.txt")
    with pytest.raises(ScriptError, match="twice"):
        parse_voice_bindings(["0=alice", "0=bob"], turns, "t.txt")
    for speaker in ["²", "٣", "1" * 5000]:  # str.isdigit holds, int() fails or reads another script
        with pytest.raises(ScriptError, match="SPEAKER=VOICE"):
            parse_voice_bindings([f"{speaker}=alice"], turns, "t.txt")


def test_speaker_ids_are_ascii_digits_or_ints():
    from csm.conversation import speaker_id

    assert speaker_id(" 3 ") == speaker_id(3) == 3
    for value in ["²", "٣", "１", "1" * 5000, "-1", "", -1, True, 1.0]:
        with pytest.raises(ValueError, match="non-negative integer speaker id"):
            speaker_id(value)


# ---- `csm dialogue` ----------------------------------------------------------------------------------


def read_int16(path):
    audio, rate = sf.read(path, dtype="int16")
    assert rate == 24000
    return audio


def test_dialogue_writes_the_mix_the_manifest_and_per_turn_files_that_match(
    ckpt, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    clip = write_clip(tmp_path / "given.wav")
    (tmp_path / "talk.json").write_text(
        json.dumps(
            [
                {"speaker": 0, "text": "Hello there.", "audio": "given.wav"},
                {"speaker": 1, "text": "Oh, hi! How are you?"},
                {"speaker": 0, "text": "Fine, thanks."},
            ]
        )
    )
    args = ["dialogue", "talk.json", "-o", "out/talk.wav", "--model", str(ckpt), "--seed", "3"]
    (tmp_path / "out").mkdir()
    assert main([*args, "--max-seconds", "0.3", "--pause", "0.2", "--turns-dir", "out/turns"]) == 0
    manifest = json.loads((tmp_path / "out" / "talk.json").read_text())
    assert manifest["kind"] == "csm.dialogue" and manifest["audio"] == "talk.wav" and manifest["seed"] == 3
    mix = read_int16(tmp_path / "out" / "talk.wav")
    entries = manifest["turns"]
    assert [(e["index"], e["speaker"], e["line"], e["seed"]) for e in entries] == [(1, 1, 1, 4), (2, 0, 1, 5)]
    lengths = []
    for e in entries:
        turn = read_int16(tmp_path / "out" / e["file"])
        start, end = round(e["start"] * 24000), round(e["end"] * 24000)
        np.testing.assert_array_equal(mix[start:end], turn)
        assert len(turn) == e["frames"] * 1920
        lengths.append(len(turn))
    assert len(mix) == sum(lengths) + round(0.2 * 24000)
    assert manifest["seconds"] == pytest.approx(len(mix) / 24000)
    assert len(clip) and "seed" not in capsys.readouterr().err  # the seed was given: not printed

    # The same seed again gives the same file; --stream gives the same audio with the same pauses.
    assert main([*args, "-q", "--max-seconds", "0.3", "--pause", "0.2"]) == 0
    np.testing.assert_array_equal(read_int16(tmp_path / "out" / "talk.wav"), mix)


def test_dialogue_streams_pcm_turn_by_turn_to_stdout(ckpt, tmp_path, monkeypatch, capfdbinary):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "talk.txt").write_text(SCRIPT)
    base = ["dialogue", "talk.txt", "--model", str(ckpt), "--seed", "1", "-q", "--max-seconds", "0.3"]
    assert main([*base, "-o", "talk.wav"]) == 0
    mix = read_int16(tmp_path / "talk.wav")
    capfdbinary.readouterr()
    assert main([*base, "--stream"]) == 0
    streamed = np.frombuffer(capfdbinary.readouterr().out, dtype="<i2")
    assert streamed.shape == mix.shape
    assert np.abs(streamed.astype(int) - mix).max() <= 40  # streamed decoding, same codes


@pytest.mark.parametrize(
    ("files", "args", "match"),
    [
        ({"talk.txt": "[0] Hi.\n[x] Yo.\n"}, ["talk.txt", "-o", "t.wav"], "talk.txt:2: expected"),
        (
            {"talk.txt": "[0] Hi.\n"},
            ["talk.txt", "-o", "t.wav", "--voice", "1=bob"],
            "speaker 1 never speaks",
        ),
        (
            {"talk.txt": "[0] Hi.\n"},
            ["talk.txt", "-o", "t.wav", "--voice", "0=nobody"],
            "no voice named 'nobody'",
        ),
        ({"talk.txt": "[0] Hi.\n"}, ["talk.txt"], "say where to write"),
        ({"talk.txt": "[0] Hi.\n"}, ["talk.txt", "--stream", "-o", "t.wav"], "--stream writes to stdout"),
        (
            {"talk.json": '[{"speaker": 0, "text": "Hi."}]'},
            ["talk.json", "-o", "talk.wav"],
            "would overwrite the script",
        ),
        (
            {"talk.txt": "[0] Hi.\n", "t.json": "{}"},
            ["talk.txt", "-o", "t.wav"],
            "not a csm dialogue manifest",
        ),
        ({}, ["missing.txt", "-o", "t.wav"], "cannot read the script missing.txt"),
    ],
)
def test_dialogue_errors_are_one_line(tmp_path, monkeypatch, capsys, files, args, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSM_VOICES_DIR", str(tmp_path / "voices"))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(["dialogue", *args, "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "t.json").read_text() == "{}" if "t.json" in files else True


def test_a_turn_that_cannot_fit_is_reported_at_its_line(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "talk.txt").write_text("# 170 s of frames cannot fit in 2048 positions:\n\n[0] Hi.\n")
    args = ["dialogue", "talk.txt", "-o", "t.wav", "--model", str(ckpt), "--seed", "0", "-q"]
    assert main([*args, "--max-seconds", "170"]) == 2
    err = capsys.readouterr().err
    assert "talk.txt:3: the text and its context take" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_keeps_the_finished_turns_in_a_valid_mix_and_manifest(ckpt, tmp_path, monkeypatch, capsys):
    from csm.conversation import Conversation

    monkeypatch.chdir(tmp_path)
    (tmp_path / "talk.txt").write_text("".join(f"[{i % 2}] This is turn number {i}.\n" for i in range(6)))
    add, calls = Conversation.add, []

    def add_then_interrupt(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C while the fourth turn is spoken
            raise KeyboardInterrupt
        return add(self, *a, **k)

    monkeypatch.setattr(Conversation, "add", add_then_interrupt)
    args = ["dialogue", "talk.txt", "-o", "talk.wav", "--manifest", "meta/talk-manifest.json"]
    (tmp_path / "meta").mkdir()
    code = main([*args, "--model", str(ckpt), "--seed", "3", "--max-seconds", "0.3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130, err
    assert (
        err[-1].startswith("csm: interrupted: wrote the 3 finished turn(s) (")
        and "from line 4 of talk.txt" in err[-1]
    )
    manifest = json.loads((tmp_path / "meta" / "talk-manifest.json").read_text())
    assert manifest["interrupted"] is True and manifest["turns_not_spoken"] == 3
    assert manifest["audio"] == "../talk.wav" and [e["line"] for e in manifest["turns"]] == [1, 2, 3]
    mix = read_int16(tmp_path / "talk.wav")  # a valid file holding the three turns and their pauses
    assert len(mix) == round(manifest["seconds"] * 24000)
    assert not (tmp_path / "talk.json").exists()
    assert not [p for p in tmp_path.rglob("*.partial*")]


def test_manifest_flag_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "talk.txt").write_text("[0] Hello.\n")
    for manifest, match in (("m.txt", "give a .json name"), ("nowhere/m.json", "does not exist")):
        code = main(
            ["dialogue", "talk.txt", "-o", "t.wav", "--manifest", manifest, "--model", "no-such-model"]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and match in err[-1], err


def test_no_room_for_the_mix_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100_000, 100_000))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "talk.txt").write_text("[0] Hello there, how are you doing today?\n[1] Fine.\n")
    code = main(["dialogue", "talk.txt", "-o", "talk.wav", "--model", "no-such-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "-o talk.wav: 0.1 MB free in" in err[-1], err


@pytest.mark.parametrize(
    "line, words",
    [
        ("[٣] Hello.", "expected `.SPEAKER. text`"),
        ("[²] Hello.", "expected"),
        ("[" + "9" * 5000 + "] Hi.", "5000 digits"),
    ],
)
def test_text_script_speaker_ids_are_ascii_digits_with_file_and_line(line, words):
    from csm.dialogue import ScriptError, _text_turns

    with pytest.raises(ScriptError, match=words) as e:
        _text_turns("[0] First.\n" + line, "script.txt")
    assert str(e.value).startswith("script.txt:2:") and len(str(e.value)) < 200
