"""The output folder of `csm batch`: audio files written so that an interruption never leaves a torn one, and
`manifest.jsonl`, appended one row per line only once that line's file is in place.

    DIR/job.json          the settings that decide the audio (model, seed, sampling, defaults)
    DIR/manifest.jsonl    one JSON row per finished line, appended, never rewritten
    DIR/<id>.<format>     the audio of each `ok` line

A line's current state is its latest `ok` row, else its latest row. A rerun skips the ids whose latest `ok`
row names a file that is there, and runs every other line again (failed ones, and ones never finished).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path

import numpy as np

MANIFEST = "manifest.jsonl"
JOB = "job.json"
LOCK = ".csm-batch.lock"
PARTIAL = ".partial"  # in the temporary name of a file being written: `.<id>.partial.<format>`


class OutputError(ValueError):
    """The output folder cannot be used for this job (and nothing in it was changed)."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file of mkstemp's (O_EXCL, an unpredictable name) in its folder:
    a symlink planted at a predictable name is never written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{PARTIAL}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


class OutputDir:
    """A batch job's output folder. `open` checks it belongs to this job (or is new) and takes its lock;
    `attach` is for workers that write files into a folder a driver has opened."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.manifest = self.path / MANIFEST
        self._lock = None

    @classmethod
    def attach(cls, path: str | os.PathLike) -> OutputDir:
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike, settings: dict) -> OutputDir:
        """Create or reopen the folder for a job with `settings`; refuses a folder that holds anything else:
        other files without a job, or a job with other settings (its audio would not match)."""
        out = cls(path)
        if out.path.exists() and not out.path.is_dir():
            raise OutputError(f"--out {out.path} is a file; give a folder (new, empty, or an earlier job's)")
        job = out.job_settings()
        if job is None and out.path.is_dir() and any(p.name != LOCK for p in out.path.iterdir()):
            raise OutputError(
                f"--out {out.path} holds files but no {JOB}: it is not a csm batch folder; "
                "give a new or empty folder (nothing there was touched)"
            )
        if job is not None and job != settings and not any(r.get("status") == "ok" for r in out.rows()):
            job = None  # nothing was made under the old settings: the job starts again with these
        if job is not None and job != settings:
            diff = ", ".join(
                f"{k}: {job.get(k)!r} there, {settings.get(k)!r} now"
                for k in sorted(set(job) | set(settings))
                if job.get(k) != settings.get(k)
            )
            raise OutputError(
                f"--out {out.path} holds a job made with other settings ({diff}); rerun with those settings "
                "to resume it, or give another --out"
            )
        try:
            out.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(
                f"--out {out.path}: cannot create this folder ({e.strerror}); give a folder you can write, "
                "e.g. --out ./corpus"
            ) from None
        try:
            out._take_lock()
            if job is None:
                _write_atomic(out.path / JOB, (json.dumps(settings, indent=2) + "\n").encode())
        except OSError as e:
            out.close()
            raise OutputError(
                f"--out {out.path}: cannot write in this folder ({e.strerror}); give a folder you can write"
            ) from None
        out.remove_partials()
        return out

    def job_settings(self) -> dict | None:
        """The settings of the job this folder holds, or None."""
        try:
            return json.loads((self.path / JOB).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise OutputError(f"cannot read {self.path / JOB}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise OutputError(f"cannot read {self.path / JOB}: {e}") from None

    def _take_lock(self) -> None:
        self._lock = open(self.path / LOCK, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise OutputError(
                f"another csm batch is writing to {self.path}; wait for it or use another --out"
            ) from None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove_partials(self) -> None:
        """Delete files a killed run was writing (never renamed into place, never in the manifest)."""
        for tmp in self.path.glob(f".*{PARTIAL}*"):
            tmp.unlink(missing_ok=True)

    # ---- manifest ----------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """Every row of the manifest, in order; a torn last line (a run killed while appending) is left out."""
        try:
            lines = self.manifest.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines):
                    raise OutputError(
                        f"{self.manifest}:{n} is not valid JSON; fix or remove that line"
                    ) from None
        return rows

    def state(self) -> dict[str, dict]:
        """Each id's current row: its latest `ok` row, else its latest row."""
        state: dict[str, dict] = {}
        for row in self.rows():
            id = row.get("id")
            if id is not None and (row.get("status") == "ok" or state.get(id, {}).get("status") != "ok"):
                state[id] = row
        return state

    def replaced(self, old: dict, new: dict) -> None:
        """After a line made again (`new`, its file in place): remove the file of its previous `ok` row
        (`old`) when it had another name (another format), so the folder holds each line's current audio."""
        path = old.get("path")
        if old.get("status") == "ok" and path and path != new.get("path") and "/" not in path:
            (self.path / path).unlink(missing_ok=True)

    def done(self) -> set[str]:
        """Ids whose latest `ok` row names a file that is there: a rerun skips them."""
        return {
            id
            for id, row in self.state().items()
            if row.get("status") == "ok" and (self.path / row.get("path", "")).is_file()
        }

    def append(self, rows: list[dict]) -> None:
        """Append rows (one write, flushed and synced); starts on a new line after a torn one."""
        if not rows:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        with open(self.manifest, "ab") as f:
            if f.tell() > 0:
                with open(self.manifest, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    # ---- audio -------------------------------------------------------------------------------------

    def write_audio(self, filename: str, audio: np.ndarray, sampling_rate: int) -> Path:
        """Write `DIR/filename` under a temporary name in the same folder, sync it, then rename it into place."""
        from ..audio import save_audio_atomic

        path = self.path / filename
        save_audio_atomic(path, audio, sampling_rate, sync=True)  # mkstemp's temporary file (O_EXCL)
        _fsync_dir(self.path)
        return path
