"""The server's Prometheus metrics, all declared here (`prometheus-client`), served at GET /metrics.

Each app has its own `CollectorRegistry` (tests and Ray Serve replicas build several apps; the global registry
would mix them). Counters and histograms are updated where the event happens: the request middleware counts
requests and errors, `Service` observes time to first audio and the real-time ratio, the scheduler observes queue
wait, prefill time, rows per step and the gap between a running row's frames. Gauges of state (rows in use,
capacity, waiting, voices, the prefix cache) are read at scrape time by `StateCollector`, so nothing has to keep
them up to date; `sessions_open` reads the service's open WebSocket sessions the same way.

Names follow Prometheus' conventions: base units as a suffix (`_seconds`, `_bytes`), counters end in `_total`,
labels of low cardinality only (an endpoint is its route template, never a raw path)."""

from __future__ import annotations

import json
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..prefix_cache import store_for

# seconds: a frame takes ~20 ms on a GPU, ~80 ms (tiny model) to ~400 ms (csm-1b) on a 2-core CPU
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
RATIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    """The metrics of one server (one registry)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "csm_requests", "HTTP requests answered, by endpoint (route template) and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "csm_errors",
            "error answers (4xx, 5xx) by status and code (the error's `code`, else its `type`)",
            ["status", "code"],
            registry=r,
        )
        self.time_to_first_audio = Histogram(
            "csm_time_to_first_audio_seconds",
            "from a speech request's arrival to its first audio chunk",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.realtime_ratio = Histogram(
            "csm_realtime_ratio",
            "seconds of audio per second of work, per speech request (> 1: faster than real time)",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter("csm_audio_seconds", "seconds of audio sent to clients", registry=r)
        self.queue_wait = Histogram(
            "csm_queue_wait_seconds",
            "from a job's submission to the scheduler to its admission into a row",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            "csm_prefill_seconds",
            "admitting one job: its clips encoded and its prompt prefilled (running rows wait meanwhile)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frame_gap = Histogram(
            "csm_inter_frame_gap_seconds",
            "time between two frames of a running row (a step, plus any prefill of a joining job in between)",
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "csm_batch_rows",
            "rows advanced by one scheduler step (batch occupancy)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.frames = Counter("csm_frames", "frames generated (rate(): frames per second)", registry=r)
        self.sessions_open = Gauge("csm_sessions_open", "WebSocket sessions open", registry=r)
        self.replica = Info("csm_replica", "which Ray Serve replica this is (csm serve --ray)", registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        PlatformCollector(registry=r)

    def watch(self, scheduler, service=None) -> None:
        """Read the scheduler's (and the service's voices' and prefix cache's) state at every scrape."""
        self.registry.register(StateCollector(scheduler, service))

    # ---- hooks, one line where the event happens ---------------------------------------------------

    def answered(self, endpoint: str, status: int, error_body: bytes | None) -> None:
        """A request's answer went out (the middleware); `error_body`: the JSON of an error answer."""
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(str(status), error_code(error_body)).inc()

    def admitted(self, job, prefill_started: float) -> None:
        """A job left the queue for a row (`prefill_started`: perf_counter before its prefill)."""
        now = time.perf_counter()
        self.queue_wait.observe(max(0.0, prefill_started - job.submitted))
        self.prefill.observe(now - prefill_started)

    def stepped(self, rows: int, frames: int, gap: float | None) -> None:
        """A scheduler step advanced `rows` rows by `frames` frames; `gap` since the step before, when rows ran
        through both."""
        if not rows:  # every row left before the step (cancelled): nothing ran
            return
        self.batch_rows.observe(rows)
        self.frames.inc(frames)
        if gap is not None:
            self.frame_gap.observe(gap)

    def spoke(self, audio_seconds: float, seconds: float) -> None:
        """A speech request ended after `seconds`, having sent `audio_seconds` of audio."""
        if audio_seconds > 0:
            self.audio_seconds.inc(audio_seconds)
            self.realtime_ratio.observe(audio_seconds / max(seconds, 1e-9))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def error_code(body: bytes | None) -> str:
    """The `code` (else `type`) of an OpenAI-shaped error body; "unknown" for anything else."""
    try:
        error = json.loads(body or b"")["error"]
        return str(error.get("code") or error.get("type") or "unknown")[:40]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unknown"


class StateCollector:
    """Gauges read at scrape time: rows, queue, voices, the scheduler's outcomes, and the prefix store (when it
    is on: csm.prefix_cache's `stats()`)."""

    def __init__(self, scheduler, service=None):  # a csm.server.scheduler.Scheduler
        self.scheduler, self.service = scheduler, service

    def collect(self):
        s = self.scheduler
        core = s.core

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        yield gauge(
            "csm_rows_in_use", "rows generating now", len(core.live_rows()) if core is not None else 0
        )
        yield gauge("csm_rows_capacity", "rows the scheduler has (--max-batch-size)", s.max_batch_size)
        yield gauge("csm_queue_waiting", "jobs waiting for a row", s.waiting.qsize())
        yield gauge(
            "csm_up",
            "1 while the scheduler runs and the server admits requests",
            int(s.alive and not s.draining),
        )
        yield gauge("csm_draining", "1 while draining after SIGTERM", int(s.draining))
        jobs = CounterMetricFamily(
            "csm_jobs", "scheduler jobs (sentence-sized chunks) by outcome", labels=["outcome"]
        )
        for outcome in ("completed", "failed", "cancelled"):
            jobs.add_metric([outcome], getattr(s, outcome))
        yield jobs
        voices = getattr(self.service, "voices", None)
        if voices is not None:
            yield gauge("csm_voices", "voices saved in the voice folder", len(voices.names()))
            yield gauge("csm_voices_cached", "saved voices held in memory", len(voices.cached()))
        yield from prefix_cache_metrics(store_for(s.model))


def prefix_cache_metrics(cache):
    """The prefix cache's counters and gauges from its `stats()`; nothing when there is no cache."""
    stats = getattr(cache, "stats", None)
    if stats is None:
        return
    try:
        st = stats()
    except Exception:  # a scrape never fails because of the cache
        return
    for key, name, doc in (
        ("hits", "csm_prefix_cache_hits", "prompts that started from a stored prefix"),
        ("misses", "csm_prefix_cache_misses", "prompts that found no stored prefix"),
        (
            "positions_saved",
            "csm_prefix_cache_positions_saved",
            "prompt positions not prefilled thanks to it",
        ),
    ):
        if key in st:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], st[key])
            yield c
    for key, name, doc in (
        ("bytes", "csm_prefix_cache_bytes", "memory the stored prefixes hold"),
        ("max_bytes", "csm_prefix_cache_max_bytes", "the store's bound"),
        ("entries", "csm_prefix_cache_entries", "segments stored"),
    ):
        if key in st:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], st[key])
            yield g
