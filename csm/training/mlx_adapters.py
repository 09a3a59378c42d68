"""LoRA adapters in mlx-lm's layout, and the conversion between it and peft's (`csm.training.adapters`).

An mlx-layout adapter folder holds:

- ``adapters.safetensors``: what mlx-lm's trainer saves and ``mlx_lm.utils.load_adapters`` loads.
  A LoRA on the linear layer at module path M of `csm_mlx.model.Model` (csm's names) is
  ``M.lora_a`` [in, r] and ``M.lora_b`` [r, out]: peft's A and B transposed. It adds
  ``scale * (x @ lora_a) @ lora_b``, i.e. ``scale * B @ A`` to M's weight, as peft does.
- ``adapter_config.json``: mlx-lm's ``{"fine_tune_type": "lora", "num_layers": -1, "lora_parameters":
  {"rank", "scale", "dropout", "keys"}}``. mlx-lm's ``scale`` is the multiplier itself: peft's
  ``lora_alpha / r``. ``keys`` lists the full module paths, which mlx-lm's ``linear_to_lora_layers``
  matches on the whole model, so ``num_layers`` picks nothing on its own.
- ``full_weights.safetensors`` (only if some tensors were trained in full: heads, projection,
  embeddings): csm parameter name -> the tensor replacing the base model's. They are kept out of
  ``adapters.safetensors`` because mlx-lm's ``load_adapters`` refuses anything but LoRA tensors there.
- ``csm_adapter.json``: as in peft's layout, the base model and facts about the run, plus
  ``"layout": "mlx"``.

Reading gives the same `Adapter` as peft's layout (A [r, in], B [out, r], torch tensors), with a
peft ``LoraConfig`` dict worked out from mlx-lm's config, so merging, loading and exporting do not
care which layout a folder is in. Conversions copy tensors bit for bit (a transpose moves no value)
and keep every module's scale exactly: peft's ``lora_alpha`` is ``scale * r``, and where ``alpha / r``
misses mlx-lm's ``scale`` by a rounding, the exact scale is kept as ``lora_scale`` in csm_adapter.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csm.errors import CsmError, read_json

MLX_WEIGHTS_FILE = "adapters.safetensors"
MLX_FULL_FILE = "full_weights.safetensors"
LAYOUTS = ("peft", "mlx")
_PARTS = {"lora_a": "A", "lora_b": "B"}


def is_mlx_layout(folder: Path) -> bool:
    return (folder / MLX_WEIGHTS_FILE).is_file()


# --- reading ---------------------------------------------------------------------------------------

def read_mlx_adapter(folder: Path):
    """The mlx-layout adapter in `folder` as an `Adapter` in csm's names (see the module docstring)."""
    from csm.training.adapters import CONFIG_FILE, CSM_FILE, Adapter, _check_info, _collect

    if not (folder / CONFIG_FILE).is_file():
        raise CsmError(f"no adapter config in {folder}: mlx-lm's layout needs {CONFIG_FILE} beside {MLX_WEIGHTS_FILE}")
    config = read_json(folder / CONFIG_FILE, "adapter config")
    info = read_json(folder / CSM_FILE, "adapter description") if (folder / CSM_FILE).is_file() else {}
    _check_info(info, folder)
    kind, rank, scale, dropout = _check_mlx_config(config, folder)
    tensors = _read(folder / MLX_WEIGHTS_FILE)
    full = _read(folder / MLX_FULL_FILE) if (folder / MLX_FULL_FILE).is_file() else {}
    ours: dict[str, Any] = {}
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        if kind == "lora" and leaf in _PARTS:
            halves.setdefault(module, {})[leaf] = tensor
        elif leaf == "m" or leaf.startswith("lora_"):
            raise CsmError(f"the adapter in {folder} holds {key!r}, which csm cannot merge (DoRA magnitudes and "
                           "LoRA on embeddings are not supported)")
        else:  # mlx-lm saves every trainable parameter: these were trained in full
            full.setdefault(key, tensor)
    for module, pair in sorted(halves.items()):
        if set(pair) != set(_PARTS):
            missing = "lora_b" if "lora_a" in pair else "lora_a"
            raise CsmError(f"the adapter in {folder} has no {missing} for {module!r}: {MLX_WEIGHTS_FILE} is "
                           "incomplete")
        a, b = pair["lora_a"], pair["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise CsmError(f"the adapter in {folder} has mismatched LoRA shapes for {module!r}: lora_a "
                           f"{tuple(a.shape)}, lora_b {tuple(b.shape)} (expected [in, r] and [r, out])")
        if a.shape[1] != rank:
            raise CsmError(f"the adapter in {folder} has rank {a.shape[1]} for {module!r} but {CONFIG_FILE} says "
                           f"lora_parameters.rank={rank}")
        ours[f"{module}.lora_A.weight"] = a.T.contiguous()
        ours[f"{module}.lora_B.weight"] = b.T.contiguous()
    ours.update(full)
    base = info.get("base_model") or config.get("model")
    peft_config = _peft_config(sorted(halves), sorted(full), rank=rank, scale=scale, dropout=dropout, base=base)
    adapter = Adapter(path=folder, lora={}, full={}, scale={}, alpha={}, config=peft_config, names="csm", info=info,
                      base_model=base)
    _collect(adapter, ours)
    for module in adapter.lora:  # mlx-lm's scale is the multiplier itself: exact, whatever alpha rounds to
        adapter.scale[module] = scale
    if not adapter.lora and not adapter.full:
        raise CsmError(f"the adapter in {folder} holds no LoRA or trained tensors for CSM")
    return adapter


def _check_mlx_config(config: Any, folder: Path) -> tuple[str, int, float, float]:
    """(fine_tune_type, rank, scale, dropout) from mlx-lm's adapter_config.json, checked."""
    from csm.training.adapters import CONFIG_FILE

    where = folder / CONFIG_FILE
    if not isinstance(config, dict):
        raise CsmError(f"{where} must hold mlx-lm's adapter config object")
    if "peft_type" in config:
        raise CsmError(f"{folder} holds peft's {CONFIG_FILE} beside mlx-lm's {MLX_WEIGHTS_FILE}; keep one layout "
                       "per folder (csm-finetune export-adapter converts between them)")
    kind = config.get("fine_tune_type", "lora")
    if kind == "dora":
        raise CsmError(f"{folder}: DoRA adapters are not supported; train a plain LoRA (fine_tune_type lora)")
    if kind not in ("lora", "full"):
        raise CsmError(f"{where}: unknown fine_tune_type {kind!r}; csm reads lora (or full) adapters")
    params = config.get("lora_parameters")
    if kind == "full" and params is None:
        return kind, 1, 1.0, 0.0
    if not isinstance(params, dict):
        raise CsmError(f"{where} lacks lora_parameters (rank, scale, dropout); is it an mlx-lm adapter config?")
    rank, scale, dropout = params.get("rank"), params.get("scale"), params.get("dropout", 0.0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise CsmError(f"{where}: lora_parameters.rank must be a positive whole number, got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        hint = " (mlx-lm takes the multiplier scale = alpha / rank, not alpha)" if "alpha" in params else ""
        raise CsmError(f"{where}: lora_parameters.scale must be a number, got {scale!r}{hint}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CsmError(f"{where}: lora_parameters.dropout must be in [0, 1), got {dropout!r}")
    return kind, rank, float(scale), float(dropout)


def _read(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from csm.errors import CheckpointError

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (truncated or not an adapter file?)") from None


# --- scale and alpha -----------------------------------------------------------------------------

def alpha_for(scale: float, rank: int) -> float:
    """peft's lora_alpha for mlx-lm's `scale`: scale * rank. Its alpha / rank misses `scale` by a
    rounding for about 6% of (scale, rank) pairs (0.1 with rank 3), and no neighbouring alpha hits
    it either; then the exact scale travels in csm_adapter.json (`exact_scale_note`)."""
    alpha = float(scale) * rank
    return int(alpha) if alpha.is_integer() else alpha


def exact_scale_note(adapter) -> float | None:
    """The one scale of an adapter that its peft config's alpha / r misses by a rounding (a value
    for csm_adapter.json's "lora_scale"), else None."""
    scales = set(adapter.scale.values())
    config = adapter.config
    if len(scales) != 1 or config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        return None
    scale = scales.pop()
    return None if config["lora_alpha"] / config["r"] == scale else scale


def apply_exact_scale(adapter) -> None:
    """Honour csm_adapter.json's "lora_scale" (written where peft's alpha / r cannot hit mlx-lm's
    scale exactly) when it is that rounding and nothing more; a stale or edited one is ignored."""
    exact = adapter.info.get("lora_scale")
    if isinstance(exact, bool) or not isinstance(exact, (int, float)):
        return
    if any(abs(scale - exact) > 1e-12 * abs(exact) for scale in adapter.scale.values()):
        return
    for module in adapter.scale:
        adapter.scale[module] = float(exact)


def _peft_config(modules: list[str], full: list[str], *, rank: int, scale: float, dropout: float,
                 base: str | None) -> dict:
    """peft's LoraConfig dict for an mlx-lm adapter: the modules listed exactly, alpha = scale * r."""
    from csm.training.adapters import _module_of

    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
        "inference_mode": True, "r": rank, "lora_alpha": alpha_for(scale, rank), "lora_dropout": dropout,
        "target_modules": modules or None, "modules_to_save": sorted(_module_of(n) for n in full) or None,
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


# --- writing ---------------------------------------------------------------------------------------

def write_mlx_adapter(out_dir: str | Path, lora: Mapping[str, tuple[Any, Any]], *, scale: float, rank: int,
                      dropout: float = 0.0, base_model: str | Path, full: Mapping[str, Any] | None = None,
                      info: Mapping[str, Any] | None = None) -> Path:
    """Write an adapter folder in mlx-lm's layout (created if need be; each file replaced
    atomically). `lora`: csm module path -> (A [rank, in], B [out, rank]), as for `write_adapter`
    (written transposed, as mlx-lm's lora_a / lora_b); `scale`: mlx-lm's multiplier (peft's
    alpha / rank); `full`: csm parameter name -> tensor trained in full. Tensors may be torch,
    numpy or mx. `info`: free-form facts for csm_adapter.json."""
    from csm.training.adapters import _base_model_string, check_adapter_tensors

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CsmError(f"scale must be a number (mlx-lm's multiplier, alpha / rank), got {scale!r}")
    full = check_adapter_tensors(lora, full, rank)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_mlx_files(out, lora, full, rank=rank, scale=float(scale), dropout=dropout,
                     base=_base_model_string(base_model), info=dict(info or {}))
    return out


def _write_mlx_files(folder: Path, lora: Mapping[str, tuple[Any, Any]], full: Mapping[str, Any], *, rank: int,
                     scale: float, dropout: float, base: str | None, info: dict) -> None:
    from safetensors.torch import save_file

    from csm.files import write_file_atomic
    from csm.training.adapters import (
        CONFIG_FILE,
        CSM_FILE,
        FORMAT_VERSION,
        WEIGHTS_FILE,
        WEIGHTS_FILE_BIN,
        _to_torch,
    )

    if any((folder / n).is_file() for n in (WEIGHTS_FILE, WEIGHTS_FILE_BIN)):
        raise CsmError(f"{folder} holds a peft-layout adapter; write the mlx layout to another folder")
    tensors = {}
    for module, (a, b) in sorted(lora.items()):
        tensors[f"{module}.lora_a"] = _to_torch(a).T.contiguous()
        tensors[f"{module}.lora_b"] = _to_torch(b).T.contiguous()
    config = {"fine_tune_type": "lora", "num_layers": -1, "model": base,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": sorted(lora)}}
    description = {**info, "csm_adapter": FORMAT_VERSION, "base_model": base, "names": "csm", "layout": "mlx"}
    try:
        texts = {name: json.dumps(data, indent=2, sort_keys=True) + "\n"
                 for name, data in ((CONFIG_FILE, config), (CSM_FILE, description))}
    except (TypeError, ValueError) as exc:
        raise CsmError(f"the adapter's description must be plain JSON values ({exc})") from None
    write_file_atomic(folder / MLX_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "mlx"}))
    if full:
        state = {k: _to_torch(v) for k, v in sorted(full.items())}
        write_file_atomic(folder / MLX_FULL_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "mlx"}))
    else:
        (folder / MLX_FULL_FILE).unlink(missing_ok=True)  # a stale one would be read as part of this adapter
    for name, text in texts.items():
        write_file_atomic(folder / name, lambda tmp, text=text: tmp.write_text(text))


def write_adapter_as_mlx(adapter, folder: Path) -> None:
    """Adapter (read from either layout) -> mlx-lm's layout in `folder`. mlx-lm has one rank and
    one scale per adapter, so an adapter using several (peft's rank_pattern / alpha_pattern) is refused."""
    ranks = sorted({adapter.rank(m) for m in adapter.lora})
    scales = sorted({adapter.scale[m] for m in adapter.lora})
    if len(ranks) > 1 or len(scales) > 1:
        raise CsmError(f"the adapter in {adapter.path} uses several ranks {ranks} or scales {scales} across modules "
                       "(peft's rank_pattern / alpha_pattern); mlx-lm's layout has one rank and one scale, so it "
                       "cannot be converted")
    config = adapter.config
    rank = ranks[0] if ranks else int(config.get("r") or 1)
    scale = scales[0] if scales else float(config.get("lora_alpha") or 1) / rank
    info = {k: v for k, v in adapter.info.items() if k not in ("layout", "lora_scale")}
    _write_mlx_files(folder, adapter.lora, adapter.full, rank=rank, scale=scale,
                     dropout=float(config.get("lora_dropout") or 0.0), base=adapter.base_model, info=info)
