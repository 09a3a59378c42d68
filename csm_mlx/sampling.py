"""Temperature / top-k / top-p sampling in MLX, one setting per batch row (semantics, and why
the noise is drawn per vocabulary entry, in `csm.sampling`; the same steps as
`csm_torch.sampling`). MLX has no sorted top-k: the `kept` largest are partitioned off, then sorted."""

from __future__ import annotations

import mlx.core as mx


def filter_sorted(values: mx.array, topk: mx.array, top_p: mx.array) -> mx.array:
    """Scaled logits sorted in descending order [B, K] -> the same with -inf where top-k [B] or
    top-p [B] drops a code (top-p as transformers' TopPLogitsWarper: in ascending order, drop
    what the cumulative probability keeps <= 1 - p, never the most probable code)."""
    rank = mx.arange(values.shape[-1])
    values = mx.where(rank[None] >= topk[:, None], -mx.inf, values)
    ascending = values[:, ::-1]
    cumulative = mx.cumsum(mx.softmax(ascending, axis=-1), axis=-1)
    drop = (cumulative <= (1 - top_p)[:, None]) & (rank[None] < values.shape[-1] - 1)
    return mx.where(drop, -mx.inf, ascending)[:, ::-1]


def _sorted_probs(logits: mx.array, temperature: mx.array, topk: mx.array, top_p: mx.array, kept: int):
    """The probabilities of the `kept` largest scaled logits [B, kept], in descending order, and
    their codes."""
    scaled = logits.astype(mx.float32) / temperature[:, None]
    if kept < scaled.shape[-1]:
        candidates = mx.argpartition(-scaled, kth=kept - 1, axis=-1)[:, :kept]  # [B, kept], unordered
    else:
        candidates = mx.broadcast_to(mx.arange(scaled.shape[-1]), scaled.shape)
    values = mx.take_along_axis(scaled, candidates, axis=-1)
    order = mx.argsort(-values, axis=-1)
    codes = mx.take_along_axis(candidates, order, axis=-1)
    values = mx.take_along_axis(values, order, axis=-1)
    return mx.softmax(filter_sorted(values, topk, top_p), axis=-1), codes


def filtered_probs(logits: mx.array, temperature: mx.array, topk: mx.array, top_p: mx.array) -> mx.array:
    """logits [B, V] -> the probabilities [B, V] a sample is drawn from (0 outside the kept set)."""
    probs, codes = _sorted_probs(logits, temperature, topk, top_p, logits.shape[-1])
    return mx.take_along_axis(probs, mx.argsort(codes, axis=-1), axis=-1)


def sample(logits: mx.array, temperature: mx.array, topk: mx.array, top_p: mx.array,
           noise: mx.array | None, kept: int | None = None) -> mx.array:
    """logits [B, V] -> codes [B] (int32). `noise` [B, kept]: Exp(1) per rank of the sorted
    candidates, None when every row is greedy; `kept`: candidates to sort, at least every row's
    top-k (default: all)."""
    if noise is None:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    probs, order = _sorted_probs(logits, temperature, topk, top_p, kept or logits.shape[-1])
    # exponential race: the argmax of p / Exp(1) is a draw from p
    choice = mx.argmax(probs / noise, axis=-1)
    return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(mx.int32)


def exponential_noise(key: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Exp(1) variates as -log(u), u uniform in [0, 1): none is 0, which would make a dropped
    code's 0 / 0 a NaN (a u of 0 gives inf, and that code never wins)."""
    return -mx.log(mx.random.uniform(shape=shape, key=key))
