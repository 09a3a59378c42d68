"""Building the MLX model: devices, dtypes, and `load_model` over canonical tensors (any checkpoint
the torch backend loads, or a folder converted for MLX, quantized ones included)."""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

from csm.checkpoint import Checkpoint, iter_tensors
from csm.config import CsmConfig
from csm.errors import CheckpointError, CsmError
from csm.weights import check_complete, csm_tensors
from csm_mlx.model import Model
from csm_mlx.quantize import quantize_model, quantize_skeleton

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
GPU_NAMES = ("gpu", "mps", "cuda", "metal")


def pick_device(device: str | None) -> mx.Device:
    if device is None:
        return mx.default_device()
    name = device.split(":")[0].lower()
    if name == "cpu":
        return mx.cpu
    if name in GPU_NAMES:
        if not mx.is_available(mx.gpu):
            raise CsmError(f"device {device!r} requested but this MLX build has no GPU here; use --device cpu")
        return mx.gpu
    raise CsmError(f"unknown device {device!r} for MLX; use gpu or cpu")


def pick_dtype(dtype: str | None, device: mx.Device) -> mx.Dtype:
    if dtype is None:
        # bf16 halves the bytes read per frame on GPUs; MLX's CPU kernels run float32 fastest
        return mx.bfloat16 if device == mx.gpu else mx.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CsmError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def load_model(config: CsmConfig, tensors: Iterable[tuple[str, mx.array]], dtype: mx.Dtype = mx.float32,
               quantize: int | None = None, group_size: int = 64, source: str = "the weights") -> Model:
    """A model from (canonical name, array) pairs, floating-point ones cast to `dtype`;
    `quantize` (4 or 8) quantizes it afterwards."""
    model = Model(config)
    weights = [(name, t.astype(dtype) if mx.issubdtype(t.dtype, mx.floating) else t) for name, t in tensors]
    check_complete({k: tuple(v.shape) for k, v in weights}, config, source)
    model.load_weights(weights, strict=True)
    if quantize is not None:
        quantize_model(model, quantize, group_size)
    materialize(model)
    return model.eval()


def materialize(module) -> None:
    """Evaluate every array a module tree holds, its private ones too (mlx-lm's RoPE frequencies,
    the codebook offsets): a lazy array belongs to the stream of the thread that made it, and
    the engine computes in threads of its own."""
    arrays = [v for m in module.modules() for v in m.values() if isinstance(v, mx.array)]
    mx.eval(module.parameters(), arrays)


def load_checkpoint(ckpt: Checkpoint, dtype: mx.Dtype = mx.float32, quantize: int | None = None,
                    group_size: int = 64, adapter=None) -> Model:
    """A checkpoint's model; a quantized folder's config.json says how it was quantized. `adapter`
    (`csm.training.adapters.Adapter`) is merged into the float weights, before any quantization."""
    if ckpt.quantization is None:
        tensors = csm_tensors(checkpoint_arrays(ckpt), ckpt.format, ckpt.config)
        if adapter is not None:
            from csm.training.adapters import merged_tensors

            # merged from the weights as stored, rounded once into the model's dtype
            tensors = merged_tensors(tensors, adapter, ckpt.config, dtype=dtype)
        return load_model(ckpt.config, tensors, dtype, quantize, group_size,
                          source=f"{ckpt.format} checkpoint {ckpt.root}")
    if adapter is not None:
        raise CsmError(f"{ckpt.root} is quantized, and an adapter merges into float weights; load the float "
                       "base model (with --quantize to quantize after merging)")
    if quantize is not None:
        raise CsmError(f"{ckpt.root} is already quantized ({ckpt.quantization}); load it without --quantize")
    model = Model(ckpt.config)
    quantize_skeleton(model, ckpt.quantization)
    try:
        model.load_weights([(name, t) for f in ckpt.files for name, t in _mx_load(f).items()], strict=True)
    except ValueError as exc:
        raise CsmError(f"the quantized weights of {ckpt.root} do not fit its config: {exc}") from None
    materialize(model)
    return model.eval()


def checkpoint_arrays(ckpt: Checkpoint):
    """(name, mx.array) in the checkpoint's own naming. safetensors through `mx.load`, which
    reads bfloat16 (safetensors' own MLX reader goes through numpy, which has no bfloat16);
    ckpt.pt goes through torch once, at load."""
    if ckpt.is_safetensors:
        for f in ckpt.files:
            yield from _mx_load(f).items()
        return
    import torch

    for name, tensor in iter_tensors(ckpt):
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: carry the bits, not a float32 copy
            yield name, mx.array(tensor.view(torch.uint16).numpy()).view(mx.bfloat16)
        else:
            yield name, mx.array(tensor.numpy())


def _mx_load(path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (truncated or not a safetensors file?)") from None
