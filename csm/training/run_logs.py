"""Scalar logs of a run for TensorBoard and Weights & Biases, fed by the loop's `on_event` records
(the same ones metrics.jsonl holds). Only the first process of a torchrun logs; the library never
starts one itself: `csm-train` does, so a script calling `CSMFineTuner` stays quiet.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csm.errors import CsmError
from csm.training.processes import is_first_process

# record key -> the scalar's name; TensorBoard groups scalars by the part before "/"
STEP_SCALARS = {"loss": "train/loss", "semantic_loss": "train/semantic_loss", "acoustic_loss": "train/acoustic_loss",
                "c0_accuracy": "train/c0_accuracy", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "steps_per_s": "speed/steps_per_s", "audio_s_per_s": "speed/audio_s_per_s",
                "peak_memory_gb": "memory/peak_gb"}
VALIDATION_SCALARS = {"loss": "validation/loss", "semantic_loss": "validation/semantic_loss",
                      "acoustic_loss": "validation/acoustic_loss", "c0_accuracy": "validation/c0_accuracy"}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise CsmError("--wandb needs the wandb package: pip install wandb (and `wandb login`), or drop --wandb")


def _scalars(kind: str, record: dict[str, Any]) -> dict[str, float]:
    names = STEP_SCALARS if kind == "step" else VALIDATION_SCALARS
    return {name: float(record[key]) for key, name in names.items() if record.get(key) is not None}


class RunLogger:
    """An `on_event` callback writing each record's scalars to TensorBoard (`log_dir`) and/or
    Weights & Biases (`wandb_project`); `close()` flushes. Writers open at the first record, so a
    resumed run knows its first step: TensorBoard drops the events of the steps it replays."""

    def __init__(self, log_dir: Path | None, wandb_project: str | None = None, config: dict[str, Any] | None = None,
                 run_name: str | None = None):
        self.log_dir = log_dir
        self.wandb_project = wandb_project
        self.config = config or {}
        self.run_name = run_name
        self.main = is_first_process()
        self._tb = None
        self._wandb = None

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        if not self.main or kind not in ("step", "validation"):
            return
        if self._tb is None and self._wandb is None:
            self._open(first_step=record["step"])
        scalars = _scalars(kind, record)
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def _open(self, first_step: int) -> None:
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run replays the steps after its checkpoint; their old events go
            self._tb = SummaryWriter(str(self.log_dir), purge_step=first_step)
        if self.wandb_project is not None:
            import wandb

            self._wandb = wandb.init(project=self.wandb_project, name=self.run_name, config=self.config)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def combine(*callbacks: Callable[[str, dict[str, Any]], None]) -> Callable[[str, dict[str, Any]], None]:
    def call(kind: str, record: dict[str, Any]) -> None:
        for c in callbacks:
            c(kind, record)

    return call
