"""`csm serve`: the OpenAI-compatible speech server (needs the `server` extra)."""

from __future__ import annotations

import argparse
import math
import os

from . import common
from .common import CliError


def _number(kind, low: float, strict: bool, what: str):
    """An argparse type: a `kind` (int or float) > low (strict) or >= low; one line of error otherwise."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value

    return parse


positive_int = _number(int, 0, True, "a whole number")
count = _number(int, 0, False, "a whole number")
seconds = _number(float, 0, True, "a number of seconds")
grace = _number(float, 0, False, "a number of seconds")
megabytes = _number(float, 0, True, "a number of megabytes")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible speech server (needs the `server` extra)")
    common.add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=port, default=8000, help="port, 0-65535 (default: %(default)s)")
    serve.add_argument(
        "--api-key", default=os.environ.get("CSM_API_KEY"), help="require this bearer key ($CSM_API_KEY)"
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="the model id /v1/models lists (default: the hub id given to --model, or its folder's name)",
    )
    serve.add_argument(
        "--max-frames",
        type=positive_int,
        default=None,
        help="frame cap per request, all its sentences and dialogue turns together (12.5 frames per second; "
        "default: 1500, two minutes)",
    )
    serve.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=8,
        help="requests generated together (default: %(default)s)",
    )
    serve.add_argument(
        "--max-voices",
        type=count,
        default=None,
        help="voices that POST /v1/voices may save; more get 409 (default: 100)",
    )
    serve.add_argument(
        "--max-voices-mb",
        type=megabytes,
        default=None,
        help="megabytes the saved voices may take on disk; more get 409 (default: 512)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=grace,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests get to finish; new ones get 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--stall-timeout",
        type=seconds,
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
    serve.add_argument(
        "--max-sessions",
        type=count,
        default=None,
        help="realtime sessions (WebSocket /v1/audio/session) open at once; more are closed with 1013 "
        "(default: 16)",
    )
    serve.add_argument(
        "--session-idle-timeout",
        type=seconds,
        default=None,
        help="seconds a session may send nothing while nothing is said before it expires (1008; default: 60)",
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
