"""`csm batch --ray`: the same job on a Ray cluster with Ray Data.

The checked lines become a dataset; `map_batches` hands blocks of lines to a pool of `BatchWorker` actors,
each of which loads the model once and runs the same `Synthesizer` (continuous batching over its block),
writing audio files into the shared output folder. Manifest rows come back to the driver, which alone appends
them to DIR/manifest.jsonl, so the manifest has one writer and the resume rule is the single-process one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import warnings
from collections.abc import Callable

from .output import OutputDir
from .requests import LineRequest
from .runner import JobSettings, Synthesizer

INSTALL_HINT = "--ray needs Ray Data: pip install 'csm-speech[ray]' (on the driver and on every node)"


def import_ray():
    """The `ray` module, or ImportError with how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return ray


class BatchWorker:
    """A Ray Data callable class: loads the model once, then speaks each block of lines it is given."""

    def __init__(self, loader: dict, settings: dict, batch_size: int, out: str, threads: int = 0):
        import torch

        from ..pipeline import pipeline

        if threads:
            torch.set_num_threads(threads)
        pipe = pipeline("text-to-audio", **loader)
        self.synth = Synthesizer(pipe, JobSettings(**settings), batch_size)
        self.out = OutputDir.attach(out)

    def __call__(self, batch: dict) -> dict:
        rows: list[str] = []
        requests = [LineRequest.from_json(r) for r in batch["request"]]
        self.synth.run(requests, self.out, lambda row: rows.append(json.dumps(row)))
        return {"row": rows}


def run_on_ray(
    address: str | None,
    requests: list[LineRequest],
    out: OutputDir,
    settings: JobSettings,
    loader: dict,
    batch_size: int,
    on_row: Callable[[dict], None],
    workers: int | None = None,
    cpus_per_worker: int = 1,
    block_lines: int | None = None,
) -> None:
    """Run `requests` on Ray (the cluster at `address`, or a new local instance when it is None or empty)
    with `workers` actors: one GPU each when the model goes on CUDA, else `cpus_per_worker` CPUs each."""
    ray = import_ray()
    # Ray Data logs a worker's failure with its remote traceback; the command reports it in one line instead
    # (the full log stays in Ray's session folder, /tmp/ray/session_*/logs).
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address or None, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
        )
    try:
        with warnings.catch_warnings(), _worker_errors(ray):
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # Ray's own deprecation notices
            _run(
                ray,
                requests,
                out,
                settings,
                loader,
                batch_size,
                on_row,
                workers,
                cpus_per_worker,
                block_lines,
            )
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _worker_errors(ray):
    """A failure inside the workers (the model does not load, a node dies) as one RuntimeError line: the
    innermost cause, not Ray's remote traceback."""
    try:
        yield
    except ray.exceptions.RayError as e:
        message, cause = type(e).__name__, e
        while cause is not None:  # the innermost exception that says something (Ray's wrappers may not)
            lines = [x.strip() for x in re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).splitlines() if x.strip()]
            message = lines[-1] if lines else message
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise RuntimeError(
            f"the Ray job failed: {message} (rows already written are kept; rerun to resume)"
        ) from None


def _run(ray, requests, out, settings, loader, batch_size, on_row, workers, cpus_per_worker, block_lines):
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command shows its own
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = loader.get("device")
    use_gpu = (device or "").startswith("cuda") or (device is None and gpus > 0)
    if use_gpu and gpus == 0:
        raise RuntimeError(f"--device {device} asked for, but the Ray cluster has no GPUs")
    workers = workers or (gpus if use_gpu else 1)
    if use_gpu:
        loader = {**loader, "device": "cuda"}  # each actor sees its own GPU as cuda:0
    # Lines per call: a few times the rows, to keep them busy as lines end, but no more than spreads the
    # job over every worker.
    block = block_lines or max(batch_size, min(4 * batch_size, math.ceil(len(requests) / workers)))
    dataset = ray.data.from_items([{"request": r.to_json()} for r in requests])
    results = dataset.map_batches(
        BatchWorker,
        fn_constructor_kwargs={
            "loader": loader,
            "settings": settings.to_dict(),
            "batch_size": batch_size,
            "out": str(out.path.resolve()),
            "threads": 0 if use_gpu else cpus_per_worker,
        },
        batch_size=block,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
    )
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        for row in batch["row"]:
            on_row(json.loads(row))
