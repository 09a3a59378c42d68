"""Building the PyTorch model: devices, dtypes, and `load_model` over canonical tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from csm.checkpoint import Checkpoint, iter_tensors, return_freed_memory
from csm.config import CsmConfig
from csm.errors import CsmError
from csm.weights import check_complete, csm_tensors
from csm_torch.model import Model, rope_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CsmError(f"unknown device {device!r}; use cuda, cpu or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CsmError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CsmError(f"device {device!r} requested but MPS is not available here; use --device cpu")
    if dev.type not in ("cuda", "cpu", "mps"):
        raise CsmError(f"unknown device {device!r}; use cuda, cpu or mps")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # bf16 halves the bytes read per frame on GPUs; CPUs without bf16 units run float32 faster
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CsmError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def load_model(config: CsmConfig, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device,
               dtype: torch.dtype, source: str = "the weights") -> Model:
    """A model for inference from (canonical name, tensor) pairs: a checkpoint's
    (`checkpoint_tensors`), random ones, a test's. Built on the meta device and assigned the
    tensors, so the weights are held once."""
    with torch.device("meta"):
        model = Model(config)
    state = {name: t.to(device=device, dtype=dtype) for name, t in tensors}
    check_complete({k: tuple(v.shape) for k, v in state.items()}, config, source)
    model.load_state_dict(state, strict=True, assign=True)
    init_buffers(model, device)
    if device.type == "cpu":
        return_freed_memory()  # the copies cast or converted on the way (see csm.checkpoint)
    return model.eval().requires_grad_(False)


def fuse_for_inference(model: Model) -> Model:
    """`Model.fuse_projections`, handing each layer's freed weights back to the system on the CPU,
    so the peak stays one layer above the model."""
    return model.fuse_projections(return_freed_memory if model.audio_head.device.type == "cpu" else None)


def checkpoint_tensors(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
    """A checkpoint's tensors under canonical names, cast and placed on the way in (no second copy)."""
    return csm_tensors(iter_tensors(ckpt, dtype, device), ckpt.format, ckpt.config)


def init_buffers(model: Model, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints: compute them where the model lives."""
    config = model.config
    model.backbone.rope = rope_table(config.backbone, config.backbone.max_seq_len).to(device)
    model.decoder.rope = rope_table(config.decoder, config.audio_num_codebooks).to(device)
    model.codebook_offsets = (torch.arange(config.audio_num_codebooks) * config.audio_vocab_size).to(device)
