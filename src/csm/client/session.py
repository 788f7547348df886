"""A small asyncio client for a server's realtime session (WebSocket /v1/audio/session; needs `websockets`).

async with await SessionClient.connect("ws://127.0.0.1:8000/v1/audio/session", voices={0: "alice"}) as s:
    await s.user_turn("Hi, did you get my message?", audio=clip)      # float32 at 24 kHz, or wav bytes
    for token in llm_tokens:
        await s.text_delta(token)                                     # sentences start as they complete
    await s.flush()
    async for event in s.events():                                    # audio: event["pcm"] float32
        if event["type"] == "turn.done":
            break
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from ..audio import SAMPLING_RATE


class SessionError(Exception):
    """The server closed the session (`code`, `reason`: a limit, a refused start) or answered with an error."""

    def __init__(self, message: str, code: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.code, self.reason = code, reason


def wav_bytes(audio: np.ndarray, rate: int = SAMPLING_RATE) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class SessionClient:
    """One session: send the user's turns and the agent's text; read events (`events`, `recv`)."""

    def __init__(self, websocket, started: dict):
        self.websocket, self.started = websocket, started
        self.session_id, self.format = started["session_id"], started["format"]
        self.sampling_rate = started["sampling_rate"]

    @classmethod
    async def connect(
        cls, url: str, api_key: str | None = None, open_timeout: float = 30.0, **start
    ) -> SessionClient:
        """Open a session: `start` are session.start's fields (voices, speaker, seed, temperature, top_k,
        do_sample, format, first_clause). Raises SessionError when the server refuses it."""
        try:
            import websockets
        except ImportError:
            raise ImportError("the session client needs websockets: pip install websockets") from None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        websocket = await websockets.connect(
            url, additional_headers=headers, open_timeout=open_timeout, max_size=None
        )
        if "voices" in start:
            start["voices"] = {str(k): v for k, v in start["voices"].items()}
        await websocket.send(json.dumps({"type": "session.start", **start}))
        started = await read_event(websocket, "pcm16")
        if started["type"] != "session.started":
            await websocket.close()
            raise SessionError(f"the server answered session.start with {started}")
        return cls(websocket, started)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.websocket.close()

    async def send(self, message: dict) -> None:
        await self.websocket.send(json.dumps(message))

    async def user_turn(self, text: str, audio, speaker: int = 1) -> None:
        """What the user said: `audio` float32 samples at 24 kHz (sent as pcm16) or a wav file's bytes."""
        if isinstance(audio, (bytes, bytearray)):
            data, fmt = bytes(audio), "wav"
        else:
            pcm = (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767).round().astype("<i2")
            data, fmt = pcm.tobytes(), "pcm16"
        audio64 = base64.b64encode(data).decode()
        await self.send(
            {"type": "user.turn", "speaker": speaker, "text": text, "audio": audio64, "audio_format": fmt}
        )

    async def text_delta(self, text: str) -> None:
        await self.send({"type": "text.delta", "text": text})

    async def flush(self) -> None:
        await self.send({"type": "flush"})

    async def cancel(self) -> None:
        await self.send({"type": "cancel"})

    async def truncate(self, turn_id: int, played_samples: int) -> None:
        await self.send({"type": "truncate", "turn_id": turn_id, "played_samples": int(played_samples)})

    async def recv(self) -> dict:
        """The next event; an `audio` event gets `pcm` (float32 samples). SessionError when the server closed
        the session."""
        return await read_event(self.websocket, self.format)

    async def events(self):
        """Events until the session closes (a clean close ends the iteration)."""
        while True:
            try:
                yield await self.recv()
            except SessionError as e:
                if e.code in (1000, None):
                    return
                raise

    async def speak(self, text: str) -> tuple[np.ndarray, list[dict]]:
        """Send a whole reply (one delta and a flush) and wait for it: its audio and the events."""
        await self.text_delta(text)
        await self.flush()
        pieces, events = [], []
        async for event in self.events():
            events.append(event)
            if event["type"] == "audio":
                pieces.append(event["pcm"])
            elif event["type"] == "error":
                raise SessionError(event["error"]["message"])
            elif event["type"] == "turn.done":
                break
        return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), events


async def read_event(websocket, fmt: str) -> dict:
    """The next event of a session; SessionError (with the close code and reason) once it is closed."""
    import websockets

    try:
        raw = await websocket.recv()
    except websockets.ConnectionClosed as e:
        code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd is not None else (None, None)
        raise SessionError(f"the session closed ({code}): {reason}", code, reason) from None
    event = json.loads(raw)
    if event["type"] == "audio":
        data = base64.b64decode(event["audio"])
        pcm = np.frombuffer(data, "<f4") if fmt == "float32" else np.frombuffer(data, "<i2") / 32768.0
        event["pcm"] = pcm.astype(np.float32)
    return event
