"""What a run leaves in its output folder, loadable everywhere: a LoRA run's adapter
(`write_run_adapter`), or a fully fine-tuned model as a model folder in this project's format:
`model.safetensors` (csm names) and `config.json`, with the base model's tokenizer and Mimi."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from csm.checkpoint import open_checkpoint
from csm.convert import TOKENIZER_FILES, _find_mimi, _write_codec
from csm.hub import resolve_model
from csm.mimi_files import MIMI_FILE


def write_run_adapter(out_dir: Path, config, lora: dict[str, tuple[Any, Any]], full: dict[str, Any],
                      target_modules: str, base_model: str) -> Path:
    """A LoRA run's result, the same from every backend: `lora` csm module -> (A [r, in], B [out, r]),
    `full` the tensors trained in full beside it, with the run's LoRA settings and speaker."""
    from csm.training.adapters import write_adapter

    return write_adapter(out_dir, lora, alpha=config.lora_alpha, rank=config.lora_rank, dropout=config.lora_dropout,
                         target_modules=target_modules, base_model=base_model, full=full or None,
                         info={"speaker_id": config.speaker_id, "method": "lora", "style_name": config.style_name})


def write_model_folder(out_dir: Path, state: dict[str, Any], base_model: str) -> Path:
    """`state`: every csm parameter (torch tensors, or numpy arrays from a run without torch).
    Each file lands atomically; other files in `out_dir` (checkpoints, logs) are left alone."""
    base = open_checkpoint(resolve_model(base_model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out_dir))
    try:
        _save_state(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(base.config.to_dict(), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (base.root / name).is_file():
                shutil.copy2(base.root / name, tmp / name)
        found = _find_mimi(base, None, "csm")
        if found is not None and not (out_dir / MIMI_FILE).is_file():
            _write_codec(found, base, "csm", tmp, lambda t: t)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_state(state: dict[str, Any], path: Path) -> None:
    """numpy arrays through safetensors' numpy writer (no torch import), torch tensors through its
    torch writer; the file is the same."""
    if all(isinstance(v, np.ndarray) for v in state.values()):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata={"format": "pt"})
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
