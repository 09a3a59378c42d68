"""The Mimi codec's fixed numbers and where its weights are, for every backend (no framework imports).

CSM speaks in Mimi codes: mono audio at 24 kHz, one frame per 1920 samples (12.5 frames/s, 80 ms
each), 32 codebooks of 2048 codes per frame. These constants are the one definition of those
numbers in csm (`csm.audio.MODEL_SAMPLE_RATE` is `SAMPLE_RATE`).

Mimi comes from kyutai's original checkpoint file, or from the ``codec_model.*`` tensors of a
transformers-format CSM checkpoint (renamed by `csm.mimi_names`); both backends resolve it here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from csm.checkpoint import SAFETENSORS_INDEX
from csm.errors import CheckpointError, CsmError

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
SAMPLE_RATE = 24_000  # Hz, mono
FRAME_SIZE = 1920  # samples per frame
FRAME_MS = FRAME_SIZE * 1000 // SAMPLE_RATE  # 80 ms per frame
NUM_CODEBOOKS = 32  # Mimi's residual codebooks, all used by CSM
CODEBOOK_SIZE = 2048  # codes per codebook: valid codes are 0..2047
TRANSFORMER_NUM_HEADS = 8  # attention heads of Mimi's encoder and decoder transformers
CODEC_PREFIX = "codec_model."

KYUTAI_FILE = "kyutai"
TRANSFORMERS = "transformers"

_FIX = (
    f"pass --mimi PATH to {MIMI_FILE}, or download it once with "
    f"`huggingface-cli download {MIMI_REPO} {MIMI_FILE}`"
)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        files = sorted({model_dir / f for name, f in weight_map.items() if name.startswith(CODEC_PREFIX)})
        return files
    return sorted(p for p in model_dir.glob("*.safetensors") if p.name != MIMI_FILE)


def _codec_files(model_dir: Path) -> list[Path]:
    """The safetensors files of model_dir that hold ``codec_model.*`` tensors."""
    from safetensors import safe_open

    found = []
    for path in _safetensors_files(model_dir):
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the safetensors index but missing")
        try:
            with safe_open(str(path), framework="numpy") as f:
                if any(k.startswith(CODEC_PREFIX) for k in f.keys()):
                    found.append(path)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return found


def resolve_mimi_weights(model_dir: Path | str | None, mimi: str | Path | None) -> tuple[str, Any]:
    """Where the Mimi weights come from, as (kind, location):

    1. ``mimi`` given: ("kyutai", Path) — kyutai's safetensors file;
    2. model_dir holds the kyutai file under its original name: ("kyutai", Path);
    3. model_dir's safetensors (sharded or not) hold ``codec_model.*``: ("transformers", model_dir);
    4. the Hub cache / download of kyutai's file: ("kyutai", Path).
    """
    if mimi is not None:
        path = Path(mimi).expanduser()
        if path.is_dir() and (path / MIMI_FILE).is_file():
            path = path / MIMI_FILE
        if not path.is_file():
            raise CsmError(f"Mimi weights {path} do not exist; {_FIX}")
        return KYUTAI_FILE, path
    if model_dir is not None:
        model_dir = Path(model_dir)
        if (model_dir / MIMI_FILE).is_file():
            return KYUTAI_FILE, model_dir / MIMI_FILE
        if model_dir.is_dir() and _codec_files(model_dir):
            return TRANSFORMERS, model_dir
    try:
        from huggingface_hub import hf_hub_download

        return KYUTAI_FILE, Path(hf_hub_download(MIMI_REPO, MIMI_FILE))
    except Exception as exc:  # offline, not cached, network errors...
        where = f" in {model_dir}" if model_dir is not None else ""
        raise CsmError(
            f"no Mimi codec weights found{where} nor in the Hugging Face cache "
            f"({type(exc).__name__}); {_FIX}"
        ) from exc


def read_codec_state(model_dir: Path, framework: str = "pt") -> dict[str, Any]:
    """Only the ``codec_model.*`` tensors of a transformers checkpoint, prefix removed, as
    `framework` arrays ("pt", "numpy", "mlx")."""
    from safetensors import safe_open

    state: dict[str, Any] = {}
    for path in _codec_files(model_dir):
        with safe_open(str(path), framework=framework) as f:
            for key in f.keys():
                if key.startswith(CODEC_PREFIX):
                    state[key[len(CODEC_PREFIX):]] = f.get_tensor(key)
    if not state:
        raise CheckpointError(f"no {CODEC_PREFIX}* tensors in {model_dir}")
    return state


def codec_num_heads(codec_config: dict | None) -> int:
    """The attention heads of the Mimi a transformers `codec_config` describes (kyutai's when unstated):
    unpermuting its q/k rows for moshi needs them."""
    return (codec_config or {}).get("num_attention_heads") or TRANSFORMER_NUM_HEADS


def read_codec_config(model_dir: Path) -> dict | None:
    """The ``codec_config`` (a transformers MimiConfig dict) of model_dir/config.json, if any."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    codec = config.get("codec_config")
    return codec if isinstance(codec, dict) else None


def codec_fingerprint(kind: str, location: Path) -> str:
    """A short id of the Mimi weights at (kind, location) (`resolve_mimi_weights`), to key codes
    cached on disk: another Mimi gets another id, so its codes are never mixed up with these.

    Reading every weight would take seconds, and the file's name, size or header are the same for a
    re-trained Mimi; so each codec tensor's name, dtype, shape and first 4 KiB of data are hashed,
    which any change of weights shows in, and which is the same wherever the file lies."""
    import hashlib
    import struct

    files = [Path(location)] if kind == KYUTAI_FILE else _codec_files(Path(location))
    digest = hashlib.sha256(kind.encode())
    for path in files:
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
                for name in sorted(k for k in header if k != "__metadata__"):
                    if kind != KYUTAI_FILE and not name.startswith(CODEC_PREFIX):
                        continue
                    entry = header[name]
                    begin, end = entry["data_offsets"]
                    f.seek(8 + header_len + begin)
                    digest.update(f"{name}|{entry['dtype']}|{entry['shape']}|".encode())
                    digest.update(f.read(min(end - begin, 4096)))
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise CheckpointError(f"cannot read the Mimi weights {path}: {exc}") from exc
    return f"mimi-{digest.hexdigest()[:16]}"
