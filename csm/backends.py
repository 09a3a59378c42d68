"""Backends: the protocol each one implements, the registry, and `backend="auto"`.

A backend owns tensor work only (the policy around it is `csm.engine`'s, written once):
- a `FrameLoop` over one running batch of `max_batch_size` slots: `start` prefills one stream's
  prompt into a free slot and returns its first frame, `advance(n)` runs every slot n frames and
  returns their codes with one host sync, `drop` frees a slot;
- Mimi: codes <-> audio (`codec`, loaded on first use: text-only code generation never needs it).

auto = $CSM_BACKEND if set; else MLX on Apple Silicon when MLX is installed (the Apple GPU);
else PyTorch, which picks CUDA when there is one and the CPU otherwise. Importing this module
imports neither torch nor MLX: a backend's package is imported when it is created.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from csm.audio import as_samples
from csm.config import CsmConfig
from csm.errors import CsmError
from csm.sampling import Sampling

BACKEND_ENV = "CSM_BACKEND"
# name -> (module, class, what to install when it is missing)
REGISTRY = {
    "torch": ("csm_torch.backend", "TorchBackend", "pip install torch"),
    "mlx": ("csm_mlx.backend", "MlxBackend", "pip install 'csm-speech[mlx]'"),
}
BACKENDS = tuple(REGISTRY)


class FrameLoop(ABC):
    """One model's running batch: `max_batch_size` slots, each holding one stream's caches, its
    sampling settings and its random generator. Rows of free slots may be computed (batch shapes
    are fixed per bucket) but their codes mean nothing."""

    max_batch_size: int
    block_frames: int  # frames per `advance` between host syncs, when nothing asks for fewer

    @abstractmethod
    def start(self, slot: int, tokens: np.ndarray, mask: np.ndarray, sampling: Sampling, seed: int) -> np.ndarray:
        """Prefill prompt frames [T, 33] into free `slot`, seed its generator with `seed`, and return
        its first frame's codes [32] (int64): the stream then advances with the others."""

    @abstractmethod
    def advance(self, n: int) -> np.ndarray:
        """Run every slot n frames on from its last one: codes [max_batch_size, n, 32] (int64)."""

    @abstractmethod
    def drop(self, slot: int) -> None:
        """Free `slot` (its caches are overwritten by the next stream started there)."""


class Backend(ABC):
    """Subclasses set `name`, `device` and `dtype`, and implement `frame_loop` and `_load_codec`."""

    name: str
    device: str
    # True where the framework must not run device work from two threads at once (MLX, torch
    # while compiling): the engine's loop and the streams' Mimi decoders then take turns in `lock`.
    serialized: bool = False
    # True where a thread that ran device work must not end before the process does: MLX (0.32)
    # can abort at exit ("terminate called without an active exception") once such a thread has
    # ended, so a closed engine's thread stays parked instead.
    park_threads: bool = False

    def __init__(self, config: CsmConfig, model_dir: Path, mimi: str | None):
        self.config = config
        self.model_dir = model_dir
        self._mimi_source = mimi
        self._codec = None
        self._codec_lock = threading.Lock()
        self._lock = threading.RLock()
        self._codec_identity: str | None = None

    @abstractmethod
    def frame_loop(self, max_batch_size: int) -> FrameLoop:
        """A new running batch of `max_batch_size` slots over this backend's model."""

    @abstractmethod
    def _load_codec(self):
        """This backend's Mimi codec (`csm.mimi_codec.MimiCodecBase`)."""

    def load_codec(self):
        """Mimi, loaded on first use (once, whichever thread asks first)."""
        with self._codec_lock:
            if self._codec is None:
                self._codec = self._load_codec()
        return self._codec

    @property
    def codec(self):
        """Mimi, loaded on first use (`load_codec`)."""
        return self.load_codec()

    @property
    def codec_identity(self) -> str:
        """An id of this backend's Mimi weights (`csm.mimi_files.codec_fingerprint`): codes cached
        under one id are this codec's, and another Mimi encodes its own."""
        if self._codec_identity is None:
            from csm.mimi_files import codec_fingerprint, resolve_mimi_weights

            self._codec_identity = codec_fingerprint(*resolve_mimi_weights(self.model_dir, self._mimi_source))
        return self._codec_identity

    @property
    def codec_loaded(self) -> bool:
        return self._codec is not None

    def lock(self):
        """The context to run device work in: the backend's lock where it is `serialized`."""
        return self._lock if self.serialized else contextlib.nullcontext()

    def encode_audio(self, audio) -> np.ndarray:
        """Mono 24 kHz samples (numpy, or a torch tensor a Segment kept) -> Mimi codes."""
        samples = as_samples(audio)
        with self.lock():
            return self.codec.encode(samples)

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        with self.lock():
            return self.codec.decode(codes)


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def mlx_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_lm", "moshi_mlx"))


def select_backend(backend: str | None) -> str:
    choice = (backend or "auto").lower()
    if choice == "auto":
        choice = os.environ.get(BACKEND_ENV, "").lower() or "auto"
    if choice == "auto":
        return "mlx" if is_apple_silicon() and mlx_installed() else "torch"
    if choice not in REGISTRY:
        raise CsmError(f"unknown backend {choice!r}; available: {', '.join(BACKENDS)} (or auto)")
    return choice


def create_backend(name: str, ckpt, device, dtype, mimi, quantize: int | None = None,
                   compile: bool | str | None = None, adapter=None) -> Backend:
    """`compile` None keeps each backend's default: torch eager (graphed on CUDA), MLX mx.compile'd.
    `adapter` (`csm.training.adapters.Adapter`) is merged into the weights as they load."""
    if name == "torch":
        if ckpt.quantization is not None:
            raise CsmError(f"{ckpt.root} holds weights quantized for MLX; load it with backend 'mlx' "
                           "(csm-generate-mlx), or convert the float checkpoint for PyTorch")
        if quantize is not None:
            raise CsmError("on-the-fly quantization is an MLX feature; use backend 'mlx' (csm-generate-mlx --quantize)")
        options = dict(compile=bool(compile) and compile)
    elif name == "mlx":
        if compile not in (None, True, False, "default"):
            raise CsmError(f"compile mode {compile!r} is a torch option; MLX takes compile=True or False")
        options = dict(quantize=quantize, compile=compile is not False)
    else:
        raise CsmError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls, install = REGISTRY[name]
    try:
        backend_class = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise CsmError(f"the {name} backend needs packages that are not installed ({exc}); "
                       f"install them with `{install}`") from None
    return backend_class(ckpt, device=device, dtype=dtype, mimi=mimi, adapter=adapter, **options)
