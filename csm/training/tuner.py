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

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csm.backends import select_backend
from csm.checkpoint import open_checkpoint
from csm.errors import CsmError
from csm.files import write_json_atomic
from csm.mimi_files import FRAME_MS, MIMI_FILE
from csm.text import load_tokenizer
from csm.training.config import TrainConfig, config_from
from csm.training.examples import Example, TrainingFrames, build_training_frames
from csm.training.loop import TrainResult, evaluate, run_training
from csm.training.processes import process_count

RUN_FILE = "train_config.json"
SAMPLE_MS = 10_000  # longest sample clip
# settings a prepared model and optimizer do not depend on: `train` may change them without a rebuild
RUN_SETTINGS = {"data", "audio_dir", "transcript_dir", "validation_data", "batch_size", "batch_frames", "epochs",
                "max_steps", "grad_accum", "max_grad_norm", "warmup_steps", "learning_rate", "semantic_weight",
                "acoustic_weight", "decoder_fraction", "train_on", "context_turns", "validation_split", "eval_every",
                "patience", "save_every", "sample_prompts", "merge", "speaker_id", "style_name", "eval_conversations",
                "keep_snapshots"}
# what a run writes into its output folder; anything else there is the user's
RUN_OUTPUTS = {"checkpoints", "metrics.jsonl", RUN_FILE, "data", "validation_data", "samples",
               "adapter_model.safetensors", "adapter_config.json", "csm_adapter.json", "model.safetensors",
               "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merged", MIMI_FILE,
               "logs", "evaluation"}
# what a new run (and --force) leaves in place: the prepared data, and the model csm-train created
# there to train from (it is the run's input: without it nothing could start over)
KEPT_OUTPUTS = ("data", "initial_model")


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
        self._adapter = None

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
        """The base checkpoint, and the adapter when `model_path` is an adapter folder (a voice
        trained with LoRA): its weights are then the base's with the adapter merged in."""
        if self._ckpt is None:
            from csm.training.adapters import model_and_adapter

            base, self._adapter = model_and_adapter(self.config.model_path, None)
            self._ckpt = open_checkpoint(base)
            self._tokenizer = load_tokenizer(self._ckpt.root)
        return self._ckpt

    def _build(self):
        if self._backend is None:
            ckpt = self._open()
            name = self.backend_name
            if name == "torch" and self.config.quantize is not None:
                raise CsmError("QLoRA (--quantize) runs on the MLX backend; add --backend mlx, or drop --quantize")
            base_model = _base_model_reference(self.config.model_path)
            if self._adapter is not None:
                base_model = str(self._ckpt.root)
            if name == "mlx":
                try:
                    from csm_mlx.training import MlxTrainer
                except ImportError as exc:
                    raise CsmError(f"fine-tuning on MLX needs mlx and mlx-lm ({exc}); install the mlx extra "
                                   "(pip install 'csm-speech[mlx]'), or use --backend torch") from None
                self._backend = MlxTrainer(self.config, ckpt, base_model=base_model, adapter=self._adapter)
            else:
                from csm_torch.training import TorchTrainer

                self._backend = TorchTrainer(self.config, ckpt, base_model=base_model, adapter=self._adapter)
        return self._backend

    @property
    def backend_name(self) -> str:
        """The framework the run trains on: --backend, or for auto MLX on Apple Silicon (with MLX
        installed) and PyTorch elsewhere."""
        return select_backend(self.config.backend)

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
        from csm.training.data import PreparedDataset

        if not isinstance(dataset, PreparedDataset):
            dataset = self._dataset(self.config.replace(data=str(dataset)), "data")
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
            if set(changes) <= RUN_SETTINGS and self._backend is not None:
                self._backend.config = self.config  # the model and optimizer stay as prepared
            else:
                self._backend = None
        if self.config.quantize is not None:
            self._build()  # refuses QLoRA off MLX (or a base it cannot quantize) before any data is prepared
        self._open()
        if self._adapter is not None and self.config.method == "lora":
            raise CsmError(f"{self.config.model_path} is a LoRA adapter: a second adapter on top of it could not be "
                           "loaded alone. Merge it first (csm-finetune merge) and train on the merged folder, or "
                           "use --method full")
        # Under torchrun the first process checks the folder and prepares the data while the
        # others wait, then they open what it prepared.
        distributed = process_count() > 1
        backend = self._build() if distributed else None
        main_process = backend is None or backend.rank == 0
        if main_process:
            self._check_output_dir(resume, force)
            train, validation = self._training_frames(train_dataset, val_dataset)
        if backend is not None:
            backend.barrier()
        if not main_process:
            train, validation = self._training_frames(train_dataset, val_dataset)
        backend = backend or self._build()
        if backend.rank == 0:
            self._write_run_file()
        on_validation = None
        if self.config.sample_prompts and validation:
            from csm.watermark import Watermarker

            Watermarker.load()  # samples are watermarked: a missing watermark model fails now, not mid-run
            on_validation = self._write_samples
        try:
            result = run_training(backend, train, validation, self.config, self.output_dir, resume=resume,
                                  on_event=on_event, on_validation=on_validation)
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

    def _write_samples(self, step: int) -> None:
        """Speak each sample prompt with the weights as they are now (greedy, so clips from one
        validation to the next differ by the training alone) into samples/step<N>_<i>.wav."""
        import csm
        from csm.audio import write_wav

        weights = self.output_dir / "checkpoints" / "sampling"
        self._backend.save_weights(weights)  # every process takes part (a sharded model is gathered)
        if self._backend.rank != 0:
            self._backend.barrier()
            return
        voice = csm.load(str(weights), backend=self.backend_name, device=str(self._backend.device), dtype="float32")
        samples = self.output_dir / "samples"
        samples.mkdir(exist_ok=True)
        for i, text in enumerate(self.config.sample_prompts):
            room = voice.config.backbone.max_seq_len - len(voice.prompt(text, self.config.speaker_id)) - 1
            audio = voice.generate(text, speaker=self.config.speaker_id, topk=1, seed=self.config.seed,
                                   max_audio_length_ms=min(SAMPLE_MS, room * FRAME_MS))
            write_wav(samples / f"step{step:06d}_{i}.wav", audio, voice.sample_rate, force=True)
        self._backend.barrier()

    def _training_frames(self, train_dataset: Any, val_dataset: Any) -> tuple[list, list]:
        """(training frames, validation frames): the training data's train split and validation
        split, or all of it when separate validation data is given."""
        c = self.config
        if train_dataset is None:
            train_dataset = c.data or c.audio_dir
            if train_dataset is None:
                raise CsmError("no training data: give --data (or --audio-dir with --transcript-dir)")
            train_dataset = self._dataset(c, "data")
        if val_dataset is None and c.validation_data is not None:
            val_dataset = self._dataset(c.replace(data=c.validation_data, audio_dir=None, transcript_dir=None,
                                                  validation_split=0.0), "validation_data")
        separate = val_dataset is not None or isinstance(train_dataset, list)
        train = self.frames(train_dataset, None if separate and not isinstance(train_dataset, list) else "train")
        if not train:
            raise CsmError("the training split is empty: add data or lower --validation-split")
        if val_dataset is not None:
            validation = self.frames(val_dataset, "train" if _is_whole(val_dataset) else "validation")
        elif isinstance(train_dataset, list):
            validation = []
        else:
            validation = self.frames(train_dataset, "validation")
        return train, validation

    def _dataset(self, config: TrainConfig, folder: str):
        """Prepared data for `config.data` (or its audio folders): prepared into the output folder
        by the first process; a later process opens what it wrote."""
        from csm.training.data import PreparedDataset, is_prepared, resolve_training_data

        work_dir = self.output_dir / folder
        if self._backend is not None and self._backend.rank > 0 and is_prepared(work_dir):
            return PreparedDataset.open(work_dir)
        return resolve_training_data(config, work_dir)

    def evaluate(self, dataset: Any, split: str = "validation") -> dict[str, Any]:
        """Loss on every frame of `dataset`'s `split` (a list of examples is used whole):
        loss, semantic_loss, acoustic_loss, codebook_losses, c0_accuracy."""
        frames = self.frames(dataset, split if not isinstance(dataset, list) else "train")
        if not frames:
            raise CsmError(f"no {split} examples to evaluate")
        return evaluate(self._build(), frames, self.config)

    def evaluate_conversations(self, dataset: Any = None, split: str = "validation", max_conversations: int = 8,
                               seed: int = 0, on_turn: Callable[[int, int], None] | None = None):
        """How the trained model (the result in `output_dir`) holds held-out conversations: each turn
        spoken with the real earlier turns as context (`csm.conversation_eval`, the `eval` extra).
        By default the run's validation conversations: its validation data, or its data's
        validation split. Returns a `ConversationReport` (`.to_dict()`, `.table()`, `.figure(path)`)."""
        import csm
        from csm.conversation_eval import conversations_from_dataset, evaluate_conversations

        c = self.config
        if dataset is None and c.validation_data is not None:
            dataset = self._dataset(c.replace(data=c.validation_data, audio_dir=None, transcript_dir=None,
                                              validation_split=0.0), "validation_data")
            split = "train" if _is_whole(dataset) else split
        elif dataset is None:
            if c.data is None and c.audio_dir is None:
                raise CsmError("no data to take conversations from: give a dataset")
            dataset = self._dataset(c, "data")
        conversations = conversations_from_dataset(dataset, split=split, max_conversations=max_conversations)
        voice = csm.load(str(self.output_dir), backend=self.backend_name, device=c.device)
        return evaluate_conversations(voice, conversations, seed=seed, on_turn=on_turn)

    # --- files -------------------------------------------------------------------------------------
    def _check_output_dir(self, resume: bool, force: bool) -> None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise CsmError(f"{out} exists and is not a folder")
        if resume:
            if not (out / "checkpoints").is_dir():
                raise CsmError(f"nothing to resume in {out}: it has no checkpoints/ (start without --resume)")
            return
        if out.is_dir() and any(p.name != "initial_model" for p in out.iterdir()):
            if not force:
                raise CsmError(f"{out} already exists and is not empty; pass --resume to continue its run or "
                               "--force to start over (its checkpoints are replaced)")
            foreign = [p.name for p in out.iterdir() if p.name not in RUN_OUTPUTS | set(KEPT_OUTPUTS)]
            if foreign:
                raise CsmError(f"{out} holds files a run did not write ({', '.join(sorted(foreign)[:5])}); "
                               "choose another --output-dir")
            for p in out.iterdir():
                if p.name not in KEPT_OUTPUTS:  # the prepared data (and its code cache) stay valid
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)

    def _write_run_file(self) -> None:
        write_json_atomic(self.output_dir / RUN_FILE, self.config.to_dict())


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
