"""Top-k / temperature sampling in MLX (semantics in `csm.sampling`)."""

from __future__ import annotations

import mlx.core as mx

from csm.sampling import SamplingParams


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> mx.array:
    """logits [B, V] -> codes [B] (int32)."""
    if params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits.astype(mx.float32) / params.temperature
    k = min(params.topk, logits.shape[-1])
    top_indices = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]  # [B, k], unordered
    top_values = mx.take_along_axis(logits, top_indices, axis=-1)
    # a categorical draw over the kept logits is a draw from their softmax
    choice = mx.random.categorical(top_values, axis=-1, key=key)  # [B]
    return mx.take_along_axis(top_indices, choice[:, None], axis=-1)[:, 0].astype(mx.int32)
