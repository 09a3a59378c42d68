"""Sampling semantics, shared by every backend (only the tensor code differs).

Official CSM sampling, the same for all 32 codebooks: divide the logits by the temperature,
keep the top-k, softmax, draw one sample. top-k 1 (or temperature 0) is greedy: the arg-max,
deterministic, which is what parity tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

from csm.errors import CsmError

DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOPK = 50
FRAME_MS = 80  # one Mimi frame: 1920 samples at 24 kHz
DEFAULT_MAX_AUDIO_LENGTH_MS = 90_000


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE
    topk: int = DEFAULT_TOPK

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise CsmError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.topk < 1:
            raise CsmError(f"top-k must be at least 1 (1 means greedy), got {self.topk}")

    @property
    def greedy(self) -> bool:
        return self.topk == 1 or self.temperature == 0


def max_frames(max_audio_length_ms: float) -> int:
    if not max_audio_length_ms > 0:
        raise CsmError(f"max audio length must be positive, got {max_audio_length_ms} ms")
    return max(1, int(max_audio_length_ms // FRAME_MS))
