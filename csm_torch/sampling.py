"""Top-k / temperature sampling on the device (semantics in `csm.sampling`)."""

from __future__ import annotations

import torch

from csm.sampling import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> codes [B] (int64). No host synchronisation."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    k = min(params.topk, logits.shape[-1])
    top_values, top_indices = torch.topk(logits, k, dim=-1)
    probs = torch.softmax(top_values, dim=-1)
    # Exponential race (argmax of p / Exp(1)) draws from `probs` exactly, like torch.multinomial,
    # without the device-to-host sync multinomial needs.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    return top_indices.gather(-1, choice).squeeze(-1)
