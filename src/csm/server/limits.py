"""What a client may make the server hold before a request reaches a route: the size of a body (refused by its
Content-Length before reading, and counted while reading), the time to send it, and the time to send a
request's head (uvicorn has no limit on that: a client trickling header bytes holds a connection forever)."""

from __future__ import annotations

import asyncio
import json

MULTIPART_SLACK = 64 * 1024  # an upload's form fields and part headers, beyond the audio file itself
MIN_BODY_RATE = 1024  # bytes per second a body must average once `read_timeout` has passed


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
    no body bytes for `read_timeout` seconds, or trickles them (under MIN_BODY_RATE on average once
    `read_timeout` has passed), gets 408 and the connection is closed. After a 413 the server reads on and
    discards the rest of the body (for at most the head deadline, see `http_protocol`): a client still sending
    gets to read the answer, where closing at once would reset the connection under it.

    Multipart bodies (voice uploads) may be `max_upload_bytes` plus room for the form fields; others (JSON)
    `max_body_bytes`.
    """

    def __init__(self, app, max_body_bytes: int, max_upload_bytes: int, read_timeout: float):
        self.app = app
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes
        self.read_timeout = read_timeout

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
        received, body_done, refused, started, since = 0, False, None, False, None

        async def limited_receive():
            nonlocal received, body_done, refused, since
            if body_done:  # after the body, `receive` waits for a disconnect (while streaming): no deadline
                return await receive()
            since = since or asyncio.get_running_loop().time()
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
                took = asyncio.get_running_loop().time() - since
                if not body_done and took > self.read_timeout and received < MIN_BODY_RATE * took:
                    refused = _BodyRefused(
                        408,
                        f"the body arrives at {received / took:.0f} bytes/s; send it at {MIN_BODY_RATE} bytes/s "
                        "or faster",
                        None,
                    )
                    raise refused
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
        if refused is not None and not started:
            await _refuse(send, refused.status, refused.message, refused.param)


async def _refuse(send, status: int, message: str, param: str | None) -> None:
    body = error_body(message, param)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 408:
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


def uvicorn_config(app, **options):
    """uvicorn's config for an app made by `create_app`, with the deadline for request heads of its settings
    (`head_timeout`): how every server of ours must be run (plain `uvicorn.Config` has no such deadline)."""
    import uvicorn

    settings = app.state.settings
    # uvicorn closes with 1009 past ws_max_size; below it, the session's own limit answers with a clear reason
    options.setdefault("ws_max_size", 2 * settings.max_session_message_bytes)
    return uvicorn.Config(app, http=http_protocol(settings.head_timeout), **options)
