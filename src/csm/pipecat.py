"""CSM as a Pipecat TTS service that keeps the conversation (`pip install 'csm-speech[pipecat]'`).

    from csm.pipecat import CsmTTSService

    tts = CsmTTSService(model="sesame/csm-1b", voices={0: "alice"})          # in-process: a Conversation
    tts = CsmTTSService(url="ws://127.0.0.1:8000/v1/audio/session")           # a `csm serve` session
    pipeline = Pipeline([transport.input(), stt, tts.user_listener(), user_aggregator, llm, tts,
                         transport.output(), assistant_aggregator])

Every sentence the agent says is spoken in the context of the conversation so far, and so is the user: the
user's audio (`InputAudioRawFrame`s, resampled to 24 kHz) and transcript (`TranscriptionFrame`s) since the
agent last spoke become a user turn of the conversation before the agent's next sentence, so the agent's voice
answers how the user sounded. A processor placed after the STT (`user_listener()`) passes those frames to the
service, since the user aggregator keeps transcriptions from going further down a pipeline; frames that reach
the service itself are heard too. An interruption stops the sentence being generated within one chunk
(`chunk_frames`, one frame by default); the conversation keeps what was generated of it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

import numpy as np

try:
    from pipecat.frames.frames import (
        ErrorFrame,
        Frame,
        InputAudioRawFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
        UserStartedSpeakingFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TTSService
except ImportError as e:  # one clear message naming the extra
    raise ImportError(
        f"csm.pipecat needs Pipecat ({e.name or e}): pip install 'csm-speech[pipecat]'"
    ) from None

SAMPLING_RATE = 24_000
MAX_USER_SECONDS = 20.0  # the newest user audio kept for a turn (the context window is the limit)


class _InProcess:
    """A `csm.Conversation` in this process; generation runs on a thread, one sentence at a time."""

    def __init__(self, model, voices, seed, speaker, chunk_frames, options):
        from .pipeline import TextToAudioPipeline
        from .pipeline import pipeline as load

        tts = model if isinstance(model, TextToAudioPipeline) else load("text-to-audio", model=model)
        self.conversation = tts.conversation(voices=voices, seed=seed, **options)
        self.speaker, self.chunk_frames = speaker, chunk_frames
        self.lock = threading.Lock()  # one generation at a time: a stopped one finishes before the next

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def add_user(self, speaker: int, text: str, audio: np.ndarray) -> None:
        def add():
            with self.lock:
                self.conversation.add(speaker, text, audio=audio)

        await asyncio.to_thread(add)

    async def speak(self, text: str):
        loop, out, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the event loop is gone
                stop.set()

        def work():
            with self.lock:
                stream = self.conversation.stream(self.speaker, text, chunk_frames=self.chunk_frames)
                try:
                    for piece in stream:
                        if stop.is_set():  # interrupted: the turn keeps what was made
                            break
                        put(piece)
                except Exception as e:
                    put(e)
                finally:
                    stream.close()
                    put(None)

        threading.Thread(target=work, name="csm-pipecat", daemon=True).start()
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()


class _Remote:
    """A realtime session of a `csm serve` server (csm.client.session)."""

    def __init__(self, url, api_key, voices, seed, speaker, options):
        self.url, self.api_key, self.speaker = url, api_key, speaker
        self.start_fields = {"voices": voices or {}, "seed": seed, "speaker": speaker, **options}
        self.client, self.next_turn = None, 0  # turn ids, counted as the server counts them

    async def start(self) -> None:
        from .client.session import SessionClient

        if self.client is None:
            self.client = await SessionClient.connect(self.url, api_key=self.api_key, **self.start_fields)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def add_user(self, speaker: int, text: str, audio: np.ndarray) -> None:
        await self.start()
        await self.client.user_turn(text, audio, speaker=speaker)
        self.next_turn += 1

    async def speak(self, text: str):
        await self.start()
        client, turn = self.client, self.next_turn
        self.next_turn += 1
        await client.text_delta(text)
        await client.flush()
        done = False
        try:
            while True:
                event = await client.recv()
                if event.get("turn_id") != turn or event["type"] in ("cancelled", "truncated"):
                    continue  # what is left of an interrupted turn
                if event["type"] == "audio":
                    yield event["pcm"]
                elif event["type"] == "error":
                    raise RuntimeError(event["error"]["message"])
                elif event["type"] == "turn.done":
                    done = True
                    return
        finally:
            if not done:  # interrupted: the server stops within a frame and keeps what it sent
                asyncio.ensure_future(client.cancel())


class CsmTTSService(TTSService):
    """Pipecat TTS with CSM, speaking in the context of the whole conversation (see the module).

    model: a checkpoint (folder or hub id) or a `csm` pipeline, run in this process; or url: a `csm serve`
    session (`ws://HOST:PORT/v1/audio/session`, with `api_key`). voices: {speaker: saved voice name (or a
    Voice, in-process)}; speaker: the agent's speaker id; user_speaker: the user's; seed: turn i uses seed + i;
    chunk_frames: frames per audio chunk in-process (an interruption stops within one chunk); options:
    sampling (temperature, top_k, do_sample) and, in-process, the Conversation's options."""

    def __init__(
        self,
        *,
        model=None,
        url: str | None = None,
        api_key: str | None = None,
        voices: dict | None = None,
        speaker: int = 0,
        user_speaker: int = 1,
        seed: int | None = None,
        chunk_frames: int = 1,
        options: dict | None = None,
        **kwargs,
    ):
        if (model is None) == (url is None):
            raise ValueError("give CsmTTSService either model= (in-process) or url= (a csm serve session)")
        settings = TTSSettings(model="csm", voice=None, language=None)
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            sample_rate=SAMPLING_RATE,
            settings=settings,
            **kwargs,
        )
        if url is not None:
            self._csm = _Remote(url, api_key, voices, seed, speaker, dict(options or {}))
        else:
            self._csm = _InProcess(model, voices, seed, speaker, chunk_frames, dict(options or {}))
        self.user_speaker = user_speaker
        self._heard: list[np.ndarray] = []  # the user's audio since the agent last spoke, 24 kHz
        self._heard_samples = 0
        self._transcript: list[str] = []
        self._listened = False

    @property
    def conversation(self):
        """The in-process Conversation (None for a server session)."""
        return getattr(self._csm, "conversation", None)

    def can_generate_metrics(self) -> bool:
        return True

    async def start(self, frame):
        await super().start(frame)
        await self._csm.start()

    async def stop(self, frame):
        await super().stop(frame)
        await self._csm.close()

    async def cancel(self, frame):
        await super().cancel(frame)
        await self._csm.close()

    # ---- the user's side ----------------------------------------------------------------------------

    def user_listener(self) -> FrameProcessor:
        """A processor for just after the STT: it passes every frame on and lets this service hear the
        user's audio and transcripts."""
        self._listened = True  # frames that reach the service too are not heard twice
        return _UserListener(self)

    def hear(self, frame: Frame) -> None:
        """Take the user's audio and transcripts from a frame (others are ignored)."""
        if isinstance(frame, UserStartedSpeakingFrame) and not self._transcript:
            self._heard, self._heard_samples = [], 0  # what came before the user spoke is not their turn
        elif isinstance(frame, InputAudioRawFrame):
            self._hear_audio(frame)
        elif isinstance(frame, TranscriptionFrame) and frame.text.strip():
            self._transcript.append(frame.text.strip())

    def _hear_audio(self, frame: InputAudioRawFrame) -> None:
        pcm = np.frombuffer(frame.audio, "<i2").astype(np.float32) / 32768.0
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1)
        if frame.sample_rate != SAMPLING_RATE:
            import soxr

            pcm = soxr.resample(pcm, frame.sample_rate, SAMPLING_RATE).astype(np.float32)
        self._heard.append(pcm)
        self._heard_samples += len(pcm)
        limit = int(MAX_USER_SECONDS * SAMPLING_RATE)
        while self._heard_samples - len(self._heard[0]) >= limit:  # keep the newest
            self._heard_samples -= len(self._heard.pop(0))

    async def _user_turn(self) -> None:
        """The user's turn since the agent last spoke, into the conversation (when they said something)."""
        text, audio = " ".join(self._transcript), self._heard
        self._transcript, self._heard, self._heard_samples = [], [], 0
        if text and audio:
            await self._csm.add_user(self.user_speaker, text, np.concatenate(audio))

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if not self._listened and direction == FrameDirection.DOWNSTREAM:
            self.hear(frame)
        await super().process_frame(frame, direction)

    # ---- the agent's side ---------------------------------------------------------------------------

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Speak `text` (a sentence) after the conversation so far; audio as it is generated."""
        try:
            await self._user_turn()
            await self.start_tts_usage_metrics(text)
            async for piece in self._csm.speak(text):
                await self.stop_ttfb_metrics()
                pcm = (np.clip(piece, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
                yield TTSAudioRawFrame(pcm, SAMPLING_RATE, 1, context_id=context_id)
        except Exception as e:
            yield ErrorFrame(error=f"csm: {type(e).__name__}: {e}")
        finally:
            await self.stop_ttfb_metrics()


class _UserListener(FrameProcessor):
    def __init__(self, tts: CsmTTSService):
        super().__init__()
        self._tts = tts

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self._tts.hear(frame)
        await self.push_frame(frame, direction)
