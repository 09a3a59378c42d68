"""The PyTorch backend behind `csm.load`: frames in, codes out; codes <-> audio through Mimi."""

from __future__ import annotations

import torch

from csm.backend import Backend
from csm.checkpoint import Checkpoint
from csm_torch.generator import FrameGenerator, load_model, pick_device, pick_dtype


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, ckpt: Checkpoint, device: str | None = None, dtype: str | None = None, mimi: str | None = None):
        super().__init__(ckpt, mimi)
        self.torch_device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.torch_device)
        self.device = str(self.torch_device)
        self.model = load_model(ckpt, self.torch_device, self.dtype)
        # CUDA replays each frame from a captured graph; elsewhere the same code runs eagerly
        self._frames = FrameGenerator(self.model, cuda_graph=self.torch_device.type == "cuda")

    def _load_codec(self):
        from csm_torch.mimi import load_mimi

        return load_mimi(model_dir=self._model_dir, mimi=self._mimi_source, device=self.device)

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
