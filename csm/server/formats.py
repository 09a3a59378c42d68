"""Response formats: float32 24 kHz chunks -> the bytes a client asked for.

`pcm` (raw 16-bit little-endian mono at 24 kHz) and `wav` go out chunk by chunk as the audio is
made; a WAV has one header, at the start, whose sizes say "unknown length" (0xFFFFFFFF), which
players and libsndfile read as "to the end of the stream". `flac`, `mp3` and `opus` (Ogg Opus) are
encoded by libsndfile (soundfile) once the clip is complete, so they arrive in one piece at the
end. `aac` is refused: libsndfile has no AAC encoder.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from csm.audio import MODEL_SAMPLE_RATE

STREAMED = ("wav", "pcm")
# format -> (soundfile format, subtype), for the formats encoded whole
_WHOLE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg"}
SSE_FORMATS = STREAMED  # an SSE delta carries bytes a client can play as they come


def supported_formats() -> list[str]:
    """The formats this machine's libsndfile can write (mp3 needs libsndfile >= 1.1)."""
    import soundfile as sf

    return [*STREAMED, *(name for name, (fmt, sub) in _WHOLE.items() if sf.check_format(fmt, sub))]


def pcm16(audio: np.ndarray) -> bytes:
    samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return np.round(samples * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int = MODEL_SAMPLE_RATE) -> bytes:
    """A 16-bit mono PCM WAV header of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


class Encoder:
    """One response's encoder: `chunk(audio)` -> bytes to send now, `end()` -> the last bytes."""

    def __init__(self, fmt: str):
        self.format = fmt
        self.media_type = MEDIA_TYPES[fmt]
        self._header_sent = False
        self._held: list[np.ndarray] = []

    def chunk(self, audio: np.ndarray) -> bytes:
        if self.format not in STREAMED:
            self._held.append(np.asarray(audio, dtype=np.float32))
            return b""
        return self._header() + pcm16(audio)

    def end(self) -> bytes:
        if self.format in STREAMED:
            return self._header()  # a clip with no audio is still a WAV
        import soundfile as sf

        audio = np.concatenate(self._held) if self._held else np.zeros(0, dtype=np.float32)
        fmt, subtype = _WHOLE[self.format]
        buffer = io.BytesIO()
        # the same 16-bit samples as pcm and wav (libsndfile's own float conversion rounds differently)
        samples = np.frombuffer(pcm16(audio), dtype="<i2")
        sf.write(buffer, samples, MODEL_SAMPLE_RATE, format=fmt, subtype=subtype)
        return buffer.getvalue()

    def _header(self) -> bytes:
        if self.format != "wav" or self._header_sent:
            return b""
        self._header_sent = True
        return wav_header()
