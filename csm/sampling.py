"""Sampling semantics, shared by every backend (only the tensor code differs).

A request's sampling is one frozen `Sampling`, built once where the user's arguments come in
and passed through unchanged. For each of a frame's 32 codebooks, in the order of transformers'
logits warpers:

1. temperature: the logits are divided by it;
2. top-k: only the k largest stay;
3. top-p (nucleus): of those, sorted by probability, the smallest set whose cumulative
   probability exceeds p stays (tokens whose ascending cumulative probability is <= 1 - p are
   dropped, the most probable token always stays); p = 1.0 keeps the top-k set as it is, which
   is Sesame's sampling;
4. one code is drawn from the softmax of what stayed.

top-k 1 or temperature 0 is greedy: the arg-max, deterministic, which is what parity tests use.

The draw: each stream has its own random generator, seeded from `seed` (a random seed when
None). Per frame it draws one Exp(1) variate E[j] per codebook and rank j < top-k, and the code
is the kept candidate of rank j (candidates sorted by probability) with the largest p[j] / E[j]
(an exponential race: exactly a draw from p, with no host synchronisation). A stream draws the
same amount whatever runs beside it, and ranks do not depend on how many candidates a batch
sorts, so a stream's codes depend only on its seed and its own logits.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from csm.errors import CsmError
from csm.mimi_files import FRAME_MS

DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOPK = 50
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_AUDIO_LENGTH_MS = 90_000


@dataclass(frozen=True)
class Sampling:
    """How one request samples, and for how long. Bad values raise `CsmError` naming the fix."""

    temperature: float = DEFAULT_TEMPERATURE
    topk: int = DEFAULT_TOPK
    top_p: float = DEFAULT_TOP_P
    max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS
    seed: int | None = None

    def __post_init__(self):
        if not _is_real(self.temperature) or not self.temperature >= 0 or math.isinf(self.temperature):
            raise CsmError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, numbers.Integral) or self.topk < 1:
            raise CsmError(f"top-k must be a whole number >= 1 (1 means greedy), got {self.topk!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise CsmError(f"top-p must be in (0, 1] (1.0 keeps every top-k code), got {self.top_p!r}")
        if not _is_real(self.max_audio_length_ms) or not self.max_audio_length_ms > 0:
            raise CsmError(f"max audio length must be positive, got {self.max_audio_length_ms!r} ms")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not 0 <= self.seed < 2**63):
            raise CsmError(f"seed must be a whole number in [0, 2**63) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.topk == 1 or self.temperature == 0

    @property
    def max_frames(self) -> int:
        """Frames the request may generate at most (80 ms each, at least one)."""
        return max(1, int(self.max_audio_length_ms // FRAME_MS))

    def with_seed(self, seed: int | None) -> Sampling:
        return Sampling(self.temperature, self.topk, self.top_p, self.max_audio_length_ms, seed)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def row_settings(sampling: Sampling) -> tuple[float, int, float]:
    """(temperature, top-k, top-p) as a batched sampler applies them to one row: a greedy row is
    top-k 1 at temperature 1, whose only kept code is the arg-max whatever the noise."""
    if sampling.greedy:
        return 1.0, 1, 1.0
    return float(sampling.temperature), int(sampling.topk), float(sampling.top_p)
