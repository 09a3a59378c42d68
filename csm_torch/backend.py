"""The PyTorch backend behind `csm.load`: frames in, codes out; codes <-> audio through Mimi."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from csm.checkpoint import Checkpoint
from csm.sampling import SamplingParams
from csm_torch.generator import FrameGenerator, load_model, pick_device, pick_dtype


class TorchBackend:
    name = "torch"

    def __init__(self, ckpt: Checkpoint, device: str | None = None, dtype: str | None = None, mimi: str | None = None):
        self.torch_device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.torch_device)
        self.device = str(self.torch_device)
        self.config = ckpt.config
        self.model = load_model(ckpt, self.torch_device, self.dtype)
        # CUDA replays each frame from a captured graph; elsewhere the same code runs eagerly
        self._frames = FrameGenerator(self.model, cuda_graph=self.torch_device.type == "cuda")
        self._model_dir: Path = ckpt.root
        self._mimi_source = mimi
        self._codec = None

    @property
    def codec(self):
        """Mimi, loaded on first use: text-only code generation never needs it."""
        if self._codec is None:
            from csm_torch.mimi import load_mimi

            self._codec = load_mimi(model_dir=self._model_dir, mimi=self._mimi_source, device=self.device)
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
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
