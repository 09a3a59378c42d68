"""The PyTorch backend behind `csm.load`: the model, its frame loops, and Mimi through moshi."""

from __future__ import annotations

import torch

from csm.backends import Backend
from csm.checkpoint import Checkpoint
from csm_torch.frame_loop import TorchFrameLoop
from csm_torch.loading import checkpoint_tensors, fuse_for_inference, load_model, pick_device, pick_dtype


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, ckpt: Checkpoint, device: str | None = None, dtype: str | None = None, mimi: str | None = None,
                 compile: bool | str = False, adapter=None):
        super().__init__(ckpt.config, ckpt.root, mimi)
        self.torch_device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.torch_device)
        self.device = str(self.torch_device)
        if adapter is None:
            tensors = checkpoint_tensors(ckpt, self.torch_device, self.dtype)
        else:
            from csm.training.adapters import merged_tensors

            # merged from the weights as stored, rounded once into the model's dtype
            tensors = merged_tensors(checkpoint_tensors(ckpt, self.torch_device, None), adapter, ckpt.config,
                                     dtype=self.dtype)
        model = load_model(ckpt.config, tensors, self.torch_device, self.dtype,
                           source=f"{ckpt.format} checkpoint {ckpt.root}")
        self.model = fuse_for_inference(model)
        self.compile = compile
        # torch.compile traces at the first frame of each batch bucket, patching nn.Module calls
        # process-wide while it does: streams' Mimi decoders then take turns with the frame loop
        self.serialized = bool(compile)

    def frame_loop(self, max_batch_size: int) -> TorchFrameLoop:
        # CUDA replays each frame from a captured graph; elsewhere the same code runs eagerly
        return TorchFrameLoop(self.model, max_batch_size, cuda_graph=self.torch_device.type == "cuda",
                              compile=self.compile)

    def _load_codec(self):
        from csm_torch.mimi import load_mimi

        return load_mimi(model_dir=self.model_dir, mimi=self._mimi_source, device=self.device)

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
