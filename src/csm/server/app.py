"""The OpenAI-compatible HTTP API: /v1/audio/speech, /v1/voices, /v1/models, /health (and /docs), the extra
/v1/audio/dialogue, and the web page at /."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audio import SAMPLING_RATE, load_audio
from ..generate import GenerationConfig
from ..pipeline import MAX_CHUNK_CHARS, split_sentences
from ..planner import Turn, encode_turns, plan_prompt, voice_turns
from ..voice import VOICE_FILE, Voice, voices_dir
from .dialogue import context_turns, dialogue_events, dialogue_json, dialogue_turns
from .docs import add_docs
from .encode import MEDIA_TYPES
from .scheduler import Scheduler, SpeechJob
from .schemas import (
    DIALOGUE_RESPONSES,
    OPENAI_MODELS,
    OPENAI_VOICES,
    SPEECH_RESPONSES,
    DialogueRequest,
    Health,
    ModelCard,
    ModelList,
    SchedulerStats,
    SpeechRequest,
    VoiceCard,
    VoiceCreated,
    VoiceList,
    VoiceRef,
    errors,
)
from .speech import (
    ApiError,
    PlannedTurn,
    SpeechPlan,
    SpeechStream,
    audio_bytes,
    context_overflow,
    prompt_positions,
    speaker_number,
    sse_events,
)
from .voice_store import VoiceStore
from .web import add_page

log = logging.getLogger("csm.server")
access = logging.getLogger("csm.access")
VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
SPEED_HEADER = "resample: speed > 1 plays faster and higher, < 1 slower and lower (pitch follows)"


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
    max_upload_seconds: float = 60.0
    max_transcript_chars: int = 1000  # a voice's transcript: the words of at most a minute of speech
    max_voices: int = 100  # voices saved through the API; more get 409
    max_voices_bytes: int = 512 * 1024 * 1024  # disk the voices folder may take; more gets 409
    voice_cache: int = 8  # saved voices kept in memory (the last used); others are read from disk when used
    voices_dir: str | None = None  # default: $CSM_VOICES_DIR or ~/.local/share/csm/voices
    api_key: str | None = None


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
            if self.scheduler.draining and scope["path"] not in (
                "/health",
                "/v1/stats",
            ):  # expected: no error log
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
    root = Path(settings.voices_dir).expanduser() if settings.voices_dir else voices_dir()
    store = VoiceStore(root, settings.max_voices, settings.max_voices_bytes, settings.voice_cache)

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
        docs_url=None,  # add_docs serves them with local assets
        redoc_url=None,
    )
    app.state.scheduler, app.state.settings, app.state.voices = scheduler, settings, store
    app.add_middleware(RequestContext, settings=settings, scheduler=scheduler)
    add_page(app)
    add_docs(app)

    # ---- errors ------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        if e.status >= 500:
            log.error("request %s failed: %s", request.state.request_id, e.message)
        return error_response(e.status, e.message, e.type, e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        message, param = validation_message(e)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)

    # ---- plain endpoints ---------------------------------------------------------------------------

    @app.get(
        "/health", response_model=Health, responses={503: {"model": Health, "description": "not serving"}}
    )
    async def health():
        status = "draining" if scheduler.draining else "ok" if scheduler.alive else "unavailable"
        body = {"status": status, "model": settings.model_name, "scheduler": scheduler.stats()}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/stats", response_model=SchedulerStats, responses=errors(401))
    async def stats():
        return scheduler.stats()

    @app.get("/v1/models", response_model=ModelList, responses=errors(401))
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_name)])

    @app.get("/v1/voices", response_model=VoiceList, responses=errors(401))
    async def voices():
        return VoiceList(
            voices=[VoiceCard(id=name, name=name) for name in store.names()],
            speakers='any speaker number, e.g. "0", without reference audio',
            openai_voices=OPENAI_VOICES,
        )

    @app.post(
        "/v1/voices",
        status_code=201,
        response_model=VoiceCreated,
        responses=errors(400, 401, 409, 413, 500),
        description="Save a voice: a clip and its transcript. 409 when the name is taken (`code`: "
        "voice_exists) or the server holds as many voices or bytes of them as it allows (voice_limit_reached).",
    )
    async def create_voice(
        audio_file: Annotated[UploadFile, File(description="a clip of the voice (wav, flac, mp3, ...)")],
        name: Annotated[str, Form(description="1-64 letters, digits, '_', '-' or '.', not only digits")],
        transcript: Annotated[str, Form(description="the words spoken in the clip")],
        speaker: Annotated[int, Form(ge=0, le=999, description="the speaker number it speaks as")] = 0,
    ):
        if not VOICE_NAME.match(name) or name.isdigit():
            raise ApiError(
                400, "name must be 1-64 letters, digits, '_', '-' or '.', not only digits", param="name"
            )
        if not transcript.strip():
            raise ApiError(400, "transcript must hold the words spoken in the clip", param="transcript")
        if len(transcript) > settings.max_transcript_chars:
            raise ApiError(
                400,
                f"transcript is {len(transcript)} characters; the limit is {settings.max_transcript_chars} "
                "(the words of the clip, at most a minute of speech)",
                param="transcript",
            )
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
        check_voice_fits(audio, transcript, speaker)
        await asyncio.to_thread(store.create, name, speaker, audio, transcript)
        return VoiceCreated(id=name, name=name, speaker=speaker, seconds=round(seconds, 3))

    def check_voice_fits(audio, transcript: str, speaker: int) -> None:
        """A voice is context in every prompt it speaks in: it may take at most half the model's context."""
        limit = scheduler.max_seq_len
        frames = int(np.ceil(len(audio) / SAMPLING_RATE * model.codec_model.frame_rate))
        text = prompt_positions(processor, [], speaker, transcript.strip())
        if text is not None and text + frames <= limit // 2:
            return
        clip_too_long = frames > limit // 4
        raise ApiError(
            400,
            f"the voice would take {'more than all' if text is None else text + frames} of the model's "
            f"{limit} context positions ({frames} for the clip's audio); at most {limit // 2} leave room to "
            f"speak: use a {'shorter clip' if clip_too_long else 'shorter transcript'}",
            param="audio_file" if clip_too_long else "transcript",
        )

    # ---- speech ------------------------------------------------------------------------------------

    def resolve_voice(value: Any, param: str = "voice") -> tuple[int, Voice | None]:
        """A speaker number (ASCII digits), a saved voice, or one of OpenAI's voice names (a saved voice of
        that name wins) as (speaker, voice or None)."""
        if isinstance(value, VoiceRef):
            value, param = value.id, f"{param}.id"
        speaker = speaker_number(value, param)
        if speaker is not None:
            return speaker, None
        if not isinstance(value, str) or not VOICE_NAME.match(value):
            raise ApiError(
                400,
                "voice must be a saved voice name, one of OpenAI's voice names or a speaker number "
                "(ASCII digits, 0-999)",
                param=param,
            )
        if value.lower() in OPENAI_VOICES and not (root / value / VOICE_FILE).is_file():
            return OPENAI_VOICES[value.lower()], None
        voice = store.get(value, param)
        return voice.speaker, voice

    def check_model(name: str | None) -> None:
        accepted = (None, "", settings.model_name, settings.model_path, "csm", *OPENAI_MODELS)
        if name not in accepted:
            raise ApiError(
                404, f"unknown model {name!r}; this server serves {settings.model_name!r}", param="model"
            )

    def generation_config(body) -> GenerationConfig:
        try:
            return GenerationConfig.from_model(model, temperature=body.temperature, top_k=body.top_k)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def prepare(body: SpeechRequest) -> SpeechPlan:
        """Check a request and cut its text into sentence-sized chunks, after its context turns."""
        text = body.input.strip()
        if not text:
            raise ApiError(400, "input is empty", param="input")
        if len(body.input) > settings.max_input_chars:
            raise ApiError(
                400,
                f"input is {len(body.input)} characters; the limit is {settings.max_input_chars}",
                param="input",
            )
        check_model(body.model)
        speaker, voice = resolve_voice(body.voice)
        config = generation_config(body)
        voices = [(voice, voice_turns(voice))] if voice is not None else []
        more_voices, given = context_turns(body.context, resolve_voice, settings)
        turn = PlannedTurn(speaker, text, split_sentences(text, settings.max_chunk_chars), seed=body.seed)
        params = ["voice"] * len(voices) + [
            f"context.{i}.voice" for i, t in enumerate(body.context or []) if t.voice is not None
        ]
        return SpeechPlan([*given, turn], config, [*voices, *more_voices], voice_params=params)

    def prepare_dialogue(body: DialogueRequest) -> SpeechPlan:
        check_model(body.model)
        config = generation_config(body)
        voices, turns = dialogue_turns(body, resolve_voice, settings)
        params = [f"voices.{key}" for key in body.voices]
        return SpeechPlan(turns, config, voices, pause=body.pause, voice_params=params)

    def job_for(plan: SpeechPlan, turn: int, index: int, carried: list[Turn], frames_left: int) -> SpeechJob:
        """The job for chunk `index` of turn `turn`: the voices' clips and as many of the turns and chunks
        before it (with the audio made for them) as fit the context with its whole frame budget, then its text."""
        spoken = plan.turns[turn]
        text = spoken.chunks[index]
        budget = min(frames_left, frames_for_text(text, model.codec_model.frame_rate))
        try:
            prompt = plan_prompt(
                processor, plan.fixed, carried, spoken.speaker, text, budget, scheduler.max_seq_len, "keep"
            )
        except (
            ValueError
        ):  # the planner's message names the Python API's knobs: say what the request can change
            raise context_overflow(processor, plan, spoken, text, scheduler.max_seq_len) from None

        def embed():  # on the scheduler's thread: clips are encoded there, once per request (voices: once)
            for voice, turns in plan.voices:
                if turns and turns[0].codes is None:
                    for t, codes in zip(turns, voice.codes(model), strict=True):
                        t.codes = codes
            encode_turns(model, prompt.context)
            codes = [c.to(model.device) for c in prompt.audio_codes or []]
            return model.embed_inputs(prompt.input_ids.to(model.device), audio_codes=codes or None)[0]

        return SpeechJob(
            embed=embed,
            prompt_len=prompt.length,
            max_frames=prompt.frames,
            backbone=plan.config.backbone,
            depth_decoder=plan.config.depth_decoder,
            seed=None if spoken.seed is None else spoken.seed + index,
        )

    @app.post("/v1/audio/speech", response_class=Response, responses=SPEECH_RESPONSES)
    async def speech(body: SpeechRequest, request: Request):
        """Speak `input`; the audio streams back as it is made (OpenAI's `audio.speech.create`)."""
        plan = await asyncio.to_thread(prepare, body)
        rid = request.state.request_id
        speech = SpeechStream(
            plan, job_for, scheduler, settings.max_frames, rid, settings.max_buffered_chunks
        )
        request.state.cleanup.append(speech.cancel)
        await speech.start()  # a failure before the first audio is still an error status
        stream = audio_bytes(speech.audio(), body.response_format, body.speed)
        headers = {"X-Accel-Buffering": "no", "X-Speed-Method": SPEED_HEADER if body.speed != 1.0 else "none"}
        if body.stream_format == "sse":
            return StreamingResponse(
                sse_events(stream, speech), media_type="text/event-stream", headers=headers
            )
        media_type = MEDIA_TYPES[body.response_format]
        if body.response_format == "flac":  # written only at the end: buffered, so a failure is a status
            data = b"".join([part async for part in stream])
            return Response(data, media_type=media_type, headers=headers)
        return StreamingResponse(stream, media_type=media_type, headers=headers)

    @app.post("/v1/audio/dialogue", response_class=Response, responses=DIALOGUE_RESPONSES)
    async def dialogue(body: DialogueRequest, request: Request):
        """Extra: speak a dialogue, each turn in the context of the ones before; the mix streams back as each
        turn is made, with `pause` seconds between turns (`sse`: with each turn's times; `json`: all at once)."""
        plan = await asyncio.to_thread(prepare_dialogue, body)
        rid = request.state.request_id
        speech = SpeechStream(
            plan, job_for, scheduler, settings.max_frames, rid, settings.max_buffered_chunks
        )
        request.state.cleanup.append(speech.cancel)
        await speech.start()
        stream = audio_bytes(speech.audio(), body.response_format, 1.0)
        headers = {"X-Accel-Buffering": "no"}
        if body.stream_format == "sse":
            events = dialogue_events(stream, speech, body.seed)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        if body.stream_format == "json":
            return JSONResponse(await dialogue_json(stream, speech, body), headers=headers)
        media_type = MEDIA_TYPES[body.response_format]
        if body.response_format == "flac":
            data = b"".join([part async for part in stream])
            return Response(data, media_type=media_type, headers=headers)
        return StreamingResponse(stream, media_type=media_type, headers=headers)

    return app


def frames_for_text(text: str, frame_rate: float) -> int:
    """A generous frame budget for `text` (5 s + 0.25 s per character, ~4x normal speech): a guard against
    runaway generation when the model never says end-of-audio."""
    return int((5.0 + 0.25 * len(text)) * frame_rate)


def settings_dict(settings: ServerSettings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k != "api_key"}
