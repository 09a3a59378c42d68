"""The training task (`python -m benchmarks --task train`): optimizer steps of every fine-tuning
implementation (`benchmarks.trainers`) on one fixed synthetic batch (`benchmarks.train_inputs`)
of random weights, all in one process.

Per row: build the trainer, run the warm-up steps (the optimizer's state, first-touch
allocations, kernel choices), then time `steps` optimizer steps between two device syncs.
Audio seconds trained per second counts the frames the codebook-0 loss covers (every trained
frame, EOS frames included: the same count for every row) at 80 ms each.

Peak memory is a row's growth over what the process held just before it built its model: the
weights, gradients, optimizer state and activations, not a transient copy made while loading
(the peak is reset once the model is built). On CUDA torch.cuda.max_memory_allocated; on a CPU
the process's peak resident size (Linux resets it per row: `measure.ProcessMemory`). MLX rows
also give `mx.get_peak_memory()` over the timed steps: every MLX array, the weights included.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

from benchmarks import measure, models, report, train_inputs, trainers
from csm.checkpoint import return_freed_memory
from csm.mimi_files import FRAME_MS
from csm.training.objective import collate, select_frames


def run(impls: list[trainers.TrainImpl], source: models.ModelSource, batches: list[int], clip_seconds: float,
        warmup_steps: int, steps: int, settings: trainers.TrainSettings, device_name: str, command: str,
        log=lambda line: None) -> list[dict]:
    """One row per implementation and batch size."""
    meter = measure.CudaMemory() if settings.device == "cuda" else measure.ProcessMemory()
    trainers.import_libraries()  # so that no row's setup time holds the imports
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log(f"writing the random checkpoint ({source.label}) ...")
        folder = train_inputs.write_checkpoint(Path(tmp) / "model", source)
        for batch in batches:
            examples = train_inputs.synthetic_examples(batch, clip_seconds, source.seed)
            frames = train_inputs.training_frames(folder, examples)
            for impl in impls:
                log(f"  {impl.label}, batch {batch} x {clip_seconds:g} s ...")
                row = base_row(impl, batch, clip_seconds, source, settings, device_name, meter, command)
                row["trained_frames_per_step"] = select_frames(collate(frames), 1.0).num_frames
                row["positions_per_example"] = len(frames[0])
                row["warmup_steps"], row["steps_timed"] = warmup_steps, steps
                row |= measure_steps(impl, folder, frames, settings, meter, warmup_steps, steps)
                rows.append(row)
                log("    " + summary(row))
    return rows


def base_row(impl: trainers.TrainImpl, batch: int, clip_seconds: float, source: models.ModelSource,
             settings: trainers.TrainSettings, device_name: str, meter: measure.MemoryMeter, command: str) -> dict:
    row = dict.fromkeys(report.TRAIN_ROW_FIELDS)
    row |= {
        "task": "train", "impl": impl.name, "backend": impl.library, "label": impl.label, "device": device_name,
        "dtype": settings.dtype, "batch": batch, "clip_seconds": clip_seconds, "model": source.label,
        "method": impl.method, "lora_rank": settings.lora_rank if impl.method == "lora" else None,
        "decoder_fraction": settings.decoder_fraction if impl.library != "transformers" else 1.0,
        "peak_memory_kind": f"growth of {meter.kind} over the row's start",
        "versions": report.versions(), "date": report.today(), "command": command,
    }
    return row


def measure_steps(impl: trainers.TrainImpl, folder: Path, frames, settings: trainers.TrainSettings,
                  meter: measure.MemoryMeter, warmup_steps: int, steps: int) -> dict:
    """The figures of one row (or its error: one failing implementation must not end the run)."""
    release_memory(settings.device)
    held_before = meter.current()
    trainer = None
    try:
        started = time.perf_counter()
        trainer = trainers.build(impl, folder, frames, settings)
        release_memory(settings.device)  # what loading freed is not the training's
        meter.reset()
        if hasattr(trainer, "reset_mlx_peak"):
            trainer.reset_mlx_peak()
        for _ in range(warmup_steps):
            trainer.step()
        trainer.sync()
        setup_s = time.perf_counter() - started
        t = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        trainer.sync()
        elapsed = time.perf_counter() - t
        peak = meter.peak()
        mlx_peak = trainer.mlx_peak_memory() if hasattr(trainer, "mlx_peak_memory") else None
    except Exception as exc:
        return {"error": report.first_line(exc)}
    finally:
        if trainer is not None:
            trainer.close()
    trained = select_frames(collate(frames), 1.0).num_frames
    figures = {
        "trainable_params": trainer.trainable_params,
        "decoder_frames_per_step": trainer.decoder_frames_per_step,
        "setup_s": setup_s,
        "steps_per_s": steps / elapsed, "ms_per_step": 1000 * elapsed / steps,
        "audio_s_per_s": steps * trained * FRAME_MS / 1000 / elapsed,
        "peak_memory_gb": (peak - held_before) / 1e9, "loss": trainer.last_loss,
        # MLX rows: its arrays' peak (weights included), what bounds a Mac's unified memory
        "mlx_peak_memory_gb": None if mlx_peak is None else mlx_peak / 1e9,
    }
    del trainer
    return figures


def release_memory(device: str) -> None:
    """Hand what the last row freed back (the heap's holes on a CPU, the cache on CUDA), so that a
    row's growth is its own."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    else:
        return_freed_memory()


def summary(row: dict) -> str:
    if row["error"]:
        return f"skipped: {row['error']}"
    return (f"{row['steps_per_s']:.2f} steps/s, {row['audio_s_per_s']:.1f} audio s/s, "
            f"peak +{row['peak_memory_gb']:.2f} GB, {row['trainable_params'] / 1e6:.2f} M trainable")
