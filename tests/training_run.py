"""A fine-tuning run as its own process (for the resume and torchrun tests): two fixed clips of
random codes on the tiny model in `argv[1]`, written to `argv[2]`; `argv[3:]` are settings as
key=value (ints, floats, bools as given)."""

from __future__ import annotations

import sys

import numpy as np

from csm.training.examples import Example, Turn
from csm.training.tuner import CSMFineTuner

CLIPS = [("Short one.", 6), ("A much longer sentence for the second clip.", 15), ("Third.", 4),
         ("And a fourth clip here.", 9)]


def examples() -> list[Example]:
    rng = np.random.default_rng(0)
    return [Example(f"clip{i}", [Turn(0, text, rng.integers(0, 2048, (frames, 32)))])
            for i, (text, frames) in enumerate(CLIPS)]


def parse(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value, value)


if __name__ == "__main__":
    settings = dict(arg.split("=", 1) for arg in sys.argv[3:])
    if settings.get("backend") != "mlx":  # an MLX run never touches torch
        import torch

        torch.set_num_threads(1)
    resume = settings.pop("resume", "false") == "true"
    tuner = CSMFineTuner(model_path=sys.argv[1], output_dir=sys.argv[2], precision="float32",
                         **{k: parse(v) for k, v in settings.items()})
    tuner.train(examples(), resume=resume)
