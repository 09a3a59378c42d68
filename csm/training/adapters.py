"""LoRA adapters: the folder format, merging into a base model, and converting between namings.

An adapter folder holds three files in peft's layout (mlx-lm's layout, which `read_adapter` reads too
and `convert_adapter` writes, is described in `csm.training.mlx_adapters`):

- ``adapter_model.safetensors``: peft's layout. A LoRA on the linear layer at module path M is
  ``base_model.model.M.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r], and adds
  ``scale * B @ A`` to M's weight. Tensors trained in full next to the LoRA (peft's
  ``modules_to_save``: heads, projection, embeddings) are ``base_model.model.<parameter name>``
  and replace the base model's tensor.
- ``adapter_config.json``: a peft ``LoraConfig`` dict, so peft itself can load the adapter.
- ``csm_adapter.json``: ``{"csm_adapter": 1, "base_model": ..., "names": "csm" | "transformers", ...}``:
  the base model the adapter belongs to, the naming of its keys, and free-form facts about the run.

Keys use csm's module names (``backbone.layers.0.self_attn.q_proj``) or transformers' (an adapter
trained by peft on ``CsmForConditionalGeneration``: ``backbone_model.layers.0.self_attn.q_proj``);
both are read through the one rename table in `csm.weights`. Both namings use rotate-half RoPE, so
a LoRA moves from one to the other without touching a value.

No framework imports at module level: the adapter is read as torch tensors, and a merge works on
the base model's own tensors (torch tensors, mx arrays or numpy arrays).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csm.checkpoint import SAFETENSORS_INDEX
from csm.config import CsmConfig
from csm.errors import CheckpointError, CsmError, read_json
from csm.files import folder_atomic, write_file_atomic
from csm.weights import TIED_COPIES, expected_shapes, from_csm_name, to_csm_name

WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_FILE_BIN = "adapter_model.bin"  # what peft wrote before safetensors
CONFIG_FILE = "adapter_config.json"
CSM_FILE = "csm_adapter.json"
FORMAT_VERSION = 1
NAMES = ("csm", "transformers")
PEFT_PREFIX = "base_model.model."
CODEC_PREFIX = "codec_model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# peft settings whose adapters are not a plain `W + scale * B @ A`, each with its fix
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported; train a plain LoRA (use_dora=False), or merge it with peft's "
                "merge_and_unload and load the merged model",
    "fan_in_fan_out": "the adapter stores transposed (fan_in_fan_out) weights, which CSM's linear layers never need; "
                      "retrain it with fan_in_fan_out=False",
    "lora_bias": "the adapter trains a bias on lora_B (lora_bias=True), and CSM's layers have no biases; "
                 "retrain it with lora_bias=False",
    "use_qalora": "QALoRA adapters are not supported; train a plain LoRA",
    "layer_replication": "the adapter replicates layers (layer_replication), which changes the model's shape; "
                         "merge it with peft and load the merged model",
    "target_parameters": "the adapter puts LoRA on parameters (target_parameters), which csm does not merge; "
                         "target the linear layers instead",
    "trainable_token_indices": "the adapter trains single token embeddings (trainable_token_indices); "
                               "train the embeddings in full (modules_to_save) instead",
}


@dataclass
class Adapter:
    """An adapter as csm names it: every key mapped to csm's names, every scale worked out."""

    path: Path
    lora: dict[str, tuple[Any, Any]]  # csm module path -> (A [r, in], B [out, r]), torch tensors
    full: dict[str, Any]  # csm parameter name -> tensor replacing the base model's
    scale: dict[str, float]  # csm module path -> the factor of B @ A (alpha / r, or alpha / sqrt(r))
    alpha: dict[str, float]  # csm module path -> its lora_alpha (after peft's alpha_pattern)
    base_model: str | None  # as the adapter names it: Hub id, absolute path, or relative to `path`
    config: dict  # adapter_config.json
    names: str  # the naming of the file's keys: "csm" or "transformers"
    info: dict = field(default_factory=dict)  # csm_adapter.json ({} for a plain peft adapter)
    keys: dict[str, str] = field(default_factory=dict)  # csm name -> the key it came from, for messages

    def rank(self, module: str) -> int:
        return int(self.lora[module][0].shape[0])


# --- reading ---------------------------------------------------------------------------------------

def is_adapter_folder(path: str | Path) -> bool:
    """A folder of adapter files and no model weights of its own."""
    path = Path(path)
    has_adapter = (path / CONFIG_FILE).is_file() or (path / CSM_FILE).is_file()
    has_weights = any((path / n).is_file() for n in ("model.safetensors", SAFETENSORS_INDEX, "ckpt.pt"))
    return path.is_dir() and has_adapter and not has_weights


def read_adapter(path: str | Path) -> Adapter:
    """The adapter in folder `path` (or the folder of `path`'s adapter file), in csm's names:
    peft's layout, or mlx-lm's (`csm.training.mlx_adapters`), told apart by their weight files."""
    from csm.training.mlx_adapters import (
        MLX_FULL_FILE,
        MLX_WEIGHTS_FILE,
        apply_exact_scale,
        is_mlx_layout,
        read_mlx_adapter,
    )

    folder = Path(path).expanduser()
    if folder.is_file() and folder.name in (WEIGHTS_FILE, WEIGHTS_FILE_BIN, CONFIG_FILE, CSM_FILE, MLX_WEIGHTS_FILE,
                                            MLX_FULL_FILE):
        folder = folder.parent
    if not folder.is_dir():
        raise CsmError(f"adapter folder not found: {folder}")
    weights = next((folder / n for n in (WEIGHTS_FILE, WEIGHTS_FILE_BIN) if (folder / n).is_file()), None)
    if is_mlx_layout(folder):
        if weights is not None:
            raise CsmError(f"{folder} holds both peft's {weights.name} and mlx-lm's {MLX_WEIGHTS_FILE}; keep one "
                           "layout per folder (csm-finetune export-adapter converts between them)")
        return read_mlx_adapter(folder)
    if weights is None or not (folder / CONFIG_FILE).is_file():
        raise CsmError(f"no adapter in {folder}: expected {CONFIG_FILE} with {WEIGHTS_FILE} (peft's layout, written "
                       f"by csm-finetune or peft's save_pretrained) or with {MLX_WEIGHTS_FILE} (mlx-lm's layout)")
    config = read_json(folder / CONFIG_FILE, "adapter config")
    info = read_json(folder / CSM_FILE, "adapter description") if (folder / CSM_FILE).is_file() else {}
    _check_config(config, folder)
    _check_info(info, folder)
    tensors = {_strip_prefix(k): v for k, v in _read_weights(weights).items()}
    names = info.get("names") or _detect_names(tensors, folder)
    adapter = Adapter(path=folder, lora={}, full={}, scale={}, alpha={}, config=config, names=names, info=info,
                      base_model=info.get("base_model") or config.get("base_model_name_or_path"))
    _collect(adapter, tensors)
    apply_exact_scale(adapter)
    if not adapter.lora and not adapter.full:
        raise CsmError(f"the adapter in {folder} holds no LoRA or trained tensors for CSM")
    return adapter


def _check_config(config: Any, folder: Path) -> None:
    where = folder / CONFIG_FILE
    if not isinstance(config, dict):
        raise CsmError(f"{where} must hold a peft LoraConfig object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CsmError(f"{where} describes a {config.get('peft_type')!r} adapter; csm loads LoRA adapters only")
    for key, problem in _UNSUPPORTED.items():
        if config.get(key):
            raise CsmError(f"{folder}: {problem}")
    if config.get("bias", "none") != "none":
        raise CsmError(f"{folder}: the adapter trains biases (bias={config['bias']!r}), and CSM's layers have none; "
                       "retrain it with bias='none'")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CsmError(f"{where}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in patterns.values()):
            raise CsmError(f"{where}: {key} must map module patterns to positive numbers")


def _check_info(info: Any, folder: Path) -> None:
    where = folder / CSM_FILE
    if not isinstance(info, dict):
        raise CsmError(f"{where} must hold a JSON object")
    if not info:
        return
    version = info.get("csm_adapter")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CsmError(f'{where} lacks "csm_adapter": {FORMAT_VERSION}; is it a csm adapter description?')
    if version > FORMAT_VERSION:
        raise CsmError(f"{where} is adapter format {version}, newer than this csm reads ({FORMAT_VERSION}); "
                       "upgrade csm")
    if info.get("names") is not None and info["names"] not in NAMES:
        raise CsmError(f"{where}: unknown names {info['names']!r}; use one of {', '.join(NAMES)}")


def _read_weights(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (truncated or not an adapter file?)") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return state


def _strip_prefix(key: str) -> str:
    # peft's PeftModel saves under base_model.model.; inject_adapter_in_model's state dicts do not
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _parameter_name(key: str) -> str:
    """The base model's parameter a key (prefix stripped) belongs to: M.weight for a LoRA on M."""
    m = _LORA_KEY.match(key)
    return f"{m['module']}.weight" if m else key


def _detect_names(tensors: Mapping[str, Any], folder: Path) -> str:
    """The naming every key fits (a plain peft adapter does not say): csm's, else transformers'."""
    params = [_parameter_name(k) for k in tensors]
    for names in NAMES:
        try:
            for p in params:
                to_csm_name(p, names)
        except CheckpointError:
            continue
        return names
    unknown = next(p for p in params if not _fits("csm", p) and not _fits("transformers", p))
    raise CsmError(f"the adapter in {folder} holds {unknown!r}, which is neither a csm nor a transformers CSM name: "
                   "it was not trained on CSM")


def _fits(names: str, name: str) -> bool:
    try:
        to_csm_name(name, names)
    except CheckpointError:
        return False
    return True


def _csm_name(name: str, names: str, folder: Path) -> str | None:
    try:
        return to_csm_name(name, names)
    except CheckpointError:
        raise CsmError(f"the adapter in {folder} holds {name!r}, which is not a CSM parameter in {names} names "
                       "(was it trained on another model?)") from None


def _collect(adapter: Adapter, tensors: Mapping[str, Any]) -> None:
    """Fill adapter.lora / full / scale / alpha from the file's tensors (prefix stripped)."""
    folder = adapter.path
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if m := _LORA_KEY.match(key):
            parts.setdefault(m["module"], {})[m["part"]] = tensor
        elif ".lora_" in key or "lora_magnitude_vector" in key:
            raise CsmError(f"the adapter in {folder} holds {key!r}: LoRA on embeddings and DoRA magnitudes are not "
                           "supported; train embeddings in full (modules_to_save)")
        else:
            _add_full(adapter, key, tensor)
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CsmError(f"the adapter in {folder} has no {missing} for {module!r}: the file is incomplete")
        _add_lora(adapter, module, ab["A"], ab["B"])


def _add_full(adapter: Adapter, key: str, tensor: Any) -> None:
    ours = _csm_name(key, adapter.names, adapter.path)
    if ours is None:
        if key.startswith(CODEC_PREFIX):
            raise CsmError(f"the adapter in {adapter.path} replaces Mimi's {key!r}; csm takes Mimi from the base "
                           "model, so it cannot apply this adapter as trained")
        return  # buffers and caches the table says no model parameter comes from
    if ours in adapter.full:  # transformers' two tied audio-embedding tables: one table in CSM
        first = adapter.full[ours]
        if tuple(first.shape) != tuple(tensor.shape) or not bool((first == tensor).all()):
            raise CsmError(f"the adapter in {adapter.path} holds two different {ours!r} tables, "
                           f"{adapter.keys[ours]!r} and {key!r}, where CSM has one")
        return
    adapter.full[ours] = tensor
    adapter.keys[ours] = key


def _add_lora(adapter: Adapter, module: str, a: Any, b: Any) -> None:
    folder, config = adapter.path, adapter.config
    weight = _csm_name(f"{module}.weight", adapter.names, folder)
    if weight is None:
        # Mimi's layers (codec_model.*) match unsloth's suffix targets (q_proj, ...) in a transformers
        # CSM, but no gradient reaches them: the codes are discrete and the codec runs outside the
        # loss. Their lora_B stays at its zero init, so skipping them changes nothing; a non-zero one
        # would mean a different Mimi, which csm cannot give.
        if module.startswith(CODEC_PREFIX) and bool((b != 0).any()):
            raise CsmError(f"the adapter in {folder} changes Mimi's {module!r} (non-zero lora_B); csm takes Mimi "
                           "from the base model, so it cannot apply this adapter as trained")
        return
    if not weight.endswith(".weight"):
        raise CsmError(f"the adapter in {folder} has a LoRA on {module!r}, which is not a linear layer")
    ours = weight[: -len(".weight")]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise CsmError(f"the adapter in {folder} has mismatched LoRA shapes for {module!r}: lora_A "
                       f"{tuple(a.shape)}, lora_B {tuple(b.shape)} (expected [r, in] and [out, r])")
    rank = int(a.shape[0])
    stated = _pattern_value(config.get("rank_pattern"), module, config["r"])
    if rank != stated:
        raise CsmError(f"the adapter in {folder} has rank {rank} for {module!r} but {CONFIG_FILE} says r={stated}")
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    if weight in adapter.full:
        raise CsmError(f"the adapter in {folder} trains {module!r} both in full and with LoRA")
    adapter.lora[ours] = (a, b)
    adapter.alpha[ours] = alpha
    adapter.scale[ours] = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    adapter.keys[ours] = module


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first pattern matching the end of the
    module path (as peft matches it, on the names the adapter was trained on)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# --- the base model ----------------------------------------------------------------------------

def base_model_location(adapter: Adapter) -> str | Path:
    """Where the adapter's base model is: a local path (a relative one is relative to the adapter
    folder) or a Hub id."""
    base = adapter.base_model
    if not base:
        raise CsmError(f"the adapter in {adapter.path} does not name its base model; pass it as the model "
                       "(--model / --model-path)")
    path = Path(base).expanduser()
    if path.is_absolute() and path.exists():
        return path
    if not path.is_absolute() and (adapter.path / path).exists():
        return (adapter.path / path).resolve()
    from csm.hub import _looks_like_repo_id

    if not path.is_absolute() and _looks_like_repo_id(base):
        return base
    raise CsmError(f"the adapter's base model {base!r} was not found (a relative path is taken from the adapter "
                   f"folder {adapter.path}); pass the base model as the model (--model / --model-path)")


def resolve_adapter(adapter: str | Path) -> Path:
    """A local adapter folder as it is; a Hub repo id downloaded (cached)."""
    path = Path(adapter).expanduser()
    if path.exists():
        return path
    from csm.hub import _looks_like_repo_id, resolve_model

    if _looks_like_repo_id(str(adapter)):
        return resolve_model(str(adapter))
    raise CsmError(f"adapter folder not found: {adapter}")


def model_and_adapter(model: str | Path | None, adapter: str | Path | None) -> tuple[Path, Adapter | None]:
    """What `csm.load(model, adapter=...)` loads: (the base model's location, the adapter or None).
    `model` may itself be an adapter folder: its base model is then the one it names."""
    from csm.hub import DEFAULT_MODEL, resolve_model

    if adapter is not None:
        found = read_adapter(resolve_adapter(adapter))
        if model is None:
            return resolve_model(base_model_location(found)), found
        path = resolve_model(model)
        if is_adapter_folder(path):
            raise CsmError(f"{model} is an adapter folder too; pass the base model as the model and one adapter")
        return path, found
    path = resolve_model(DEFAULT_MODEL if model is None else model)
    if is_adapter_folder(path):
        found = read_adapter(path)
        return resolve_model(base_model_location(found)), found
    return path, None


def check_adapter(adapter: Adapter, config: CsmConfig) -> None:
    """Raise if the adapter does not fit a base model of `config`: every LoRA on a linear layer the
    model has, with its in/out widths; every full tensor a parameter of the model's shape."""
    expected = expected_shapes(config)
    where = f"the adapter in {adapter.path}"
    for module, (a, b) in adapter.lora.items():
        shape, key = expected.get(f"{module}.weight"), adapter.keys.get(module, module)
        if shape is None or len(shape) != 2:
            raise CsmError(f"{where} has a LoRA on {key!r}, which the base model does not have: "
                           "it was trained on another model")
        if (int(b.shape[0]), int(a.shape[1])) != shape:
            raise CsmError(f"{where} does not fit the base model: {key!r} is [out, in] = {shape} there, but lora_B "
                           f"is {tuple(b.shape)} and lora_A {tuple(a.shape)}; load it on the model it was trained on")
    for name, tensor in adapter.full.items():
        shape, key = expected.get(name), adapter.keys.get(name, name)
        if shape is None:
            raise CsmError(f"{where} holds {key!r}, which the base model does not have: it was trained on another "
                           "model")
        if tuple(tensor.shape) != shape:
            raise CsmError(f"{where} does not fit the base model: {key!r} is {tuple(tensor.shape)}, the base model's "
                           f"{shape}; load it on the model it was trained on")


# --- merging -------------------------------------------------------------------------------------

def merged_tensors(tensors: Iterable[tuple[str, Any]], adapter: Adapter, config: CsmConfig,
                   *, dtype: Any = None) -> Iterator[tuple[str, Any]]:
    """The base model's (csm name, tensor) stream with the adapter merged: W + scale * B @ A for
    every LoRA (computed in float32), full tensors in place of the base's. A changed tensor comes
    in `dtype` (the framework's dtype object) if given, else in W's dtype: pass the dtype the
    model will run in, with W as read, and the merge is rounded once. Works on torch tensors, mx
    arrays and numpy arrays alike. Raises if the stream never reached one of the adapter's
    tensors (a LoRA on a layer the model lacks must not vanish)."""
    check_adapter(adapter, config)
    used = set()
    for name, w in tensors:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if name in adapter.full:
            w = _cast(_float32_like(adapter.full[name], w), w.dtype if dtype is None else dtype)
            used.add(name)
        elif module in adapter.lora:
            a, b = adapter.lora[module]
            delta = _float32_like(b, w) @ _float32_like(a, w)
            w = _cast(_float32(w) + adapter.scale[module] * delta, w.dtype if dtype is None else dtype)
            used.add(module)
        yield name, w
    unused = sorted((adapter.lora.keys() | adapter.full.keys()) - used)
    if unused:
        shown = ", ".join(repr(adapter.keys.get(n, n)) for n in unused[:4]) + (" ..." if len(unused) > 4 else "")
        raise CsmError(f"the base model's weights never reached the adapter's {shown}; "
                       "load it on the model it was trained on")


def _framework(t: Any) -> str:
    module = type(t).__module__
    return "torch" if module.startswith("torch") else "mlx" if module.startswith("mlx") else "numpy"


def _float32(t: Any) -> Any:
    kind = _framework(t)
    if kind == "torch":
        return t.float()
    if kind == "mlx":
        import mlx.core as mx

        return t.astype(mx.float32)
    import numpy as np

    return np.asarray(t, dtype=np.float32)


def _float32_like(t: Any, like: Any) -> Any:
    """Adapter tensor `t` (torch or numpy) as float32 of `like`'s framework (and device)."""
    kind = _framework(like)
    if kind == "torch":
        import torch

        return torch.as_tensor(t).to(device=like.device, dtype=torch.float32)
    values = t.detach().cpu().float().numpy() if _framework(t) == "torch" else _float32(t)
    if kind == "mlx":
        import mlx.core as mx

        return mx.array(values)
    return values


def _cast(t: Any, dtype: Any) -> Any:
    return t.to(dtype) if _framework(t) == "torch" else t.astype(dtype)


# --- writing ---------------------------------------------------------------------------------------

def check_adapter_tensors(lora: Mapping[str, tuple[Any, Any]], full: Mapping[str, Any] | None,
                          rank: int) -> dict[str, Any]:
    """What an adapter of either layout may hold, checked: csm names, A [rank, in] and B [out,
    rank] for each LoRA module, no module both adapted and trained in full, not nothing.
    Returns `full` as a dict."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise CsmError(f"rank must be a positive whole number, got {rank!r}")
    full = dict(full or {})
    for module, (a, b) in lora.items():
        _check_csm_name(f"{module}.weight", "LoRA module")
        if module + ".weight" in full:
            raise CsmError(f"{module!r} is both trained in full and given a LoRA; give it one or the other")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise CsmError(f"LoRA for {module!r} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                           f"expected A [{rank}, in] and B [out, {rank}]")
    for name in full:
        _check_csm_name(name, "fully trained tensor")
    if not lora and not full:
        raise CsmError("the adapter would be empty: give LoRA weights or tensors trained in full")
    return full


def write_adapter(out_dir: str | Path, lora: Mapping[str, tuple[Any, Any]], *, alpha: float, rank: int,
                  dropout: float = 0.0, target_modules: str | list[str], base_model: str | Path,
                  full: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None,
                  names: str = "csm") -> Path:
    """Write an adapter folder (created if need be; its three adapter files replaced, each
    atomically). `lora`: csm module path -> (A [rank, in], B [out, rank]); `full`: csm parameter
    name -> tensor trained in full; tensors may be torch, numpy or mx. `target_modules` is the
    pattern the LoRA was put on (csm names); `names="transformers"` writes transformers' keys, and
    then a config listing the renamed modules exactly. `info`: free-form facts for csm_adapter.json."""
    if names not in NAMES:
        raise CsmError(f"unknown names {names!r}; use one of {', '.join(NAMES)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise CsmError(f"alpha must be a positive number, got {alpha!r}")
    full = check_adapter_tensors(lora, full, rank)
    tensors: dict[str, Any] = {}
    for module, (a, b) in lora.items():
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
    tensors.update(full)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": _base_model_string(base_model),
        "revision": None, "inference_mode": True, "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "modules_to_save": sorted(_module_of(n) for n in full) or None,
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    description = {**(info or {}), "csm_adapter": FORMAT_VERSION, "base_model": config["base_model_name_or_path"],
                   "names": "csm"}
    if names != "csm":
        tensors, config, description = _renamed(_read_back(tensors, config, description), names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_files(out, {PEFT_PREFIX + k: v for k, v in tensors.items()}, config, description)
    return out


def _check_csm_name(name: str, what: str) -> None:
    try:
        from_csm_name(name, "csm")
    except CheckpointError:
        raise CsmError(f"{name!r} is not a CSM parameter; a {what} needs csm's names "
                       "(e.g. backbone.layers.0.self_attn.q_proj)") from None


def _module_of(parameter: str) -> str:
    """peft's modules_to_save entry for a parameter: its module (audio_head is a bare parameter)."""
    return parameter[: -len(".weight")] if parameter.endswith(".weight") else parameter


def _base_model_string(base_model: str | Path) -> str:
    """A local base model as an absolute path (the adapter may move); a Hub id as it is."""
    if not base_model:
        raise CsmError("name the base model the adapter was trained on (a Hub id or a path)")
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else str(base_model)


def _read_back(tensors: dict[str, Any], config: dict, info: dict) -> Adapter:
    """An Adapter over tensors about to be written in csm names (for writing them renamed)."""
    adapter = Adapter(path=Path("<new adapter>"), lora={}, full={}, scale={}, alpha={}, base_model=info["base_model"],
                      config=config, names="csm", info=info)
    _collect(adapter, {k: _to_torch(v) for k, v in tensors.items()})
    return adapter


def _renamed(adapter: Adapter, names: str) -> tuple[dict[str, Any], dict, dict]:
    """The adapter's tensors, config and description in `names` (keys without peft's prefix)."""
    def module_name(module: str) -> str:
        return from_csm_name(f"{module}.weight", names)[: -len(".weight")]

    tensors: dict[str, Any] = {}
    for module, (a, b) in sorted(adapter.lora.items()):
        theirs = module_name(module)
        tensors[f"{theirs}.lora_A.weight"], tensors[f"{theirs}.lora_B.weight"] = a, b
    full_modules = []
    for name, tensor in sorted(adapter.full.items()):
        tensors[from_csm_name(name, names)] = tensor
        full_modules.append(_module_of(from_csm_name(name, names)))
        for copy in TIED_COPIES[names].get(name, ()):
            tensors[copy] = tensor.clone()  # its own storage: safetensors refuses shared tensors
            full_modules.append(_module_of(copy))
    config = dict(adapter.config)
    if names != adapter.names:
        # A pattern written for one naming cannot be translated in general: list the modules exactly.
        default_r, default_alpha = config["r"], config["lora_alpha"]
        config["target_modules"] = sorted(module_name(m) for m in adapter.lora) or None
        config["modules_to_save"] = sorted(full_modules) or None
        config["rank_pattern"] = {re.escape(module_name(m)): adapter.rank(m) for m in sorted(adapter.lora)
                                  if adapter.rank(m) != default_r}
        config["alpha_pattern"] = {re.escape(module_name(m)): adapter.alpha[m] for m in sorted(adapter.lora)
                                   if adapter.alpha[m] != default_alpha}
    info = {**adapter.info, "csm_adapter": FORMAT_VERSION, "names": names}
    return tensors, config, info


def _to_torch(t: Any) -> Any:
    """A tensor of any of the three frameworks as a contiguous CPU torch tensor, bits unchanged."""
    import numpy as np
    import torch

    kind = _framework(t)
    if kind == "torch":
        return t.detach().cpu().contiguous()
    if kind == "mlx":
        import mlx.core as mx

        if t.dtype == mx.bfloat16:  # numpy has no bfloat16: carry the bits
            return torch.from_numpy(np.array(t.view(mx.uint16))).view(torch.bfloat16)
        return torch.from_numpy(np.array(t))
    return torch.from_numpy(np.ascontiguousarray(t))


def _write_files(folder: Path, tensors: Mapping[str, Any], config: dict, info: dict) -> None:
    """The three files into `folder`, each written to a temporary file and renamed into place."""
    try:
        texts = {name: json.dumps(data, indent=2, sort_keys=True) + "\n"
                 for name, data in ((CONFIG_FILE, config), (CSM_FILE, info))}
    except (TypeError, ValueError) as exc:
        raise CsmError(f"the adapter's description must be plain JSON values ({exc})") from None
    write_file_atomic(folder / WEIGHTS_FILE, lambda tmp: _save_safetensors(tensors, tmp))
    for name, text in texts.items():
        write_file_atomic(folder / name, lambda tmp, text=text: tmp.write_text(text))


def _save_safetensors(tensors: Mapping[str, Any], path: Path) -> None:
    """torch tensors (or mx bfloat16 ones, which numpy cannot hold) through safetensors' torch
    writer; numpy and other mx arrays through its numpy writer, so that a run without torch
    (MLX training) never imports it. The file is the same either way."""
    import numpy as np

    if any(_framework(v) == "torch" or (_framework(v) == "mlx" and "bfloat16" in str(v.dtype))
           for v in tensors.values()):
        from safetensors.torch import save_file

        save_file({k: _to_torch(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})


# --- converting and merging folders ------------------------------------------------------------

def export_adapter(src: str | Path, dst: str | Path, names: str = "transformers", force: bool = False) -> Path:
    """Write the adapter in `src` into the new folder `dst` with `names`' keys ("transformers": for
    peft on transformers' CsmForConditionalGeneration; "csm": for csm). Tensors are copied bit for
    bit; the config lists the renamed modules exactly. `dst` appears whole or not at all."""
    if names not in NAMES:
        raise CsmError(f"unknown names {names!r}; use one of {', '.join(NAMES)}")
    return convert_adapter(src, dst, to="peft" if names == "csm" else names, force=force)


CONVERSIONS = ("peft", "mlx", "transformers")


def convert_adapter(src: str | Path, dst: str | Path, to: str, force: bool = False) -> Path:
    """Write the adapter in `src` (either layout) into the new folder `dst`: "peft" (peft's layout,
    csm's names), "mlx" (mlx-lm's layout, `csm.training.mlx_adapters`) or "transformers" (peft's
    layout, transformers' names). Tensors are copied bit for bit (transposed between the layouts)
    and every module's scale kept exactly. `dst` appears whole or not at all."""
    if to not in CONVERSIONS:
        raise CsmError(f"unknown adapter layout {to!r}; use one of {', '.join(CONVERSIONS)}")
    adapter = read_adapter(src)
    dst = Path(dst)
    if dst.exists() and dst.resolve() == adapter.path.resolve():
        raise CsmError(f"{dst} is the adapter being exported; choose another output folder")
    if dst.exists() and not force:
        raise CsmError(f"{dst} already exists; pass --force to replace it")
    base = adapter.base_model
    if base and not Path(base).is_absolute() and (adapter.path / base).exists():
        # a path relative to the old folder would not be found from the new one
        adapter.base_model = str((adapter.path / base).resolve())
    adapter.info = {**adapter.info, "base_model": adapter.base_model}
    adapter.config = {**adapter.config, "base_model_name_or_path": adapter.base_model}
    with folder_atomic(dst) as tmp:
        if to == "mlx":
            from csm.training.mlx_adapters import write_adapter_as_mlx

            write_adapter_as_mlx(adapter, tmp)
        else:
            from csm.training.mlx_adapters import exact_scale_note

            adapter.info.pop("layout", None)  # peft's layout is the one a csm_adapter.json need not name
            adapter.info.pop("lora_scale", None)
            if (exact := exact_scale_note(adapter)) is not None:
                adapter.info["lora_scale"] = exact
            tensors, config, info = _renamed(adapter, "csm" if to == "peft" else to)
            _write_files(tmp, {PEFT_PREFIX + k: v for k, v in tensors.items()}, config, info)
    return dst


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, *, model_path: str | Path | None = None,
                  dtype: str | None = None, quantize: int | None = None, group_size: int = 64,
                  force: bool = False) -> Path:
    """A standalone model folder: the base model with the adapter merged, in csm's layout (config.json,
    model.safetensors, tokenizer, Mimi), or quantized for MLX with `quantize` 4 or 8 (in groups of
    `group_size`; the adapter is merged into the float weights first). `model_path`:
    the base model, when not the one the adapter names; `dtype`: cast the weights (default: keep
    the base model's)."""
    from csm.backends import mlx_installed
    from csm.convert import convert

    if quantize is not None and quantize not in (4, 8):
        raise CsmError(f"cannot quantize to {quantize} bits; use 4 or 8")
    if quantize is not None and not mlx_installed():
        raise CsmError("--quantize writes MLX weights and needs MLX; install it with `pip install 'csm-speech[mlx]'`")
    adapter = read_adapter(adapter_dir)
    base = model_path if model_path is not None else base_model_location(adapter)
    return convert(base, output_dir, "mlx" if quantize else "csm", dtype=dtype, force=force, quantize=quantize,
                   group_size=group_size, adapter=adapter)
