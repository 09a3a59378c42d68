"""One benchmark for every backend: `python -m benchmarks` (or `csm-bench`).

Generation (`--task infer`, the default): for each implementation x dtype x batch size on one
device it reports steady-state frames/s, the real-time factor with Mimi decode included, time to
first audio, peak memory and the ratio to the bandwidth bound, as JSON (one object per row) and
as a markdown table. transformers' `CsmForConditionalGeneration` runs on the same weights in the
same run, as the reference.

    python -m benchmarks --preset small --device cpu --frames 16          # quick, CPU, random weights
    python -m benchmarks --preset csm-1b --device cuda --batch 1 8 64     # the full GPU matrix
    python -m benchmarks --model unsloth/csm-1b --device cuda             # a real checkpoint

Fine-tuning (`--task train`): optimizer steps/s, audio seconds trained per second, peak memory
and trainable parameters of csm's LoRA and full fine-tuning (the real TorchTrainer; MlxTrainer
with LoRA, QLoRA on a 4-bit base and in full on MLX) against transformers' model with peft LoRA
and in full, on the same random weights and one fixed batch of synthetic clips (bf16 autocast on
CUDA, float32 on CPUs):

    python -m benchmarks --task train --preset small --device cpu --threads 1 --batch 2 --clip-seconds 4 --steps 8
    python -m benchmarks --task train --preset csm-1b --impl csm-mlx-lora csm-mlx-qlora4 csm-mlx-full \\
        --batch 4 --clip-seconds 10 --steps 5     # on a Mac: MLX on the Apple GPU
    python -m benchmarks --task train --preset csm-1b --device cuda --batch 8 --clip-seconds 10 --steps 10

(the first is RESULTS.md's CPU section; add `--decoder-fraction 1 --impl csm-lora csm-full` for
csm with its decoder on every frame, as transformers' rows have theirs)

Serving (`--task serve`): a bounded load test of `csm serve` (`benchmarks.serve_task`): requests/s,
time to first audio p50/p95 and aggregate frames/s of many clients against one server:

    python -m benchmarks --task serve --preset small --device cpu --threads 1 --requests 64 --clients 16
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import bandwidth, engines, measure, models, report, serve_task, train_task, trainers
from benchmarks.report import first_line
from csm.errors import CsmError
from csm.prompt import check_fits, text_frames
from csm.training.config import TrainConfig

RESULTS_MD = Path(__file__).with_name("RESULTS.md")

MAC_GUIDE = """\
On a Mac (Apple Silicon), from a clone of this repository, with uv (`pip install uv`):

    uv sync --extra dev
    uv run python -m benchmarks --preset csm-1b --impl csm-mlx csm-mlx-sync csm-mlx-eager --device gpu \\
        --dtype bfloat16 float16 --frames 64 --json mac.json

It needs no download (random csm-1b-sized weights) and about 4 GB of free memory; a run takes a
few minutes. To report: paste the markdown table it prints and attach mac.json (it records the
chip, the library versions and the command); say how much memory the Mac has. Add
`--impl csm-mlx transformers-eager --device cpu --preset small` for a quick CPU comparison."""


@dataclass
class Target:
    """What every row on one device in one dtype shares."""

    backend: str  # "torch" (also transformers') or "mlx"
    device: str  # the device's name, as reported
    dtype: str
    meter: measure.MemoryMeter
    bandwidth: float | None  # bytes/s
    codec: object | None  # Mimi, or None with the reason in codec_error
    codec_error: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=MAC_GUIDE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--random-weights", action="store_true", help="random weights (the default without --model)")
    src.add_argument("--model", help="a real checkpoint: local folder/file or Hub id (its dims, not --preset's)")
    src.add_argument("--preset", choices=sorted(models.ALL_PRESETS),
                     help="dims (default csm-1b; for --task train small on CPUs, csm-1b on CUDA)")
    src.add_argument("--dims", help="explicit dims instead: LxDxHxKVxI,LxDxHxKVxI (backbone,decoder)")
    src.add_argument("--seed", type=int, default=0, help="of the random weights")
    src.add_argument("--mimi", help="Mimi weights (default: the checkpoint's, or random ones with random weights)")
    run = p.add_argument_group("what to run")
    run.add_argument("--task", choices=("infer", "train", "serve"), default="infer",
                     help="infer: generation (the default); train: fine-tuning steps; serve: a load test of "
                          "csm serve (benchmarks/serve_task.py)")
    run.add_argument("--device", help="cuda, cpu, mps or gpu (MLX's GPU); default: the best there is")
    run.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice); one avoids "
                     "spinning threads on a CPU shared with other work")
    run.add_argument("--dtype", nargs="+", choices=sorted(bandwidth.BYTES_PER_ELEMENT),
                     help="default: bfloat16 on GPUs, float32 on CPUs")
    run.add_argument("--batch", nargs="+", type=int,
                     help="batch sizes (default 1; csm torch only above 1); --task train: examples per step "
                          f"(default {TRAIN_DEFAULTS['cuda'].batch} on CUDA, {TRAIN_DEFAULTS['cpu'].batch} on CPUs)")
    run.add_argument("--impl", nargs="+", choices=list(engines.IMPLS) + list(trainers.IMPLS),
                     help="default: all of the task's that run on the device")
    run.add_argument("--streams", nargs="+", type=int, default=[1, 8, 32],
                     help="the engine rows' stream counts, arriving over time (default 1 8 32)")
    how = p.add_argument_group("how")
    how.add_argument("--frames", type=int, default=64, help="frames timed in the steady state (default 64)")
    how.add_argument("--warmup-frames", type=int, default=8, help="the short call's length (default 8)")
    how.add_argument("--prompt-tokens", type=int, default=100, help="text prompt length (default 100)")
    how.add_argument("--first-chunk", type=int, default=2, help="frames before the first audio (default 2)")
    how.add_argument("--chunk", type=int, default=8, help="frames per audio chunk after it (default 8)")
    how.add_argument("--copy-mb", type=int, help="size of the bandwidth copy (default 1024 on GPUs, 256 on CPUs)")
    how.add_argument("--baseline-rev", metavar="REV",
                     help="also run csm's own loops (batch 1) as git revision REV had them, with that revision's "
                          "harness, in this run: a before/after of a change (needs a git clone)")
    train = p.add_argument_group("fine-tuning (--task train)")
    train.add_argument("--clip-seconds", type=float, help="each example's audio (default "
                       f"{TRAIN_DEFAULTS['cuda'].clip_seconds:g} s on CUDA, {TRAIN_DEFAULTS['cpu'].clip_seconds:g} s "
                       "on CPUs)")
    train.add_argument("--steps", type=int, help=f"optimizer steps timed (default {TRAIN_DEFAULTS['cuda'].steps} "
                       f"on CUDA, {TRAIN_DEFAULTS['cpu'].steps} on CPUs)")
    train.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (default 2)")
    train.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of both LoRA rows (default 16)")
    train.add_argument("--decoder-fraction", type=float, default=TrainConfig.decoder_fraction,
                       help="share of frames csm's decoder trains on (default 1/16; transformers' rows: all)")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the rows here (default: csm-bench-<time>.json)")
    out.add_argument("--from-json", nargs="+", type=Path, metavar="JSON",
                     help="run nothing: print (and with --append-results, append) the rows of earlier runs "
                          "as one table")
    out.add_argument("--append-results", nargs="?", const=RESULTS_MD, type=Path, metavar="RESULTS_MD",
                     help=f"append a section to {RESULTS_MD.name} (or the file given)")
    serve_task.add_arguments(p)
    a = p.parse_args(argv)
    if a.model and (a.random_weights or a.dims):
        p.error("--model loads a checkpoint: drop --random-weights / --dims")
    check_threads(p, a)
    if a.task == "train":
        check_train_args(p, a)
        return a
    if a.task == "serve":
        serve_task.check_args(p, a)
        return a
    a.batch = a.batch or [1]
    a.preset = a.preset or "csm-1b"
    if any(name in trainers.IMPLS for name in a.impl or []):
        p.error(f"--impl {' '.join(trainers.IMPLS)} are --task train's")
    for name in ("frames", "warmup_frames", "prompt_tokens", "first_chunk", "chunk"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(b < 1 for b in a.batch + a.streams):
        p.error("--batch sizes and --streams must be at least 1")
    return a


def check_threads(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be at least 1")


@dataclass(frozen=True)
class TrainDefaults:
    """--task train's defaults on one kind of device: a GPU's batch is a real run's; a CPU's
    takes about a minute per row on a 2-core machine at the small preset."""

    preset: str
    batch: int
    clip_seconds: float
    steps: int


TRAIN_DEFAULTS = {"cuda": TrainDefaults("csm-1b", 8, 10.0, 10), "cpu": TrainDefaults("small", 2, 4.0, 8)}


def check_train_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.model:
        p.error("--task train runs on random weights: give --preset or --dims, not --model")
    if a.baseline_rev:
        p.error("--baseline-rev compares generation loops: it does not apply to --task train")
    wrong = [name for name in a.impl or [] if name not in trainers.IMPLS]
    if wrong:
        p.error(f"--task train runs {', '.join(trainers.IMPLS)}, not {', '.join(wrong)}")
    if a.dtype and set(a.dtype) - {"float32", "bfloat16"}:
        p.error("--task train runs float32 or bfloat16 (autocast)")
    if any(b < 1 for b in a.batch or []) or (a.steps is not None and a.steps < 1) or a.warmup_steps < 0:
        p.error("--batch and --steps must be at least 1, --warmup-steps at least 0")
    if a.clip_seconds is not None and a.clip_seconds <= 0:
        p.error("--clip-seconds must be positive")
    if a.lora_rank < 1 or not 0 < a.decoder_fraction <= 1:
        p.error("--lora-rank must be at least 1 and --decoder-fraction in (0, 1]")


# --- devices ----------------------------------------------------------------------------------

def resolve_devices(device: str | None) -> tuple[str | None, str]:
    """(torch's device or None where torch has no such device, MLX's device) for --device."""
    import torch

    from csm_torch.loading import pick_device

    mlx = "cpu" if device == "cpu" else "gpu"
    if device == "gpu" or device is None:
        if torch.cuda.is_available():
            return "cuda", mlx
        if torch.backends.mps.is_available():
            return "mps", mlx
        return (None, mlx) if device == "gpu" else ("cpu", "cpu")
    return str(pick_device(device)), mlx


def mlx_installed() -> bool:
    if importlib.util.find_spec("mlx") is None:
        return False
    try:  # the Linux wheel imports only with a compute extra (mlx[cpu] or mlx[cuda13])
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


def chosen_impls(names: list[str] | None, torch_dev: str | None) -> list[engines.Impl]:
    """The implementations asked for, or by default every one that runs here."""
    if names:
        impls = [engines.IMPLS[name] for name in names]
    else:
        impls = list(engines.IMPLS.values())
        if torch_dev == "cpu":
            impls = [i for i in impls if i.cpu_default]
        else:  # torch.compile without a CUDA graph is the GPU's slower variant
            impls = [i for i in impls if i.gpu_default and i.name != "csm-torch-compile"]
        if not mlx_installed():
            impls = [i for i in impls if i.backend != "mlx"]
    if torch_dev is None:
        impls = [i for i in impls if i.backend == "mlx"]
    return [i for i in impls if torch_dev == "cuda" or not i.cuda_only]


def torch_device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    return f"{report.cpu_name()} ({device}{threads})"


def mlx_device_name(device: str) -> str:
    if device == "cpu" or sys.platform == "darwin":
        return f"{report.cpu_name()} ({'mlx ' + device})"
    import torch  # MLX's CUDA build: name the card as torch does

    return f"{torch.cuda.get_device_name()} (mlx)" if torch.cuda.is_available() else "gpu (mlx)"


def default_dtypes(device: str) -> list[str]:
    return ["float32"] if device == "cpu" else ["bfloat16"]


# --- rows -------------------------------------------------------------------------------------

def base_row(impl: engines.Impl, batch: int, target: Target, source: models.ModelSource, a: argparse.Namespace,
             command: str) -> dict:
    """What a row says of where and how it was measured; its figures start as None."""
    row = dict.fromkeys(report.ROW_FIELDS)
    row |= {
        "task": "infer", "impl": impl.name, "backend": impl.backend, "label": impl.label, "device": target.device,
        "dtype": target.dtype, "batch": batch, "model": source.label,
        "params_per_frame": bandwidth.params_per_frame(source.config),
        "bytes_per_frame": bandwidth.bytes_per_frame(source.config, target.dtype),
        "prompt_tokens": a.prompt_tokens, "first_chunk_frames": a.first_chunk,
        "peak_memory_kind": target.meter.kind, "versions": report.versions(), "date": report.today(),
        "command": command,
    }
    return row


def measure_engine_row(make_generator, impl: engines.Impl, streams: int, target: Target, source: models.ModelSource,
                       a: argparse.Namespace, command: str) -> dict:
    """csm's engine with `streams` requests arriving over time (`measure.engine_arrivals`)."""
    row = base_row(impl, streams, target, source, a, command)
    gc.collect()
    try:
        generator = make_generator()
        target.meter.reset()
        run = measure.engine_arrivals(generator, prompt_frames(source, a.prompt_tokens), streams,
                                      a.warmup_frames + a.frames, a.first_chunk, a.chunk,
                                      audio=target.codec is not None)
    except Exception as exc:
        row["error"] = first_line(exc)
        return row
    firsts = sorted(run.first_audio_s)
    if not run.frames_per_s or len(firsts) < streams:
        row["error"] = f"{streams - len(firsts)} of {streams} streams gave no frames"
        return row
    row["peak_memory_gb"] = target.meter.peak() / 1e9
    row["frames_timed"] = streams * (a.warmup_frames + a.frames)
    row["frames_per_s_aggregate"] = run.frames_per_s
    row["frames_per_s_per_stream"] = run.frames_per_s / streams
    row["ms_per_frame"] = 1000 / row["frames_per_s_per_stream"]
    row["ttfa_ms"] = firsts[len(firsts) // 2] * 1000  # the median stream's
    row["ttfa_max_ms"] = firsts[-1] * 1000
    row["arrival_ms"] = run.arrival_s * 1000
    what = "first audio" if run.audio else f"first codes (no audio: {target.codec_error})"
    row["notes"] = (f"{streams} streams of {row['frames_timed'] // streams} frames, "
                    f"one every {row['arrival_ms']:.0f} ms; "
                    f"{what}: median {row['ttfa_ms']:.0f} ms, worst {row['ttfa_max_ms']:.0f} ms; "
                    "frames/s over first submission to last end")
    return row


def measure_row(make_engine, impl: engines.Impl, batch: int, target: Target, source: models.ModelSource,
                a: argparse.Namespace, command: str) -> dict:
    per_frame = bandwidth.bytes_per_frame(source.config, target.dtype)
    row = base_row(impl, batch, target, source, a, command)
    notes = []
    gc.collect()
    try:
        engine = make_engine()
        target.meter.reset()  # after building: what stays allocated counts, transient build copies do not
        steady = measure.steady_state(engine, a.warmup_frames, a.warmup_frames + a.frames)
    except engines.BatchingMissing as exc:
        row["error"] = str(exc)
        return row
    except Exception as exc:  # one failing implementation (a compile error, say) must not end the matrix
        row["error"] = first_line(exc)
        return row
    audio, audio_error = None, target.codec_error
    if batch == 1 and target.codec is not None:
        try:
            audio = measure.streamed_audio(engine, target.codec, a.warmup_frames + a.frames, a.first_chunk, a.chunk)
        except Exception as exc:  # keep the frame loop's figures when only the audio side fails
            audio_error = first_line(exc)
    row["peak_memory_gb"] = target.meter.peak() / 1e9
    row["setup_s"] = steady.setup_s
    row["frames_timed"] = steady.frames_timed
    row["frames_per_s_aggregate"] = steady.frames_per_s
    row["frames_per_s_per_stream"] = steady.frames_per_s / batch
    row["ms_per_frame"] = 1000 / row["frames_per_s_per_stream"]
    row["_codes"] = steady.codes[0]
    if target.bandwidth:
        row["copy_bandwidth_gb_s"] = target.bandwidth / 1e9
        row["bound_frames_per_s"] = target.bandwidth / per_frame
        row["bound_ratio"] = steady.frames_per_s / row["bound_frames_per_s"]
    if audio is not None:
        row["rtf_with_mimi"] = audio.real_time_factor
        row["ttfa_ms"] = audio.first_audio_s * 1000
        row["mimi_decoder"] = audio.decoder
        if audio.decoder != measure.STREAMING:
            notes.append("Mimi: per-block decode stand-in")
    elif batch > 1:
        notes.append("throughput only (no audio per stream)")
    else:
        notes.append(f"no audio: {audio_error}")
    if impl.backend == "transformers":
        notes.append("no streaming: first audio after the whole call")
    if batch > 1:
        notes.append("bound is batch 1's")
    row["notes"] = "; ".join(notes) or None
    return row


def mark_code_matches(rows: list[dict]) -> None:
    """Greedy codes of the short call, against the first row of the same dtype: the fraction of
    frames that are equal (1.0 = same weights, same numerics; bf16 drifts, float32 should not)."""
    firsts: dict[str, dict] = {}
    for row in rows:
        codes = row.pop("_codes", None)
        if codes is None:
            continue
        ref = firsts.setdefault(row["dtype"], {"codes": codes})["codes"]
        n = min(len(ref), len(codes))
        row["codes_match_first_row"] = float((ref[:n] == codes[:n]).all(axis=1).mean()) if n else None


def torch_rows(impls, a, source, device: str, dtype: str, command: str, log) -> list[dict]:
    import torch

    from csm_torch.loading import DTYPES, fuse_for_inference

    # transformers' rows share the unfused weights: they run before csm's fuse them
    torch_impls = sorted((i for i in impls if i.backend in ("torch", "transformers")),
                         key=lambda i: i.backend != "transformers")
    fused = False
    if not torch_impls:
        return []
    log(f"building the torch model ({source.label}, {dtype}, {device}) ...")
    model = models.torch_model(source, torch.device(device), DTYPES[dtype])
    meter = measure.CudaMemory() if device == "cuda" else measure.ProcessMemory()
    copy_bytes = (a.copy_mb or (256 if device == "cpu" else 1024)) * 2**20
    codec, codec_error = None, None
    try:
        codec = models.torch_mimi(source, device, a.mimi)
    except Exception as exc:  # moshi is not installed everywhere (the GPU image lacks it)
        codec_error = first_line(exc)
    target = Target("torch", torch_device_name(device), dtype, meter,
                    bandwidth.torch_copy_bandwidth(device, copy_bytes), codec, codec_error)
    prompt = prompt_frames(source, a.prompt_tokens)
    rows = []
    for impl in torch_impls:
        if impl.backend == "torch" and not fused:
            fuse_for_inference(model)  # as csm's torch backend runs it (transformers' rows come first)
            fused = True
        for batch in sizes(impl, a):
            log(f"  {impl.label}, {'streams' if impl.arrivals else 'batch'} {batch} ...")
            if impl.backend == "torch":
                rows.append(csm_row(impl, batch, model, codec, prompt, target, source, a, command))
            else:
                make = lambda impl=impl: engines.TransformersEngine(  # noqa: E731
                    engines.transformers_model(model), prompt_ids(source, a.prompt_tokens),
                    a.warmup_frames + a.frames, static_compile=impl.compile)
                rows.append(measure_row(make, impl, batch, target, source, a, command))
            log("    " + summary(rows[-1]))
            if impl.compile:
                torch._dynamo.reset()  # drop compiled graphs (and their recompile budget) between rows
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def mlx_rows(impls, a, source, device: str, dtype: str, command: str, log) -> list[dict]:
    mlx_impls = [i for i in impls if i.backend == "mlx"]
    if not mlx_impls:
        return []
    import mlx.core as mx

    from csm_mlx.loading import DTYPES, pick_device

    mx.set_default_device(pick_device(device))
    log(f"building the MLX model ({source.label}, {dtype}, {device}) ...")
    model = models.mlx_model(source, DTYPES[dtype])
    codec, codec_error = None, None
    try:
        codec = models.mlx_mimi(source, a.mimi)
    except Exception as exc:
        codec_error = first_line(exc)
    copy_bytes = (a.copy_mb or (256 if device == "cpu" else 1024)) * 2**20
    target = Target("mlx", mlx_device_name(device), dtype, measure.MlxMemory(),
                    bandwidth.mlx_copy_bandwidth(copy_bytes), codec, codec_error)
    prompt = prompt_frames(source, a.prompt_tokens)
    rows = []
    for impl in mlx_impls:
        for batch in sizes(impl, a):
            log(f"  {impl.label}, {'streams' if impl.arrivals else 'batch'} {batch} ...")
            rows.append(csm_row(impl, batch, model, codec, prompt, target, source, a, command))
            log("    " + summary(rows[-1]))
    return rows


def csm_row(impl: engines.Impl, batch: int, model, codec, prompt, target: Target, source: models.ModelSource,
            a: argparse.Namespace, command: str) -> dict:
    """One of csm's rows: the engine under arrivals, or its frame loop at a fixed batch."""
    if impl.arrivals:
        make = lambda: engines.Generator(engines.backend(impl, model, codec), tokenizer=None)  # noqa: E731
        return measure_engine_row(make, impl, batch, target, source, a, command)
    return measure_row(lambda: engines.loop_engine(impl, model, prompt, batch), impl, batch, target, source, a, command)


def sizes(impl: engines.Impl, a: argparse.Namespace) -> list[int]:
    """Batch sizes (or stream counts, for the engine rows) to run `impl` at."""
    if impl.arrivals:
        return a.streams
    return a.batch if impl.batched else [1]


def prompt_ids(source: models.ModelSource, n: int) -> list[int]:
    """n text token ids, never a special one's low ids, always inside the vocabulary."""
    vocab = source.config.text_vocab_size
    return [1 + i % (vocab - 1) for i in range(n)]


def prompt_frames(source: models.ModelSource, n: int):
    return text_frames(prompt_ids(source, n), source.config.audio_num_codebooks)


def summary(row: dict) -> str:
    if row["error"]:
        return f"skipped: {row['error']}"
    parts = [f"{row['frames_per_s_per_stream']:.1f} frames/s per stream"]
    if row["rtf_with_mimi"] is not None:
        parts.append(f"RTF {row['rtf_with_mimi']:.3f}, first audio {row['ttfa_ms']:.0f} ms")
    if row["bound_ratio"] is not None:
        parts.append(f"{row['bound_ratio']:.1%} of bound")
    return ", ".join(parts)


def model_source(a: argparse.Namespace) -> models.ModelSource:
    if a.model:
        from csm.checkpoint import open_checkpoint
        from csm.hub import resolve_model

        path = resolve_model(a.model)
        return models.ModelSource(open_checkpoint(path).config, path=path)
    config = models.parse_dims(a.dims) if a.dims else models.ALL_PRESETS[a.preset]
    return models.ModelSource(config, seed=a.seed)


def run(a: argparse.Namespace, command: str, log=lambda line: None) -> list[dict]:
    """Every row of the matrix the arguments ask for."""
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.task == "train":
        return train_rows(a, command, log)
    if a.task == "serve":
        device = resolve_devices(a.device)[0] or "cpu"
        return serve_task.run(a, model_source(a), device, torch_device_name(device), command, log)
    source = model_source(a)
    check_fits(a.prompt_tokens, a.warmup_frames + a.frames, source.config.backbone.max_seq_len)
    torch_dev, mlx_dev = resolve_devices(a.device)
    impls = chosen_impls(a.impl, torch_dev)
    rows = []
    for dtype in a.dtype or default_dtypes(torch_dev or mlx_dev):
        if torch_dev is not None:
            rows += torch_rows(impls, a, source, torch_dev, dtype, command, log)
        rows += mlx_rows(impls, a, source, mlx_dev, dtype, command, log)
    mark_code_matches(rows)
    return rows


def train_rows(a: argparse.Namespace, command: str, log) -> list[dict]:
    """--task train: every fine-tuning implementation asked for, on torch's device."""
    device = resolve_devices(a.device)[0]
    if device == "mps" and a.device is None:
        device = "cpu"  # TorchTrainer's own choice on a Mac unless told
    if device not in TRAIN_DEFAULTS:
        raise CsmError(f"--task train runs on CUDA or a CPU, not {device or a.device}")
    defaults = TRAIN_DEFAULTS[device]
    a.preset = a.preset or defaults.preset
    source = model_source(a)
    impls = [trainers.IMPLS[name] for name in a.impl or trainers.IMPLS]
    if not a.impl and not mlx_installed():
        impls = [i for i in impls if i.library != "csm-mlx"]
    rows = []
    for dtype in a.dtype or default_dtypes(device):
        settings = trainers.TrainSettings(device, dtype, a.lora_rank, a.decoder_fraction, a.seed)
        rows += train_task.run(impls, source, a.batch or [defaults.batch], a.clip_seconds or defaults.clip_seconds,
                               a.warmup_steps, a.steps or defaults.steps, settings, torch_device_name(device),
                               command, log)
    return rows


def baseline_rows(a: argparse.Namespace, rev: str, log) -> list[dict]:
    """Batch-1 rows of csm's loops at revision `rev`, measured by that revision's own harness in
    a subprocess over the same model, device and protocol; their impl names get `@rev`."""
    names = [i.name for i in chosen_impls(a.impl, resolve_devices(a.device)[0])
             if i.backend in ("torch", "mlx") and not i.arrivals]
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=root, capture_output=True)
        if archive.returncode != 0:
            raise CsmError(f"--baseline-rev {rev}: {archive.stderr.decode().strip() or 'git archive failed'}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        out = Path(tmp) / "rows.json"
        argv = [sys.executable, "-m", "benchmarks", "--impl", *names, "--batch", "1", "--json", str(out),
                "--frames", str(a.frames), "--warmup-frames", str(a.warmup_frames),
                "--prompt-tokens", str(a.prompt_tokens),
                "--first-chunk", str(a.first_chunk), "--chunk", str(a.chunk), "--seed", str(a.seed)]
        for flag, value in (("--model", a.model), ("--dims", a.dims), ("--device", a.device), ("--mimi", a.mimi),
                            ("--copy-mb", a.copy_mb)):
            if value is not None:
                argv += [flag, str(value)]
        if not (a.model or a.dims):
            argv += ["--preset", a.preset]
        if a.dtype:
            argv += ["--dtype", *a.dtype]
        log(f"revision {rev}'s harness: {shlex.join(argv[1:])} ...")
        done = subprocess.run(argv, cwd=tmp, env={**os.environ, "PYTHONPATH": tmp}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not out.exists():
            last_error = done.stderr.strip().splitlines()[-1:] or done.returncode
            raise CsmError(f"revision {rev}'s harness failed: {last_error}")
        rows = json.loads(out.read_text())
    for row in rows:
        row.update(impl=f"{row['impl']}@{rev}", label=f"{row['label']} (at {rev})")
    return [dict.fromkeys(report.ROW_FIELDS) | row for row in rows]


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            rows += json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CsmError(f"cannot read benchmark rows from {path}: {exc}") from None
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    command = "python -m benchmarks " + shlex.join(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        rows = read_rows(a.from_json) if a.from_json else run(a, command, log)
        if a.baseline_rev and not a.from_json:
            rows += baseline_rows(a, a.baseline_rev, log)
    except CsmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("error: nothing to run (no implementation of those runs on this device)", file=sys.stderr)
        return 2
    if not a.from_json:
        path = a.json or Path(f"csm-bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.write_text(json.dumps(rows, indent=2) + "\n")
        log(f"rows written to {path}")
    print(report.markdown_section(rows))
    if a.append_results:
        report.append_results(a.append_results, rows)
        log(f"section appended to {a.append_results}")
    if sys.platform == "darwin":
        log("\n" + MAC_GUIDE)
    return 0
