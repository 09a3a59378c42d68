"""The request body of POST /v1/audio/speech: OpenAI's fields, then csm's optional extras.

Unknown fields are refused (OpenAI's schema has `additionalProperties: false`), so a misspelt
option is an error rather than silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from csm.server.errors import ApiError

MAX_INPUT_CHARS = 4096  # OpenAI's limit
MAX_CONTEXT_SEGMENTS = 16


class VoiceRef(BaseModel):
    """OpenAI's `{"id": "voice_..."}` form of `voice`."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)


class ContextSegment(BaseModel):
    """A turn of the conversation so far: its words, its speaker and (optionally) its audio as a
    base64 WAV, FLAC or Ogg file."""

    model_config = ConfigDict(extra="forbid")
    text: str
    speaker: int = Field(ge=0)
    audio: str | None = None


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # OpenAI's fields
    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str | VoiceRef
    response_format: str = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: str = "audio"
    instructions: str | None = None
    # csm's extras (OpenAI's clients send them through extra_body)
    speaker: int | None = Field(None, ge=0)
    context: list[ContextSegment] = Field(default_factory=list, max_length=MAX_CONTEXT_SEGMENTS)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_audio_length_ms: float | None = Field(None, gt=0)

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


def parse_request(payload) -> SpeechRequest:
    """The body as a SpeechRequest, or a 400 naming the first bad field."""
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(payload).__name__}",
                       code="invalid_json")
    try:
        return SpeechRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        kind = first["type"]
        if kind == "extra_forbidden":
            message = f"unknown field {param!r}: see the fields of POST /v1/audio/speech"
        elif kind == "missing":
            message = f"{param!r} is required"
        elif param == "input" and kind == "string_too_long":
            message = f"'input' is {len(payload['input'])} characters long; the most is {MAX_INPUT_CHARS}: split it"
        else:
            message = f"{param!r}: {first['msg']}"
        raise ApiError(400, message, param=param, code="invalid_value") from None


def _param(loc) -> str:
    # a union's member name (voice: str | VoiceRef) is pydantic's, not the client's: keep the field path
    parts = [p for p in loc if p not in ("str", "VoiceRef")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
