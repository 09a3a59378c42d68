"""Batches by a frame budget, with length bucketing; the order is a function of (seed, epoch).

Examples of similar length go together so little of a batch is padding: each epoch shuffles the
examples, sorts them by length inside windows of a few batches (so the order stays random from
one window to the next), cuts batches of at most `batch_size` examples and `batch_frames`
padded positions (examples x longest), and shuffles the batches. Everything is drawn from a
generator seeded by (seed, epoch), so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

import numpy as np

from csm.errors import CsmError

WINDOW_BATCHES = 16  # sort by length inside windows of this many batches' worth of examples


def epoch_batches(lengths: list[int] | np.ndarray, batch_size: int, batch_frames: int, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[int]]:
    """Example indices per batch, for one epoch."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    too_long = np.flatnonzero(lengths > batch_frames)
    if len(too_long):
        raise CsmError(f"an example needs {int(lengths.max())} positions, more than batch_frames={batch_frames}: "
                       "raise batch_frames")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    window = batch_size * WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        current: list[int] = []
        longest = 0
        for i in chunk:
            new_longest = max(longest, int(lengths[i]))
            if current and (len(current) == batch_size or new_longest * (len(current) + 1) > batch_frames):
                batches.append(current)
                current, new_longest = [], int(lengths[i])
            current.append(int(i))
            longest = new_longest
        if current:
            batches.append(current)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.0) -> float:
    """Learning rate before optimizer step `step` (0-based): linear warmup over `warmup_steps`
    optimizer steps, then cosine decay to `min_ratio * base_lr` at `total_steps`. A function of
    the step alone, so resuming needs no scheduler state."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return float(base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * progress))))
