"""The PyTorch backend behind `csm.load`: frames in, codes out; codes <-> audio through Mimi."""

from __future__ import annotations

import torch

from csm.backend import Backend
from csm.checkpoint import Checkpoint
from csm.sampling import SamplingParams
from csm_torch.generator import FrameGenerator, load_model, pick_device, pick_dtype


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, ckpt: Checkpoint, device: str | None = None, dtype: str | None = None, mimi: str | None = None,
                 compile: bool | str = False):
        super().__init__(ckpt, mimi)
        self.torch_device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.torch_device)
        self.device = str(self.torch_device)
        self.model = load_model(ckpt, self.torch_device, self.dtype).fuse_projections()
        # CUDA replays each frame from a captured graph; elsewhere the same code runs eagerly
        self._cuda_graph = self.torch_device.type == "cuda"
        self._compile = compile
        self._frames = FrameGenerator(self.model, cuda_graph=self._cuda_graph, compile=compile)
        self._batch_frames: FrameGenerator | None = None  # caches sized for the last batch run

    def generate_codes_batch(self, prompts, max_frames: int, params: SamplingParams, seed: int | None = None):
        """All prompts in one batch on the device: one frame loop, each stream stopping on its own."""
        if len(prompts) == 1:
            return super().generate_codes_batch(prompts, max_frames, params, seed)
        if self._batch_frames is None or self._batch_frames.batch_size != len(prompts):
            self._batch_frames = None  # free the previous batch's caches before allocating new ones
            self._batch_frames = FrameGenerator(self.model, batch_size=len(prompts), cuda_graph=self._cuda_graph,
                                                compile=self._compile)
        return self._batch_frames.generate_batch(prompts, max_frames, params, seed)

    def _load_codec(self):
        from csm_torch.mimi import load_mimi

        return load_mimi(model_dir=self._model_dir, mimi=self._mimi_source, device=self.device)

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
