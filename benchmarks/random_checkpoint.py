"""Write a random checkpoint of any preset (csm-1b by default) in a real file layout, without
ever holding it twice in memory: tensors are drawn and written one file at a time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from csm.config import PRESETS, CsmConfig, to_official_dict, to_transformers_dict
from csm.training.init_model import random_weights
from csm.weights import from_csm_name


def write_random_checkpoint(out: Path, config: CsmConfig, fmt: str = "official", dtype=torch.bfloat16,
                            seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    # the package's initialisation (csm-finetune init draws the same), cast one tensor at a time
    for name, t in random_weights(config, seed):
        tensors[from_csm_name(name, fmt)] = t.to(dtype)  # random weights: no RoPE permutation needed
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    to_dict = {"official": to_official_dict, "transformers": to_transformers_dict}.get(fmt, CsmConfig.to_dict)
    config_dict = to_dict(config)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="csm-1b", choices=sorted(PRESETS))
    p.add_argument("--format", default="official", choices=["official", "transformers", "csm"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args()
    write_random_checkpoint(a.out, PRESETS[a.preset], a.format, getattr(torch, a.dtype))
    print(a.out)
