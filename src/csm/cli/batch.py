"""`csm batch REQUESTS.jsonl --out DIR`: a whole corpus in one run, resumable, on one machine or on Ray."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from ..batch.output import MANIFEST, OutputDir
from ..batch.requests import FORMATS, BadLine, read_requests, set_request_keys, voice_finder
from . import common
from .common import CliError

SHOWN_BAD_LINES = 20
EXIT_LINES_FAILED = 1  # some line has no audio: it failed while generating, or was a bad line (--skip-bad)


def add_parser(sub) -> None:
    batch = sub.add_parser("batch", help="speak every line of a JSON-lines file into DIR (resumable; --ray)")
    add_arguments(batch)
    common.add_model_args(batch)
    common.add_generation_args(batch)
    batch.set_defaults(handler=cmd_batch)


def cmd_batch(args) -> int:
    if args.speaker is not None and args.speaker < 0:
        raise CliError(f"--speaker must be a speaker id >= 0, got {args.speaker}")
    for clip, transcript in args.context:  # read now: a bad clip is one line before the model loads
        if Path(clip).expanduser().is_file():
            if not transcript.strip():
                raise CliError(
                    f"--context {clip}: the transcript is empty; give the words spoken in the clip"
                )
            try:
                common.context(args)
            except (OSError, ValueError) as e:
                raise CliError(f"--context: {e}") from None
            break
    return run(args, common.load_pipeline, CliError)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `csm batch` besides the model and generation flags it shares with `csm say`."""
    p.add_argument(
        "requests",
        help='UTF-8 JSON lines: {"id": ..., "text": ..., and optional "speaker", "voice", "seed", "format"}, or '
        'a dialogue: {"id": ..., "turns": [{"speaker": 0, "text": ...}, ...], "voices": {"0": NAME}, "pause": S}; '
        "or a .csv file whose first row names its columns (id, text, speaker, voice, seed, format)",
    )
    p.add_argument("-o", "--out", required=True, help="output folder: <id>.<format> files and manifest.jsonl")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="lines generated together, per worker (default: %(default)s)",
    )
    p.add_argument(
        "--format", default="wav", choices=FORMATS, help="audio format of lines without one (default: wav)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="record malformed lines and duplicate ids as failed and run the rest, then exit with status 1 "
        "(default: stop before any work)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data: a cluster address (auto, ray://host:10001), or none for a local instance",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --ray: model replicas (default: one per GPU of the cluster, else 1)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        help="with --ray: CPUs (and torch threads) per CPU worker (default: %(default)s)",
    )
    p.add_argument(
        "--batched-decode",
        action="store_true",
        help="decode the rows' audio in one codec call per step (for GPUs, where a call per row costs more "
        "than the frame step); a line's audio then equals its solo run's within one 16-bit step instead of bit "
        "for bit; recorded in the job",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar or summary (errors still print)"
    )


def _settings(args, seed: int):
    """The job's settings from the flags, with paths made absolute (workers may run elsewhere)."""
    from ..batch.runner import JobSettings

    model = (
        str(Path(args.model).expanduser().resolve()) if Path(args.model).expanduser().is_dir() else args.model
    )
    context = []
    for clip, text in args.context:
        if not Path(clip).expanduser().is_file():
            raise ValueError(f"--context clip not found: {clip}")
        context.append([str(Path(clip).expanduser().resolve()), text])
    return JobSettings(
        model=model,
        seed=seed,
        speaker=args.speaker,
        voice=voice_finder()(args.voice) if args.voice else None,
        context=context,
        temperature=args.temperature,
        top_k=args.top_k,
        max_seconds=args.max_seconds,
        quantize=args.quantize,
        batched_decode=args.batched_decode,
    )


def _report_bad(path: str, bad: list[BadLine]) -> None:
    for b in bad[:SHOWN_BAD_LINES]:
        print(f"csm: {path}:{b.line}: {b.error}", file=sys.stderr)
    if len(bad) > SHOWN_BAD_LINES:
        print(f"csm: ... and {len(bad) - SHOWN_BAD_LINES} more bad line(s)", file=sys.stderr)


def run(args, load_pipeline, error=ValueError) -> int:
    """Run the batch command; `load_pipeline(model, device, dtype, quiet)` loads the model (the CLI's)."""
    if args.workers is not None and args.ray is None:
        raise error("--workers needs --ray (one process runs one model; use --batch-size for more rows)")
    if args.ray is not None:
        from ..batch.on_ray import import_ray

        try:
            import_ray()
        except ImportError as e:
            raise error(str(e)) from None
    if args.batch_size < 1 or (args.workers is not None and args.workers < 1) or args.cpus_per_worker < 1:
        raise error("--batch-size, --workers and --cpus-per-worker must be >= 1")
    common.check_sampling(args)
    # The seed: given, else the job's (a rerun), else a new one, printed.
    job = OutputDir(args.out).job_settings() if Path(args.out).expanduser().is_dir() else None
    seed = args.seed if args.seed is not None else job["seed"] if job else random.randrange(2**31)
    settings = _settings(args, seed)
    if (
        args.ray is not None and Path(settings.model).is_dir()
    ):  # a bad folder: one line here, not in each worker
        from ..config import CsmConfig

        CsmConfig.from_pretrained(settings.model)
    good, bad = read_requests(args.requests, seed, args.format)
    set_request_keys(good, settings.voice, settings.context)
    if bad and not args.skip_bad:
        _report_bad(args.requests, bad)
        raise error(
            f"{len(bad)} bad line(s) in {args.requests}; nothing was generated: fix them, or pass --skip-bad "
            "to record them as failed and run the rest"
        )
    out = OutputDir.open(args.out, settings.to_dict())
    try:
        return _run(args, out, settings, good, bad, load_pipeline)
    finally:
        out.close()


def _run(args, out: OutputDir, settings, good, bad, load_pipeline) -> int:
    quiet = args.quiet
    state = out.state()
    done = out.done()
    # A line made before whose request changed since (its text, speaker, voice, seed, format, ...) is made
    # again; its old file stays until the new one is in place. Rows from before hashes were kept count as done.
    changed = [r for r in good if r.id in done and state[r.id].get("request_hash", r.key) != r.key]
    done -= {r.id for r in changed}
    todo = [r for r in good if r.id not in done]
    if bad:
        if not quiet:
            _report_bad(args.requests, bad)
        # A rerun records a bad line again only when it is new: not already its id's current row (or, for a
        # line without a usable id, not already in the manifest).
        anonymous = {(r.get("line"), r.get("error")) for r in out.rows() if r.get("id") is None}
        rows = [
            {"id": b.id, "line": b.line, "status": "failed", "error": f"bad line: {b.error}"}
            for b in bad
            if b.id not in done
        ]
        out.append(
            [
                r
                for r in rows
                if (r["id"] is None and (r["line"], r["error"]) not in anonymous)
                or (r["id"] is not None and state.get(r["id"]) != r)
            ]
        )
    if changed and not quiet:
        names = ", ".join(f"{r.id} (line {r.line})" for r in changed[:SHOWN_BAD_LINES])
        more = f" and {len(changed) - SHOWN_BAD_LINES} more" if len(changed) > SHOWN_BAD_LINES else ""
        print(
            f"csm batch: {len(changed)} line(s) changed since their audio was made, made again: {names}{more}",
            file=sys.stderr,
        )
    if not quiet:
        print(
            f"csm batch: {len(todo)} line(s) to generate, {len(good) - len(todo)} done before, "
            f"{len(bad)} bad; seed {settings.seed}; writing to {out.path}",
            file=sys.stderr,
        )
    stats = {"ok": 0, "failed": 0, "seconds": 0.0}
    bar = None
    start = time.perf_counter()

    def on_row(row: dict) -> None:
        out.append([row])  # the file is in place: the row may now say so
        if row["status"] == "ok" and row["id"] in state:
            out.replaced(state[row["id"]], row)
        stats[row["status"]] += 1
        stats["seconds"] += row.get("seconds", 0.0)
        if bar is not None:
            rate = stats["seconds"] / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats['seconds']:.1f} s audio, {rate:.2f} audio-s/s", refresh=False)
            bar.update(1)

    def progress():
        nonlocal bar, start
        start = time.perf_counter()  # the rates count generation, not loading the model
        if not quiet:
            bar = common.progress_bar(len(todo), "csm batch", "line")

    try:
        if todo:
            loader = {
                "model": settings.model,
                "device": args.device,
                "dtype": args.dtype,
                "quantize": settings.quantize,
            }
            if args.ray is not None:
                from ..batch.on_ray import run_on_ray

                progress()
                run_on_ray(
                    args.ray, todo, out, settings, loader, args.batch_size, on_row, args.workers,
                    args.cpus_per_worker,
                )  # fmt: skip
            else:
                from ..batch.runner import Synthesizer

                synth = Synthesizer(load_pipeline(**loader, quiet=quiet), settings, args.batch_size)
                progress()
                synth.run(todo, out, on_row)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        ok = len(out.done() & {r.id for r in todo})  # from the manifest: a row is there once its file is
        print(
            f"csm batch: interrupted: {ok} of {len(todo)} line(s) made in this run, {len(good) - len(todo)} "
            f"before; {len(todo) - ok} left. "
            f"Their files and {out.path / MANIFEST} are kept: rerun the same command to make the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        if bar is not None:
            bar.close()
    took = time.perf_counter() - start
    failed = stats["failed"] + len(bad)
    retry = "; rerun the same command to retry the failed" if stats["failed"] else ""
    fix = f"; fix the {len(bad)} bad line(s) and rerun to make them" if bad else ""
    if not quiet:
        print(
            f"csm batch: {stats['ok']} ok, {stats['failed']} failed, {len(good) - len(todo)} done before, "
            f"{len(bad)} bad line(s): {stats['seconds']:.1f} s of audio in {took:.1f} s "
            f"({stats['seconds'] / max(took, 1e-9):.2f} audio-s/s, {(stats['ok'] + stats['failed']) / max(took, 1e-9):.2f} lines/s); "
            f"manifest {out.path / MANIFEST}{retry}{fix}",
            file=sys.stderr,
        )  # fmt: skip
    elif failed:  # -q still says that the exit status is not 0, and why
        print(
            f"csm batch: {stats['failed']} line(s) failed, {len(bad)} bad line(s): see {out.path / MANIFEST}"
            f"{retry}{fix}",
            file=sys.stderr,
        )
    return EXIT_LINES_FAILED if failed else 0
