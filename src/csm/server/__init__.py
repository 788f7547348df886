"""OpenAI-compatible speech server with continuous batching (`csm serve`); needs the `server` extra."""

from __future__ import annotations

import argparse
import logging
import signal

from .app import ServerSettings, create_app
from .limits import uvicorn_config

__all__ = ["ServerSettings", "create_app", "load_app", "main", "uvicorn_config"]


def load_app(
    model_path: str,
    device: str | None = None,
    dtype: str | None = None,
    settings: ServerSettings | None = None,
    quantize: str | None = None,
):
    """Load a checkpoint folder or hub id (model and processor) and build the app around it; `quantize`
    ("int8", "int4") quantizes the weights as they load."""
    from ..model import CsmForConditionalGeneration
    from ..pipeline import pick_device, pick_dtype
    from ..processor import CsmProcessor

    device = pick_device(device)
    model = CsmForConditionalGeneration.from_pretrained(
        model_path, dtype=pick_dtype(dtype, device), device=device, quantize=quantize
    )
    model.eval()
    processor = CsmProcessor.from_pretrained(model_path)
    return create_app(model, processor, settings or ServerSettings(model_name=str(model_path)))


def main(args: argparse.Namespace) -> int:
    """Run the server: `csm serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8000] [--api-key KEY]`; on SIGTERM
    it stops admitting (503), lets in-flight requests finish within `--shutdown-grace` seconds, and exits 0."""
    try:
        import uvicorn
    except ImportError:
        print("the server needs its extra: pip install 'csm-speech[server]'")
        return 1
    settings = ServerSettings(model_name=str(args.model), api_key=getattr(args, "api_key", None))
    for name in (
        "max_batch_size",
        "max_queue",
        "max_frames",
        "max_input_chars",
        "voices_dir",
        "stall_timeout",
        "batched_decode",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    if settings.max_batch_size < 1:
        print(f"--max-batch-size must be >= 1, got {settings.max_batch_size}")
        return 2
    host = getattr(args, "host", None) or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logging.getLogger("csm.server").warning(
            "listening on %s without --api-key: anyone who can reach it can use it", host
        )
    try:
        app = load_app(
            args.model,
            getattr(args, "device", None),
            getattr(args, "dtype", None),
            settings,
            quantize=getattr(args, "quantize", None),
        )
    except (ValueError, OSError) as e:
        print(f"cannot load {args.model}: {e}")
        return 2
    port = int(getattr(args, "port", None) or 8000)
    grace = getattr(args, "shutdown_grace", None)
    grace = 30.0 if grace is None else float(grace)
    logging.basicConfig(format="%(levelname)s:     %(message)s")  # csm's own lines beside uvicorn's
    logging.getLogger("csm").setLevel(logging.INFO)  # e.g. the start-up times (load, compile, capture)
    config = uvicorn_config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=grace)
    server = uvicorn.Server(config)
    exit_now = server.handle_exit

    def drain(sig, frame):  # stop admitting at once; uvicorn waits up to `grace` for in-flight requests
        app.state.scheduler.draining = True
        exit_now(sig, frame)

    server.handle_exit = drain
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler lets us exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0
