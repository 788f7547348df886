"""The server's scheduler: one thread owns the model and a `BatchCore` and serves many requests at once.

Between frames the thread admits waiting requests into free rows, then one `BatchCore.step()` prefills a slice
of a joining prompt (about a frame's time, so running streams never stall; a stored prefix is not read again:
csm.prefix_cache) and advances every generating row; its events go back to each request's asyncio queue. A row leaves
as soon as its audio ends, it reaches its frame budget, its client goes away, or it fails (alone: see
`csm.batching`). The thread survives any exception; should it die anyway, `alive` is False and new jobs are
refused at once.

Seeds: each row draws its sampling noise from its own generator (a seeded one for a request with a seed, a shared
one otherwise), so a seeded request gives the same audio alone or batched.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..batching import BatchCore, RowJob
from ..generate import GenerationConfig
from ..prefix_cache import prefix_stats
from .metrics import ServerMetrics

log = logging.getLogger("csm.server")


class QueueFull(Exception):
    """The server has more waiting requests than it accepts."""


class Unavailable(Exception):
    """The scheduler is not running (shutting down, or its thread died)."""


@dataclass
class SpeechJob(RowJob):
    """A RowJob plus the channel its audio comes back on: np.ndarray chunks, then None, or an Exception."""

    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    max_buffered: int = 0  # audio chunks sent but not yet taken beyond which decoding waits; 0: no bound
    buffered: int = 0
    request_id: str = "-"
    carried_kept: int = 0  # the carried turns its prompt kept (the newest ones): the rest left the window
    submitted: float = field(default_factory=time.perf_counter)

    def send(self, item) -> None:
        if self.loop is not None and not self.loop.is_closed():
            if item is not None and not isinstance(item, Exception):
                self.buffered += 1
            try:
                self.loop.call_soon_threadsafe(self.out.put_nowait, item)
            except RuntimeError:  # the event loop closed between the check and the call
                pass

    async def take(self):
        item = await self.out.get()
        if item is not None and not isinstance(item, Exception):
            self.buffered -= 1
        return item

    def wants_audio(self) -> bool:
        return not self.max_buffered or self.buffered < self.max_buffered


class Scheduler:
    """Admits jobs into a BatchCore's rows between frames and streams their audio back."""

    def __init__(
        self,
        model,
        max_batch_size: int = 8,
        max_seq_len: int = 2048,
        max_queue: int = 64,
        chunk_frames: int = 4,
        batched_decode: bool = True,
        prefill_chunk: int | str | None = "auto",
        metrics: ServerMetrics | None = None,
    ):
        self.model, self.batched_decode, self.prefill_chunk = model, batched_decode, prefill_chunk
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self._last_step: float | None = None  # when the last step ended with rows still running
        self.max_batch_size, self.chunk_frames = max_batch_size, chunk_frames
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.waiting: queue.Queue[SpeechJob] = queue.Queue(maxsize=max_queue)
        self.core: BatchCore | None = None
        self.completed = self.failed = self.cancelled = 0
        self.draining = False  # set on SIGTERM: the app admits no new requests; those in flight finish
        self.in_flight = 0  # HTTP requests being served (counted by the app): a drain waits for none
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        if self._thread is None:
            self.core = BatchCore(
                self.model,
                self.max_batch_size,
                self.max_seq_len,
                self.chunk_frames,
                batched_decode=self.batched_decode,
                prefill_chunk=self.prefill_chunk,
            )
            config = GenerationConfig.from_model(self.model)
            self.core.engine.capture_graphs(config.backbone, config.depth_decoder)  # CUDA graphs only
            log.info("ready to generate: %s", self.core.engine.timings.summary())
            self._thread = threading.Thread(target=self._run, name="csm-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_all(Unavailable("the server is shutting down"))
        if self.core is not None:
            self.core.close()
            self.core = None

    def submit(self, job: SpeechJob) -> None:
        """Queue a job; raises Unavailable when the scheduler is not running, QueueFull when the line is full."""
        if not self.alive:
            raise Unavailable("the scheduler is not running; the server cannot make audio")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        self._wake.set()

    # ---- stats -------------------------------------------------------------------------------------

    def stats(self) -> dict:
        core = self.core
        hist = dict(sorted(core.batch_histogram.items())) if core is not None else {}
        steps = sum(hist.values())
        return {
            "max_batch_size": self.max_batch_size,
            "alive": self.alive,
            "active": len(core.live_rows()) if core is not None else 0,
            "waiting": self.waiting.qsize(),
            "steps": steps,
            "frames_generated": core.frames_generated if core is not None else 0,
            "max_active_rows": max(hist, default=0),
            "mean_active_rows": (sum(k * v for k, v in hist.items()) / steps) if steps else 0.0,
            "active_rows_histogram": {str(k): v for k, v in hist.items()},
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "prefilling": len(core.prefilling) if core is not None else 0,
            "prefix_cache": prefix_stats(self.model),
        }

    # ---- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._admit()
                    if not self.core.live_rows():
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    self._step()
                except Exception:  # a bug outside any one row: log it, keep serving
                    log.exception("scheduler loop error")
                    time.sleep(0.01)
        finally:
            self._fail_all(Unavailable("the scheduler stopped"))

    def _admit(self) -> None:
        core = self.core
        while core.free_rows():
            job = self._next_job()
            if job is None:
                return
            try:
                started = time.perf_counter()
                core.add(job)
                self.metrics.admitted(job, started)
            except Exception as e:
                self._fail(job, e, "preparing")

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

    def _step(self) -> None:
        core = self.core
        for b in core.live_rows():  # a client that went away frees its row before the step
            if core.job(b).cancelled.is_set():
                self.cancelled += 1
                core.remove(b)
        rows, frames, events = len(core.live_rows()), core.frames_generated, core.step()
        now, last = time.perf_counter(), self._last_step
        self.metrics.stepped(rows, core.frames_generated - frames, None if last is None else now - last)
        self._last_step = now if core.live_rows() else None
        for event in events:
            job = event.job
            if event.kind == "audio":
                job.send(event.audio)
            elif event.kind == "done":
                self.completed += 1
                job.send(None)
            else:
                self._fail(job, event.error, "generating")

    def _fail(self, job: SpeechJob, error: Exception, stage: str) -> None:
        self.failed += 1
        log.error("request %s failed while %s: %s: %s", job.request_id, stage, type(error).__name__, error)
        job.send(error)

    def _fail_all(self, error: Exception) -> None:
        core = self.core
        if core is not None:
            for b in core.live_rows():
                core.job(b).send(error)
                core.remove(b)
        while True:
            try:
                self.waiting.get_nowait().send(error)
            except queue.Empty:
                break
