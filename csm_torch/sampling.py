"""Temperature / top-k / top-p sampling on the device, one setting per batch row (semantics,
and why the noise is drawn per rank of a stream's own top-k, in `csm.sampling`).

The noise is drawn ahead for a whole frame (`SlotSampling.draw`), so the frame's 32 samples
run without a generator inside: the same code then runs eagerly or replayed from a CUDA graph
and gives the same codes for the same seed either way, with no host synchronisation.
"""

from __future__ import annotations

import torch

from csm.sampling import Sampling, row_settings

TINY = torch.finfo(torch.float32).tiny


class SlotSampling:
    """Per-slot sampling settings, generators and noise of a running batch, in static buffers
    (a CUDA graph reads them where they are)."""

    def __init__(self, max_batch_size: int, num_codebooks: int, vocab_size: int, device: torch.device):
        self.device = device
        self.temperature = torch.ones(max_batch_size, device=device)
        self.topk = torch.ones(max_batch_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_batch_size, device=device)
        # Exp(1) per codebook and rank among the sorted candidates; ones where nothing is drawn
        self.noise = torch.ones(max_batch_size, num_codebooks, vocab_size, device=device)
        self.settings: list[Sampling | None] = [None] * max_batch_size
        self._generators: list[torch.Generator | None] = [None] * max_batch_size
        self._draws: list[torch.Tensor | None] = [None] * max_batch_size  # a stream's own [32, its top-k]

    def set(self, slot: int, sampling: Sampling, generator: torch.Generator) -> None:
        """A stream's settings, and the generator it draws all of its noise from."""
        temperature, topk, top_p = row_settings(sampling)
        self.temperature[slot], self.topk[slot], self.top_p[slot] = temperature, topk, top_p
        self.settings[slot] = sampling
        self._generators[slot] = generator
        ranks = min(topk, self.noise.shape[-1])  # a top-k above the vocabulary keeps all of it
        self._draws[slot] = None if sampling.greedy else torch.empty(self.noise.shape[1], ranks, device=self.device)

    def clear(self, slot: int) -> None:
        self.settings[slot] = None
        self._generators[slot] = None
        self._draws[slot] = None

    def kept(self, rows: int) -> tuple[int, bool] | None:
        """The sampling shape of the first `rows` slots: (sorted candidates to keep, whether any
        row cuts them by top-p), or None when every stream there is greedy. Candidates round up
        to a power of two, so that CUDA graphs are shared between settings; a stream's codes do
        not depend on it (its noise belongs to codes, and its own top-k cuts the list)."""
        sampled = [s for s in self.settings[:rows] if s is not None and not s.greedy]
        if not sampled:
            return None
        k = min(1 << (max(s.topk for s in sampled) - 1).bit_length(), self.noise.shape[-1])
        return k, any(s.top_p < 1 for s in sampled)

    def draw(self, rows: int) -> None:
        """Each sampling stream's noise for its next frame [32, its top-k], from its own generator
        (drawn into a buffer of its own shape, so the draws never depend on the batch's)."""
        for slot in range(rows):
            draws = self._draws[slot]
            if draws is not None:
                # an Exp(1) draw of exactly 0 would make a dropped code's 0 / 0 a NaN, which wins an argmax
                draws.exponential_(1, generator=self._generators[slot]).clamp_min_(TINY)
                self.noise[slot, :, : draws.shape[1]].copy_(draws)


def filter_sorted(values: torch.Tensor, topk: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """Scaled logits sorted in descending order [B, K] -> the same with -inf where top-k [B] or
    top-p [B] drops a code (top-p as transformers' TopPLogitsWarper: in ascending order, drop
    what the cumulative probability keeps <= 1 - p, never the most probable code). `top_p`
    None: no row cuts by top-p (each one a few kernels fewer per codebook)."""
    rank = torch.arange(values.shape[-1], device=values.device)
    values = values.masked_fill(rank >= topk[:, None], float("-inf"))
    if top_p is None:
        return values
    ascending = values.flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)[:, None]
    drop[:, -1] = False
    return ascending.masked_fill(drop, float("-inf")).flip(-1)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the probabilities [B, V] a sample is drawn from (0 outside the kept set)."""
    values, indices = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
    probs = filter_sorted(values, topk, top_p).softmax(dim=-1)
    return torch.zeros_like(probs).scatter_(-1, indices, probs)


def sample(logits: torch.Tensor, slots: SlotSampling, rows: int, kept: tuple[int, bool] | None,
           codebook: int) -> torch.Tensor:
    """logits [B, V] of one codebook for the first B = `rows` slots -> codes [B] (int64).
    `kept`: the sampling shape (`SlotSampling.kept`), None for an all-greedy batch."""
    if kept is None:
        return logits.argmax(dim=-1)
    k, nucleus = kept
    values, indices = (logits.float() / slots.temperature[:rows, None]).topk(k, dim=-1)  # sorted
    probs = filter_sorted(values, slots.topk[:rows], slots.top_p[:rows] if nucleus else None).softmax(dim=-1)
    # Exponential race: argmax of p / Exp(1) draws from `probs` exactly, like torch.multinomial,
    # without the device-to-host sync multinomial needs; a rank's noise is the same whatever k.
    choice = (probs / slots.noise[:rows, codebook, :k]).argmax(dim=-1, keepdim=True)
    return indices.gather(-1, choice).squeeze(-1)
