"""Many lines through one `BatchCore`: rows share every frame, a row that finishes is refilled at once.

A line is spoken sentence by sentence as `csm say` does: each sentence is a row job whose prompt holds the
sentences before it (their text and the codes generated for them); when a sentence ends, the line's next one
takes the row it leaves. Each job draws from its own generator seeded with the line's seed + the sentence's
index, so a line's audio depends on its seed alone, not on what runs beside it or in which order.

A dialogue line (`turns`) is spoken by `csm.conversation.converse`, as `csm dialogue` speaks a script, after
the batched lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..batching import BatchCore, RowJob
from ..chunking import CROSSFADE_MS, MAX_CHUNK_CHARS, crossfade_join, split_sentences
from ..generate import GenerationConfig
from ..planner import Turn
from ..voice import Voice
from .output import OutputDir
from .requests import LineRequest

CHUNK_FRAMES = 8  # frames decoded at a time per row; fixed, so the audio never depends on the run


@dataclass
class JobSettings:
    """What decides a job's audio besides each line: stored in DIR/job.json, the same on every rerun."""

    model: str
    seed: int
    speaker: int | None = None
    voice: str | None = None  # a voice folder: the default for lines without one
    context: list[list[str]] = field(default_factory=list)  # [[clip path, transcript], ...] before every line
    temperature: float | None = None
    top_k: int | None = None
    max_seconds: float | None = None  # per sentence
    quantize: str | None = None  # "int8" / "int4": quantized weights give other audio
    batched_decode: bool = False  # one codec call for all rows: audio within one 16-bit step of a solo run's

    def to_dict(self) -> dict:
        return asdict(self)

    def sampling(self) -> dict:
        """The generation options of the job's sampling settings; a temperature of 0 is greedy (the CLI's
        `--temperature 0`)."""
        if self.temperature == 0:
            return {"do_sample": False, "top_k": self.top_k}
        return {"temperature": self.temperature, "top_k": self.top_k}


@dataclass
class _Line:
    """A line in progress: its sentences, the one being generated, and what the earlier ones gave."""

    request: LineRequest
    speaker: int
    fixed: list[Turn]  # the voice's clips and the context clips
    chunks: list[str]
    opts: dict
    started: float = field(default_factory=time.perf_counter)
    index: int = 0
    carried: list[Turn] = field(default_factory=list)
    pieces: list[np.ndarray] = field(default_factory=list)  # audio of each finished sentence
    parts: list[np.ndarray] = field(default_factory=list)  # audio of the sentence in progress
    frames: int = 0
    cut: int = 0  # sentences that reached their frame budget without an end-of-audio frame


class Synthesizer:
    """Runs lines through a BatchCore of `batch_size` rows and writes each line's file into an OutputDir."""

    def __init__(self, pipe, settings: JobSettings, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.pipe, self.model, self.settings, self.batch_size = pipe, pipe.model, settings, batch_size
        pipe.store_voice_codes = False  # a job writes into its output folder only, never into a voice's
        self.config = GenerationConfig.from_model(self.model, **settings.sampling())
        self.context = None
        if settings.context:
            clips = [(Path(c), t) for c, t in settings.context]
            self.context = Voice.from_files("context", settings.speaker or 0, clips)
        self.rate = pipe.sampling_rate
        self.frames_generated = 0

    def run(self, requests: Iterable[LineRequest], out: OutputDir, on_row: Callable[[dict], None]) -> None:
        """Generate every request; `on_row(row)` gets each line's manifest row once its file is in place
        (or once it failed). One line's failure ends that line alone."""
        requests = list(requests)
        dialogues = [r for r in requests if r.turns is not None]
        core = BatchCore(
            self.model,
            self.batch_size,
            self.model.config.max_position_embeddings,
            CHUNK_FRAMES,
            batched_decode=self.settings.batched_decode,
        )
        lines: dict[int, _Line] = {}  # id(job) -> its line
        todo = iter([r for r in requests if r.turns is None])
        try:
            while True:
                while core.free_rows():
                    request = next(todo, None)
                    if request is None:
                        break
                    line = self._start(request, on_row)
                    if line is not None:
                        self._add(core, line, lines, on_row)
                if not core.live_rows():
                    break
                for event in core.step():
                    line = lines[id(event.job)]
                    if event.kind == "audio":
                        line.parts.append(event.audio)
                    elif event.kind == "done":
                        del lines[id(event.job)]
                        self._sentence_done(line, event.job, event.reason)
                        if line.index < len(line.chunks):
                            self._add(core, line, lines, on_row)  # the row this sentence left
                        else:
                            self._finish(line, out, on_row)
                    else:
                        del lines[id(event.job)]
                        on_row(self._failed(line.request, event.error, line.started))
        finally:
            self.frames_generated += core.frames_generated
            core.close()
        for request in dialogues:  # after the core: `converse` runs its own engine on the model's caches
            self._dialogue(request, out, on_row)

    # ---- one line ----------------------------------------------------------------------------------

    def _start(self, request: LineRequest, on_row) -> _Line | None:
        s = self.settings
        opts = {
            "speaker": request.speaker if request.speaker is not None else s.speaker,
            "voice": request.voice or s.voice,
            "context": self.context,
            "max_seconds": s.max_seconds,
        }
        started = time.perf_counter()
        try:
            speaker, fixed = self.pipe._context_turns(opts)
            chunks = split_sentences(request.text, MAX_CHUNK_CHARS)
        except Exception as e:
            on_row(self._failed(request, e, started))
            return None
        return _Line(request, speaker, fixed, chunks, opts, started)

    def _job(self, line: _Line) -> RowJob:
        """The row job for the line's next sentence: the context that fits, then the sentence's text."""
        chunk, model = line.chunks[line.index], self.model
        # the pipeline's plan for a sentence (budget and policy), so a line sounds as `tts(text)` does
        prompt = self.pipe._prompt([chunk], line.speaker, line.fixed, line.carried, line.opts)
        line.carried = prompt.carried
        ids = prompt.input_ids.to(model.device)
        codes = [c.to(model.device) for c in prompt.audio_codes] if prompt.audio_codes else None
        return RowJob(
            embed=lambda: model.embed_prompt(ids, audio_codes=codes),  # with its content: a voice's
            # clips are prefilled once per run, not once per line (csm.prefix_cache)
            max_frames=prompt.frames,
            backbone=self.config.backbone,
            depth_decoder=self.config.depth_decoder,
            seed=line.request.seed + line.index,
            prompt_len=ids.shape[1],
        )

    def _add(self, core: BatchCore, line: _Line, lines: dict, on_row) -> None:
        try:
            job = self._job(line)
            core.add(job)
        except Exception as e:  # this line's prompt or prefill: the other rows go on
            on_row(self._failed(line.request, e, line.started))
            return
        lines[id(job)] = line

    def _sentence_done(self, line: _Line, job: RowJob, reason: str) -> None:
        audio = np.concatenate(line.parts) if line.parts else np.zeros(0, np.float32)
        line.parts = []
        line.pieces.append(audio)
        line.frames += job.frames
        line.cut += reason == "max_frames"
        if job.codes:  # carried as the pipeline carries it: the text, the audio and the codes it came from
            line.carried.append(Turn(line.speaker, line.chunks[line.index], audio, torch.stack(job.codes)))
        line.index += 1

    def _finish(self, line: _Line, out: OutputDir, on_row) -> None:
        request = line.request
        audio = crossfade_join(line.pieces, self.rate, CROSSFADE_MS)
        if not len(audio):
            error = ValueError(
                f"the model ended the audio at once (seed {request.seed}); give the line another seed"
            )
            on_row(self._failed(request, error, line.started))
            return
        try:
            out.write_audio(request.filename, audio, self.rate)
        except Exception as e:
            on_row(self._failed(request, e, line.started))
            return
        on_row(
            self._ok(
                request, audio, line.frames, line.started, sentences=len(line.chunks), cut_sentences=line.cut
            )
        )

    def _dialogue(self, request: LineRequest, out: OutputDir, on_row) -> None:
        """A dialogue line, spoken by `csm.conversation.converse` as `csm dialogue` speaks a script: turn by
        turn, each in the context of the ones before (one line at a time, not batched with others)."""
        from ..audio import MAX_CLIP_SECONDS, load_audio
        from ..conversation import converse

        s, started = self.settings, time.perf_counter()
        options = {**s.sampling(), "max_seconds": s.max_seconds}
        try:
            turns = [  # clips read bounded, as `csm dialogue` reads them (an hour of silence is refused)
                {**t, "audio": load_audio(t["audio"], max_seconds=MAX_CLIP_SECONDS)} if t.get("audio") else t
                for t in request.turns
            ]
            talk = converse(
                self.pipe,
                turns,
                voices={int(k): v for k, v in (request.voices or {}).items()},
                seed=request.seed,
                pause=request.pause,
                **{k: v for k, v in options.items() if v is not None},
            )
            if not len(talk.audio):
                raise ValueError(
                    f"the model ended every turn at once (seed {request.seed}); give another seed"
                )
            out.write_audio(request.filename, talk.audio, self.rate)
        except Exception as e:
            on_row(self._failed(request, e, started))
            return
        turns = talk.manifest["turns"]  # per spoken turn: speaker, text, start and end in the file
        on_row(self._ok(request, talk.audio, sum(t.frames for t in talk.turns), started, turns=turns))

    def _ok(self, request: LineRequest, audio: np.ndarray, frames: int, started: float, **extra) -> dict:
        return {
            "id": request.id,
            "line": request.line,
            "status": "ok",
            "path": request.filename,
            "seconds": round(len(audio) / self.rate, 4),
            "frames": frames,
            **extra,
            "seed": request.seed,
            "request_hash": request.key,
            "generation_seconds": round(time.perf_counter() - started, 3),
        }

    @staticmethod
    def _failed(request: LineRequest, error: Exception, started: float) -> dict:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {
            "id": request.id,
            "line": request.line,
            "status": "failed",
            "error": f"{type(error).__name__}: {message}",
            "seed": request.seed,
            "generation_seconds": round(time.perf_counter() - started, 3),
        }
