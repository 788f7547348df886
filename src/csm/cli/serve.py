"""`csm serve`: the OpenAI-compatible speech server (needs the `server` extra)."""

from __future__ import annotations

import argparse
import os

from . import common
from .common import CliError


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible speech server (needs the `server` extra)")
    common.add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--api-key", default=os.environ.get("CSM_API_KEY"), help="require this bearer key ($CSM_API_KEY)"
    )
    serve.add_argument(
        "--max-frames", type=int, default=None, help="frame cap per request (12.5 frames per second)"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=8, help="requests generated together (default: %(default)s)"
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests get to finish; new ones get 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        help="seconds a client may stop reading before it is dropped and its row freed (default: 30)",
    )
    serve.add_argument(
        "--batched-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode the audio of all requests in one codec call per step (default: on); with "
        "--no-batched-decode each request has a decoder of its own, and a seeded request's audio is bit "
        "for bit the same alone or batched",
    )
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args) -> int:
    try:
        from .. import server
    except ImportError as e:
        raise CliError(
            f"`csm serve` needs the server extra ({e.name or e}): pip install 'csm-speech[server]'"
        ) from None
    return int(server.main(args) or 0)
