"""Steady-state time per frame of the torch frame loop (prefill excluded), eager and CUDA graph,
plus the kernel count of one frame: where the time of a frame goes.

    python -m benchmarks.frame_time [--preset csm-1b] [--dtype bfloat16] [--frames 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.random_checkpoint import write_random_checkpoint
from csm.checkpoint import open_checkpoint
from csm.config import PRESETS
from csm.prompt import text_frames
from csm.sampling import SamplingParams
from csm_torch.generator import FrameGenerator, load_model


def steady_ms_per_frame(gen: FrameGenerator, prompt, params, frames: int) -> float:
    gen.generate(prompt.tokens, prompt.mask, 4, params, seed=0)  # warm-up (and graph capture)
    short = time_call(lambda: gen.generate(prompt.tokens, prompt.mask, 8, params, seed=0))
    long = time_call(lambda: gen.generate(prompt.tokens, prompt.mask, 8 + frames, params, seed=0))
    return (long - short) * 1000 / frames  # the prefill and fixed costs cancel out


def time_call(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def kernels_per_frame(gen: FrameGenerator, prompt, params) -> int:
    from torch.profiler import ProfilerActivity, profile

    gen.generate(prompt.tokens, prompt.mask, 2, params, seed=0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(prompt.tokens, prompt.mask, 3, params, seed=0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof2:
        gen.generate(prompt.tokens, prompt.mask, 2, params, seed=0)
    count = lambda p: sum(e.count for e in p.key_averages() if e.device_type.name == "CUDA")  # noqa: E731
    return count(prof) - count(prof2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--frames", type=int, default=100)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", PRESETS[a.preset], "csm", getattr(torch, a.dtype))
        model = load_model(open_checkpoint(ckpt), torch.device("cuda"), getattr(torch, a.dtype))
    prompt = text_frames(list(range(1, 101)), model.config.audio_num_codebooks)  # a 100-token prompt
    result = {"preset": a.preset, "dtype": a.dtype, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, params in (("greedy", SamplingParams(topk=1)), ("topk50", SamplingParams(temperature=0.9, topk=50))):
        for graph, compiled in ((False, False), (True, False), (True, True)):
            gen = FrameGenerator(model, cuda_graph=graph, compile=compiled)
            ms = steady_ms_per_frame(gen, prompt, params, a.frames if graph else a.frames // 4)
            key = f"{'graph' if graph else 'eager'}{'_compiled' if compiled else ''}_{name}"
            result[key] = {"ms_per_frame": round(ms, 2), "frames_per_s": round(1000 / ms, 1)}
            if not graph and name == "greedy":
                result["kernels_per_frame"] = kernels_per_frame(gen, prompt, params)
    prefill = FrameGenerator(model)
    t = time_call(lambda: prefill.generate(prompt.tokens, prompt.mask, 1, SamplingParams(topk=1)))
    result["first_frame_ms_100_token_prompt"] = round(t * 1000, 1)
    result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    main()
