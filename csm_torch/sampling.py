"""Top-k / temperature sampling on the device (semantics in `csm.sampling`).

The randomness is drawn ahead, for a whole frame at once (`draw_noise`), so that the frame's
32 samples run without a generator inside: the same code then runs eagerly or replayed from a
CUDA graph, and gives the same codes for the same seed either way.
"""

from __future__ import annotations

import torch

from csm.sampling import SamplingParams


def draw_noise(params: SamplingParams, num_codebooks: int, batch_size: int, vocab_size: int, device,
               generator: torch.Generator | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Exp(1) noise [num_codebooks, B, k] for one frame (None when sampling is greedy)."""
    if params.greedy:
        return None
    k = min(params.topk, vocab_size)
    if out is None:
        out = torch.empty(num_codebooks, batch_size, k, device=device)
    return out.exponential_(1, generator=generator)


def sample(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> codes [B] (int64). `noise` [B, k] from `draw_noise`. No host synchronisation."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    # unsorted: the race needs the top-k set, not its order, and sorting it was a tenth of a frame on a GPU
    top_values, top_indices = torch.topk(logits, noise.shape[-1], dim=-1, sorted=False)
    probs = torch.softmax(top_values, dim=-1)
    # Exponential race: argmax of p / Exp(1) draws from `probs` exactly, like torch.multinomial,
    # without the device-to-host sync multinomial needs.
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    return top_indices.gather(-1, choice).squeeze(-1)
