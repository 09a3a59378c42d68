"""What a server is configured with, and how a request's `voice` becomes a speaker.

A `voice` is, in this order: an OpenAI voice name (alloy, echo, ...) mapped with `--voice-map`
to a voice profile or a speaker id, else speaker 0 (a fresh voice each seed: CSM has no built-in
voices); a voice profile's name or 12-character id in the voice store (`csm voice create`); or a
speaker id given as digits. Anything else is refused with the known voices listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csm.errors import CsmError
from csm.sentences import DEFAULT_TURN_CHARS

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # names clients send: all served by the one model
DEFAULT_SPEAKER = 0  # what an unmapped OpenAI voice name speaks as
DEFAULT_TURN_MS = 30_000  # a turn's longest audio: twice what a 200-character turn takes to say
API_KEY_ENV = "CSM_API_KEY"


@dataclass
class ServerSettings:
    """`model_id`: the name /v1/models lists (OpenAI's model names are accepted too);
    `voice_map`: OpenAI voice name -> profile name or speaker id; `max_audio_length_ms`: the
    longest audio of one turn; `turn_chars`: long input is spoken in turns of at most this many
    characters; `max_body_bytes`: larger request bodies are refused (413)."""

    model_id: str = "csm-1b"
    api_key: str | None = None
    voice_map: dict[str, str | int] = field(default_factory=dict)
    max_audio_length_ms: float = DEFAULT_TURN_MS
    turn_chars: int = DEFAULT_TURN_CHARS
    max_body_bytes: int = 16 * 2**20
    retry_after_s: int = 1

    def __post_init__(self):
        self.voice_map = {check_openai_voice(k): v for k, v in self.voice_map.items()}
        if self.api_key is not None and not self.api_key.strip():
            raise CsmError("the API key is empty: give a non-empty --api-key, or none for an open server")
        if not self.max_audio_length_ms > 0 or self.max_body_bytes < 1024 or self.turn_chars < 8:
            raise CsmError("max_audio_length_ms must be positive, max_body_bytes >= 1024 and turn_chars >= 8")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_id, *OPENAI_MODELS)


def check_openai_voice(name: str) -> str:
    if name.lower() not in OPENAI_VOICES:
        raise CsmError(f"--voice-map maps OpenAI's voice names ({', '.join(OPENAI_VOICES)}), not {name!r}")
    return name.lower()


def parse_voice_map(items) -> dict[str, str | int]:
    """["alloy=John", "echo=1"] -> {"alloy": "John", "echo": 1} (digits are a speaker id)."""
    mapping: dict[str, str | int] = {}
    for item in items:
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise CsmError(f"--voice-map takes OPENAI_NAME=PROFILE_OR_SPEAKER_ID (e.g. alloy=John), got {item!r}")
        target = target.strip()
        mapping[check_openai_voice(name.strip())] = int(target) if target.isdigit() else target
    return mapping
