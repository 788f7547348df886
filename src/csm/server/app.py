"""The OpenAI-compatible HTTP API: /v1/audio/speech, /v1/voices, /v1/models, /health."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import soxr
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audio import SAMPLING_RATE, load_audio
from ..generate import GenerationConfig
from ..pipeline import MAX_CHUNK_CHARS, CrossfadeStream, Turn, split_sentences
from ..voice import Voice, list_voices, voices_dir
from .encode import FORMATS, MEDIA_TYPES, AudioEncoder
from .scheduler import QueueFull, Scheduler, SpeechJob

VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SPEED_HEADER = "resample: speed > 1 plays faster and higher, < 1 slower and lower (pitch follows)"


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
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_seconds: float = 60.0
    voices_dir: str | None = None  # default: $CSM_VOICES_DIR or ~/.local/share/csm/voices
    api_key: str | None = None


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(
        {"error": {"message": message, "type": type, "param": param, "code": None}}, status_code=status
    )


class SpeechRequest(BaseModel):
    """OpenAI's fields, plus `seed`, `temperature` and `top_k`."""

    model: str | None = None
    input: str
    voice: str | int | dict = "0"
    instructions: str | None = None  # accepted for compatibility; CSM takes no instructions
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None


def create_app(model, processor, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around a loaded model and processor; the scheduler runs while the app runs."""
    settings = settings or ServerSettings()
    scheduler = Scheduler(
        model, settings.max_batch_size, settings.max_seq_len, settings.max_queue, settings.chunk_frames
    )
    root = Path(settings.voices_dir).expanduser() if settings.voices_dir else voices_dir()
    loaded: dict[str, Voice] = {}

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="csm", lifespan=lifespan)
    app.state.scheduler, app.state.settings = scheduler, settings

    # ---- errors ------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error_response(
            422,
            f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
            param=".".join(loc) or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(
            e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error"
        )

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return error_response(
                    401,
                    "missing or wrong API key: send `Authorization: Bearer <key>`",
                    "authentication_error",
                )
        return await call_next(request)

    # ---- plain endpoints ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "scheduler": scheduler.stats()}

    @app.get("/v1/stats")
    async def stats():
        return scheduler.stats()

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "csm"}],
        }

    @app.get("/v1/voices")
    async def voices():
        saved = [{"id": name, "name": name, "type": "saved"} for name in list_voices(root)]
        return {
            "object": "list",
            "voices": saved,
            "speakers": 'any speaker number, e.g. "0", without reference audio',
        }

    @app.post("/v1/voices", status_code=201)
    async def create_voice(
        audio_file: Annotated[UploadFile, File()],
        name: Annotated[str, Form()],
        transcript: Annotated[str, Form()],
        speaker: Annotated[int, Form()] = 0,
    ):
        if not VOICE_NAME.match(name) or name.isdigit():
            raise ApiError(
                400, "name must be 1-64 letters, digits, '_', '-' or '.', not only digits", param="name"
            )
        if not transcript.strip():
            raise ApiError(400, "transcript must hold the words spoken in the clip", param="transcript")
        if not 0 <= speaker < 1000:
            raise ApiError(400, "speaker must be between 0 and 999", param="speaker")
        data = await audio_file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(
                413, f"audio_file is larger than {settings.max_upload_bytes} bytes", param="audio_file"
            )
        try:
            audio = await asyncio.to_thread(load_audio, data)
        except Exception as e:
            raise ApiError(400, f"cannot read audio_file: {e}", param="audio_file") from None
        seconds = len(audio) / SAMPLING_RATE
        if seconds > settings.max_upload_seconds:
            raise ApiError(
                413,
                f"audio_file is {seconds:.1f} s long; the limit is {settings.max_upload_seconds:g} s",
                param="audio_file",
            )
        if (root / name).exists():
            raise ApiError(409, f"a voice named {name!r} exists already", param="name")
        try:
            voice = Voice(name, speaker, [(audio, transcript)])
            await asyncio.to_thread(voice.save, root / name)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        loaded[name] = voice
        return {"id": name, "name": name, "speaker": speaker, "seconds": round(seconds, 3)}

    # ---- speech ------------------------------------------------------------------------------------

    def resolve_voice(value: Any) -> tuple[int, Voice | None]:
        if isinstance(value, dict):
            value = value.get("id")
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            speaker = int(value)
            if not 0 <= speaker < 1000:
                raise ApiError(400, "a speaker number must be between 0 and 999", param="voice")
            return speaker, None
        if not isinstance(value, str) or not VOICE_NAME.match(value):
            raise ApiError(400, "voice must be a saved voice name or a speaker number", param="voice")
        if value not in loaded:
            if not (root / value / "voice.json").is_file():
                known = ", ".join(list_voices(root)) or "none saved yet"
                raise ApiError(
                    404,
                    f"unknown voice {value!r} (saved voices: {known}; or a speaker number)",
                    param="voice",
                )
            loaded[value] = Voice.load(root / value)
        return loaded[value].speaker, loaded[value]

    def prepare(body: SpeechRequest) -> SpeechPlan:
        """Check a request and cut its text into sentence-sized chunks."""
        text = body.input.strip()
        if not text:
            raise ApiError(400, "input is empty", param="input")
        if len(body.input) > settings.max_input_chars:
            raise ApiError(
                400,
                f"input is {len(body.input)} characters; the limit is {settings.max_input_chars}",
                param="input",
            )
        if body.response_format not in FORMATS:
            raise ApiError(
                400,
                f"unsupported response_format {body.response_format!r}; use one of {', '.join(FORMATS)}",
                param="response_format",
            )
        if body.stream_format not in ("audio", "sse"):
            raise ApiError(400, "stream_format must be 'audio' or 'sse'", param="stream_format")
        if not 0.25 <= body.speed <= 4.0:
            raise ApiError(400, "speed must be between 0.25 and 4.0", param="speed")
        if body.model not in (None, "", settings.model_name, "csm", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"):
            raise ApiError(
                404,
                f"unknown model {body.model!r}; this server serves {settings.model_name!r}",
                param="model",
            )
        speaker, voice = resolve_voice(body.voice)
        try:
            overrides = {"temperature": body.temperature, "top_k": body.top_k}
            config = GenerationConfig.from_model(model, **overrides)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        chunks = split_sentences(text, settings.max_chunk_chars)
        return SpeechPlan(chunks, speaker, voice, config, body.seed)

    def job_for(plan: SpeechPlan, index: int, carried: list[Turn], frames_left: int) -> SpeechJob:
        """The job for chunk `index`: the voice's clips and as many of the chunks before it (with the audio
        made for them) as fit the context, then its text."""
        text = plan.chunks[index]
        voice_turns = plan.voice.turns() if plan.voice is not None else []
        budget = min(frames_left, frames_for_text(text, model.codec_model.frame_rate))
        carried = list(carried)
        while True:
            conversation = [*voice_turns, *(t.as_message() for t in carried)]
            conversation.append({"role": str(plan.speaker), "content": [{"type": "text", "text": text}]})
            try:
                ids = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            except ValueError as e:
                if not carried:
                    raise ApiError(400, str(e)) from None
                ids = None
            if ids is not None and (ids.shape[1] + budget <= scheduler.max_seq_len or not carried):
                break
            carried.pop(0)  # the oldest chunk leaves the context first
        T = ids.shape[1]
        room = scheduler.max_seq_len - T
        if room < 1:
            raise ApiError(
                400,
                f"the prompt is {T} tokens, leaving no room in the {scheduler.max_seq_len}-position context; shorten input",
                param="input",
            )

        def embed():
            codes = plan.voice.codes(model) if plan.voice is not None else []
            codes = [*codes, *(t.codes.to(model.device) for t in carried)]
            return model.embed_inputs(ids.to(model.device), audio_codes=codes or None)[0]

        return SpeechJob(
            embed=embed,
            prompt_len=T,
            max_frames=min(budget, room),
            backbone=plan.config.backbone,
            depth_decoder=plan.config.depth_decoder,
            seed=None if plan.seed is None else plan.seed + index,
        )

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        try:
            raw = await request.json()
            body = SpeechRequest.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            raise ApiError(422, f"{loc or 'body'}: {first.get('msg')}", param=loc or None) from None
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body must be JSON") from None
        plan = await asyncio.to_thread(prepare, body)
        speech = SpeechStream(plan, job_for, scheduler, settings.max_frames)
        await speech.start()
        stream = audio_bytes(speech.audio(), body.response_format, body.speed)
        headers = {"X-Accel-Buffering": "no", "X-Speed-Method": SPEED_HEADER if body.speed != 1.0 else "none"}
        if body.stream_format == "sse":
            return StreamingResponse(
                sse_events(stream, speech), media_type="text/event-stream", headers=headers
            )
        return StreamingResponse(stream, media_type=MEDIA_TYPES[body.response_format], headers=headers)

    return app


async def audio_chunks(job: SpeechJob, first):
    """Float32 chunks of a job as the scheduler sends them; a client that leaves cancels the job."""
    item = first
    try:
        while item is not None:
            if isinstance(item, Exception):
                raise item
            yield item
            item = await job.take()
    finally:
        job.cancelled.set()  # no-op once the job is done; frees the row when the client went away


@dataclass
class SpeechPlan:
    """A checked request: its text in sentence-sized chunks, and how to speak them."""

    chunks: list[str]
    speaker: int
    voice: Voice | None
    config: GenerationConfig
    seed: int | None


class SpeechStream:
    """One request's audio, chunk after chunk: each chunk is a scheduler job whose context holds the chunks
    before it and the audio made for them (as `csm.pipeline` does for long text), joined with crossfades."""

    def __init__(self, plan: SpeechPlan, job_for, scheduler: Scheduler, max_frames: int):
        self.plan, self.job_for, self.scheduler, self.max_frames = plan, job_for, scheduler, max_frames
        self.prompt_len = self.frames = 0  # usage, over every chunk
        self.first: tuple[SpeechJob, Any] | None = None

    async def start(self) -> None:
        """Queue the first chunk and wait for its first audio, so that a failure is still an error response."""
        self.first = await self._run(0, [], wait=False)

    async def _run(self, index: int, carried: list[Turn], wait: bool) -> tuple[SpeechJob, Any]:
        job = await asyncio.to_thread(self.job_for, self.plan, index, carried, self.max_frames - self.frames)
        job.loop, job.out = asyncio.get_running_loop(), asyncio.Queue()
        while True:
            try:
                self.scheduler.submit(job)
                break
            except QueueFull:
                if not wait:  # a new request is turned away; one already speaking waits its turn
                    raise ApiError(
                        429,
                        "the server is busy: too many requests waiting; retry shortly",
                        "rate_limit_error",
                    ) from None
                await asyncio.sleep(0.05)
        first = await job.take()
        if isinstance(first, Exception):
            raise ApiError(400 if isinstance(first, ValueError) else 500, f"generation failed: {first}")
        return job, first

    async def audio(self):
        """Float32 pieces of the whole request's audio."""
        joiner, carried = CrossfadeStream(SAMPLING_RATE), []
        for index, text in enumerate(self.plan.chunks):
            if index and self.frames >= self.max_frames:
                break
            job, first = self.first if index == 0 else await self._run(index, carried, wait=True)
            joiner.start_sentence(last=index == len(self.plan.chunks) - 1)
            parts = []
            async for piece in audio_chunks(job, first):
                parts.append(piece)
                out = joiner.push(piece)
                if len(out):
                    yield out
            self.prompt_len, self.frames = self.prompt_len + job.prompt_len, self.frames + job.frames
            if job.codes:
                carried.append(Turn(self.plan.speaker, text, np.concatenate(parts), torch.stack(job.codes)))
        tail = joiner.finish()
        if len(tail):
            yield tail


async def audio_bytes(chunks, fmt: str, speed: float):
    """Encoded bytes of float32 audio chunks; `speed` resamples (pitch follows the speed)."""
    encoder = AudioEncoder(fmt, SAMPLING_RATE)
    stretch = (
        soxr.ResampleStream(SAMPLING_RATE * speed, SAMPLING_RATE, 1, dtype="float32")
        if speed != 1.0
        else None
    )
    async for chunk in chunks:
        if stretch is not None:
            chunk = stretch.resample_chunk(chunk)
        data = encoder.push(chunk)
        if data:
            yield data
    tail = (
        encoder.push(stretch.resample_chunk(np.zeros(0, np.float32), last=True))
        if stretch is not None
        else b""
    )
    data = tail + encoder.finish()
    if data:
        yield data


async def sse_events(stream, job: SpeechStream):
    """OpenAI's speech SSE: `speech.audio.delta` events with base64 audio, then `speech.audio.done`."""
    async for data in stream:
        yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': base64.b64encode(data).decode()})}\n\n"
    usage = {
        "input_tokens": job.prompt_len,
        "output_tokens": job.frames,
        "total_tokens": job.prompt_len + job.frames,
    }
    yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"


def frames_for_text(text: str, frame_rate: float) -> int:
    """A generous frame budget for `text` (5 s + 0.25 s per character, ~4x normal speech): a guard against
    runaway generation when the model never says end-of-audio."""
    return int((5.0 + 0.25 * len(text)) * frame_rate)


def settings_dict(settings: ServerSettings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k != "api_key"}
