"""`--to mlx` of `csm.convert`: a checkpoint written as csm_mlx holds it (optionally quantized).

The folder is mlx-lm-style: csm's names, saved by MLX, and config.json with mlx-lm's
`quantization` entry when quantized (loading it then needs no flags). `csm.convert` imports this
module only for `--to mlx`, so the core converter never needs MLX.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from csm.checkpoint import Checkpoint
from csm.errors import CsmError
from csm_mlx.loading import DTYPES, load_checkpoint
from csm_mlx.quantize import quantization_config


def write_mlx(ckpt: Checkpoint, folder: Path, dtype: str | None = None, quantize: int | None = None,
              group_size: int = 64, adapter=None) -> None:
    """Write model.safetensors and config.json of `ckpt` into `folder` (float32 unless `dtype`),
    with `adapter` (`csm.training.adapters.Adapter`) merged before quantizing, if given."""
    if ckpt.quantization is not None:
        raise CsmError(f"{ckpt.root} is already quantized; convert the float checkpoint instead")
    model = load_checkpoint(ckpt, DTYPES[dtype or "float32"], quantize=quantize, group_size=group_size,
                            adapter=adapter)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    config = ckpt.config.to_dict()
    if quantize is not None:
        config["quantization"] = quantization_config(quantize, group_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
