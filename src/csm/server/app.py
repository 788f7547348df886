"""The OpenAI-compatible HTTP API: /v1/audio/speech, /v1/voices, /v1/models, /health (and /docs), the extra
/v1/audio/dialogue, and the web page at /. `create_app` wires the routers of `routes/` (and the page) around one
`Service` (model, processor, scheduler, settings, voices); `RequestContext` checks the API key, adds request ids
and refuses new requests while draining, for every route at once."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ..audio import MAX_CLIP_SECONDS
from ..chunking import MAX_CHUNK_CHARS
from .docs import add_docs
from .errors import PARSE_FAILED, parse_failure_message, validation_message
from .limits import BodyLimit
from .routes import dialogue, session, speech, status, voices
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
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


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
    head_timeout: float = 10.0  # seconds for a request's line and headers (see limits.http_protocol)
    read_timeout: float = 30.0  # seconds a client may pause while sending a body
    max_transcript_chars: int = 1000  # a voice's transcript: the words of at most a minute of speech
    max_voices: int = 100  # voices saved through the API; more get 409
    max_voices_bytes: int = 512 * 1024 * 1024  # disk the voices folder may take; more gets 409
    voice_cache: int = 8  # saved voices kept in memory (the last used); others are read from disk when used
    voices_dir: str | None = None  # default: $CSM_VOICES_DIR or ~/.local/share/csm/voices
    api_key: str | None = None
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


def authorized(header: bytes, key: str) -> bool:
    """Whether an Authorization header carries `key` as a bearer token (the scheme in any case, RFC 9110)."""
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class RequestContext:
    """ASGI middleware around the whole app: an X-Request-ID on every response (the client's, or a new one), the
    API key check, 503 for new requests while draining, a time limit on each write to a client that stopped
    reading, a 500 (or an aborted transfer, once bytes were sent) for anything that escaped the handlers, and
    one access log line per request (`csm.access`: method, path, status, seconds, client, request id)."""

    def __init__(self, app, settings: ServerSettings, scheduler: Scheduler):
        self.app, self.settings, self.scheduler = app, settings, scheduler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["cleanup"] = rid, []
        started, status, outcome = False, 0, ""

        async def send_with_id(message):
            nonlocal started, status
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
            key = self.settings.api_key
            if key and scope["path"].startswith("/v1/"):
                if not authorized(dict(scope["headers"]).get(b"authorization", b""), key):
                    raise ApiError(
                        401,
                        "missing or wrong API key: send `Authorization: Bearer <key>`",
                        "authentication_error",
                    )
            if self.scheduler.draining and scope["path"] not in ("/health", "/v1/stats"):
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
                log.error("request %s failed after audio was sent, transfer aborted: %s", rid, e)
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
            client = scope.get("client") or ("-", 0)
            access.info(
                '"%s %s" %d%s %.3fs client=%s:%s rid=%s',
                scope["method"],
                scope["path"],
                status,
                outcome,
                time.perf_counter() - t0,
                client[0],
                client[1],
                rid,
            )


def create_app(model, processor, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around a loaded model and processor; the scheduler runs while the app runs."""
    settings = settings or ServerSettings()
    scheduler = Scheduler(
        model,
        settings.max_batch_size,
        settings.max_seq_len,
        settings.max_queue,
        settings.chunk_frames,
        batched_decode=settings.batched_decode,
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
    app.add_middleware(
        BodyLimit,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        read_timeout=settings.read_timeout,
    )
    app.add_middleware(
        RequestContext, settings=settings, scheduler=scheduler
    )  # outermost: ids on all answers
    add_page(app)
    add_docs(app)
    for router in (status.router, voices.router, speech.router, dialogue.router, session.router):
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
