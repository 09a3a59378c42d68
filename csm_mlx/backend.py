"""The MLX backend behind `csm.load`: frames in, codes out; codes <-> audio through Mimi.
No PyTorch anywhere on this path (only a `ckpt.pt` checkpoint is read with torch, once, at load)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from csm.checkpoint import Checkpoint
from csm.sampling import SamplingParams
from csm_mlx.generator import FrameGenerator, load_model, pick_device, pick_dtype


class MlxBackend:
    name = "mlx"

    def __init__(self, ckpt: Checkpoint, device: str | None = None, dtype: str | None = None, mimi: str | None = None,
                 quantize: int | None = None, group_size: int = 64, compile: bool = True):
        self.mlx_device = pick_device(device)
        # MLX places work on its default device; a process runs one MLX model, so set it once
        mx.set_default_device(self.mlx_device)
        self.device = "gpu" if self.mlx_device == mx.gpu else "cpu"
        self.dtype = pick_dtype(dtype, self.mlx_device)
        self.config = ckpt.config
        self.model = load_model(ckpt, self.dtype, quantize=quantize, group_size=group_size)
        self._frames = FrameGenerator(self.model, compile=compile)
        self._model_dir: Path = ckpt.root
        self._mimi_source = mimi
        self._codec = None

    @property
    def codec(self):
        """Mimi, loaded on first use: text-only code generation never needs it."""
        if self._codec is None:
            from csm_mlx.mimi import load_mimi

            self._codec = load_mimi(model_dir=self._model_dir, mimi=self._mimi_source)
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

    def synchronize(self) -> None:
        mx.synchronize()
