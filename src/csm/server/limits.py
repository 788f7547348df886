"""What a client may make the server hold before a request reaches a route: the size of a body (refused by its
Content-Length before reading, and counted while reading), the bytes all bodies in flight hold together, the time
to send a body (a rate over a sliding window), the time to send a request's head (uvicorn has no limit on that:
a client trickling header bytes holds a connection forever), the shape of a JSON body (keys and depth, checked
before and while parsing it, off the event loop), and the head's framing (h11 accepts ambiguous framing)."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from concurrent.futures import ThreadPoolExecutor

MULTIPART_SLACK = 64 * 1024  # an upload's form fields and part headers, beyond the audio file itself
MIN_BODY_RATE = 1024  # bytes per second a body must send in every window of `read_timeout` seconds
MAX_JSON_TOKENS = 65_536  # ',', ':', '[' and '{' in a JSON body (counted on its bytes before parsing)
MAX_JSON_NODES = 4096  # keys, items and values of a parsed JSON body (a valid request has a few hundred)
MAX_JSON_DEPTH = 8  # nesting of a JSON body (a valid request nests 4 deep)

_pools: dict[str, ThreadPoolExecutor] = {}


def pool(name: str, workers: int = 2) -> ThreadPoolExecutor:
    """A small thread pool of the server's own for one kind of work ("parse": JSON bodies, "decode": clips
    from requests), so that a flood of one kind cannot take the threads every route's `to_thread` shares."""
    if name not in _pools:
        _pools[name] = ThreadPoolExecutor(workers, thread_name_prefix=f"csm-{name}")
    return _pools[name]


async def in_pool(name: str, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(pool(name), fn, *args)


class JsonShapeError(ValueError):
    """A JSON body larger in keys, items or depth than any valid request (a 400 before validation)."""


def parse_json_body(raw: bytes):
    """A JSON body parsed with its work bounded: more separators than MAX_JSON_TOKENS are refused from a count
    of its bytes before parsing (json's parser holds the GIL throughout, so a thread alone would not keep the
    event loop free); more than MAX_JSON_NODES nodes or deeper than MAX_JSON_DEPTH, after parsing and before
    pydantic builds one error per bad key. Raises JsonShapeError, or json's JSONDecodeError."""
    tokens = raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")
    if tokens > MAX_JSON_TOKENS:
        raise JsonShapeError(
            f"the body holds {tokens} JSON separators (',', ':', '[', '{{'); the limit is {MAX_JSON_TOKENS}: "
            "a request has a few dozen fields"
        )
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JsonShapeError(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    nodes, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_JSON_NODES:
            raise JsonShapeError(
                f"the body holds more than {MAX_JSON_NODES} keys and values; a request has a few dozen fields"
            )
        if depth > MAX_JSON_DEPTH:
            raise JsonShapeError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            nodes += len(item)  # the keys
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def json_route():
    """FastAPI's APIRoute whose JSON bodies are parsed by `parse_json_body` in the "parse" pool: bounded work,
    off the event loop (FastAPI's own `request.json()` parses on it). pydantic then validates a bounded
    document. Use as `APIRouter(route_class=json_route())`."""
    from fastapi import HTTPException
    from fastapi.routing import APIRoute
    from starlette.requests import Request

    class BoundedJsonRequest(Request):
        async def json(self):
            if not hasattr(self, "_json"):
                body = await self.body()
                try:
                    self._json = await in_pool("parse", parse_json_body, body)
                except JsonShapeError as e:
                    raise HTTPException(400, str(e)) from None
            return self._json

    class BoundedJsonRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def bounded(request):
                return await handler(BoundedJsonRequest(request.scope, request.receive))

            return bounded

    return BoundedJsonRoute


class InFlightBytes:
    """Bytes held by every request body being received, against one cap for the server: past it a new body gets
    503 at once, so that many connections each sending a body just under the limit cannot take the memory."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


def error_body(message: str, param: str | None = None) -> bytes:
    """OpenAI's error shape, as bytes."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return json.dumps({"error": error}).encode()


class _BodyRefused(Exception):
    """Raised from `receive` to stop the app reading a body that broke a limit; its response replaces the app's."""

    def __init__(self, status: int, message: str, param: str | None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class BodyLimit:
    """ASGI middleware: a body larger than its limit gets 413 (by Content-Length before a byte is read, or as
    soon as the count passes the limit, so nothing past it is buffered or spooled to disk); a client that sends
    no body bytes for `read_timeout` seconds, or sends under MIN_BODY_RATE bytes/s over any window of
    `read_timeout` seconds (a sliding rate: a fast start buys no time for a trickle after it), gets 408 and the
    connection is closed. All bodies being received together hold at most `max_inflight_bytes`: past that a new
    one gets 503 (retry shortly). After a 413 the server reads on and discards the rest of the body (for at most
    the head deadline, see `http_protocol`): a client still sending gets to read the answer, where closing at
    once would reset the connection under it.

    Multipart bodies (voice uploads) may be `max_upload_bytes` plus room for the form fields; others (JSON)
    `max_body_bytes`.
    """

    def __init__(
        self,
        app,
        max_body_bytes: int,
        max_upload_bytes: int,
        read_timeout: float,
        max_inflight_bytes: int | None = None,
    ):
        self.app = app
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes
        self.read_timeout = read_timeout
        self.inflight = InFlightBytes(max_inflight_bytes or 8 * max(max_body_bytes, max_upload_bytes))

    def _limit(self, scope) -> tuple[int, str, str | None]:
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        if content_type.startswith(b"multipart/"):
            limit = self.max_upload_bytes + MULTIPART_SLACK
            return limit, f"an upload may be {self.max_upload_bytes} bytes of audio", "audio_file"
        return self.max_body_bytes, f"the limit for a request body is {self.max_body_bytes} bytes", None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, rule, param = self._limit(scope)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _refuse(send, 413, f"the body is {int(length)} bytes; {rule}", param)
        held = 0  # bytes of this body counted in self.inflight
        busy = (
            "the server is receiving as many request bodies as it holds at once; retry shortly",
            None,
        )
        if length is not None and length.isdigit() and int(length) > 0:
            if not self.inflight.take(int(length)):
                return await _refuse(send, 503, *busy)
            held = int(length)
        received, body_done, refused, started = 0, False, None, False
        mark: tuple[float, int] | None = None  # the window's start: (time, bytes received by then)
        window = self.read_timeout

        async def limited_receive():
            nonlocal received, body_done, refused, mark, held
            if body_done:  # after the body, `receive` waits for a disconnect (while streaming): no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            mark = mark or (loop.time(), 0)
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                refused = _BodyRefused(
                    408,
                    f"the client sent no body bytes for {self.read_timeout:g} s; send the body at once",
                    None,
                )
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refused = _BodyRefused(413, f"the body is more than {limit} bytes; {rule}", param)
                    raise refused
                if received > held:  # a chunked body (no Content-Length) is counted as it comes
                    if not self.inflight.take(received - held):
                        refused = _BodyRefused(503, *busy)
                        raise refused
                    held = received
                now = loop.time()
                took = now - mark[0]
                if not body_done and took > window:
                    sent = received - mark[1]
                    if sent < MIN_BODY_RATE * took:
                        refused = _BodyRefused(
                            408,
                            f"the body arrived at {sent / took:.0f} bytes/s over the last {took:.0f} s; send it "
                            f"at {MIN_BODY_RATE} bytes/s or faster",
                            None,
                        )
                        raise refused
                    mark = (now, received)
            return message

        async def guarded_send(message):
            nonlocal started
            if refused is not None:  # whatever the app made of the exception, the client learns the limit
                if not started and message["type"] == "http.response.start":
                    started = True
                    await _refuse(send, refused.status, refused.message, refused.param)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused:
            pass
        except Exception:
            if refused is None:
                raise
        finally:
            self.inflight.give(held)
        if refused is not None and not started:
            await _refuse(send, refused.status, refused.message, refused.param)


async def _refuse(send, status: int, message: str, param: str | None) -> None:
    body = error_body(message, param)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (408, 503):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def http_protocol(head_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request's head (request line and headers): from the
    connection's start, or the end of the previous response, to the last header. Past it the connection gets
    408 (if it sent anything) and is closed; so is one still sending a body its answer refused (uvicorn reads and
    discards such a body until it ends). Pass as `uvicorn.Config(http=...)`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        head_deadline = head_timeout
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = False

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.conn = strict_connection(h11, self.conn._max_incomplete_event_size)

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            self._head_bytes = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, event) -> None:
            # the connection is a WebSocket from here (a session of any length): no request head follows
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().handle_websocket_upgrade(event)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_bytes = False
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(head_timeout, self._head_expired)

        def _head_expired(self) -> None:
            answered = self.cycle is None or self.cycle.response_complete
            if not answered or self.transport.is_closing():
                return
            if self.conn.their_state is not h11.IDLE:  # still sending a body that was answered already
                self.transport.close()
                return
            if self._head_bytes:
                body = error_body(
                    f"the request head did not arrive within {head_timeout:g} s; send the request line and "
                    "headers at once"
                )
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                    + body
                )
            self.transport.close()

    return HeadTimeoutProtocol


_BARE_LF = re.compile(rb"(?<!\r)\n")
_FOLDED = re.compile(rb"\r?\n[ \t]")


def strict_head(head: bytes) -> str | None:
    """Why a request head (up to its blank line) is ambiguous, or None: bare LF line ends, obs-fold (a header
    continued on a line starting with a space or tab), both Content-Length and Transfer-Encoding. h11 accepts
    all three, and a proxy in front that reads them another way frames a different request (smuggling)."""
    if _BARE_LF.search(head[:-1] if head.endswith(b"\n\n") else head):
        return "line ends without CR (bare LF)"
    if _FOLDED.search(head):
        return "a header folded over several lines (obs-fold)"
    names = {line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:]}
    if b"content-length" in names and b"transfer-encoding" in names:
        return "both Content-Length and Transfer-Encoding"
    return None


def strict_connection(h11, max_incomplete: int):
    """An h11 server connection that refuses ambiguous request heads (see `strict_head`) as a protocol error:
    uvicorn answers 400 and closes the connection, so nothing pipelined after such a request is read."""
    from h11._readers import maybe_read_from_IDLE_client
    from h11._receivebuffer import blank_line_regex

    def strict_reader(buf):
        data = buf._data
        match = blank_line_regex.search(data)
        if match is not None:
            why = strict_head(bytes(data[: match.end()]))
            if why is not None:
                raise h11.RemoteProtocolError(f"ambiguous request head: {why}", 400)
        return maybe_read_from_IDLE_client(buf)

    class StrictConnection(h11.Connection):
        def _get_io_object(self, role, event, io_dict):
            found = super()._get_io_object(role, event, io_dict)
            return strict_reader if found is maybe_read_from_IDLE_client else found

    return StrictConnection(h11.SERVER, max_incomplete)


def uvicorn_config(app, **options):
    """uvicorn's config for an app made by `create_app`, with the deadline for request heads of its settings
    (`head_timeout`), strict framing (see `strict_connection`) and at most `max_connections` connections (more
    get 503): how every server of ours must be run (plain `uvicorn.Config` has none of these)."""
    import uvicorn

    settings = app.state.settings
    options.setdefault("limit_concurrency", settings.max_connections)
    # uvicorn closes with 1009 past ws_max_size; below it, the session's own limit answers with a clear reason
    options.setdefault("ws_max_size", 2 * settings.max_session_message_bytes)
    return uvicorn.Config(app, http=http_protocol(settings.head_timeout), **options)


def authorized(header: bytes, key: str) -> bool:
    """Whether an Authorization header carries `key` as a bearer token (the scheme in any case, RFC 9110)."""
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
