"""The training run, once for every backend: epochs, batches, gradient accumulation, the learning
rate, validation, early stopping, checkpoints and resuming, metrics. A backend (`TrainingBackend`)
does the tensor work of a step; everything decided here is plain numbers and indices.

Every random choice is a function of the seed and the position in the run (the batch order of
(seed, epoch), the decoder frames and the dropout of (seed, step)), and the learning rate is a
function of the step: a checkpoint holds the weights, the optimizer, and where the run was, and a
run resumed from it continues exactly as if it had never stopped.

Under torchrun each process takes a contiguous share of every batch's examples; the frames are
chosen on the whole batch first, and each process scales its loss by the whole step's frame
counts, so N processes compute exactly the gradient one process would on the same batches.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csm.errors import CsmError
from csm.files import link_or_copy, write_bytes_atomic, write_file_atomic
from csm.mimi_files import FRAME_MS
from csm.training.batching import cosine_lr, epoch_batches
from csm.training.config import TrainConfig
from csm.training.examples import TrainingFrames
from csm.training.objective import Batch, FrameSelection, collate, select_frames

NUM_DECODER_CODEBOOKS = 31
WARMUP_SHARE = 0.05  # of the run, when warmup_steps is not given
CHECKPOINT_VERSION = 1
EVAL_BATCH_FRAMES = 8192


@dataclass
class LossScale:
    """How a process turns its loss sums into its share of the step's loss: the step's frame
    counts over every micro-batch and process, the weights, and `scale` (the number of processes,
    which average their gradients; 0 for a process with no example in a batch)."""

    num_frames: int
    num_decoder_frames: int
    semantic_weight: float
    acoustic_weight: float
    scale: float = 1.0


@dataclass
class LossSums:
    """Sums over frames (what adds up across micro-batches and processes)."""

    c0: float = 0.0  # codebook-0 cross-entropy, summed over frames
    c0_correct: float = 0.0  # frames whose codebook-0 argmax is right
    frames: float = 0.0
    codebooks: np.ndarray = field(default_factory=lambda: np.zeros(NUM_DECODER_CODEBOOKS))  # per codebook 1..31
    decoder_frames: float = 0.0

    def __iadd__(self, other: LossSums) -> LossSums:
        self.c0 += other.c0
        self.c0_correct += other.c0_correct
        self.frames += other.frames
        self.codebooks = self.codebooks + other.codebooks
        self.decoder_frames += other.decoder_frames
        return self

    def to_array(self) -> np.ndarray:
        return np.concatenate([[self.c0, self.c0_correct, self.frames, self.decoder_frames], self.codebooks])

    @classmethod
    def from_array(cls, a: np.ndarray) -> LossSums:
        return cls(float(a[0]), float(a[1]), float(a[2]), np.asarray(a[4:], dtype=np.float64), float(a[3]))

    def metrics(self, semantic_weight: float, acoustic_weight: float) -> dict[str, Any]:
        semantic = self.c0 / max(self.frames, 1)
        per_codebook = self.codebooks / max(self.decoder_frames, 1)
        acoustic = float(per_codebook.mean()) if self.decoder_frames else 0.0
        return {
            "loss": semantic_weight * semantic + acoustic_weight * acoustic,
            "semantic_loss": semantic,
            "acoustic_loss": acoustic,
            "codebook_losses": [semantic, *per_codebook.tolist()],
            "c0_accuracy": self.c0_correct / max(self.frames, 1),
            "frames": int(self.frames),
        }


class TrainingBackend(ABC):
    """The tensor work of a run on one framework. Set up by the backend's own constructor (the
    model, the method, the optimizer); `rank`/`world_size` describe torchrun's processes."""

    rank: int = 0
    world_size: int = 1
    checkpoint_name: str  # file name of a resumable checkpoint in the checkpoints folder

    @abstractmethod
    def train_micro_batch(self, batch: Batch, selection: FrameSelection, scale: LossScale, seed: int) -> LossSums:
        """Forward and backward one micro-batch, adding to the accumulated gradients."""

    @abstractmethod
    def optimizer_step(self, lr: float) -> float:
        """Clip the accumulated gradient, step at base rate `lr` (groups scale it), zero the
        gradients; returns the gradient norm before clipping."""

    @abstractmethod
    def eval_batch(self, batch: Batch, selection: FrameSelection) -> LossSums:
        """Loss sums without gradients."""

    @abstractmethod
    def save_checkpoint(self, path: Path, extra: dict[str, Any], optimizer: bool = True) -> None:
        """The trainable weights (a full run: the whole model, loadable by `csm.load`), the
        optimizer (unless `optimizer` is False: a snapshot to load, not to resume) and `extra`,
        written atomically. Every process calls it (a sharded model is gathered); the first writes."""

    @abstractmethod
    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote; returns its `extra`."""

    @abstractmethod
    def save_weights(self, out_dir: Path) -> None:
        """The trained result as a loadable folder (an adapter, or a full model). Every process
        calls it; the first writes."""

    def peak_memory_bytes(self) -> int:
        return 0

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        """Sum over processes (identity for one process)."""
        return values

    def barrier(self) -> None:  # noqa: B027 (a no-op is right for one process)
        """Wait for every process (a no-op for one)."""


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    group: int = 0  # next optimizer step's index within the epoch
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # validations in a row without improvement
    stopped_early: bool = False


@dataclass
class TrainResult:
    steps: int
    epochs_completed: float
    best_validation_loss: float | None
    best_step: int | None
    stopped_early: bool
    last_metrics: dict[str, Any]
    output_dir: Path
    seconds: float


def shard(batch: Batch, selection: FrameSelection, rank: int, world_size: int) -> tuple[Batch, FrameSelection, float]:
    """This process's contiguous share of a batch's examples and of the frames chosen on the
    whole batch, re-indexed; the last factor is the loss scale (0 when the share is empty: the
    process then runs one example whose loss counts for nothing, so every process still takes
    part in the gradient average)."""
    if world_size == 1:
        return batch, selection, 1.0
    b, t = batch.trained.shape
    lo, hi = rank * b // world_size, (rank + 1) * b // world_size
    scale = float(world_size)
    if lo == hi:
        lo, hi, scale = 0, 1, 0.0
    part = Batch(batch.tokens[lo:hi], batch.mask[lo:hi], batch.trained[lo:hi], batch.lengths[lo:hi])
    keep = (selection.example >= lo) & (selection.example < hi)
    new_index = np.cumsum(keep) - 1  # frame index among the kept ones
    offset = lo * t
    decoder = selection.decoder[keep[selection.decoder]]
    return part, FrameSelection(
        c0_rows=selection.c0_rows[keep] - offset,
        frame_rows=selection.frame_rows[keep] - offset,
        decoder=new_index[decoder],
        example=selection.example[keep] - lo,
        is_eos=selection.is_eos[keep],
    ), scale


def evaluate(backend: TrainingBackend, frames: list[TrainingFrames], config: TrainConfig) -> dict[str, Any]:
    """Validation loss over every frame of every example (no random subset: the same number for
    the same weights), in fixed batches."""
    sums = LossSums()
    lengths = [len(f) for f in frames]
    for ids in epoch_batches(lengths, config.batch_size, max(config.batch_frames, max(lengths, default=1)), 0, 0,
                             shuffle=False):
        batch = collate([frames[i] for i in ids])
        selection = select_frames(batch, fraction=1.0)
        part, sel, scale = shard(batch, selection, backend.rank, backend.world_size)
        sums_part = backend.eval_batch(part, sel)  # every process runs it: a sharded model gathers its weights
        if scale:
            sums += sums_part
    sums = LossSums.from_array(backend.all_reduce(sums.to_array()))
    return sums.metrics(config.semantic_weight, config.acoustic_weight)


class MetricsLog:
    """Metrics as JSON lines (`metrics.jsonl`), one record per optimizer step and per validation."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class EpochPlan:
    """The batches of each epoch (a function of the seed and the epoch), made when first asked
    for: a run bounded by max_steps may name any number of epochs without planning them all."""

    def __init__(self, lengths: list[int], config: TrainConfig):
        self.lengths, self.config = lengths, config
        self._epochs: dict[int, list[list[int]]] = {}

    def __getitem__(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            c = self.config
            self._epochs[epoch] = epoch_batches(self.lengths, c.batch_size, c.batch_frames, c.seed, epoch)
        return self._epochs[epoch]


def total_steps(plan: EpochPlan, config: TrainConfig) -> int:
    """Optimizer steps of the run: every epoch's, up to max_steps."""
    steps = 0
    for epoch in range(config.epochs):
        steps += math.ceil(len(plan[epoch]) / config.grad_accum)
        if config.max_steps and steps >= config.max_steps:
            return config.max_steps
    return steps


def run_training(
    backend: TrainingBackend,
    train: list[TrainingFrames],
    validation: list[TrainingFrames],
    config: TrainConfig,
    output_dir: Path,
    resume: bool = False,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    on_validation: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `backend` on `train`, validating on `validation` (may be empty), writing checkpoints,
    metrics and the best weights under `output_dir`. `on_event(kind, record)` gets every
    "step" and "validation" record (the CLI's progress bar); `on_validation(step)` runs after
    each validation (sample clips), in every process."""
    if not train:
        raise CsmError("no training examples")
    is_main = backend.rank == 0
    checkpoints = output_dir / "checkpoints"
    best_dir = checkpoints / "best"
    if is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(output_dir / "metrics.jsonl", is_main)
    plan = EpochPlan([len(f) for f in train], config)
    steps = total_steps(plan, config)
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(WARMUP_SHARE * steps)
    state = RunState()
    latest = checkpoints / backend.checkpoint_name
    # one naming for every run: checkpoint_latest (resumable), best_model, model_epoch{E}_step{S}
    suffix = Path(backend.checkpoint_name).suffix
    best_state = checkpoints / f"best_model{suffix}"
    if resume:
        if not latest.is_file():
            raise CsmError(f"nothing to resume: {latest} does not exist (start without --resume)")
        extra = backend.load_checkpoint(latest)
        if extra.get("version") != CHECKPOINT_VERSION:
            raise CsmError(f"{latest} was written by another csm version; start a new run")
        state = RunState(**extra["state"])
        if is_main:  # the records of steps after the checkpoint are replayed: drop the old ones
            _truncate_metrics(log.path, state.step)
    notify = on_event or (lambda kind, record: None)

    def checkpoint() -> None:
        backend.save_checkpoint(latest, {"version": CHECKPOINT_VERSION, "state": vars(state),
                                         "config": config.to_dict()})

    def validate() -> None:
        if not validation:
            return
        metrics = evaluate(backend, validation, config)
        improved = state.best_loss is None or metrics["loss"] < state.best_loss
        if improved:
            state.best_loss, state.best_step, state.bad_evals = metrics["loss"], state.step, 0
            backend.save_weights(best_dir)
            backend.save_checkpoint(best_state, {"version": CHECKPOINT_VERSION, "state": vars(state),
                                                 "config": config.to_dict()})
        else:
            state.bad_evals += 1
        record = {"kind": "validation", "step": state.step, "epoch": state.epoch, **metrics,
                  "best_loss": state.best_loss, "improved": improved}
        log.write(record)
        notify("validation", record)
        if config.patience and state.bad_evals >= config.patience:
            state.stopped_early = True
        if on_validation is not None:
            on_validation(state.step)

    started = time.perf_counter()
    window_start, window_steps, window_frames = started, 0, 0
    last: dict[str, Any] = {}
    while state.epoch < config.epochs and state.step < steps and not state.stopped_early:
        batches = plan[state.epoch]
        groups = [batches[i:i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
        while state.group < len(groups) and state.step < steps and not state.stopped_early:
            rng = np.random.default_rng([config.seed, state.step, 1])
            micro = [collate([train[i] for i in ids]) for ids in groups[state.group]]
            selections = [select_frames(b, config.decoder_frames_fraction, rng) for b in micro]
            sums = LossSums()
            n_frames = sum(s.num_frames for s in selections)
            n_decoder = sum(s.num_decoder_frames for s in selections)
            for i, (batch, selection) in enumerate(zip(micro, selections, strict=True)):
                part, sel, scale = shard(batch, selection, backend.rank, backend.world_size)
                loss_scale = LossScale(n_frames, n_decoder, config.semantic_weight, config.acoustic_weight, scale)
                step_sums = backend.train_micro_batch(part, sel, loss_scale, seed=config.seed * 1_000_003
                                                      + state.step * 64 + i)
                if scale:
                    sums += step_sums
            lr = cosine_lr(state.step, steps, warmup, config.learning_rate)
            grad_norm = backend.optimizer_step(lr)
            state.step += 1
            state.group += 1
            sums = LossSums.from_array(backend.all_reduce(sums.to_array()))
            now = time.perf_counter()
            window_steps += 1
            window_frames += int(sums.frames)
            rate = window_steps / max(now - window_start, 1e-9)
            last = {"kind": "step", "step": state.step, "total_steps": steps, "epoch": state.epoch,
                    **sums.metrics(config.semantic_weight, config.acoustic_weight), "lr": lr,
                    "grad_norm": grad_norm, "steps_per_s": rate,
                    "audio_s_per_s": window_frames * FRAME_MS / 1000 / max(now - window_start, 1e-9),
                    "peak_memory_gb": backend.peak_memory_bytes() / 2**30,
                    "eta_s": (steps - state.step) / max(rate, 1e-9), "elapsed_s": now - started}
            log.write(last)
            notify("step", last)
            if now - window_start > 30:  # rates over the last half minute or so
                window_start, window_steps, window_frames = now, 0, 0
            if config.eval_every and state.step % config.eval_every == 0:
                validate()
            if state.step % config.save_every == 0:
                checkpoint()
                # a snapshot to keep: the weights (no optimizer, so it is half the size or less)
                backend.save_checkpoint(checkpoints / f"model_epoch{state.epoch}_step{state.step}{suffix}",
                                        {"version": CHECKPOINT_VERSION, "state": vars(state),
                                         "config": config.to_dict()}, optimizer=False)
                if is_main and config.keep_snapshots:
                    _drop_old_snapshots(checkpoints, suffix, config.keep_snapshots)
        if state.group >= len(groups):
            state.epoch, state.group = state.epoch + 1, 0
            if not config.eval_every:
                validate()
            # no checkpoint here: a run resumes exactly from any step's, and an epoch of a few
            # clips would otherwise write the whole model and optimizer state every step or two
    checkpoint()
    if state.best_step is None:
        backend.save_weights(output_dir)
    elif is_main:
        _install(best_dir, output_dir)
    backend.barrier()
    if state.best_step is not None:  # the weights in memory are the result's too
        backend.load_checkpoint(best_state)
    epochs_done = state.epoch + state.group / max(1, math.ceil(len(plan[min(state.epoch, config.epochs - 1)])
                                                                / config.grad_accum))
    return TrainResult(steps=state.step, epochs_completed=epochs_done, best_validation_loss=state.best_loss,
                       best_step=state.best_step, stopped_early=state.stopped_early, last_metrics=last,
                       output_dir=output_dir, seconds=time.perf_counter() - started)


def _install(src: Path, dst: Path) -> None:
    """The files of folder `src` into `dst` (hard links where the disk allows), each replaced atomically."""
    for f in src.iterdir():
        if f.is_file():
            write_file_atomic(dst / f.name, lambda tmp, f=f: link_or_copy(f, tmp))


def _drop_old_snapshots(checkpoints: Path, suffix: str, keep: int) -> None:
    """Only the newest `keep` model_epoch*_step* snapshots stay (by step)."""
    snapshots = []
    for path in checkpoints.glob(f"model_epoch*_step*{suffix}"):
        step = path.stem.rpartition("_step")[2]
        if step.isdigit():
            snapshots.append((int(step), path))
    for _, path in sorted(snapshots)[:-keep]:
        path.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())
