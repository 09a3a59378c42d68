"""Frames per second of csm's frame loop against transformers' `generate`, same random weights.

    python -m benchmarks.vs_transformers [--preset csm-1b] [--device cpu] [--dtype float32] [--frames 8]

Both run greedy (top-k 1) from the same text prompt in separate processes, one after the other,
on a random checkpoint written in the transformers layout. A frame is 1 backbone step + 31
decoder steps; the figure is frames / wall time of the whole call (prefill included), after
one warm-up call of the same length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT_TOKENS = 24

_OURS = r"""
import json, sys, time, numpy as np, torch
from csm.checkpoint import open_checkpoint
from csm.prompt import text_frames
from csm.sampling import SamplingParams
from csm_torch.generator import FrameGenerator, load_model
d, device, dtype, frames, n = sys.argv[1], torch.device(sys.argv[2]), getattr(torch, sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(torch.get_num_threads())
model = load_model(open_checkpoint(d), device, dtype)
graph = sys.argv[6] == "graph"
gen = FrameGenerator(model, cuda_graph=graph)
prompt = text_frames(list(range(1, n + 1)), model.config.audio_num_codebooks)
p = SamplingParams(topk=1)
def run():
    t = time.perf_counter()
    codes = gen.generate(prompt.tokens, prompt.mask, frames, p)
    if device.type == "cuda": torch.cuda.synchronize()
    return time.perf_counter() - t, codes
run()
elapsed, codes = run()
print(json.dumps({"impl": "csm cuda graph" if graph else "csm eager", "frames": len(codes), "seconds": elapsed, "codes": codes.tolist()}))
"""

_THEIRS = r"""
import json, sys, time, torch, warnings
warnings.filterwarnings("ignore")
from transformers import CsmForConditionalGeneration
from transformers.utils import logging; logging.set_verbosity_error()
d, device, dtype, frames, n = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = CsmForConditionalGeneration.from_pretrained(d, dtype=dtype).to(device).eval()
ids = torch.arange(1, n + 1, device=device)[None]
def run():
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=frames, min_new_tokens=frames)
    if device == "cuda": torch.cuda.synchronize()
    return time.perf_counter() - t, out[0]
run()
elapsed, codes = run()
print(json.dumps({"impl": "transformers generate (eager)", "frames": int(codes.shape[0]), "seconds": elapsed, "codes": codes.tolist()}))
"""


def _run(script: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--dir", type=Path, help="reuse a transformers-layout checkpoint folder")
    a = p.parse_args()

    import torch

    from benchmarks.random_checkpoint import write_random_checkpoint
    from csm.config import PRESETS

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.dir or write_random_checkpoint(Path(tmp) / "ckpt", PRESETS[a.preset], "transformers", getattr(torch, a.dtype))
        rows = [_run(_OURS, ckpt, a.device, a.dtype, a.frames, PROMPT_TOKENS, "eager")]
        if a.device.startswith("cuda"):
            rows.append(_run(_OURS, ckpt, a.device, a.dtype, a.frames, PROMPT_TOKENS, "graph"))
        rows.append(_run(_THEIRS, ckpt, a.device, a.dtype, a.frames, PROMPT_TOKENS))
    same = all(r["codes"] == rows[-1]["codes"] for r in rows)
    for r in rows:
        r["frames_per_s"] = r["frames"] / r["seconds"]
    for r in rows:
        del r["codes"]
    print(json.dumps({"preset": a.preset, "device": a.device, "dtype": a.dtype, "same_codes": same,
                      "speedup_over_transformers": {r["impl"]: r["frames_per_s"] / rows[-1]["frames_per_s"] for r in rows[:-1]},
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
