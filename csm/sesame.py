"""Sesame's `Generator` contract on top of csm's numpy `Generator`.

Sesame's example code (`load_csm_1b(device)`, then `generator.generate(text, speaker, context)`)
expects a 1-D float32 torch tensor on the generator's device, so that clips can be fed back as
`Segment(..., audio=clip)` and joined with `torch.cat`. `csm.load_csm_1b` returns this wrapper
around the torch backend; `csm.load` keeps returning the numpy `Generator`, which stays reachable
as `.generator`.

torch is imported inside the functions: nothing in `csm` imports torch or mlx at import time.
"""

from __future__ import annotations

from collections.abc import Sequence

from csm.prompt import Segment
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, DEFAULT_TEMPERATURE, DEFAULT_TOPK


class SesameGenerator:
    """`generate` returns torch tensors, as Sesame's `Generator.generate` does. Everything else
    (codes, batches, streaming, seeds, the watermark key) is on the wrapped `.generator`."""

    def __init__(self, generator):
        self.generator = generator

    @property
    def sample_rate(self) -> int:
        return self.generator.sample_rate

    @property
    def device(self):
        """The torch.device the clips are returned on."""
        import torch

        return torch.device(self.generator.device)

    def generate(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment],
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float = DEFAULT_TEMPERATURE,
        topk: int = DEFAULT_TOPK,
        **kwargs,
    ):
        """Sesame's signature: watermarked float32 mono 24 kHz audio as a 1-D torch tensor on the
        generator's device. Extra keywords (seed, watermark, ...) go to `csm.Generator.generate`."""
        import torch

        audio = self.generator.generate(text, speaker, context, max_audio_length_ms, temperature, topk, **kwargs)
        return torch.from_numpy(audio).to(device=self.device, dtype=torch.float32)

