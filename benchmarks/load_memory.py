"""Peak memory of loading a checkpoint on the CPU, against its size on disk.

    python -m benchmarks.load_memory [--dir DIR] [--format official] [--dtype bfloat16]

Writes a random csm-1b checkpoint (3.1 GB in bf16) unless --dir is given, then loads it in a
fresh process as `csm.load` does (`TorchBackend`: the loader, then the fusion of q/k/v and
gate/up weights, then the frame loop's static caches) and reports that process's peak resident memory, both
whole and above the baseline of an interpreter that has imported torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch

def high_water_mark():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from csm.checkpoint import open_checkpoint
from csm_torch.backend import TorchBackend
base = high_water_mark()
t = time.perf_counter()
model = TorchBackend(open_checkpoint(sys.argv[1]), device="cpu", dtype=sys.argv[2]).model
elapsed = time.perf_counter() - t
peak_load = high_water_mark()
# safetensors tensors may still be lazily mapped: read every weight once so the figure
# counts the whole model resident, as it is once generation starts
for p in model.parameters():
    p.sum()
peak = high_water_mark()
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"baseline_bytes": base, "peak_after_load_bytes": peak_load, "peak_bytes": peak, "load_s": elapsed,
                  "params": params}))
"""


def measure(ckpt_dir: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt_dir), dtype], check=True, capture_output=True,
                         text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    disk = (sum(f.stat().st_size for f in ckpt_dir.glob("*.safetensors"))
            + sum(f.stat().st_size for f in ckpt_dir.glob("*.pt")))
    result |= {
        "disk_bytes": disk,
        "peak_over_disk": result["peak_bytes"] / disk,
        "peak_above_baseline_over_disk": (result["peak_bytes"] - result["baseline_bytes"]) / disk,
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, help="an existing checkpoint folder (default: write a random csm-1b)")
    p.add_argument("--format", default="official", choices=["official", "transformers", "csm"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args()
    if a.dir:
        print(json.dumps(measure(a.dir, a.dtype), indent=2))
        return
    import torch

    from benchmarks.random_checkpoint import write_random_checkpoint
    from csm.config import PRESETS

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", PRESETS["csm-1b"], a.format, getattr(torch, a.dtype))
        print(json.dumps(measure(ckpt, a.dtype), indent=2))


if __name__ == "__main__":
    main()
