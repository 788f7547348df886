"""Continuous batching without threads: a FrameEngine's rows filled with jobs, stepped together, each row's
faults kept to that row.

    core = BatchCore(model, max_batch_size=8)
    row = core.add(RowJob(embed=lambda: embeds, max_frames=200, backbone=..., depth_decoder=..., seed=1))
    while core.live_rows():
        for event in core.step():          # RowEvent: "audio" (a decoded chunk and its codes), "done", "error"
            ...
    core.close()

A job's prompt is embedded when it is added, into a free row; its `embed()` may also return the prompt's
content (csm.prefix_cache), and the row then takes over the longest stored prefix of its prompt and prefills
only the rest. With `prefill_chunk`, a prompt joining rows that are generating is prefilled in slices, one
per step, between their frames ("auto": each slice takes about one frame's time, as measured), so a long
prompt never stalls the others' audio; alone, it is prefilled whole. `step()` advances every generating row
by one frame and decodes each row's frames, `chunk_frames` at a time. A row ends at its end-of-audio frame,
at `max_frames`, or when `remove(row)` frees it; a row that ends keeps its turn in the prefix store.

Decoding: with `batched_decode`, every row is a stream of one shared codec decoder and the rows decode
together, one codec call per step for all rows with the same number of frames (chunks are aligned to every
`chunk_frames`-th step, so a new row's first chunk may be shorter); a row's audio is then its solo audio up
to float rounding. Without it, each row has a decoder of its own and its audio does not depend on the other
rows at all (bit for bit: what `csm batch` promises).

Faults: a job whose embed or prefill raises is not added (`add` raises, the row stays free); a row whose decode
raises ends with an "error" event (batched: a shared codec call that raises changes no row's stream, and each of
its rows is decoded alone: those that fail alone end, the others go on); when the shared step raises, each live row is stepped alone (without
committing anything) to find the rows at fault, those end with "error", and the step runs again for the rest
(should it raise again, every live row ends with "error": not one row's fault).
Per-row random generators are rewound before that retry, so a seeded row's audio is the same as alone.
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .engine import FrameEngine, Sampling, use_compile, use_cuda_graph


@dataclass
class RowJob:
    """One prompt to speak and how: `embed()` returns its prompt embeds (1, T, D) and runs when it is added."""

    embed: callable
    max_frames: int
    backbone: Sampling
    depth_decoder: Sampling
    seed: int | None = None  # None: the core's shared generator draws its noise
    decode: bool = True  # False: "audio" events carry codes only (audio is None)
    prompt_len: int = 0
    reused: int = 0  # prompt positions taken over from the prefix store instead of prefilled
    codes: list = field(default_factory=list)  # its frames (K,), filled in as they are generated

    @property
    def frames(self) -> int:
        return len(self.codes)

    def wants_audio(self) -> bool:
        """Whether to decode a full chunk now; a consumer that is behind returns False and its frames wait
        as codes (its end still decodes everything)."""
        return True


@dataclass
class RowEvent:
    """What happened to one row in a step: a decoded chunk ("audio"), its end ("done"), or its failure ("error").

    "audio" carries `codes` (K, n) and `audio` (samples,) float32 (None when the job does not decode); "done"
    follows the last "audio" of a row with `reason` "end" (end-of-audio frame) or "max_frames"; "error" carries
    the exception. After "done" or "error" the row is free.
    """

    row: int
    job: RowJob
    kind: str
    codes: torch.Tensor | None = None
    audio: np.ndarray | None = None
    reason: str | None = None
    error: Exception | None = None


@dataclass
class _Row:
    job: RowJob
    decoder: object | None
    generator: torch.Generator | None
    pending: list = field(default_factory=list)  # frames (K,) not yet decoded


class BatchCore:
    """Rows of a FrameEngine filled with jobs; `step()` advances them together and reports per-row events."""

    def __init__(
        self,
        model,
        max_batch_size: int = 8,
        max_seq_len: int = 2048,
        chunk_frames: int = 4,
        cuda_graph: bool | None = None,
        batched_decode: bool = False,
        compile: bool | None = None,
        prefill_chunk: int | str | None = None,
    ):
        """`cuda_graph`: on CUDA, replay the frame step as CUDA graphs, the live rows in the smallest bucket
        that holds them (None: csm.engine.use_cuda_graph decides, on by default). `batched_decode`: decode the
        rows together (module docstring); a codec whose convs pad by replication cannot, and decodes row by
        row. `compile`: torch.compile the frame step (None: csm.engine.use_compile decides, off by default).
        `prefill_chunk`: positions of a joining prompt prefilled per step while other rows generate (an int,
        or "auto": about one frame's time); None prefills a prompt whole when it is added."""
        if (
            prefill_chunk is not None
            and prefill_chunk != "auto"
            and not (isinstance(prefill_chunk, int) and prefill_chunk >= 1)
        ):
            raise ValueError(f"prefill_chunk must be an integer >= 1, 'auto' or None, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.prefilling: list[int] = []  # rows whose prompt is going in, oldest first
        # Measured: the last few steps' frame times and slices' times per position (medians: robust to a
        # step the OS delayed).
        self.frame_times: collections.deque[float] = collections.deque(maxlen=9)
        self.position_times: collections.deque[float] = collections.deque(maxlen=9)
        self.model, self.max_batch_size, self.chunk_frames = model, max_batch_size, chunk_frames
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        graphed = use_cuda_graph(model.device, cuda_graph)
        self.engine = FrameEngine(
            model, max_batch_size, self.max_seq_len, compile=use_compile(compile), cuda_graph=graphed
        )
        self.rows: list[_Row | None] = [None] * max_batch_size
        codec = model.codec_model
        self.decoder = None  # the shared decoder, its row b being row b's stream
        if batched_decode and codec.config.pad_mode == "constant":
            self.decoder = codec.streaming_decoder(max_batch_size)
        self.steps = 0
        self.shared_generator = torch.Generator(device=model.device).manual_seed(time.time_ns() % 2**31)
        self.batch_histogram: collections.Counter[int] = collections.Counter()  # live rows per step -> steps
        self.frames_generated = 0

    def free_rows(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if r is None]

    def live_rows(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if r is not None]

    def job(self, row: int) -> RowJob | None:
        return None if self.rows[row] is None else self.rows[row].job

    def add(self, job: RowJob) -> int:
        """Embed and prefill `job` into a free row; returns the row. Raises what embed/prefill raised (the row
        stays free), or RuntimeError when no row is free."""
        free = self.free_rows()
        if not free:
            raise RuntimeError("no free row: step or remove a row first")
        b = free[0]
        try:
            with torch.inference_mode():
                embeds = job.embed()
                content = None
                if isinstance(embeds, tuple):  # (embeds (1, T, D), content (1, T, 1 + K))
                    embeds, content = embeds
                left = self.engine.begin_prefill(b, embeds, None if content is None else content[0])
                job.reused = embeds.shape[1] - left
                if left and (self.prefill_chunk is None or not self.generating_rows()):
                    self._prefill(b, left)  # nobody to keep waiting: all of it now
                    left = 0
            self.engine.backbone_sampling.set(b, job.backbone)
            self.engine.depth_sampling.set(b, job.depth_decoder)
        except Exception:
            self.engine.free(b)
            raise
        if left:
            self.prefilling.append(b)
        generator = None
        if job.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(job.seed)
        decoder = None
        if job.decode and self.decoder is None:
            decoder = self.model.codec_model.streaming_decoder(1)
        elif job.decode:
            self.decoder.reset([b])
        self.rows[b] = _Row(job, decoder, generator)
        return b

    def generating_rows(self) -> list[int]:
        """Rows whose prompt is in: each step gives them a frame."""
        return [b for b, r in enumerate(self.rows) if r is not None and b not in self.prefilling]

    def remove(self, row: int) -> None:
        """Free a row now (e.g. its client went away); no event follows for it."""
        self.engine.free(row)
        self.rows[row] = None
        if row in self.prefilling:
            self.prefilling.remove(row)

    def close(self) -> None:
        """Free every row and the engine's caches."""
        self.rows = [None] * self.max_batch_size
        self.engine.release()

    # ---- one step ----------------------------------------------------------------------------------

    def step(self) -> list[RowEvent]:
        """Prefill the next slice of a joining prompt, then advance every generating row by one frame; returns
        the rows' events (empty when nothing happened)."""
        events: list[RowEvent] = []
        if self.prefilling:
            self._prefill_slice(events)
        live = self.generating_rows()
        if not live:
            return events
        started = time.perf_counter()
        codes = self._next_frame(live, events)
        if codes is None:
            return events
        self.frame_times.append(time.perf_counter() - started)
        live = self.generating_rows()
        self.batch_histogram[len(live)] += 1
        self.steps += 1
        due, ends = [], {}
        for b in live:
            row = self.rows[b]
            frame = codes[b]
            ended = self._ended(frame)
            if not ended:
                row.pending.append(frame)
                row.job.codes.append(frame)
                self.frames_generated += 1
            if ended or row.job.frames >= row.job.max_frames:
                ends[b] = "end" if ended else "max_frames"
            if row.pending and (b in ends or self._chunk_due(row)):
                due.append(b)
        events += self._flush(due)
        for b, reason in ends.items():
            if self.rows[b] is not None:  # not ended by a failed decode
                job = self.rows[b].job
                if job.codes:
                    self.engine.keep_generated(b, torch.stack(job.codes))
                events.append(RowEvent(b, job, "done", reason=reason))
                self.remove(b)
        return events

    # ---- prefill in slices -------------------------------------------------------------------------

    def prefill_budget(self) -> int:
        """Positions one step may prefill while rows generate: `prefill_chunk`, or with "auto" as many as
        take about 0.8 of a frame (so a generating row waits at most about 1.8 frames between two)."""
        if isinstance(self.prefill_chunk, int):
            return self.prefill_chunk
        if not self.frame_times or not self.position_times:
            return 16  # until both are measured
        frame, position = statistics.median(self.frame_times), statistics.median(self.position_times)
        return max(1, int(0.8 * frame / position))

    def _prefill(self, row: int, positions: int) -> int:
        job = self.engine.pending[row]
        before = job.length - job.done
        started = time.perf_counter()
        left = self.engine.prefill_step(row, positions)
        done = before - left
        if done >= 4:  # a few positions measure the per-call cost more than the per-position one
            self.position_times.append((time.perf_counter() - started) / done)
        return left

    def _prefill_slice(self, events: list[RowEvent]) -> None:
        """One step's prefill: the oldest joining prompt's next slice (all of it when nothing generates)."""
        b = self.prefilling[0]
        budget = self.prefill_budget() if self.generating_rows() else self.max_seq_len
        try:
            with torch.inference_mode():
                left = self._prefill(b, budget)
        except Exception as e:
            events.append(RowEvent(b, self.rows[b].job, "error", error=e))
            self.remove(b)
            return
        if not left:
            self.prefilling.remove(b)

    def _chunk_due(self, row: _Row) -> bool:
        if self.decoder is not None:  # batched: every row's chunk at the same steps, so they decode together
            return self.steps % self.chunk_frames == 0 and row.job.wants_audio()
        return len(row.pending) >= self.chunk_frames and row.job.wants_audio()

    def _flush(self, due: list[int]) -> list[RowEvent]:
        """Decode the rows' pending frames: one codec call per group of rows with the same number of frames
        (batched), or per row (a decoder each)."""
        events, groups = [], collections.defaultdict(list)
        for b in due:
            row = self.rows[b]
            codes = torch.stack(row.pending, 1)  # (K, n)
            row.pending = []
            if row.job.decode:
                shared = self.decoder is not None  # else a decoder each: a group of one per row
                groups[codes.shape[1] if shared else ("row", b)].append((b, codes))
            else:
                events.append(RowEvent(b, row.job, "audio", codes=codes))
        for group in groups.values():
            audio, failed = self._decode_group(group)
            for b, codes in group:
                if b in failed:
                    events.append(RowEvent(b, self.rows[b].job, "error", error=failed[b]))
                    self.remove(b)
                else:
                    events.append(RowEvent(b, self.rows[b].job, "audio", codes=codes, audio=audio[b]))
        return events

    def _decode_group(self, group: list[tuple[int, torch.Tensor]]) -> tuple[dict, dict]:
        """({row: audio}, {row: exception}) for a group decoded together; when a call of several rows
        raises (it changed no stream), each row is decoded alone to find the rows at fault."""
        try:
            return dict(zip([b for b, _ in group], self._decode(group), strict=True)), {}
        except Exception as e:
            if len(group) == 1:
                return {}, {group[0][0]: e}
        audio, failed = {}, {}
        for b, codes in group:
            try:
                audio[b] = self._decode([(b, codes)])[0]
            except Exception as e:
                failed[b] = e
        return audio, failed

    def _decode(self, group: list[tuple[int, torch.Tensor]]) -> list[np.ndarray]:
        """Audio (samples,) float32 for each (row, codes (K, n)) of `group`, all with the same n: one call of
        the shared decoder, or (one row) that row's own decoder."""
        codes = torch.stack([c for _, c in group]).to(self.model.device)
        with torch.inference_mode():
            if self.decoder is not None:
                decoded = self.decoder.step(codes, [b for b, _ in group])
            else:
                decoded = self.rows[group[0][0]].decoder.step(codes)
        audio = decoded[:, 0].float().cpu().numpy()
        return [np.ascontiguousarray(a, dtype=np.float32) for a in audio]

    def _ended(self, frame: torch.Tensor) -> bool:
        return bool(self.engine.rule.ends(frame))

    def _generators(self) -> list[torch.Generator]:
        """Each row's noise generator; a row still prefilling draws from the shared one, so that its own
        seeded draws start with its first frame."""
        return [
            r.generator
            if r is not None and r.generator is not None and b not in self.prefilling
            else self.shared_generator
            for b, r in enumerate(self.rows)
        ]

    def _next_frame(self, live: list[int], events: list[RowEvent]) -> torch.Tensor | None:
        """The shared step; when it raises, the rows at fault end with "error" and it runs again for the rest."""
        generators = self._generators()
        saved = [(g, g.get_state()) for g in {id(g): g for g in generators}.values()]
        state = self._engine_state()
        try:
            return self.engine.next_frame(generators).cpu()  # (B, K)
        except Exception as e:
            first = e
        for b in [b for b in live if self._fails_alone(b, state, saved)]:  # none: a passing fault, retried
            events.append(RowEvent(b, self.rows[b].job, "error", error=first))
            self.remove(b)
        if not self.generating_rows():
            return None
        try:  # the rewound generators draw the same noise as the failed step did
            return self.engine.next_frame(self._generators()).cpu()
        except Exception as e:  # not one row's fault: every live row fails, the engine is left consistent
            self._restore(state, saved)
            for b in self.generating_rows():
                events.append(RowEvent(b, self.rows[b].job, "error", error=e))
                self.remove(b)
            return None

    _STATE = ("hidden", "valid", "slot", "position", "finished")

    def _engine_state(self) -> dict:
        """The engine's per-row state a step commits (its keys are written at each row's next slot, which the
        next real step overwrites, so they need no copy)."""
        engine = self.engine
        state = {name: getattr(engine, name).clone() for name in self._STATE}
        state["next_slot_bound"] = list(engine.next_slot_bound)
        return state

    def _restore(self, state: dict, saved: list) -> None:
        engine = self.engine
        for name in self._STATE:
            getattr(engine, name).copy_(state[name])
        engine.next_slot_bound = list(state["next_slot_bound"])
        for g, s in saved:
            g.set_state(s)

    def _fails_alone(self, b: int, state: dict, saved: list) -> bool:
        """Whether a step raises on row b's state with every other row's state blanked; commits nothing."""
        self._restore(state, saved)
        others = [r for r in range(self.max_batch_size) if r != b]
        self.engine.hidden[others] = 0
        try:
            self.engine.next_frame(self._generators())
        except Exception:
            return True
        finally:
            self._restore(state, saved)
        return False
