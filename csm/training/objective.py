"""The training objective, once, as data and index arithmetic (numpy); a backend only does the
tensor part (embed, run the stacks, gather, cross-entropy) from the indices chosen here.

For a padded batch of examples (`collate`):

- **codebook 0** (the backbone's head): at every trained audio frame, the EOS frame included.
  Frame t + 1 is predicted from the backbone state at position t (`c0_rows` -> `frame_rows`).
- **codebooks 1..31** (the decoder): on a fixed count of the trained frames, `decoder_fraction`
  of them (1/16 by default, rounded up) drawn at random, plus every EOS frame (and at least one
  frame per example). The decoder runs on
  `[h_t, E(c0), ..., E(c30)]` of the frame (32 positions) and position k predicts codebook k.
  The count is fixed per batch (not a per-frame coin): every step has the same shape for a
  given batch, and the loss is an unbiased mean over the frames' codebooks.
- `total = semantic_weight * CE0 + acoustic_weight * mean(CE1..31)`, each term a mean over its
  frames (and codebooks). With every frame in the decoder and both weights 1 this is exactly
  transformers' `CsmForConditionalGeneration` loss (backbone loss + depth-decoder loss).

Padding is on the right, and attention is causal, so a padded position never reaches a real one.
Validation uses every frame (`fraction=1`), so its loss has no sampling noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from csm.training.examples import TrainingFrames


@dataclass
class Batch:
    tokens: np.ndarray  # [B, T, 33] int64, right-padded with zeros
    mask: np.ndarray  # [B, T, 33] bool, False on padding
    trained: np.ndarray  # [B, T] bool
    lengths: np.ndarray  # [B] real positions per example

    @property
    def num_trained_frames(self) -> int:
        return int(self.trained.sum())


def collate(examples: list[TrainingFrames], pad_to_multiple: int = 1) -> Batch:
    """Right-pad examples to one length (rounded up to `pad_to_multiple`, which bounds the number
    of distinct shapes a compiled step sees)."""
    lengths = np.array([len(e) for e in examples])
    t = int(math.ceil(lengths.max() / pad_to_multiple) * pad_to_multiple)
    width = examples[0].tokens.shape[1]
    tokens = np.zeros((len(examples), t, width), dtype=np.int64)
    mask = np.zeros((len(examples), t, width), dtype=bool)
    trained = np.zeros((len(examples), t), dtype=bool)
    for i, e in enumerate(examples):
        n = len(e)
        tokens[i, :n], mask[i, :n], trained[i, :n] = e.tokens, e.mask, e.trained
    return Batch(tokens, mask, trained, lengths)


@dataclass
class FrameSelection:
    """Flat indices into the batch's B * T positions.

    c0_rows [N]: the position whose backbone state predicts each trained frame;
    frame_rows [N]: that trained frame's position (its codes are the targets);
    decoder [K]: which of the N frames the decoder loss covers (indices into 0..N-1, sorted);
    example [N]: the example each frame belongs to; is_eos [N].
    """

    c0_rows: np.ndarray
    frame_rows: np.ndarray
    decoder: np.ndarray
    example: np.ndarray
    is_eos: np.ndarray

    @property
    def num_frames(self) -> int:
        return len(self.frame_rows)

    @property
    def num_decoder_frames(self) -> int:
        return len(self.decoder)


def decoder_frame_count(num_frames: int, num_required: int, fraction: float) -> int:
    """K: the fixed count of decoder frames for a batch: the required ones (EOS frames) plus
    `fraction` of the others, rounded up. The EOS frames come on top of the share, not out of
    it: in a small batch they would otherwise be all the decoder ever sees."""
    return min(num_frames, num_required + math.ceil((num_frames - num_required) * fraction))


def select_frames(batch: Batch, fraction: float = 1 / 16, rng: np.random.Generator | None = None) -> FrameSelection:
    """The frames each loss term covers (see the module doc). `fraction=1` (or no `rng`) puts
    every frame in the decoder."""
    b, t = batch.trained.shape
    trained = batch.trained.copy()
    trained[:, 0] = False  # nothing predicts position 0 (a prompt starts with text anyway)
    ex, pos = np.nonzero(trained)  # row-major: sorted by example, then position
    frame_rows = ex * t + pos
    c0_rows = frame_rows - 1
    # an EOS frame is the last audio frame of its turn: the next position is text, padding or the end
    audio = batch.mask[..., :-1].any(-1)
    next_is_audio = np.zeros_like(audio)
    next_is_audio[:, :-1] = audio[:, 1:]
    is_eos = (audio & ~next_is_audio)[ex, pos]
    n = len(frame_rows)
    if fraction >= 1 or rng is None:
        decoder = np.arange(n)
    else:
        required = np.zeros(n, dtype=bool)
        required[is_eos] = True
        # at least one frame per example: an example without an EOS frame in the batch (none in
        # practice, every trained turn ends with one) gets one random frame
        for e in np.unique(ex):
            if not required[ex == e].any():
                required[rng.choice(np.flatnonzero(ex == e))] = True
        k = decoder_frame_count(n, int(required.sum()), fraction)
        rest = np.flatnonzero(~required)
        extra = rng.choice(rest, size=k - int(required.sum()), replace=False) if k > required.sum() else rest[:0]
        decoder = np.sort(np.concatenate([np.flatnonzero(required), extra]))
    return FrameSelection(c0_rows=c0_rows, frame_rows=frame_rows, decoder=decoder, example=ex, is_eos=is_eos)


@dataclass(frozen=True)
class LossWeights:
    semantic: float = 1.0
    acoustic: float = 1.0
