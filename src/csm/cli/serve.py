"""`csm serve`: the OpenAI-compatible speech server (needs the `server` extra)."""

from __future__ import annotations

import argparse
import errno
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
megabytes_or_off = _number(float, 0, False, "a number of megabytes (0: off)")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def replicas_range(text: str) -> tuple[int, int]:
    """An argparse type: MIN:MAX replicas, 1 <= MIN <= MAX."""
    low, sep, high = text.partition(":")
    try:
        low, high = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, such as 1:4, got {text!r}") from None
    if not sep or not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def ray_args(serve) -> None:
    ray = serve.add_argument_group("replicas on Ray Serve (needs the ray extra)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: N replicas, each with its own model, behind Ray's HTTP proxy; requests "
        "of one session (X-Session-Id, X-Conversation-Id) go to one replica. Joins $RAY_ADDRESS, else starts "
        "a local Ray",
    )
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=None, help="replicas with --ray (default: 2)")
    scale.add_argument(
        "--autoscale",
        type=replicas_range,
        default=None,
        metavar="MIN:MAX",
        help="with --ray: between MIN and MAX replicas, one full batch of ongoing requests per replica",
    )
    ray.add_argument(
        "--cpus-per-replica", type=seconds, default=None, help="Ray CPUs each replica reserves (default: 1)"
    )
    ray.add_argument(
        "--gpus-per-replica", type=grace, default=None, help="Ray GPUs each replica reserves (default: 0)"
    )


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible speech server (needs the `server` extra)")
    common.add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=port, default=8000, help="port, 0-65535 (default: %(default)s)")
    serve.add_argument(
        "--api-key", default=os.environ.get("CSM_API_KEY"), help="require this bearer key ($CSM_API_KEY)"
    )
    serve.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAMES",
        help="comma-separated host names the server answers to besides IP addresses and localhost (a leading "
        "'.' takes subdomains; '*': any): other Host headers get 400, against DNS rebinding",
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
        "--prefix-cache-mb",
        type=megabytes_or_off,
        default=None,
        help="megabytes of keys and values kept for prompts' leading turns (voices, conversation history), "
        "so a request that begins as an earlier one did prefills only what is new; 0 turns it off "
        "(default: $CSM_PREFIX_CACHE_MB or 1024)",
    )
    serve.add_argument(
        "--metrics-public",
        action="store_true",
        default=None,
        help="serve GET /metrics (Prometheus) without the API key, for a scraper on a private network",
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
    ray_args(serve)
    serve.set_defaults(handler=cmd_serve)


def check_address(host: str, port: int) -> None:
    """Bind --host and --port as uvicorn will (SO_REUSEADDR), then let go: a bad address or a busy port is
    one line and exit 2 before the model loads, not uvicorn's "[Errno 98]" after it."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise CliError(
            f"--host {host}: not an address of this machine ({getattr(e, 'strerror', None) or e}); "
            "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CliError(
                    f"port {port} on {host} is in use (another csm serve?): stop that server, or pick another "
                    "with --port (--port 0: any free port)"
                ) from None
            if e.errno == errno.EACCES:
                raise CliError(
                    f"port {port} needs administrator rights on this system: use a port above 1023, e.g. --port 8000"
                ) from None
            raise CliError(
                f"cannot listen on {host}:{port} ({e.strerror}): --host must be an address of this machine "
                "(127.0.0.1, 0.0.0.0, or one of its interfaces)"
            ) from None


def cmd_serve(args) -> int:
    check_address(args.host, args.port)
    try:
        from .. import server
    except ImportError as e:
        raise CliError(
            f"`csm serve` needs the server extra ({e.name or e}): pip install 'csm-speech[server]'"
        ) from None
    launch = None
    if getattr(args, "ray", False):
        from ..ray_serve import run as launch
    return int(server.main(args, launch) or 0)
