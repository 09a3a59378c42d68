"""Streaming speech: the frame loop's code blocks regrouped into chunks of whole frames, which
`Generator.stream` decodes (and watermarks) as they come.

Chunk sizes: the first chunk after `first_chunk_frames` frames (80 ms each: a small first chunk
means little time to first audio), then every `chunk_frames` frames (bigger chunks mean fewer
decoder calls and host syncs); the last chunk holds whatever is left when speech ends.

The watermark: silentcipher marks a stretch of audio as a whole (an STFT over all of it; one copy
of the 5-byte key spans 21 STFT frames, 0.975 s), so it cannot mark a stream sample by sample,
and audio shorter than that cannot carry the key. A watermarked stream is therefore cut into
chunks of at least `WATERMARK_WINDOW_FRAMES` (13 frames, 1.04 s), each marked on its own: every
sample a listener hears is marked, and every chunk but a shorter last one carries the whole key
by itself. The cost is latency: the first audio waits for 1.04 s of speech instead of
`first_chunk_frames`; with the watermark off the requested sizes are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from csm.errors import CsmError
from csm.sampling import FRAME_MS
from csm.watermark import MESSAGE_SECONDS

WATERMARK_WINDOW_FRAMES = math.ceil(MESSAGE_SECONDS * 1000 / FRAME_MS)  # 13 frames, 1.04 s
DEFAULT_FIRST_CHUNK_FRAMES = 2
DEFAULT_CHUNK_FRAMES = 8


@dataclass(frozen=True)
class ChunkPlan:
    """Frames in the first chunk, then in every later chunk."""

    first: int
    every: int


def plan_chunks(first_chunk_frames: int, chunk_frames: int, watermark: bool) -> ChunkPlan:
    for name, value in (("first_chunk_frames", first_chunk_frames), ("chunk_frames", chunk_frames)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise CsmError(f"{name} must be a whole number of frames >= 1 (80 ms each), got {value!r}")
    if watermark:
        return ChunkPlan(max(first_chunk_frames, WATERMARK_WINDOW_FRAMES), max(chunk_frames, WATERMARK_WINDOW_FRAMES))
    return ChunkPlan(int(first_chunk_frames), int(chunk_frames))


def regroup(blocks: Iterable[np.ndarray], plan: ChunkPlan) -> Iterator[np.ndarray]:
    """Code blocks [n, 32] of any sizes (the backends clear frames at their own pace) -> chunks
    of `plan.first` frames, then `plan.every` frames, then the rest."""
    pending: list[np.ndarray] = []
    have, want = 0, plan.first
    for block in blocks:
        pending.append(block)
        have += len(block)
        while have >= want:
            codes = np.concatenate(pending)
            yield codes[:want]
            rest = codes[want:]
            pending, have, want = [rest], len(rest), plan.every
    if have:
        yield np.concatenate(pending)
