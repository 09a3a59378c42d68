"""Finding and reading checkpoint files, one tensor at a time.

A model location is a directory (``config.json`` + ``model.safetensors``, sharded
``model-0000x-of-0000y.safetensors`` with their index, or ``ckpt.pt``) or a single weights file.
Tensors are streamed as torch tensors so a loader never holds two copies of the weights (MLX
reads safetensors with its own ``mx.load``; ``ckpt.pt`` goes through torch). A directory
quantized for MLX (``convert_weights.py --to mlx --quantize 4``) says so in its config.json.
"""

from __future__ import annotations

import ctypes
import functools
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csm.config import DEFAULT_DECODER_FLAVOR, FLAVORS, PRESETS, CsmConfig, TransformerConfig, model_config
from csm.errors import CheckpointError, CsmError, read_json
from csm.weights import check_complete, detect_format, expected_shapes, to_csm_name

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


def weight_files(path: Path) -> tuple[Path, ...]:
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
    # a model saved from inside DistributedDataParallel or torch.compile has every name prefixed
    for prefix in ("module.", "_orig_mod."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _embedded_config(path: Path) -> dict | None:
    """The model config a csm training checkpoint carries (`"csm_config"`, JSON), so that one
    loads alone, wherever it is copied; None for any other file."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None  # reading the tensors reports what is wrong with the file
    text = state.get("csm_config") if isinstance(state, dict) else None
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise CheckpointError(f"{path} carries a model config that is not JSON (a damaged file?)") from None


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


def _csm_shapes(shapes: dict[str, tuple[int, ...]], fmt: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, shape in shapes.items():
        ours = to_csm_name(name, fmt)
        if ours is not None:
            out[ours] = shape
    return out


def _config_for(path: Path, settings: dict | None, shapes: dict[str, tuple[int, ...]], fmt: str,
                backbone_flavor, decoder_flavor) -> CsmConfig:
    if backbone_flavor is not None or decoder_flavor is not None:
        return _config_from_flavors(path, _csm_shapes(shapes, fmt), backbone_flavor, decoder_flavor)
    if settings is not None:
        return CsmConfig.from_dict(settings)
    # A bare ckpt.pt / model.safetensors: accept it if it is exactly a known preset.
    csm_shapes = _csm_shapes(shapes, fmt)
    for preset in PRESETS.values():
        if csm_shapes == expected_shapes(preset):
            return preset
    raise CsmError(
        f"no config.json next to {path}, and its shapes match no preset ({', '.join(PRESETS)}): name its stacks, "
        "e.g. csm.load(path, backbone_flavor=\"llama-3B\", decoder_flavor=\"llama-100M\") (a flavor name or a dict "
        "of dims; the decoder defaults to llama-100M), or put the model's config.json beside it")


def _config_from_flavors(path: Path, csm_shapes: dict[str, tuple[int, ...]], backbone_flavor,
                         decoder_flavor) -> CsmConfig:
    """The config of weights whose stacks the caller names; the vocabularies are read off the
    tensors (a training run may have resized them), every shape is checked here, before loading."""
    if backbone_flavor is None:
        raise CsmError("decoder_flavor= was given without backbone_flavor=: name the backbone too "
                       f"(one of {', '.join(FLAVORS)}, or a dict of dims)")
    sizes = {}
    if (t := csm_shapes.get("text_embeddings.weight")) is not None:
        sizes["text_vocab_size"] = t[0]
    if (t := csm_shapes.get("codebook0_head.weight")) is not None:
        sizes["audio_vocab_size"] = t[0]
    if (t := csm_shapes.get("audio_head")) is not None:
        sizes["audio_num_codebooks"] = t[0] + 1
    config = model_config(backbone=backbone_flavor, decoder=decoder_flavor or DEFAULT_DECODER_FLAVOR, **sizes)
    names = " and ".join(f"{what}_flavor={value!r}" for what, value in
                         (("backbone", backbone_flavor), ("decoder", decoder_flavor or DEFAULT_DECODER_FLAVOR))
                         if isinstance(value, str))
    check_complete(csm_shapes, config, f"{path} read with {names or 'the given dims'} (another flavor?)")
    return config


def open_checkpoint(path: str | Path, backbone_flavor: str | TransformerConfig | dict | None = None,
                    decoder_flavor: str | TransformerConfig | dict | None = None) -> Checkpoint:
    """The checkpoint at `path`: a model folder or one weights file. Its config comes from
    `backbone_flavor` / `decoder_flavor` when given (flavor names or dims; they win over a config.json
    beside the weights), else from the config.json beside it, else from the config a csm training
    checkpoint (.pt) carries, else from its shapes when they are exactly a preset's."""
    path = Path(path)
    if not path.exists():
        raise CsmError(f"model not found: {path}")
    files = weight_files(path)
    for f in files:
        if f.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise CheckpointError(f"{f} is not a weights file (.safetensors or .pt)")
    shapes = tensor_shapes(files)
    fmt = detect_format(shapes)
    root = path if path.is_dir() else path.parent
    config_file = root / "config.json"
    settings = read_json(config_file, "config file") if config_file.is_file() else None  # read once
    if settings is None and path.is_file() and path.suffix in (".pt", ".pth"):
        settings = _embedded_config(path)
    config = _config_for(path, settings, shapes, fmt, backbone_flavor, decoder_flavor)
    quantization = settings.get("quantization") if isinstance(settings, dict) else None
    return Checkpoint(root=root, files=files, format=fmt, config=config, quantization=quantization)


def iter_tensors(ckpt: Checkpoint, dtype=None, device=None) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor) in the checkpoint's own naming. Each tensor owns its memory (nothing
    keeps the file mapped, so a model can be fused or freed piecewise while loading) and comes
    cast to `dtype` (floating-point tensors only) and placed on `device` on the way, if given:
    a GPU load copies from the map straight to the GPU."""
    for f in ckpt.files:
        with _PagedReader(f) as reader:
            for name in reader.names():
                yield name, reader.read(name, dtype, device)


# Both file kinds are read through a memory map, and every page read stays resident while the
# map lives: copying a whole file out under one map would hold the weights twice. The reader
# re-opens the map after every READ_CHUNK_BYTES, so loading holds the weights plus one chunk
# (csm-1b on the CPU: 1.27x the file at peak with 32 MB, 1.30x with 64 MB).
READ_CHUNK_BYTES = 32 << 20


class _PagedReader:
    """Copies tensors out of one checkpoint file, one map per READ_CHUNK_BYTES read."""

    def __init__(self, path: Path):
        self.path = path
        self._map: ExitStack | None = None
        self._names: list[str] = []
        self._get: Callable[[str], Any] | None = None
        self._read = 0

    def __enter__(self) -> _PagedReader:
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def names(self) -> list[str]:
        self._open()
        return self._names

    def read(self, name: str, dtype=None, device=None):
        """One tensor, copied (and cast) in blocks of rows: a large one (the text embeddings)
        never has all its pages mapped at once, and no uncast copy is ever whole."""
        import torch

        try:
            view = self._view(name)  # a view reads no pages: its shape, dtype and size are free
            cast = dtype if dtype is not None and view.is_floating_point() else view.dtype
            out = torch.empty(view.shape, dtype=cast, device=device)
            if view.dim() == 0:
                out.copy_(view)
                self._account(view.nbytes)
                return out
            size, n = view.nbytes, view.shape[0]
            rows = n if size <= READ_CHUNK_BYTES else max(1, n * READ_CHUNK_BYTES // size)
            for start in range(0, n, rows):
                out[start:start + rows].copy_(self._view(name)[start:start + rows])
                self._account(size * min(rows, n - start) // n)
            return out
        except CheckpointError:
            raise
        except Exception as exc:  # a file cut short fails when the missing pages are read
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path}: {exc} (truncated file?)") from None

    def _open(self) -> None:
        if self._get is None:
            self._map = ExitStack()
            self._names, self._get = self._map.enter_context(_mapped(self.path))

    def _view(self, name: str):
        self._open()
        return self._get(name)

    def _account(self, nbytes: int) -> None:
        self._read += nbytes
        if self._read >= READ_CHUNK_BYTES:
            self._close()

    def _close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._map, self._get, self._read = None, None, 0


def return_freed_memory() -> None:
    """Hand memory freed on the heap back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Loading and fusing free many weight-sized blocks whose holes glibc keeps; without this a
    CPU load of csm-1b ends ~0.2 GB above the weights and the next fused weight lands on top."""
    if trim := _malloc_trim():
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@contextmanager
def _mapped(path: Path) -> Iterator[tuple[list[str], Callable[[str], Any]]]:
    """(names in file order, name -> torch tensor viewing one memory-mapped file); the map
    closes on exit."""
    if path.suffix == ".safetensors":
        with _safe_open(path, "pt") as sf:
            yield list(sf.keys()), sf.get_tensor
    else:
        state = _read_ckpt_pt(path)
        yield list(state), state.__getitem__
