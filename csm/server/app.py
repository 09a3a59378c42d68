"""The FastAPI app: OpenAI's speech endpoint over one shared `csm.Engine`.

Every request is checked in full (auth, body size, JSON, fields, model, voice, format, the
prompt fitting the model) and its first turn queued before the 200 goes out; only then does audio
stream. The engine's frame loop runs in its own thread; each response pulls its chunks (which
decodes and watermarks them) in a worker thread, so the event loop never waits on the model.
A client that disconnects cancels its speech at once, freeing its slot for the next request.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from csm.engine import Engine, EngineFull
from csm.errors import CsmError
from csm.longform import LongSpeech
from csm.prompt import Segment
from csm.sentences import split_turns
from csm.server.errors import ApiError, error_response, install_handlers
from csm.server.formats import SSE_FORMATS, Encoder, supported_formats
from csm.server.schema import SpeechRequest, parse_request
from csm.server.settings import DEFAULT_SPEAKER, OPENAI_VOICES, ServerSettings

log = logging.getLogger("csm.server")
PAGE = Path(__file__).parent / "static" / "index.html"
_CREATED = int(time.time())


class ServerState:
    """What the routes share: the model, its one engine, the settings, counters."""

    def __init__(self, engine: Engine, settings: ServerSettings, shutting_down: Callable[[], bool]):
        self.engine = engine
        self.generator = engine.generator
        self.settings = settings
        self.shutting_down = shutting_down
        self.formats = supported_formats()
        # one worker thread per stream that may wait on the engine: running and queued ones
        self.limiter = anyio.CapacityLimiter(engine.max_batch_size + engine.max_queue + 8)
        self.finished: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1


def create_app(engine: Engine, settings: ServerSettings | None = None,
               shutting_down: Callable[[], bool] = lambda: False) -> FastAPI:
    """The app serving `engine`'s model. `shutting_down()` True turns readiness off (uvicorn's
    graceful shutdown: no new clients, in-flight streams finish)."""
    state = ServerState(engine, settings or ServerSettings(), shutting_down)
    app = FastAPI(title="csm", summary="Sesame's CSM speech model behind OpenAI's speech API", docs_url=None,
                  redoc_url=None)
    app.state.csm = state
    install_handlers(app)
    authorized = Depends(_auth(state.settings.api_key))

    @app.get("/", include_in_schema=False)
    def page():
        """The web page: type, pick a voice, hear the reply as it streams (it speaks this API)."""
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    def health():
        """Liveness: the process answers. Also what the engine is doing and how requests ended."""
        return {"status": "ok", "active": engine.active, "waiting": engine.waiting, "finished": dict(state.finished)}

    @app.get("/ready")
    def ready():
        """Readiness: 200 while this replica takes new requests, 503 while it shuts down."""
        if state.shutting_down():
            return error_response(503, "shutting down: in-flight streams finish, new requests go elsewhere",
                                  code="shutting_down")
        return {"status": "ready", "model": state.settings.model_id, "active": engine.active,
                "waiting": engine.waiting, "max_batch_size": engine.max_batch_size, "max_queue": engine.max_queue}

    @app.get("/v1/models", dependencies=[authorized])
    def models():
        return {"object": "list", "data": [_model(name) for name in state.settings.model_names]}

    @app.get("/v1/models/{model_id}", dependencies=[authorized])
    def model(model_id: str):
        if model_id not in state.settings.model_names:
            raise _unknown_model(model_id, state.settings)
        return _model(model_id)

    @app.get("/v1/audio/voices", dependencies=[authorized])
    def voices():
        return {"voices": _voice_list(state.settings)}

    @app.post("/v1/audio/speech", dependencies=[authorized])
    async def speech(request: Request):
        body = await _read_body(request, state.settings.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
        req = parse_request(payload)
        job, encoder, input_tokens = await anyio.to_thread.run_sync(_prepare, state, req, limiter=state.limiter)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        # runs however the response ends, even when the client left before its body began
        stop = BackgroundTask(job.cancel)
        if req.stream_format == "sse":
            return StreamingResponse(_sse(state, job, encoder, input_tokens), media_type="text/event-stream",
                                     headers=headers, background=stop)
        return StreamingResponse(_audio(state, job, encoder), media_type=encoder.media_type, headers=headers,
                                 background=stop)

    return app


# --- checks -----------------------------------------------------------------------------------

def _auth(api_key: str | None):
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    return check


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"the request body is over {limit} bytes: send less context audio", code="too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "csm"}


def _unknown_model(name: str, settings: ServerSettings) -> ApiError:
    return ApiError(404, f"model {name!r} is not served here; use one of {', '.join(settings.model_names)}",
                    param="model", code="model_not_found")


def _voice_list(settings: ServerSettings) -> list[dict]:
    from csm.voices import VoiceStore

    listed = [{"id": name, "name": name, "kind": "openai", "maps_to": settings.voice_map.get(name, DEFAULT_SPEAKER)}
              for name in OPENAI_VOICES]
    try:
        profiles = VoiceStore().list()
    except CsmError as exc:
        log.warning("voice store unreadable: %s", exc)
        profiles = []
    listed += [{"id": v.id, "name": v.name, "kind": "profile", "speaker_id": v.speaker_id,
                "description": v.description} for v in profiles]
    return listed


def _resolve_voice(name: str, settings: ServerSettings):
    """(voice profile or None, speaker id or None) for a request's `voice` (see csm.server.settings)."""
    from csm.voices import VoiceStore

    target: str | int = name
    if name.lower() in OPENAI_VOICES:
        target = settings.voice_map.get(name.lower(), DEFAULT_SPEAKER)
    if isinstance(target, int) or target.isdigit():
        return None, int(target)
    try:
        profiles = VoiceStore().list()
    except CsmError as exc:
        raise ApiError(500, f"the voice store cannot be read: {exc}", code="voice_store_error") from None
    for voice in profiles:
        if target in (voice.name, voice.id):
            return voice, None
    known = ", ".join([*OPENAI_VOICES, *(v.name for v in profiles)])
    what = f"voice {name!r} maps to {target!r}, which is not in the voice store" if target != name else \
        f"no voice {name!r}"
    raise ApiError(400, f"{what}: use one of {known}, or a speaker id", param="voice", code="voice_not_found")


def _context(req: SpeechRequest) -> list[Segment]:
    """The request's context segments, their audio decoded from base64 (never read from a path)."""
    import soundfile as sf

    from csm.audio import MODEL_SAMPLE_RATE, resample, to_mono

    segments = []
    for i, item in enumerate(req.context):
        audio = None
        if item.audio is not None:
            where = f"context[{i}].audio"
            try:
                raw = base64.b64decode(item.audio, validate=True)
                data, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
            except (binascii.Error, ValueError) as exc:
                raise ApiError(400, f"{where} is not base64 ({exc})", param=where, code="invalid_value") from None
            except Exception as exc:  # soundfile's LibsndfileError and its kin
                raise ApiError(400, f"{where} is not an audio file soundfile reads (WAV, FLAC, Ogg): {exc}",
                               param=where, code="invalid_value") from None
            if not len(data):
                raise ApiError(400, f"{where} holds no samples", param=where, code="invalid_value")
            audio = resample(to_mono(data), rate, MODEL_SAMPLE_RATE)
        segments.append(Segment(item.speaker, item.text, audio))
    return segments


def _prepare(state: ServerState, req: SpeechRequest) -> tuple[LongSpeech, Encoder, int]:
    """Every check a request needs, then its first turn queued (in a worker thread: it reads the
    voice store and encodes context audio)."""
    settings = state.settings
    if state.shutting_down():
        raise ApiError(503, "shutting down: send the request to another replica", code="shutting_down")
    if req.model not in settings.model_names:
        raise _unknown_model(req.model, settings)
    fmt = req.response_format.lower()
    if fmt not in state.formats:
        raise ApiError(400, f"response_format {req.response_format!r} is not supported; use one of "
                       f"{', '.join(state.formats)}", param="response_format", code="unsupported_value")
    if req.stream_format not in ("audio", "sse"):
        raise ApiError(400, f"stream_format must be 'audio' or 'sse', not {req.stream_format!r}",
                       param="stream_format", code="invalid_value")
    if req.stream_format == "sse" and fmt not in SSE_FORMATS:
        raise ApiError(400, f"stream_format 'sse' sends {' or '.join(SSE_FORMATS)}, not {fmt}: its deltas must play "
                       "as they come", param="response_format", code="unsupported_value")
    if req.speed != 1.0:
        raise ApiError(400, f"speed {req.speed} is not supported: CSM speaks at its own pace (1.0); change the "
                       "playback rate on the client", param="speed", code="unsupported_value")
    if req.instructions:
        raise ApiError(400, "CSM does not follow instructions: leave 'instructions' out, and set the voice with "
                       "'voice' or 'context'", param="instructions", code="unsupported_value")
    max_ms = settings.max_audio_length_ms
    if req.max_audio_length_ms is not None:
        if req.max_audio_length_ms > max_ms:
            raise ApiError(400, f"max_audio_length_ms is at most {max_ms:g} on this server",
                           param="max_audio_length_ms", code="invalid_value")
        max_ms = req.max_audio_length_ms
    turns = split_turns(req.input, settings.turn_chars)
    if not turns:
        raise ApiError(400, "'input' holds no words to speak", param="input", code="invalid_value")
    voice, speaker = _resolve_voice(req.voice_name, settings)
    if req.speaker is not None:
        speaker = req.speaker
    try:
        job = LongSpeech(state.engine, turns, speaker, _context(req), voice=voice, max_audio_length_ms=max_ms,
                         temperature=req.temperature, topk=req.top_k, top_p=req.top_p, seed=req.seed)
        job.start()
    except EngineFull:
        raise ApiError(429, f"the server is busy: {state.engine.waiting} requests wait for one of "
                       f"{state.engine.max_batch_size} slots; retry later", code="rate_limit_exceeded",
                       headers={"Retry-After": str(settings.retry_after_s)}) from None
    except CsmError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    input_tokens = sum(len(state.generator.tokenizer.encode_turn(t, speaker or 0)) for t in turns)
    return job, Encoder(fmt), input_tokens


# --- streaming --------------------------------------------------------------------------------

def _next_chunk(iterator) -> np.ndarray | None:
    return next(iterator, None)


async def _chunks(state: ServerState, job: LongSpeech) -> AsyncIterator[np.ndarray]:
    """The speech's audio chunks, each pulled in a worker thread. Leaving early (a disconnect
    cancels the response's task) cancels the speech at once: the waiting thread is abandoned and
    ends when the engine drops the request."""
    iterator, ended = iter(job), False
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(_next_chunk, iterator, abandon_on_cancel=True,
                                                   limiter=state.limiter)
            if chunk is None:
                ended = True
                break
            yield chunk
    finally:
        if not ended:
            job.cancel()
        state.count(job.finish_reason if ended and job.finish_reason else "cancelled")


async def _audio(state: ServerState, job: LongSpeech, encoder: Encoder) -> AsyncIterator[bytes]:
    try:
        async for chunk in _chunks(state, job):
            data = encoder.chunk(chunk)
            if data:
                yield data
        yield encoder.end()
    except CsmError as exc:  # the 200 is out: all a client can see is a stream that stops early
        log.error("speech failed midway: %s", exc)


async def _sse(state: ServerState, job: LongSpeech, encoder: Encoder, input_tokens: int) -> AsyncIterator[bytes]:
    def event(data: dict) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    def delta(data: bytes) -> bytes:
        return event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})

    try:
        async for chunk in _chunks(state, job):
            data = encoder.chunk(chunk)
            if data:
                yield delta(data)
        tail = encoder.end()
        if tail:
            yield delta(tail)
        yield event({"type": "speech.audio.done", "usage": {"input_tokens": input_tokens, "output_tokens": job.frames,
                                                              "total_tokens": input_tokens + job.frames}})
    except CsmError as exc:
        log.error("speech failed midway: %s", exc)
        yield event({"type": "error", "error": {"message": str(exc), "type": "server_error", "param": None,
                                                 "code": "generation_failed"}})

