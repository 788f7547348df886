"""A realtime session for voice agents (the WebSocket at /v1/audio/session, see routes/session.py): one
conversation held by the server. The client binds voices at the start, adds the user's turns (audio and
transcript) and streams the agent's reply as text deltas (LLM tokens); each sentence is spoken as soon as it is
complete, through the server's scheduler (batched with every other request), in the context of the
conversation so far, as `csm.Conversation` would speak it: same planning, same seeds (turn i: seed + i,
its sentence j: seed + i + j), same codes.

Client messages (JSON, each with a `type`; `session_messages.parse_message` validates them all):
    session.start  {voices: {"0": "alice"}, speaker: 0, seed, temperature, top_k, do_sample,
                    format: "pcm16" | "float32", first_clause: false}            (the first message, once)
    user.turn      {speaker: 1, text, audio: base64, audio_format: "wav" | "pcm16"} (pcm16: 24 kHz mono)
    text.delta     {text}        the agent's reply, token by token; a new turn starts with the first delta
    flush          {}            the reply is complete: speak what is left and end the turn
    cancel         {}            barge-in: stop speaking now (no audio of the turn follows `cancelled`)
    truncate       {turn_id, played_samples}   the listener heard only this much of the turn: the
                                 conversation keeps those frames (and the sentences begun in them) only
Server messages:
    session.started {session_id, sampling_rate, format, limits}
    user.turn.added {turn_id, frames}
    sentence.started {turn_id, sentence_id, text}
    audio           {turn_id, sentence_id, audio: base64 (pcm16 little-endian or float32), samples}
    sentence.done   {turn_id, sentence_id, frames}
    turn.done       {turn_id, text, frames, cancelled}
    cancelled       {turn_id}       truncated {turn_id, frames, text}
    error           {message, param}   a message refused; the session goes on
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..audio import SAMPLING_RATE
from ..chunking import CLAUSE_END, MIN_CHUNK_CHARS, SENTENCE_END, CrossfadeStream, split_sentences
from ..generate import GenerationConfig
from ..planner import Turn, voice_turns
from ..voice import encode_audio
from .dialogue import decode_clip
from .scheduler import QueueFull, SpeechJob, Unavailable
from .session_messages import SessionStart, TextDelta, Truncate, UserTurn
from .speech import ApiError, PlannedTurn, SpeechPlan, speaker_number

log = logging.getLogger("csm.server")

SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 frames per second
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_ERROR, CLOSE_TRY_LATER = 1008, 1009, 1011, 1013
MAX_WAITING = 256  # sentences and turns queued behind the one being said (bounds a flood of text)


class SessionClosed(Exception):
    """The session must end with a WebSocket close `code` and `reason` (a limit, a protocol fault)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason[:120]  # a close reason must fit in 123 bytes


# ---- sentences as the text comes ---------------------------------------------------------------------


class SentenceBuffer:
    """A reply's text as it streams in, cut into the sentences `split_sentences` would cut the whole text into:
    a sentence is handed out once text after its end has come (a short one waits for the next, which it
    joins), the rest at `flush`. With `first_clause`, the reply's first piece may end at a clause mark."""

    def __init__(self, max_chars: int, first_clause: bool = False):
        self.text, self.max_chars, self.first_clause, self.given = "", max_chars, first_clause, 0

    def push(self, delta: str) -> list[str]:
        self.text += delta
        ready: list[str] = []
        for end in reversed(list(SENTENCE_END.finditer(self.text))):
            chunks = split_sentences(self.text[: end.end()], self.max_chars)
            if chunks and len(chunks[-1]) >= MIN_CHUNK_CHARS:  # a short last one may join the next
                ready, self.text = chunks, self.text[end.end() :]
                break
        if not ready and self.first_clause and not self.given:
            for mark in CLAUSE_END.finditer(self.text):
                if len(self.text[: mark.start()].strip()) >= MIN_CHUNK_CHARS:
                    ready = split_sentences(self.text[: mark.start()], self.max_chars)
                    self.text = self.text[mark.end() :]
                    break
        self.given += len(ready)
        return ready

    def flush(self) -> list[str]:
        chunks, self.text = split_sentences(self.text, self.max_chars), ""
        self.given += len(chunks)
        return chunks


# ---- the conversation -------------------------------------------------------------------------------------


@dataclass
class AgentTurn:
    """A reply being spoken: its sentences (as they become ready), what was made for each, and its state."""

    id: int
    speaker: int
    seed: int | None
    buffer: SentenceBuffer
    sentences: list[str] = field(default_factory=list)
    made: list[tuple[str, list[np.ndarray], list[torch.Tensor]]] = field(default_factory=list)
    done: list[Turn] = field(default_factory=list)  # its sentences, carried into its next sentences' context
    frames: int = 0
    joiner: CrossfadeStream = field(default_factory=lambda: CrossfadeStream(SAMPLING_RATE))
    cancelled: bool = False
    ended: bool = False  # recorded in the conversation
    said: list[str] = field(default_factory=list)  # recorded: the sentences that made audio
    starts: list[int] = field(default_factory=list)  # and the frame each began at, in the turn


def pcm_bytes(audio: np.ndarray, fmt: str) -> bytes:
    if fmt == "float32":
        return audio.astype("<f4").tobytes()
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def held_bytes(turns: list[Turn]) -> int:
    """Memory a session's turns hold: their audio and codes."""
    return sum(t.audio.nbytes + (t.codes.nbytes if t.codes is not None else 0) for t in turns)


class Session:
    """One WebSocket's conversation: the voices bound at its start, the turns so far (the oldest leave as the
    context window fills, as in `csm.Conversation`), and the agent turn being spoken. `send` (async, one JSON
    message) is how it answers. Turns are spoken one after the other by `run` (a task), in the order they came."""

    def __init__(self, service, start: SessionStart, send, session_id: str):
        self.service, self.settings, self.send, self.id = service, service.settings, send, session_id
        self.start, self.format = start, start.format
        try:
            self.config = GenerationConfig.from_model(
                service.model, temperature=start.temperature, top_k=start.top_k, do_sample=start.do_sample
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        self.voices = []
        for key, name in start.voices.items():
            speaker = speaker_number(key, "voices")
            if speaker is None:
                raise ApiError(400, f"voices: {key!r} is not a speaker number", param="voices")
            _, voice = service.resolve_voice(name, f"voices.{key}")
            if voice is None:
                raise ApiError(400, f"voices.{key} must name a saved voice", param=f"voices.{key}")
            self.voices.append((voice, voice_turns(voice, speaker=speaker)))
        self.history: list[Turn] = []  # earlier turns, oldest first: what the next sentence is said after
        self.recorded: dict[int, tuple[AgentTurn, Turn]] = {}  # replies as recorded, for truncate
        self.turn_count = 0  # turn ids, as Conversation counts turns: user turns too
        self.agent: AgentTurn | None = None  # the reply taking text deltas
        self.ops: asyncio.Queue = asyncio.Queue()
        self.job: SpeechJob | None = None
        self.current: AgentTurn | None = None  # the reply being said
        self.busy = False
        self.last_active = time.monotonic()

    # ---- what the client sends (called on the event loop, in the order messages come) ----------------

    async def user_turn(self, msg: UserTurn) -> None:
        text = " ".join(msg.text.split())
        decode = decode_clip if msg.audio_format == "wav" else self._pcm16  # off the event loop
        clip = await asyncio.to_thread(decode, msg.audio, "audio", self.settings)
        self._end_reply()  # a user turn ends the reply before it (its text is spoken first)
        if self.ops.qsize() >= MAX_WAITING:
            raise SessionClosed(CLOSE_POLICY, f"more than {MAX_WAITING} sentences and turns wait to be said")
        turn_id = self._next_id()
        await self.ops.put(("user", turn_id, Turn(msg.speaker, text, clip)))

    @staticmethod
    def _pcm16(data: str, param: str, settings) -> np.ndarray:
        if len(data) > settings.max_upload_bytes * 4 // 3 + 4:
            raise ApiError(413, f"{param} is larger than {settings.max_upload_bytes} bytes", param=param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "audio must be base64 of 24 kHz mono pcm16", param="audio") from None
        if len(raw) % 2 or not raw:
            raise ApiError(400, "audio: pcm16 has 2 bytes a sample", param="audio")
        if len(raw) // 2 > settings.max_upload_seconds * SAMPLING_RATE:
            raise ApiError(413, f"audio is over the {settings.max_upload_seconds:g} s limit", param="audio")
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0

    async def text_delta(self, msg: TextDelta) -> None:
        if self.agent is None:
            turn_id = self._next_id()
            seed = None if self.start.seed is None else self.start.seed + turn_id
            buffer = SentenceBuffer(self.settings.max_chunk_chars, self.start.first_clause)
            self.agent = AgentTurn(turn_id, self.start.speaker, seed, buffer)
        agent = self.agent
        if len(agent.buffer.text) + len(msg.text) > self.settings.max_input_chars:
            raise ApiError(
                400,
                f"text.delta: more than {self.settings.max_input_chars} characters without a sentence end; "
                "send flush",
                param="text",
            )
        for sentence in agent.buffer.push(msg.text):
            await self._queue_sentence(agent, sentence)

    async def flush(self) -> None:
        self._end_reply()

    def _end_reply(self) -> None:
        agent, self.agent = self.agent, None
        if agent is None:
            return
        for sentence in agent.buffer.flush():
            self.ops.put_nowait(("sentence", agent, len(agent.sentences)))
            agent.sentences.append(sentence)
        self.ops.put_nowait(("end", agent))

    async def _queue_sentence(self, agent: AgentTurn, sentence: str) -> None:
        if self.ops.qsize() >= MAX_WAITING:
            raise SessionClosed(CLOSE_POLICY, f"more than {MAX_WAITING} sentences and turns wait to be said")
        agent.sentences.append(sentence)
        await self.ops.put(("sentence", agent, len(agent.sentences) - 1))

    async def cancel(self) -> int | None:
        """Barge-in: the replies under way stop; each is kept as far as its audio was sent. Returns the turn
        id of the reply cut (None when nothing was being said)."""
        cut = None
        self._end_reply()
        for op in list(self.ops._queue):  # replies queued behind the current one: none of them is said
            if op[0] in ("sentence", "end") and not op[1].cancelled:
                op[1].cancelled, cut = True, op[1].id
        current = self.current
        if current is not None and not current.ended and not current.cancelled:
            current.cancelled, cut = True, current.id
        if self.job is not None:
            self.job.cancelled.set()  # the scheduler frees its row before its next frame
        return cut

    async def truncate(self, msg: Truncate) -> None:
        if msg.turn_id >= self.turn_count:
            raise ApiError(400, f"truncate: there is no turn {msg.turn_id} yet", param="turn_id")
        if self._unended(msg.turn_id):
            await self.cancel()  # a reply still being said stops first; the cut happens once it is recorded
        await self.ops.put(("truncate", msg.turn_id, msg.played_samples))

    def _unended(self, turn_id: int) -> bool:
        """Whether `turn_id` is a reply still taking text, being said or waiting to be."""
        replies = [self.agent, self.current] + [
            op[1] for op in self.ops._queue if op[0] in ("sentence", "end")
        ]
        return any(r is not None and r.id == turn_id and not r.ended for r in replies)

    def _next_id(self) -> int:
        self.turn_count += 1
        return self.turn_count - 1

    # ---- speaking (one task) ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Speak the queued turns in order until cancelled; a limit breached raises SessionClosed."""
        while True:
            op = await self.ops.get()
            self.busy = True
            try:
                kind = op[0]
                if kind == "user":
                    _, turn_id, turn = op
                    # encoded now, while the agent's reply is still being written: not before its first audio
                    turn.codes = await asyncio.to_thread(encode_audio, self.service.model, turn.audio)
                    self.history.append(turn)
                    self._check_memory()
                    frames = int(np.ceil(len(turn.audio) / SAMPLES_PER_FRAME))
                    await self.send({"type": "user.turn.added", "turn_id": turn_id, "frames": frames})
                elif kind == "sentence":
                    await self._speak(op[1], op[2])
                elif kind == "end":
                    await self._record(op[1])
                else:
                    await self._truncate(op[1], op[2])
            finally:
                self.busy = not self.ops.empty()
                self.last_active = time.monotonic()

    async def _speak(self, agent: AgentTurn, j: int) -> None:
        if agent.cancelled or agent.frames >= self.settings.max_frames:
            return
        self.current = agent
        text = agent.sentences[j]
        plan = SpeechPlan(
            [PlannedTurn(agent.speaker, " ".join(agent.sentences), agent.sentences, seed=agent.seed)],
            self.config,
            self.voices,
            voice_params=[f"voices.{k}" for k in self.start.voices],
        )
        carried = [*self.history, *agent.done]
        left = self.settings.max_frames - agent.frames
        try:
            job = await asyncio.to_thread(self.service.job_for, plan, 0, j, carried, left)
        except ApiError as e:  # a sentence that leaves no room to speak: said, and skipped
            await self.send({"type": "error", "error": {"message": e.message, "param": "text"}})
            return
        dropped, older = len(carried) - job.carried_kept, len(self.history)  # as Conversation trims
        self.history, agent.done = self.history[dropped:], agent.done[max(0, dropped - older) :]
        if dropped:  # a reply that left the window can no longer be truncated: its audio is let go
            kept = {id(t) for t in self.history}
            self.recorded = {k: v for k, v in self.recorded.items() if id(v[1]) in kept}
        job.loop, job.out = asyncio.get_running_loop(), asyncio.Queue()
        job.request_id, job.max_buffered = f"session-{self.id}", self.settings.max_buffered_chunks
        if agent.cancelled:
            return
        self.job = job
        await self.send({"type": "sentence.started", "turn_id": agent.id, "sentence_id": j, "text": text})
        while True:
            try:
                self.service.scheduler.submit(job)
                break
            except Unavailable as e:
                raise SessionClosed(CLOSE_TRY_LATER, str(e)) from None
            except QueueFull:  # a session already talking waits its turn, as a speaking request does
                await asyncio.sleep(0.05)
                if agent.cancelled:
                    return
        pieces, sent = [], 0
        joiner = agent.joiner
        joiner.start_sentence()  # the last 10 ms wait to fade into the next sentence, or the turn's end
        try:
            while True:
                item = await job.take()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise SessionClosed(CLOSE_ERROR, f"speech generation failed: {type(item).__name__}")
                if agent.cancelled:
                    break
                pieces.append(item)
                sent += len(item) // SAMPLES_PER_FRAME
                out = joiner.push(item)
                if len(out):
                    await self._audio(agent, j, out)
        finally:
            job.cancelled.set()  # no-op once done: frees the row when the session ends midway
            self.job = None
        codes = job.codes[:sent] if agent.cancelled else list(job.codes)  # cut: what the listener got
        agent.made.append((text, pieces, codes))
        agent.frames += len(codes)
        if codes:
            agent.done.append(Turn(agent.speaker, text, np.concatenate(pieces), torch.stack(codes)))
        if not agent.cancelled:
            await self.send(
                {"type": "sentence.done", "turn_id": agent.id, "sentence_id": j, "frames": len(codes)}
            )

    async def _audio(self, agent: AgentTurn, j: int, audio: np.ndarray) -> None:
        data = base64.b64encode(pcm_bytes(audio, self.format)).decode()
        message = {"type": "audio", "turn_id": agent.id, "sentence_id": j, "samples": len(audio)}
        await self.send({**message, "audio": data}, unless=lambda: agent.cancelled)
        self.last_active = time.monotonic()

    async def _record(self, agent: AgentTurn) -> None:
        """The reply as said (a cancelled one: as far as its audio went) joins the conversation as one turn."""
        if not agent.cancelled:
            tail = agent.joiner.finish()
            if len(tail):
                await self._audio(agent, len(agent.sentences) - 1, tail)
        agent.ended = True
        made = [m for m in agent.made if m[2]]
        codes = [c for _, _, cs in made for c in cs]
        text = " ".join(m[0] for m in made)
        if codes:
            audio = np.concatenate([np.concatenate(p) for _, p, _ in made])
            turn = Turn(agent.speaker, text, audio, torch.stack(codes))
            self.history.append(turn)
            agent.said = [m[0] for m in made]
            agent.starts = np.cumsum([0] + [len(cs) for _, _, cs in made])[:-1].tolist()
            self.recorded[agent.id] = (agent, turn)
        agent.made, agent.done = [], []  # the turn holds its audio and codes now: no second copy
        self._check_memory()
        event = {"type": "turn.done", "turn_id": agent.id, "text": text, "frames": len(codes)}
        await self.send({**event, "cancelled": agent.cancelled})

    async def _truncate(self, turn_id: int, played: int) -> None:
        if turn_id not in self.recorded:  # a user turn, or a reply that said nothing
            await self.send({"type": "truncated", "turn_id": turn_id, "frames": None, "text": None})
            return
        agent, turn = self.recorded[turn_id]
        frames = min(played // SAMPLES_PER_FRAME, len(turn.codes))
        text = " ".join(s for s, start in zip(agent.said, agent.starts, strict=True) if start < frames)
        if turn in self.history:
            at = self.history.index(turn)
            if frames:
                cut = Turn(turn.speaker, text, turn.audio[: frames * SAMPLES_PER_FRAME], turn.codes[:frames])
                self.history[at] = cut
                self.recorded[turn_id] = (agent, cut)
            else:
                del self.history[at]
                del self.recorded[turn_id]
        await self.send({"type": "truncated", "turn_id": turn_id, "frames": frames, "text": text})

    def _check_memory(self) -> None:
        held = held_bytes(self.history)
        limit = self.settings.max_session_audio_bytes
        if held > limit:
            raise SessionClosed(
                CLOSE_TOO_BIG,
                f"the session holds {held >> 20} MiB of audio, over the limit of {limit >> 20} MiB",
            )

    def close(self) -> None:
        """Stop whatever is being said (the session ended)."""
        if self.job is not None:
            self.job.cancelled.set()
