"""Continuous batching: one thread owns the model and a FrameEngine and serves many requests at once.

Between frames the scheduler admits waiting requests into free rows (each prefilled alone), then one
`next_frame()` advances every live row; a row leaves as soon as its audio ends, it reaches its frame
budget, or its client goes away, and its row is free for the next request on the following frame.
Each request decodes its own frames with its own streaming codec decoder and receives audio chunks on
an asyncio queue.

Seeds: each row draws its sampling noise from its own generator (a seeded one for a request with a
seed, the scheduler's shared one otherwise), so a seeded request gives the same audio alone or batched.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..frames import FrameRule
from ..generate import FrameEngine, Sampling


class QueueFull(Exception):
    """The server has more waiting requests than it accepts."""


@dataclass
class SpeechJob:
    """One request's prompt and settings, and the channel its audio comes back on."""

    embed: callable  # () -> embeds (1, T, D), run on the scheduler thread (it may use the codec)
    prompt_len: int
    max_frames: int
    backbone: Sampling
    depth_decoder: Sampling
    seed: int | None = None
    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue | None = None  # np.ndarray chunks, then None at the end, or an Exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    codes: list = field(default_factory=list)  # the frames (K,) generated, kept as context for what follows
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def frames(self) -> int:
        return len(self.codes)

    def send(self, item) -> None:
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.out.put_nowait, item)
            except RuntimeError:  # the event loop closed between the check and the call
                pass


@dataclass
class _Row:
    job: SpeechJob
    decoder: object
    generator: torch.Generator | None
    pending: list = field(default_factory=list)  # frames (K,) not yet decoded


class Scheduler:
    """Admits jobs into a FrameEngine's rows between frames and streams their audio back."""

    def __init__(
        self,
        model,
        max_batch_size: int = 8,
        max_seq_len: int = 2048,
        max_queue: int = 64,
        chunk_frames: int = 4,
    ):
        self.model = model
        self.max_batch_size, self.chunk_frames = max_batch_size, chunk_frames
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.waiting: queue.Queue[SpeechJob] = queue.Queue(maxsize=max_queue)
        self.rows: list[_Row | None] = [None] * max_batch_size
        self.engine: FrameEngine | None = None
        self.shared_generator = torch.Generator(device=model.device).manual_seed(int(time.time_ns() % 2**31))
        self.batch_histogram: collections.Counter[int] = collections.Counter()  # live rows per step -> steps
        self.completed = self.failed = self.cancelled = 0
        self.frames_generated = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.rule = FrameRule.of(model)

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self.engine = FrameEngine(self.model, self.max_batch_size, self.max_seq_len)
            self._thread = threading.Thread(target=self._run, name="csm-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for row in self.rows:
            if row is not None:
                row.job.send(RuntimeError("the server is shutting down"))
        self.rows = [None] * self.max_batch_size
        if self.engine is not None:
            self.engine.release()
            self.engine = None

    def submit(self, job: SpeechJob) -> None:
        """Queue a job; raises QueueFull when the waiting line is full."""
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        self._wake.set()

    # ---- stats -------------------------------------------------------------------------------------

    def stats(self) -> dict:
        hist = dict(sorted(self.batch_histogram.items()))
        steps = sum(hist.values())
        return {
            "max_batch_size": self.max_batch_size,
            "active": sum(r is not None for r in self.rows),
            "waiting": self.waiting.qsize(),
            "steps": steps,
            "frames_generated": self.frames_generated,
            "max_active_rows": max(hist, default=0),
            "mean_active_rows": (sum(k * v for k, v in hist.items()) / steps) if steps else 0.0,
            "active_rows_histogram": {str(k): v for k, v in hist.items()},
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }

    # ---- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit()
            live = [b for b, r in enumerate(self.rows) if r is not None]
            if not live:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._step(live)
            except Exception as e:  # a failed step fails its requests, never the server
                for b in live:
                    self._finish(b, error=RuntimeError(f"generation failed: {e}"))

    def _admit(self) -> None:
        for b in range(self.max_batch_size):
            if self.rows[b] is not None:
                continue
            job = self._next_job()
            if job is None:
                return
            try:
                with torch.inference_mode():
                    embeds = job.embed()
                    self.engine.prefill(embeds, None, rows=slice(b, b + 1))
                self.engine.backbone_sampling.set(b, job.backbone)
                self.engine.depth_sampling.set(b, job.depth_decoder)
            except Exception as e:
                self.engine.free(b)
                self.failed += 1
                job.send(e)
                continue
            generator = None
            if job.seed is not None:
                generator = torch.Generator(device=self.model.device).manual_seed(job.seed)
            self.rows[b] = _Row(job, self.model.codec_model.streaming_decoder(1), generator)

    def _next_job(self) -> SpeechJob | None:
        while True:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                return None
            if job.cancelled.is_set():
                self.cancelled += 1
                continue
            return job

    def _step(self, live: list[int]) -> None:
        engine = self.engine
        for b in live:  # a client that went away frees its row before the step
            if self.rows[b].job.cancelled.is_set():
                self.cancelled += 1
                self._release(b)
        live = [b for b in live if self.rows[b] is not None]
        if not live:
            return
        generators = [
            row.generator if row is not None and row.generator is not None else self.shared_generator
            for row in self.rows
        ]
        self.batch_histogram[len(live)] += 1
        codes = engine.next_frame(generators).cpu()  # (B, K)
        for b in live:
            row = self.rows[b]
            frame = codes[b]
            ended = bool(self.rule.ends(frame))
            if not ended:
                row.pending.append(frame)
                row.job.codes.append(frame)
                self.frames_generated += 1
            done = ended or row.job.frames >= row.job.max_frames
            if done or len(row.pending) >= self.chunk_frames:
                self._flush(row)
            if done:
                self._finish(b)

    def _flush(self, row: _Row) -> None:
        if not row.pending:
            return
        codes = torch.stack(row.pending, 1)[None].to(self.model.device)  # (1, K, n)
        row.pending = []
        audio = row.decoder.step(codes)[0, 0].float().cpu().numpy()
        row.job.send(np.ascontiguousarray(audio, dtype=np.float32))

    def _finish(self, b: int, error: Exception | None = None) -> None:
        row = self.rows[b]
        if error is None:
            self.completed += 1
            row.job.send(None)
        else:
            self.failed += 1
            row.job.send(error)
        self._release(b)

    def _release(self, b: int) -> None:
        self.engine.free(b)
        self.rows[b] = None
