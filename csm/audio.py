"""Audio in and out: reading any file soundfile knows, mono mixdown, resampling, atomic WAV writes.

Everything here works on float32 numpy arrays; the model side only ever sees mono audio at the
model's sample rate, Mimi's 24 kHz (`MODEL_SAMPLE_RATE`, defined in `csm.mimi_files`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from csm.errors import CsmError
from csm.mimi_files import SAMPLE_RATE as MODEL_SAMPLE_RATE


def as_samples(audio) -> np.ndarray:
    """float32 numpy samples from a numpy array (or anything np.asarray takes) or a torch tensor
    on any device in any float dtype, found by duck typing: this module never imports torch."""
    if hasattr(audio, "detach"):
        audio = audio.detach().to("cpu").float().numpy()
    return np.asarray(audio, dtype=np.float32)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average channels. Accepts [N] or [N, channels] (soundfile's layout)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        return audio
    if audio.ndim == 2:
        return audio.mean(axis=1, dtype=np.float32)
    raise CsmError(f"expected 1-D (mono) or 2-D [samples, channels] audio, got shape {audio.shape}")


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """High-quality resampling (soxr); a no-op when the rates agree."""
    audio = np.asarray(audio, dtype=np.float32)
    if from_rate == to_rate:
        return audio
    import soxr

    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def read_audio(path: str | os.PathLike, sample_rate: int = MODEL_SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as mono float32 at `sample_rate`, whatever its rate and channel count."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise CsmError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own LibsndfileError / RuntimeError
        raise CsmError(f"cannot read audio file {path}: {exc}. Use WAV, FLAC or OGG.") from exc
    if data.shape[0] == 0:
        raise CsmError(f"audio file {path} is empty")
    return resample(to_mono(data), rate, sample_rate)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, *, force: bool = False) -> Path:
    """Write a 16-bit PCM WAV atomically (temp file + rename); refuse to overwrite unless `force`."""
    import soundfile as sf

    path = Path(path)
    if path.exists() and not force:
        raise CsmError(f"{path} already exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise CsmError(f"output folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        sf.write(tmp, np.asarray(audio, dtype=np.float32), sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
