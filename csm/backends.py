"""Backend selection: `backend="auto"` and friendly errors for backends that are not there.

auto = $CSM_BACKEND if set; else MLX on Apple Silicon when MLX is installed (the Apple GPU);
else PyTorch, which picks CUDA when there is one and the CPU otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import platform

from csm.errors import CsmError

BACKENDS = ("torch", "mlx")
BACKEND_ENV = "CSM_BACKEND"
INSTALL = {"torch": "pip install torch", "mlx": "pip install 'csm[mlx]'"}


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
    if choice not in BACKENDS:
        raise CsmError(f"unknown backend {choice!r}; available: {', '.join(BACKENDS)} (or auto)")
    return choice


def create_backend(name: str, ckpt, device, dtype, mimi, quantize: int | None = None, compile: bool | str | None = None):
    """`compile` None keeps each backend's default: torch eager (graphed on CUDA), MLX mx.compile'd."""
    if name == "torch":
        if ckpt.quantization is not None:
            raise CsmError(f"{ckpt.root} holds weights quantized for MLX; load it with backend 'mlx' "
                           "(csm-generate-mlx), or convert the float checkpoint for PyTorch")
        if quantize is not None:
            raise CsmError("on-the-fly quantization is an MLX feature; use backend 'mlx' (csm-generate-mlx --quantize)")
        try:
            from csm_torch.backend import TorchBackend
        except ImportError as exc:
            raise CsmError(f"the torch backend needs PyTorch ({exc}); install it with `{INSTALL['torch']}`") from None
        return TorchBackend(ckpt, device=device, dtype=dtype, mimi=mimi, compile=bool(compile) and compile)
    if name == "mlx":
        try:
            from csm_mlx.backend import MlxBackend
        except ImportError as exc:
            raise CsmError(f"the mlx backend needs MLX, mlx-lm and moshi_mlx ({exc}); "
                           f"install them with `{INSTALL['mlx']}`") from None
        if compile not in (None, True, False):
            raise CsmError(f"compile mode {compile!r} is a torch option; MLX takes compile=True or False")
        return MlxBackend(ckpt, device=device, dtype=dtype, mimi=mimi, quantize=quantize, compile=compile is not False)
    raise CsmError(f"unknown backend {name!r}")
