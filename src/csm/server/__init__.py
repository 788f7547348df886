"""OpenAI-compatible speech server with continuous batching (`csm serve`); needs the `server` extra."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .app import ServerSettings, check_api_key, create_app
from .drain import run_server
from .limits import uvicorn_config

__all__ = ["ServerSettings", "create_app", "load_app", "main", "model_id", "uvicorn_config"]


def model_id(model: str) -> str:
    """The id /v1/models gives for what --model named: a hub id as it is (`sesame/csm-1b`), a folder of the
    hub's cache by its repo id, any other folder by its name: never a path of the server's disk."""
    path = Path(model).expanduser()
    if not path.exists():
        return model
    path = path.resolve()
    for part in path.parts:
        if part.startswith("models--"):  # ~/.cache/huggingface/hub/models--sesame--csm-1b/snapshots/<hash>
            return part.removeprefix("models--").replace("--", "/")
    return path.name or "csm"


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
    from ..pipeline import pick_device, pick_dtype, pick_quantize
    from ..processor import CsmProcessor

    device = pick_device(device)
    model = CsmForConditionalGeneration.from_pretrained(
        model_path, dtype=pick_dtype(dtype, device), device=device, quantize=pick_quantize(quantize, dtype)
    )
    model.eval()
    processor = CsmProcessor.from_pretrained(model_path)
    settings = settings or ServerSettings(model_name=model_id(str(model_path)))
    settings.model_path = settings.model_path or str(model_path)
    return create_app(model, processor, settings)


def main(args: argparse.Namespace, launch=None) -> int:
    """Run the server: `csm serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8000] [--api-key KEY]`; on SIGTERM
    it stops admitting (503), lets in-flight requests finish within `--shutdown-grace` seconds, and exits 0.
    `launch(args, settings)`, when given, runs the checked settings instead (`csm serve --ray`)."""
    try:
        import uvicorn  # noqa: F401  (checked before loading the model)
    except ImportError:
        print("the server needs its extra: pip install 'csm-speech[server]'")
        return 1
    served = getattr(args, "served_model_name", None) or model_id(str(args.model))
    settings = ServerSettings(
        model_name=served, model_path=str(args.model), api_key=getattr(args, "api_key", None)
    )
    for name in (
        "max_batch_size",
        "max_queue",
        "max_frames",
        "max_input_chars",
        "voices_dir",
        "max_voices",
        "stall_timeout",
        "batched_decode",
        "prefix_cache_mb",
        "metrics_public",
        "max_sessions",
        "session_idle_timeout",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    if getattr(args, "max_voices_mb", None) is not None:
        settings.max_voices_bytes = int(args.max_voices_mb * 1024 * 1024)
    try:  # before the model loads
        check_api_key(settings.api_key)
    except ValueError as e:
        print(f"--api-key: {e}")
        return 2
    allowed = getattr(args, "allowed_hosts", None)
    if allowed:
        settings.allowed_hosts = [h.strip() for h in allowed.split(",") if h.strip()]
    if settings.max_batch_size < 1:
        print(f"--max-batch-size must be >= 1, got {settings.max_batch_size}")
        return 2
    host = getattr(args, "host", None) or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logging.getLogger("csm.server").warning(
            "listening on %s without --api-key: anyone who can reach it can use it", host
        )
    if launch is None and (getattr(args, "replicas", None) or getattr(args, "autoscale", None)):
        print("--replicas and --autoscale go with --ray")
        return 2
    if launch is not None:
        return launch(args, settings)
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
    port = getattr(args, "port", None)
    port = 8000 if port is None else int(port)  # 0: any free port
    grace = getattr(args, "shutdown_grace", None)
    grace = 30.0 if grace is None else float(grace)
    run_server(app, host, port, grace)
    return 0
