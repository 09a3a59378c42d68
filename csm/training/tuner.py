"""`CSMFineTuner`: the Python face of a fine-tuning run (the CLI is a thin layer over it).

    from csm.training import CSMFineTuner
    tuner = CSMFineTuner(model_path="unsloth/csm-1b", output_dir="my_custom_voice", learning_rate=2e-5)
    tuner.prepare_optimizer(freeze_backbone=True)
    tuner.train(train_dataset=my_dataset, batch_size=1, epochs=5)
    tuner.evaluate(val_dataset)   # {"loss": ..., "semantic_loss": ..., "acoustic_loss": ...}

A dataset is a `PreparedDataset`, the path of a prepared folder, raw data in any form
`prepare_dataset` reads (prepared into `<output_dir>/data` first), or a list of `Example`s.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csm.backends import select_backend
from csm.checkpoint import open_checkpoint
from csm.errors import CsmError
from csm.hub import resolve_model
from csm.text import load_tokenizer
from csm.training.config import config_from
from csm.training.examples import Example, TrainingFrames, build_training_frames
from csm.training.loop import TrainResult, evaluate, run_training

RUN_FILE = "train_config.json"
# what a run writes into its output folder; anything else there is the user's
RUN_OUTPUTS = {"checkpoints", "metrics.jsonl", RUN_FILE, "data", "samples", "adapter_model.safetensors",
               "adapter_config.json", "csm_adapter.json", "model.safetensors", "config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "merged"}


class CSMFineTuner:
    def __init__(self, model_path: str = "unsloth/csm-1b", output_dir: str | os.PathLike = "csm-finetune",
                 learning_rate: float | None = None, *, preset: str | None = None, config_file: str | None = None,
                 **settings: Any):
        """Settings are `csm.training.config.TrainConfig` fields; `preset` (voice-adapt, style-tune,
        domain, conversational) and `config_file` supply defaults that explicit settings override."""
        self.config = config_from(preset, config_file, model_path=model_path, output_dir=str(output_dir),
                                  learning_rate=learning_rate, **settings)
        self._backend = None
        self._tokenizer = None
        self._ckpt = None

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    # --- setup -------------------------------------------------------------------------------------
    def prepare_optimizer(self, freeze_backbone: bool | None = None, freeze_decoder: bool | None = None,
                          **settings: Any) -> CSMFineTuner:
        """Choose what trains (and any other setting); the model and optimizer are built here."""
        changes = {k: v for k, v in dict(freeze_backbone=freeze_backbone, freeze_decoder=freeze_decoder,
                                         **settings).items() if v is not None}
        self.config = self.config.replace(**changes)
        self._backend = None
        self._build()
        return self

    def _open(self):
        if self._ckpt is None:
            self._ckpt = open_checkpoint(resolve_model(self.config.model_path))
            self._tokenizer = load_tokenizer(self._ckpt.root)
        return self._ckpt

    def _build(self):
        if self._backend is None:
            ckpt = self._open()
            name = select_backend(self.config.backend) if self.config.backend != "auto" else "torch"
            if name != "torch":
                raise CsmError("fine-tuning on MLX is not available yet; use --backend torch")
            from csm_torch.training import TorchTrainer

            self._backend = TorchTrainer(self.config, ckpt, base_model=_base_model_reference(self.config.model_path))
        return self._backend

    # --- data --------------------------------------------------------------------------------------
    def frames(self, dataset: Any, split: str = "train") -> list[TrainingFrames]:
        """A dataset's examples of `split` as training frames (context fitted to the model)."""
        examples = self._examples(dataset, split)
        ckpt = self._open()
        c = self.config
        return [build_training_frames(self._tokenizer, e, ckpt.config.audio_num_codebooks,
                                      ckpt.config.backbone.max_seq_len, c.context_turns) for e in examples]

    def _examples(self, dataset: Any, split: str) -> list[Example]:
        if isinstance(dataset, list):
            if not all(isinstance(e, Example) for e in dataset):
                raise CsmError("a dataset given as a list must hold csm.training.examples.Example items")
            return dataset
        from csm.training.data import PreparedDataset, resolve_training_data

        if not isinstance(dataset, PreparedDataset):
            dataset = resolve_training_data(self.config.replace(data=str(dataset)), self.output_dir / "data")
        speaker = self.config.speaker_id if self.config.train_on == "speaker" else None
        return dataset.examples(split, train_on=self.config.train_on, speaker_id=speaker)

    # --- running -----------------------------------------------------------------------------------
    def train(self, train_dataset: Any = None, batch_size: int | None = None, epochs: int | None = None,
              val_dataset: Any = None, *, resume: bool = False, force: bool = False,
              on_event: Callable[[str, dict[str, Any]], None] | None = None, **settings: Any) -> TrainResult:
        """Train and write the result into `output_dir`: an adapter folder (LoRA) or a full model
        folder, loadable by `csm.load(output_dir)` on either backend. With validation data the
        best validated weights are the result. `resume` continues a killed run exactly."""
        changes = {k: v for k, v in dict(batch_size=batch_size, epochs=epochs, **settings).items() if v is not None}
        if changes:
            self.config = self.config.replace(**changes)
            self._backend = None
        self._check_output_dir(resume, force)
        if train_dataset is None:
            train_dataset = self.config.data or self.config.audio_dir
            if train_dataset is None:
                raise CsmError("no training data: give --data (or --audio-dir with --transcript-dir)")
        if self.config.audio_dir and train_dataset == self.config.audio_dir:
            from csm.training.data import resolve_training_data

            train_dataset = resolve_training_data(self.config, self.output_dir / "data")
        train = self.frames(train_dataset, "train")
        if val_dataset is None and self.config.validation_data is not None:
            from csm.training.data import resolve_training_data

            val_dataset = resolve_training_data(self.config.replace(data=self.config.validation_data,
                                                                    validation_split=0.0),
                                                self.output_dir / "validation_data")
        if val_dataset is not None:
            validation = self.frames(val_dataset, "train" if _is_whole(val_dataset) else "validation")
        elif isinstance(train_dataset, list):
            validation = []
        else:
            validation = self.frames(train_dataset, "validation")
        if not train:
            raise CsmError("the training split is empty: add data or lower --validation-split")
        backend = self._build()
        if backend.rank == 0:
            self._write_run_file()
        try:
            result = run_training(backend, train, validation, self.config, self.output_dir, resume=resume,
                                  on_event=on_event)
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not _is_out_of_memory(exc):
                raise
            raise CsmError(
                f"ran out of memory ({str(exc).splitlines()[0][:120]}); lower --batch-frames or --batch-size, "
                "add --gradient-checkpointing, or train LoRA instead of full (--method lora); "
                "resume with --resume from the last checkpoint") from None
        if self.config.merge and self.config.method == "lora" and backend.rank == 0:
            from csm.training.adapters import merge_adapter

            merge_adapter(self.output_dir, self.output_dir / "merged", force=True)
        return result

    def evaluate(self, dataset: Any, split: str = "validation") -> dict[str, Any]:
        """Loss on every frame of `dataset`'s `split` (a list of examples is used whole):
        loss, semantic_loss, acoustic_loss, codebook_losses, c0_accuracy."""
        frames = self.frames(dataset, split if not isinstance(dataset, list) else "train")
        if not frames:
            raise CsmError(f"no {split} examples to evaluate")
        return evaluate(self._build(), frames, self.config)

    # --- files -------------------------------------------------------------------------------------
    def _check_output_dir(self, resume: bool, force: bool) -> None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise CsmError(f"{out} exists and is not a folder")
        if resume:
            if not (out / "checkpoints").is_dir():
                raise CsmError(f"nothing to resume in {out}: it has no checkpoints/ (start without --resume)")
            return
        if out.is_dir() and any(out.iterdir()):
            if not force:
                raise CsmError(f"{out} already exists and is not empty; pass --resume to continue its run or "
                               "--force to start over (its checkpoints are replaced)")
            foreign = [p.name for p in out.iterdir() if p.name not in RUN_OUTPUTS]
            if foreign:
                raise CsmError(f"{out} holds files a run did not write ({', '.join(sorted(foreign)[:5])}); "
                               "choose another --output-dir")
            for p in out.iterdir():
                if p.name != "data":  # the prepared data (and its code cache) stay valid
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)

    def _write_run_file(self) -> None:
        tmp = self.output_dir / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.output_dir / RUN_FILE)


def _base_model_reference(model_path: str) -> str:
    """How an adapter names its base: a local path made absolute, a Hub id as given."""
    path = Path(model_path).expanduser()
    return str(path.resolve()) if path.exists() else model_path


def _is_whole(dataset: Any) -> bool:
    """A dataset used whole for validation: a list of examples, or a prepared folder made for
    validation alone (no split of its own)."""
    if isinstance(dataset, list):
        return True
    from csm.training.data import PreparedDataset

    return isinstance(dataset, PreparedDataset) and not dataset.stored_examples("validation")


def _is_out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or type(exc).__name__ == "OutOfMemoryError"
