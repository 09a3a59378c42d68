"""Write a random checkpoint of any preset (csm-1b by default) in a real file layout, without
ever holding it twice in memory: tensors are drawn and written one file at a time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from csm.config import PRESETS, CsmConfig, to_official_dict, to_transformers_dict
from csm.weights import expected_shapes, from_csm_name


def write_random_checkpoint(out: Path, config: CsmConfig, fmt: str = "official", dtype=torch.bfloat16,
                            seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            fan_in = shape[-2] if name == "audio_head" else shape[-1]
            t = (torch.randn(shape, generator=gen, dtype=torch.float32) / fan_in**0.5).to(dtype)
        tensors[from_csm_name(name, fmt)] = t  # random weights: no RoPE permutation needed
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
