"""WebSocket /v1/audio/session (an extension; not OpenAI's Realtime protocol): a realtime session for voice
agents, one conversation per connection (messages: csm/server/session.py; a client: csm.client.session).

Limits, each ending the session with a close code and a reason the client can read:
- 1013 (try again later): the server holds `max_sessions` sessions, or is shutting down;
- 1008 (policy): no or wrong API key, a first message that is not `session.start` (or one the server
  refuses: an unknown voice...), no message for `session_idle_timeout` seconds while nothing is being said;
- 1009 (too big): a message over `max_session_message_bytes`, or a session holding more than
  `max_session_audio_bytes` of audio;
- 1008 too for a client that reads nothing for `stall_timeout` seconds while audio waits to be sent;
- 1011: the scheduler failed while speaking.
A message refused later (a bad field, an unreadable clip) gets an `error` message; the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketState

from ..limits import authorized as bearer_ok
from ..session import CLOSE_ERROR, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_TRY_LATER, Session, SessionClosed
from ..session_messages import Cancel, Flush, SessionStart, TextDelta, Truncate, UserTurn, parse_message
from ..speech import ApiError

router = APIRouter()
log = logging.getLogger("csm.server")
access = logging.getLogger("csm.access")


class Connection:
    """Sends on one WebSocket, one message at a time (audio and acknowledgements come from two tasks)."""

    def __init__(self, websocket: WebSocket, stall_timeout: float):
        self.websocket, self.lock, self.closed = websocket, asyncio.Lock(), False
        self.stall_timeout = stall_timeout

    async def send(self, message: dict, unless=None) -> None:
        async with self.lock:
            if self.closed or (unless is not None and unless()):
                return
            try:
                await asyncio.wait_for(self.websocket.send_text(json.dumps(message)), self.stall_timeout)
            except asyncio.TimeoutError:
                raise SessionClosed(
                    CLOSE_POLICY, f"the client read nothing for {self.stall_timeout:g} s"
                ) from None

    async def close(self, code: int, reason: str) -> None:
        async with self.lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(Exception):  # the client may be gone already
                await self.websocket.close(code, reason)


async def receive_text(websocket: WebSocket, limit: int) -> str | None:
    """The next text message; None when the client left. SessionClosed for a binary or too big message."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    if text is None:
        raise SessionClosed(CLOSE_POLICY, "messages are JSON text, not binary")
    if len(text) > limit:
        raise SessionClosed(CLOSE_TOO_BIG, f"a message of {len(text)} bytes; the limit is {limit}")
    return text


def authorized(websocket: WebSocket, key: str | None) -> bool:
    return not key or bearer_ok(websocket.headers.get("authorization", "").encode("latin-1"), key)


@router.websocket("/v1/audio/session")
async def session(websocket: WebSocket):
    service = websocket.app.state.service
    settings, scheduler = service.settings, service.scheduler
    await websocket.accept()
    conn, sid = Connection(websocket, settings.stall_timeout), uuid.uuid4().hex[:16]
    t0, outcome = time.perf_counter(), "ended"
    tasks: list[asyncio.Task] = []
    state: Session | None = None
    try:
        if not authorized(websocket, settings.api_key):
            raise SessionClosed(CLOSE_POLICY, "missing or wrong API key: send `Authorization: Bearer <key>`")
        if scheduler.draining or not scheduler.alive:
            raise SessionClosed(CLOSE_TRY_LATER, "the server is shutting down; retry on another instance")
        if len(service.sessions) >= settings.max_sessions:
            raise SessionClosed(
                CLOSE_TRY_LATER, f"the server holds {settings.max_sessions} sessions, its limit; retry later"
            )
        service.sessions[sid] = None  # counted from here: a slow start holds its place
        try:
            raw = await asyncio.wait_for(
                receive_text(websocket, settings.max_session_message_bytes), settings.session_idle_timeout
            )
        except asyncio.TimeoutError:
            raise SessionClosed(CLOSE_POLICY, "no session.start message in time") from None
        if raw is None:
            return
        try:
            start = parse_message(raw)
            if not isinstance(start, SessionStart):
                raise ApiError(400, "the first message must be session.start", param="type")
            state = await asyncio.to_thread(Session, service, start, conn.send, sid)
        except ApiError as e:
            raise SessionClosed(CLOSE_POLICY, e.message) from None
        service.sessions[sid] = state
        await conn.send(
            {
                "type": "session.started",
                "session_id": sid,
                "sampling_rate": service.model.codec_model.config.sampling_rate,
                "format": start.format,
                "limits": {
                    "idle_timeout": settings.session_idle_timeout,
                    "max_message_bytes": settings.max_session_message_bytes,
                    "max_audio_bytes": settings.max_session_audio_bytes,
                    "max_frames_per_turn": settings.max_frames,
                },
            }
        )
        speaker = asyncio.create_task(state.run(), name="speaker")
        receiver = asyncio.create_task(receive_loop(websocket, conn, state, settings), name="receiver")
        watchdog = asyncio.create_task(idle_watch(state, settings.session_idle_timeout), name="watchdog")
        tasks = [speaker, receiver, watchdog]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.cancelled():  # nothing here cancels them: a fault, said as one
                raise RuntimeError(f"the session's {task.get_name()} task was cancelled")
            if task.exception() is not None:
                raise task.exception()
        outcome = "idle" if watchdog in done else f"ended ({', '.join(t.get_name() for t in done)})"
        if watchdog in done:
            raise SessionClosed(
                CLOSE_POLICY, f"idle for {settings.session_idle_timeout:g} s; the session expired"
            )
    except SessionClosed as e:
        outcome = f"closed {e.code}: {e.reason}"
        await conn.close(e.code, e.reason)
    except BaseException as e:  # a bug (or a cancelled task): the client gets 1011, the server keeps serving
        if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
            outcome = "cancelled by the server (the connection was lost or the server stops)"
            raise
        log.exception("session %s failed", sid)
        outcome = f"closed {CLOSE_ERROR}"
        await conn.close(CLOSE_ERROR, f"internal error: {type(e).__name__}")
    finally:
        for task in tasks:
            task.cancel()
        if state is not None:
            state.close()
        service.sessions.pop(sid, None)
        if websocket.client_state != WebSocketState.DISCONNECTED:
            await conn.close(1000, "")
        client = websocket.client or ("-", 0)
        access.info(
            '"WEBSOCKET /v1/audio/session" %s %.3fs client=%s:%s session=%s',
            outcome,
            time.perf_counter() - t0,
            client[0],
            client[1],
            sid,
        )


async def receive_loop(websocket: WebSocket, conn: Connection, state: Session, settings) -> None:
    """Each client message, in order, until the client leaves."""
    while True:
        raw = await receive_text(websocket, settings.max_session_message_bytes)
        if raw is None:
            return
        state.last_active = time.monotonic()
        try:
            msg = parse_message(raw)
            if isinstance(msg, TextDelta):
                await state.text_delta(msg)
            elif isinstance(msg, UserTurn):
                await state.user_turn(msg)
            elif isinstance(msg, Flush):
                await state.flush()
            elif isinstance(msg, Cancel):
                turn_id = await state.cancel()
                await conn.send({"type": "cancelled", "turn_id": turn_id})
            elif isinstance(msg, Truncate):
                await state.truncate(msg)
            else:
                raise ApiError(400, "session.start comes once, first", param="type")
        except ApiError as e:
            await conn.send({"type": "error", "error": {"message": e.message, "param": e.param}})


async def idle_watch(state: Session, timeout: float) -> None:
    """Returns once the session has been idle (no message, nothing said) for `timeout` seconds."""
    while True:
        await asyncio.sleep(min(1.0, timeout / 4))
        if not state.busy and state.ops.empty() and time.monotonic() - state.last_active > timeout:
            return
