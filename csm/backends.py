"""Backend selection: `backend="auto"` and friendly errors for backends that are not there."""

from __future__ import annotations

import os

from csm.errors import CsmError

BACKENDS = ("torch",)
BACKEND_ENV = "CSM_BACKEND"


def select_backend(backend: str | None) -> str:
    """'auto' (or None) -> $CSM_BACKEND if set, else torch (the MLX backend is not built yet)."""
    choice = (backend or "auto").lower()
    if choice == "auto":
        choice = os.environ.get(BACKEND_ENV, "").lower() or "torch"
    if choice not in BACKENDS:
        raise CsmError(f"unknown backend {choice!r}; available: {', '.join(BACKENDS)} (or auto)")
    return choice


def create_backend(name: str, ckpt, device, dtype, mimi):
    if name == "torch":
        try:
            from csm_torch.backend import TorchBackend
        except ImportError as exc:
            raise CsmError(f"the torch backend needs PyTorch ({exc}); install it with `pip install torch`") from None
        return TorchBackend(ckpt, device=device, dtype=dtype, mimi=mimi)
    raise CsmError(f"unknown backend {name!r}")
