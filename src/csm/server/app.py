"""The OpenAI-compatible HTTP API: /v1/audio/speech, /v1/voices, /v1/models, /health (and /docs), the extra
/v1/audio/dialogue, and the web page at /. `create_app` wires the routers of `routes/` (and the page) around one
`Service` (model, processor, scheduler, settings, voices); `RequestContext` checks the API key, adds request ids
and refuses new requests while draining, for every route at once."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ..audio import MAX_CLIP_SECONDS
from ..chunking import MAX_CHUNK_CHARS
from ..prefix_cache import set_store_bytes
from .docs import add_docs
from .errors import PARSE_FAILED, parse_failure_message, validation_message
from .limits import BodyLimit, authorized
from .metrics import ServerMetrics
from .routes import dialogue, metrics, session, speech, status, voices
from .scheduler import Scheduler
from .schemas import errors
from .service import VOICE_NAME, Service, frames_for_text  # noqa: F401 (kept importable from here)
from .speech import ApiError
from .web import add_page

log = logging.getLogger("csm.server")
access = logging.getLogger("csm.access")
SESSION_DOCS = (
    "**Realtime sessions** for voice agents are a WebSocket, which OpenAPI cannot describe: "
    "`ws://HOST/v1/audio/session`. Send `session.start` (voices, seed, sampling, `format` pcm16 or float32 at "
    "24 kHz), then `user.turn` (audio and transcript), `text.delta` (the agent's reply as LLM tokens: each "
    "sentence is spoken as soon as it is complete), `flush`, `cancel` (barge-in) and `truncate` (to the audio "
    "played). Audio comes back as `audio` messages tagged with `turn_id` and `sentence_id`. The protocol, "
    "limits and close codes are in the README (section *Realtime sessions*); a Python client is "
    "`csm.client.session.SessionClient`."
)
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces (fullmatch)
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass
class ServerSettings:
    """Limits and defaults of one server."""

    model_name: str = "csm"  # the id /v1/models lists: never a local path (see `model_id`)
    model_path: str | None = None  # what --model named: still accepted as a request's `model`
    max_batch_size: int = 8
    max_queue: int = 64  # waiting requests beyond the busy rows; more get 429
    max_seq_len: int = 2048  # positions per row: prompt tokens + frames
    max_frames: int = 1500  # per request: 2 minutes at 12.5 frames/s
    max_input_chars: int = 4096
    max_chunk_chars: int = MAX_CHUNK_CHARS  # longer input is spoken sentence by sentence, each in context
    chunk_frames: int = 4  # frames decoded and sent together when streaming (0.32 s)
    max_buffered_chunks: int = 16  # audio chunks made but not yet sent, per request; beyond, decoding waits
    stall_timeout: float = 30.0  # seconds a client may stop reading before it is dropped and its row freed
    batched_decode: bool = True  # the rows' audio decoded in one codec call (csm.batching)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_seconds: float = MAX_CLIP_SECONDS  # checked from a clip's header, then while decoding it
    max_body_bytes: int = 32 * 1024 * 1024  # a JSON body: a clip at the upload limit in base64, and more
    max_inflight_bytes: int = 256 * 1024 * 1024  # all bodies being received at once; more get 503
    max_connections: int = 512  # open connections (uvicorn's limit_concurrency); more get 503
    max_context_seconds: float = 120.0  # a request's context clips together (from their headers); more: 413
    max_context_samples: int = (
        120 * 48_000 * 2
    )  # their samples over all channels at their own rate: decode work
    decode_workers: int = 2  # threads that decode request clips (their own pool: never the routes')
    max_request_voices: int = (
        8  # saved voices one request may name (each read from disk, kept in every prompt)
    )
    head_timeout: float = 10.0  # seconds for a request's line and headers (see limits.http_protocol)
    read_timeout: float = 30.0  # seconds a client may pause while sending a body
    max_transcript_chars: int = 1000  # a voice's transcript: the words of at most a minute of speech
    max_voices: int = 100  # voices saved through the API; more get 409
    max_voices_bytes: int = 512 * 1024 * 1024  # disk the voices folder may take; more gets 409
    voice_cache: int = 8  # saved voices kept in memory (the last used); others are read from disk when used
    voice_cache_bytes: int = 64 * 1024 * 1024  # their audio and codes together; a voice larger is not cached
    voices_dir: str | None = None  # default: $CSM_VOICES_DIR or ~/.local/share/csm/voices
    api_key: str | None = None
    prefix_cache_mb: float | None = None  # the prefix store's bound (csm.prefix_cache); None: its default
    prefill_chunk: int | str | None = "auto"  # a joining prompt's positions per step (csm.batching)
    allowed_hosts: list[str] | None = None  # Host names served besides IP literals and localhost; ["*"]: any
    metrics_public: bool = False  # GET /metrics without the API key (for a scraper inside a private network)
    max_sessions: int = 16  # realtime sessions (/v1/audio/session) open at once; more are closed with 1013
    session_idle_timeout: float = 60.0  # seconds a session may send nothing while nothing is said (1008)
    max_session_message_bytes: int = 8 * 1024 * 1024  # one session message (a user turn's audio): 1009
    max_session_audio_bytes: int = 64 * 1024 * 1024  # audio (and codes) a session's turns hold: 1009


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    headers=None,
    code: str | None = None,
):
    return JSONResponse(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


class ClientStalled(Exception):
    """The client read nothing for `stall_timeout` seconds."""


def log_safe(text: str, limit: int = 512) -> str:
    """`text` for a log line: control characters (CR, LF, ESC...) and non-ASCII escaped, so that a client cannot
    write a line of its own choosing into the log; cut at `limit` characters."""
    shown = text.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if 0x20 <= ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in shown)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def host_allowed(host: str, allowed: list[str] | None) -> bool:
    """Whether a request's Host header names this server: an IP literal, localhost (or *.localhost), or one of
    `allowed` ("*": any; ".example.com": the domain and its subdomains). A page on another domain cannot
    reach a server through a name it controls (DNS rebinding) since its name is not on the list."""
    if allowed and "*" in allowed:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return True
    for entry in allowed or []:
        entry = entry.lower()
        if name == entry or (entry.startswith(".") and (name.endswith(entry) or name == entry[1:])):
            return True
    return False


def same_origin(origin: str, host: str, allowed: list[str] | None = None) -> bool:
    """Whether an Origin header is the page of this very server: its host and port are the request's Host, or
    (behind a proxy that rewrites Host) its host is one of `allowed` by name (`--allowed-hosts`; "*" is not
    enough: it says any Host, not any page)."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    if parts.netloc.lower() == host.lower():
        return True
    names = [a for a in allowed or [] if a != "*"]
    return bool(names) and host_allowed(parts.netloc, names) and not host_allowed(parts.netloc, None)


def check_api_key(key: str | None) -> None:
    """ValueError for a key no client could send or that would let anyone in: empty (an empty --api-key or
    $CSM_API_KEY used to turn auth off silently), or not visible ASCII (HTTP headers carry bytes: a non-ASCII
    key could never match)."""
    if key is None:
        return
    if not key.strip():
        raise ValueError(
            "the API key is empty, which would let anyone in: give a key, or leave --api-key and $CSM_API_KEY unset"
        )
    if not all(0x21 <= ord(c) < 0x7F for c in key):
        raise ValueError(
            "the API key must be visible ASCII characters (no spaces, no accents): clients send it in an HTTP "
            "header, where any other key could never match"
        )


class RequestContext:
    """ASGI middleware around the whole app: an X-Request-ID on every response (the client's, or a new one), the
    API key check, 503 for new requests while draining, a time limit on each write to a client that stopped
    reading, a 500 (or an aborted transfer, once bytes were sent) for anything that escaped the handlers, and
    one access log line per request (`csm.access`: method, path, status, seconds, client, request id)."""

    def __init__(self, app, settings: ServerSettings, scheduler: Scheduler):
        self.app, self.settings, self.scheduler = app, settings, scheduler

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # a page elsewhere must not open one either (cross-site hijacking)
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            origin = headers.get(b"origin")
            if not host_allowed(host, self.settings.allowed_hosts) or (
                origin is not None
                and not same_origin(origin.decode("latin-1"), host, self.settings.allowed_hosts)
            ):
                return await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["cleanup"], state["t0"] = rid, [], t0
        started, status, outcome, error_body = False, 0, "", None

        async def send_with_id(message):
            nonlocal started, status, error_body
            if status >= 400 and message["type"] == "http.response.body" and error_body is None:
                error_body = message.get("body", b"")  # the error's JSON, for csm_errors_total's code
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            elif message["type"] == "http.response.body" and message.get("more_body"):
                try:
                    return await asyncio.wait_for(send(message), self.settings.stall_timeout)
                except asyncio.TimeoutError:
                    raise ClientStalled from None
            await send(message)

        try:
            host = headers.get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.settings.allowed_hosts):
                raise ApiError(
                    400,
                    f"this server does not answer to the host {log_safe(host, 80)!r}: use its address, or start "
                    "it with --allowed-hosts NAME",
                    code="host_not_allowed",
                )
            origin = headers.get(b"origin")
            if origin is not None and scope["method"] in STATE_CHANGING:
                if not same_origin(origin.decode("latin-1"), host, self.settings.allowed_hosts):
                    raise ApiError(
                        403,
                        "cross-origin requests may not change anything: a web page of another site cannot use "
                        "this server (send the request from its own page, or without an Origin header)",
                        "permission_error",
                        code="cross_origin",
                    )
            key = self.settings.api_key
            path = scope["path"]
            if key and (path.startswith("/v1/") or (path == "/metrics" and not self.settings.metrics_public)):
                if not authorized(dict(scope["headers"]).get(b"authorization", b""), key):
                    raise ApiError(
                        401,
                        "missing or wrong API key: send `Authorization: Bearer <key>`",
                        "authentication_error",
                    )
            if self.scheduler.draining and path not in ("/health", "/v1/stats", "/metrics"):
                # expected while draining: answered, but not logged as a failure
                message = "the server is shutting down; retry on another instance"
                return await error_response(503, message, "server_error")(scope, receive, send_with_id)
            self.scheduler.in_flight += 1
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self.scheduler.in_flight -= 1
        except ClientStalled:
            outcome = " dropped"
            log.warning(
                "request %s: the client read nothing for %g s; dropped", rid, self.settings.stall_timeout
            )
        except Exception as e:
            if started:  # the client sees an incomplete response, never a clean short file
                outcome = " aborted"
                log.error(
                    "request %s failed after audio was sent, transfer aborted: %s",
                    rid,
                    log_safe(f"{type(e).__name__}: {e}"),
                    exc_info=not isinstance(e, ApiError),
                )
            else:
                if not isinstance(e, ApiError):
                    log.exception("request %s failed", rid)
                    e = ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
                elif e.status >= 500:
                    log.error("request %s failed: %s", rid, e.message)
                headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
                response = error_response(e.status, e.message, e.type, e.param, headers, e.code)
                await response(scope, receive, send_with_id)
        finally:
            for cleanup in state["cleanup"]:
                cleanup()
            route = getattr(scope.get("route"), "path", None) or "other"  # a template: never a raw path
            self.scheduler.metrics.answered(route, status, error_body)
            client = scope.get("client") or ("-", 0)
            speech = state.get("speech")  # prompt positions found in the prefix store / all of them
            prefix = f" prefix={speech.reused}/{speech.prompt_len}" if speech is not None else ""
            access.info(
                '"%s %s" %d%s %.3fs client=%s:%s rid=%s%s',
                log_safe(scope["method"], 16),
                log_safe(scope["path"]),
                status,
                outcome,
                time.perf_counter() - t0,
                client[0],
                client[1],
                rid,
                prefix,
            )


def create_app(model, processor, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around a loaded model and processor; the scheduler runs while the app runs."""
    settings = settings or ServerSettings()
    check_api_key(settings.api_key)
    if settings.prefix_cache_mb is not None:
        set_store_bytes(model, int(settings.prefix_cache_mb * (1 << 20)))
    scheduler = Scheduler(
        model,
        settings.max_batch_size,
        settings.max_seq_len,
        settings.max_queue,
        settings.chunk_frames,
        batched_decode=settings.batched_decode,
        prefill_chunk=settings.prefill_chunk,
        metrics=ServerMetrics(),
    )

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(
        title="csm",
        summary="OpenAI-compatible text-to-speech with Sesame's CSM",
        description=SESSION_DOCS,
        lifespan=lifespan,
        responses=errors(400, 408, 413, 500),  # 408, 413: limits.BodyLimit and http_protocol
        docs_url=None,  # add_docs serves them with local assets
        redoc_url=None,
    )
    app.state.scheduler, app.state.settings = scheduler, settings
    app.state.service = Service(model, processor, settings, scheduler)
    app.state.voices = app.state.service.voices
    app.state.metrics = scheduler.metrics
    scheduler.metrics.watch(scheduler, app.state.service)
    service = app.state.service
    scheduler.metrics.sessions_open.set_function(lambda: service.sessions_open)  # read at scrape time
    app.add_middleware(
        BodyLimit,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        read_timeout=settings.read_timeout,
        max_inflight_bytes=settings.max_inflight_bytes,
    )
    app.add_middleware(
        RequestContext, settings=settings, scheduler=scheduler
    )  # outermost: ids on all answers
    add_page(app)
    add_docs(app)
    for router in (
        status.router,
        voices.router,
        speech.router,
        dialogue.router,
        metrics.router,
        session.router,
    ):
        app.include_router(router)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        if e.status >= 500:
            log.error("request %s failed: %s", request.state.request_id, e.message)
        return error_response(e.status, e.message, e.type, e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        message, param = validation_message(e, request.url.path, request.headers.get("content-type"))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        message = str(e.detail)
        if message == PARSE_FAILED:
            message = parse_failure_message(e.__cause__)
        elif isinstance(e.__context__, MultiPartException):
            message = f"the upload is not valid multipart/form-data ({message}): send audio_file, name and transcript"
        return error_response(e.status_code, message, kind, headers=e.headers)

    return app


def settings_dict(settings: ServerSettings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k != "api_key"}
