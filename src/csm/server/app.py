"""The OpenAI-compatible HTTP API: /v1/audio/speech, /v1/voices, /v1/models, /health (and /docs), the extra
/v1/audio/dialogue, and the web page at /. `create_app` wires the routers of `routes/` (and the page) around one
`Service` (model, processor, scheduler, settings, voices); `RequestContext` checks the API key, adds request ids
and refuses new requests while draining, for every route at once."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chunking import MAX_CHUNK_CHARS
from .routes import dialogue, speech, status, voices
from .scheduler import Scheduler
from .schemas import errors
from .service import VOICE_NAME, Service, frames_for_text  # noqa: F401 (kept importable from here)
from .speech import ApiError
from .web import add_page

log = logging.getLogger("csm.server")
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


@dataclass
class ServerSettings:
    """Limits and defaults of one server."""

    model_name: str = "csm"
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
    max_upload_seconds: float = 60.0
    voices_dir: str | None = None  # default: $CSM_VOICES_DIR or ~/.local/share/csm/voices
    api_key: str | None = None


def error_response(
    status: int, message: str, type: str = "invalid_request_error", param: str | None = None, headers=None
):
    return JSONResponse(
        {"error": {"message": message, "type": type, "param": param, "code": None}},
        status_code=status,
        headers=headers,
    )


class ClientStalled(Exception):
    """The client read nothing for `stall_timeout` seconds."""


class RequestContext:
    """ASGI middleware around the whole app: an X-Request-ID on every response (the client's, or a new one), the
    API key check, 503 for new requests while draining, a time limit on each write to a client that stopped
    reading, and a 500 (or an aborted transfer, once bytes were sent) for anything that escaped the handlers."""

    def __init__(self, app, settings: ServerSettings, scheduler: Scheduler):
        self.app, self.settings, self.scheduler = app, settings, scheduler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["cleanup"] = rid, []
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
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
                if dict(scope["headers"]).get(b"authorization", b"") != f"Bearer {key}".encode():
                    raise ApiError(
                        401,
                        "missing or wrong API key: send `Authorization: Bearer <key>`",
                        "authentication_error",
                    )
            if self.scheduler.draining and scope["path"] not in ("/health", "/v1/stats"):
                raise ApiError(503, "the server is shutting down; retry on another instance", "server_error")
            await self.app(scope, receive, send_with_id)
        except ClientStalled:
            log.warning(
                "request %s: the client read nothing for %g s; dropped", rid, self.settings.stall_timeout
            )
        except Exception as e:
            if started:  # the client sees an incomplete response, never a clean short file
                log.error("request %s failed after audio was sent, transfer aborted: %s", rid, e)
            else:
                if not isinstance(e, ApiError):
                    log.exception("request %s failed", rid)
                    e = ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
                elif e.status >= 500:
                    log.error("request %s failed: %s", rid, e.message)
                await error_response(e.status, e.message, e.type, e.param)(scope, receive, send_with_id)
        finally:
            for cleanup in state["cleanup"]:
                cleanup()


def validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the body must be JSON ({first.get('ctx', {}).get('error', 'invalid')})", None
    return f"{param or 'body'}: {first.get('msg', 'invalid request')}", param


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
        lifespan=lifespan,
        responses=errors(400, 500),
    )
    app.state.scheduler, app.state.settings = scheduler, settings
    app.state.service = Service(model, processor, settings, scheduler)
    app.add_middleware(RequestContext, settings=settings, scheduler=scheduler)
    add_page(app)
    for router in (status.router, voices.router, speech.router, dialogue.router):
        app.include_router(router)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        if e.status >= 500:
            log.error("request %s failed: %s", request.state.request_id, e.message)
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        message, param = validation_message(e)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)

    return app


def settings_dict(settings: ServerSettings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k != "api_key"}
