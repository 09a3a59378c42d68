"""What every backend shares around its tensor code: the lazily loaded Mimi codec and the
protocol `csm.api.Generator` calls (frames in, codes out; codes <-> audio)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np

from csm.checkpoint import Checkpoint
from csm.sampling import SamplingParams


class Backend(ABC):
    """Subclasses set `name`, `device`, `config`, `_frames` (a FrameGenerator) and `_load_codec`."""

    name: str
    device: str

    def __init__(self, ckpt: Checkpoint, mimi: str | None):
        self.config = ckpt.config
        self._model_dir: Path = ckpt.root
        self._mimi_source = mimi
        self._codec = None

    @abstractmethod
    def _load_codec(self):
        """This backend's Mimi codec (encode/decode on numpy arrays)."""

    @property
    def codec(self):
        """Mimi, loaded on first use: text-only code generation never needs it."""
        if self._codec is None:
            self._codec = self._load_codec()
        return self._codec

    def generate_codes(
        self, tokens: np.ndarray, mask: np.ndarray, max_frames: int, params: SamplingParams,
        seed: int | None = None, on_frame: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        return self._frames.generate(tokens, mask, max_frames, params, seed, on_frame)

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        return self.codec.encode(audio)

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        return self.codec.decode(codes)
