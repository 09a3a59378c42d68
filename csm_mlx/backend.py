"""The MLX backend behind `csm.load`: frames in, codes out; codes <-> audio through Mimi.
No PyTorch anywhere on this path (only a `ckpt.pt` checkpoint is read with torch, once, at load)."""

from __future__ import annotations

import mlx.core as mx

from csm.backend import Backend
from csm.checkpoint import Checkpoint
from csm_mlx.generator import FrameGenerator, load_model, pick_device, pick_dtype


class MlxBackend(Backend):
    name = "mlx"

    def __init__(self, ckpt: Checkpoint, device: str | None = None, dtype: str | None = None, mimi: str | None = None,
                 quantize: int | None = None, group_size: int = 64, compile: bool = True):
        super().__init__(ckpt, mimi)
        self.mlx_device = pick_device(device)
        # MLX places work on its default device; a process runs one MLX model, so set it once
        mx.set_default_device(self.mlx_device)
        self.device = "gpu" if self.mlx_device == mx.gpu else "cpu"
        self.dtype = pick_dtype(dtype, self.mlx_device)
        self.model = load_model(ckpt, self.dtype, quantize=quantize, group_size=group_size)
        self._frames = FrameGenerator(self.model, compile=compile)

    def _load_codec(self):
        from csm_mlx.mimi import load_mimi

        return load_mimi(model_dir=self._model_dir, mimi=self._mimi_source)

    def synchronize(self) -> None:
        mx.synchronize()
