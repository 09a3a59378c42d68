"""Finding and reading checkpoint files, one tensor at a time.

A model location is a directory (``config.json`` + ``model.safetensors``, sharded
``model-0000x-of-0000y.safetensors`` with their index, or ``ckpt.pt``) or a single weights file.
Tensors are streamed so a loader never holds two copies of the weights. safetensors files are
read for any framework (``"pt"``, ``"numpy"``, ``"mlx"``); ``ckpt.pt`` needs torch. A directory
quantized for MLX (``convert_weights.py --to mlx --quantize 4``) says so in its config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from csm.config import PRESETS, CsmConfig
from csm.errors import CheckpointError, CsmError, read_json
from csm.weights import detect_format, expected_shapes, to_csm_name

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    root: Path  # the directory holding config, tokenizer, Mimi
    files: tuple[Path, ...]  # weight files, in order
    format: str  # "official" | "transformers" | "csm"
    config: CsmConfig
    # mlx-lm's {"group_size": 64, "bits": 4} for a directory quantized for MLX, else None
    quantization: dict | None = None

    @property
    def is_safetensors(self) -> bool:
        return self.files[0].suffix == ".safetensors"


def _weight_files(path: Path) -> tuple[Path, ...]:
    if path.is_file():
        return (path,)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing shards listed in {SAFETENSORS_INDEX}: {', '.join(missing)}")
        return tuple(path / s for s in shards)
    for name in ("model.safetensors", "ckpt.pt"):
        if (path / name).is_file():
            return (path / name,)
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors, sharded safetensors with {SAFETENSORS_INDEX}, or ckpt.pt"
    )


def _read_ckpt_pt(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (truncated or not a torch checkpoint?)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def _safe_open(path: Path, framework: str):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework=framework)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (truncated or not a safetensors file?)") from None


def tensor_shapes(files: tuple[Path, ...]) -> dict[str, tuple[int, ...]]:
    """Names and shapes without reading the data (safetensors headers; ckpt.pt is memory-mapped)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with _safe_open(f, "numpy") as sf:
                for name in sf.keys():
                    shapes[name] = tuple(sf.get_slice(name).get_shape())
        else:
            shapes |= {k: tuple(v.shape) for k, v in _read_ckpt_pt(f).items()}
    return shapes


def _config_for(root: Path, shapes: dict[str, tuple[int, ...]], fmt: str) -> CsmConfig:
    config_file = root / "config.json"
    if config_file.is_file():
        return CsmConfig.from_file(config_file)
    # A bare ckpt.pt / model.safetensors: accept it if it is exactly a known preset.
    csm_shapes = {}
    for name, shape in shapes.items():
        ours = to_csm_name(name, fmt)
        if ours is not None:
            csm_shapes[ours] = shape
    for preset in PRESETS.values():
        if csm_shapes == expected_shapes(preset):
            return preset
    raise CsmError(f"no config.json next to the weights in {root}, and they are not a csm-1b checkpoint; add its config.json")


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CsmError(f"model not found: {path}")
    files = _weight_files(path)
    for f in files:
        if f.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise CheckpointError(f"{f} is not a weights file (.safetensors or .pt)")
    shapes = tensor_shapes(files)
    fmt = detect_format(shapes)
    root = path if path.is_dir() else path.parent
    config = _config_for(root, shapes, fmt)
    return Checkpoint(root=root, files=files, format=fmt, config=config, quantization=_quantization_for(root))


def _quantization_for(root: Path) -> dict | None:
    config_file = root / "config.json"
    if not config_file.is_file():
        return None
    d = read_json(config_file, "config file")
    return d.get("quantization") if isinstance(d, dict) else None


def iter_tensors(ckpt: Checkpoint, framework: str = "pt") -> Iterator[tuple[str, Any]]:
    """(name, tensor) in the checkpoint's own naming, one tensor in memory at a time."""
    for f in ckpt.files:
        if f.suffix == ".safetensors":
            with _safe_open(f, framework) as sf:
                for name in sf.keys():
                    try:
                        yield name, sf.get_tensor(name)
                    except Exception as exc:
                        raise CheckpointError(f"cannot read tensor {name!r} from {f}: {exc} (truncated file?)") from None
        else:
            yield from _read_ckpt_pt(f).items()
