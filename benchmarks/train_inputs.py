"""What the training task trains on: a random checkpoint folder and a fixed synthetic batch.

The folder is a real checkpoint as `CSMFineTuner` opens one (config.json, model.safetensors,
tokenizer.json), holding `models.random_tensors` in float32, so every implementation starts
from the very same weights, read from the same file. The tokenizer is a byte-level one with
Llama-3's special tokens: no download, and its ids fit every preset's text vocabulary.

The batch is `batch` one-turn examples, each `clip_seconds` of random Mimi codes after a short
text, all the same length (so no row pays for padding the others do not), built into frames by
the fine-tuner itself, as a real run builds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import models
from csm.mimi_files import CODEBOOK_SIZE, FRAME_MS
from csm.training.examples import Example, TrainingFrames, Turn


def write_checkpoint(folder: Path, source: models.ModelSource) -> Path:
    """`source`'s random weights as a csm-layout checkpoint folder with a tokenizer."""
    import torch
    from safetensors.torch import save_file

    from csm.weights import from_csm_name

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {from_csm_name(name, "csm"): t.to(torch.float32).contiguous()
               for name, t in models.random_tensors(source.config, source.seed)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (folder / "config.json").write_text(json.dumps(source.config.to_dict(), indent=2))
    write_byte_tokenizer(folder / "tokenizer.json")
    return folder


def write_byte_tokenizer(path: Path) -> Path:
    """A byte-level BPE without merges (ids 0..255) plus <|begin_of_text|> and <|end_of_text|>."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.save(str(path))
    return path


def clip_frames(clip_seconds: float) -> int:
    return max(1, round(clip_seconds * 1000 / FRAME_MS))


def synthetic_examples(batch: int, clip_seconds: float, seed: int = 0) -> list[Example]:
    """`batch` examples of one trained turn: a short text, then random codes."""
    rng = np.random.default_rng(seed)
    frames = clip_frames(clip_seconds)
    return [Example(f"clip{i:03d}", [Turn(speaker=0, text=f"Synthetic clip number {i:03d}.",
                                          codes=rng.integers(0, CODEBOOK_SIZE, (frames, 32)))])
            for i in range(batch)]


def training_frames(folder: Path, examples: list[Example]) -> list[TrainingFrames]:
    """The examples as frames, through the fine-tuner's own path (its tokenizer, context fitting)."""
    import tempfile

    from csm.training.tuner import CSMFineTuner

    with tempfile.TemporaryDirectory() as out:  # nothing is written: the model is not built here
        return CSMFineTuner(model_path=str(folder), output_dir=out).frames(examples)
