"""What every backend shares around its tensor code: the lazily loaded Mimi codec and the
protocol `csm.api.Generator` calls (frames in, codes out; codes <-> audio)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from csm.audio import as_samples
from csm.checkpoint import Checkpoint
from csm.config import CsmConfig
from csm.sampling import SamplingParams


class FrameLoop(ABC):
    """The face both backends' FrameGenerators show: `stream` is the frame loop (tensor code,
    per backend); a whole clip is its blocks put together, written once here."""

    config: CsmConfig

    @abstractmethod
    def stream(
        self, tokens: np.ndarray, mask: np.ndarray, max_frames: int, params: SamplingParams,
        seed: int | None = None, first_block: int = 1, check_every: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Prompt frames [T, 33] -> blocks of generated codes [n, 32], as soon as they are known."""

    def generate(
        self, tokens: np.ndarray, mask: np.ndarray, max_frames: int, params: SamplingParams,
        seed: int | None = None, on_frame: Callable[[int], None] | None = None,
        check_every: int | None = None,
    ) -> np.ndarray:
        """Prompt frames [T, 33] -> generated codes [F, 32] (F <= max_frames)."""
        blocks = self.stream(tokens, mask, max_frames, params, seed, check_every=check_every)
        return collect_blocks(blocks, self.config.audio_num_codebooks, on_frame)


class Backend(ABC):
    """Subclasses set `name`, `device`, `config`, `_frames` (a FrameGenerator) and `_load_codec`."""

    name: str
    device: str
    _frames: FrameLoop

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

    def generate_codes_batch(
        self, prompts: list[tuple[np.ndarray, np.ndarray]], max_frames: int, params: SamplingParams,
        seed: int | None = None,
    ) -> list[np.ndarray]:
        """Codes per prompt (tokens, mask). Here one stream after another (stream i seeded with
        seed + i); backends that batch on the device override this."""
        return [self._frames.generate(tokens, mask, max_frames, params, None if seed is None else seed + i)
                for i, (tokens, mask) in enumerate(prompts)]

    def stream_codes(
        self, tokens: np.ndarray, mask: np.ndarray, max_frames: int, params: SamplingParams,
        seed: int | None = None, first_block: int = 1, check_every: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Blocks of codes [n, 32] as the frame loop clears them (see the FrameGenerators)."""
        return self._frames.stream(tokens, mask, max_frames, params, seed, first_block=first_block, check_every=check_every)

    def encode_audio(self, audio) -> np.ndarray:
        """Mono 24 kHz samples (numpy, or a torch tensor a Segment kept) -> Mimi codes."""
        return self.codec.encode(as_samples(audio))

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        return self.codec.decode(codes)


def collect_blocks(blocks: Iterable[np.ndarray], num_codebooks: int,
                   on_frame: Callable[[int], None] | None = None) -> np.ndarray:
    """Concatenate streamed code blocks into [F, num_codebooks], reporting the running count."""
    kept, total = [], 0
    for block in blocks:
        kept.append(block)
        total += len(block)
        if on_frame is not None:
            on_frame(total)
    return np.concatenate(kept) if kept else np.zeros((0, num_codebooks), dtype=np.int64)
