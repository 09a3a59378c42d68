"""The MLX backend behind `csm.load`: the model, its frame loops, and Mimi through moshi_mlx.
No PyTorch anywhere on this path (only a `ckpt.pt` checkpoint is read with torch, once, at load)."""

from __future__ import annotations

import contextlib
import threading

import mlx.core as mx

from csm.backends import Backend
from csm.checkpoint import Checkpoint
from csm_mlx.frame_loop import MlxFrameLoop
from csm_mlx.loading import load_checkpoint, pick_device, pick_dtype


class DeviceTurns:
    """One thread at a time on an MLX device, on a stream of its own that any thread may use:
    MLX's default streams belong to the thread that made them, and the engine runs the loop in
    its thread while listeners decode Mimi in theirs. Call it for the context to work in."""

    def __init__(self, device: mx.Device):
        self._lock = threading.RLock()
        self._stream = mx.new_thread_unsafe_stream(device)  # safe: the lock keeps work in sequence

    @contextlib.contextmanager
    def __call__(self):
        with self._lock, mx.stream(self._stream):
            yield


class MlxBackend(Backend):
    name = "mlx"
    serialized = True  # the engine's loop and the streams' Mimi decoders take turns on the device
    park_threads = True

    def __init__(self, ckpt: Checkpoint, device: str | None = None, dtype: str | None = None, mimi: str | None = None,
                 quantize: int | None = None, group_size: int = 64, compile: bool = True, adapter=None):
        super().__init__(ckpt.config, ckpt.root, mimi)
        self.mlx_device = pick_device(device)
        # MLX places work on its default device; a process runs one MLX model, so set it once
        mx.set_default_device(self.mlx_device)
        self.device = "gpu" if self.mlx_device == mx.gpu else "cpu"
        self.dtype = pick_dtype(dtype, self.mlx_device)
        self.model = load_checkpoint(ckpt, self.dtype, quantize=quantize, group_size=group_size, adapter=adapter)
        self.compile = compile
        self._turns = DeviceTurns(self.mlx_device)

    def lock(self):
        return self._turns()

    def frame_loop(self, max_batch_size: int) -> MlxFrameLoop:
        return MlxFrameLoop(self.model, max_batch_size, compile=self.compile)

    def _load_codec(self):
        from csm_mlx.mimi import load_mimi

        return load_mimi(model_dir=self.model_dir, mimi=self._mimi_source)

    def synchronize(self) -> None:
        mx.synchronize()
