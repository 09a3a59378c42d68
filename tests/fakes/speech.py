"""Real speech made offline: espeak-ng's voices (Debian's espeak-ng, which .ci/run installs),
spoken through csm's own dialogue maker (`csm.training.dialogues.speak`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csm.training import dialogues

MALE, FEMALE = "en-us", "en-us+f3"


def require_espeak(why: str = "no offline speech") -> str:
    """espeak-ng's path, or skip the test that needs it (saying what for)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip(f"espeak-ng not found (apt-get install espeak-ng): {why}")
    return espeak


def speak(path: str | Path, text: str, voice: str = MALE) -> tuple[np.ndarray, int]:
    """espeak-ng saying `text` in `voice` into the WAV file `path`: (float32 samples, rate). A
    female voice is raised in pitch (-p 80), so the two voices are clearly different speakers."""
    require_espeak()
    samples, rate = dialogues.speak(text, voice, pitch=80 if "+f" in voice else None)
    sf.write(str(path), samples, rate, subtype="PCM_16")  # espeak-ng's own 16-bit samples, exactly
    return samples, rate
