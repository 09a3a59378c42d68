"""The PyTorch backend: loading a checkpoint into `Model`, and the frame loop.

One frame = 1 backbone step + 31 decoder steps + 32 samples (CSM_FACTS §3):
1. backbone over the new positions (the whole prompt the first time), last hidden state h;
2. codebook 0 sampled from `codebook0_head(h)`;
3. decoder from position 0 on [h, emb(c0)], then one position per codebook i, logits
   `state @ audio_head[i-1]`; its cache is overwritten every frame (positions restart at 0);
4. stop on an all-zero frame (not kept) or after `max_frames`.
Positions, caches and sampling stay on the device; the end-of-speech check is the only sync.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from csm.checkpoint import Checkpoint, iter_tensors
from csm.config import CsmConfig
from csm.errors import CsmError
from csm.sampling import SamplingParams
from csm.weights import check_complete, to_csm
from csm_torch.model import Model, rope_table
from csm_torch.sampling import sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CsmError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CsmError(f"device {device!r} requested but MPS is not available here; use --device cpu")
    if dev.type not in ("cuda", "cpu", "mps"):
        raise CsmError(f"unknown device {device!r}; use cuda, cpu or mps")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # bf16 halves the bytes read per frame on GPUs; CPUs without bf16 units run float32 faster
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CsmError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> Model:
    """Build on the meta device and assign the checkpoint's tensors: one copy of the weights."""
    config = ckpt.config
    with torch.device("meta"):
        model = Model(config)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(ckpt, "pt"):
        converted = to_csm(name, tensor, ckpt.format, config)
        if converted is not None:
            ours, t = converted
            state[ours] = t.to(device=device, dtype=dtype)
            del t, tensor
    check_complete({k: tuple(v.shape) for k, v in state.items()}, config, f"{ckpt.format} checkpoint {ckpt.root}")
    model.load_state_dict(state, strict=True, assign=True)
    init_buffers(model, device)
    return model.eval().requires_grad_(False)


def init_buffers(model: Model, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints: compute them where the model lives."""
    config = model.config
    model.backbone.rope = rope_table(config.backbone, config.backbone.max_seq_len).to(device)
    model.decoder.rope = rope_table(config.decoder, config.audio_num_codebooks).to(device)
    model.codebook_offsets = (torch.arange(config.audio_num_codebooks) * config.audio_vocab_size).to(device)


class FrameGenerator:
    """Owns the static caches of one model for a batch size, and runs the frame loop."""

    def __init__(self, model: Model, batch_size: int = 1):
        self.model = model
        self.config: CsmConfig = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_seq_len = self.config.backbone.max_seq_len
        self.backbone_cache = model.backbone.make_cache(batch_size, self.max_seq_len, self.device, self.dtype)
        self.decoder_cache = model.decoder.make_cache(batch_size, self.config.audio_num_codebooks, self.device, self.dtype)
        self._decoder_positions = torch.arange(self.config.audio_num_codebooks + 1, device=self.device)

    def frame(self, tokens, mask, input_pos, params: SamplingParams, generator=None) -> torch.Tensor:
        """One frame of codes [B, 32] for the positions `input_pos` of tokens/mask [B, T, 33]."""
        m = self.model
        h = m.backbone(m.embed_frames(tokens, mask), input_pos, self.backbone_cache)[:, -1]  # [B, D]
        c = sample(m.codebook0_head(h), params, generator)
        codes = [c]
        x = torch.stack([h, m.embed_audio(0, c)], dim=1)  # [B, 2, D]
        pos = self._decoder_positions[:2]
        for i in range(1, self.config.audio_num_codebooks):
            state = m.decoder(m.projection(x), pos, self.decoder_cache)[:, -1]  # [B, D_dec]
            c = sample(m.codebook_logits(i, state), params, generator)
            codes.append(c)
            x = m.embed_audio(i, c).unsqueeze(1)
            pos = self._decoder_positions[i + 1 : i + 2]
        return torch.stack(codes, dim=1)

    @torch.inference_mode()
    def generate(
        self,
        tokens: np.ndarray,
        mask: np.ndarray,
        max_frames: int,
        params: SamplingParams,
        seed: int | None = None,
        on_frame: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Prompt frames [T, 33] -> generated codes [F, 32] (F <= max_frames)."""
        n = tokens.shape[0]
        if n + max_frames >= self.max_seq_len:
            raise CsmError(
                f"the prompt ({n} positions, context included) plus up to {max_frames} audio frames does not fit "
                f"the model's {self.max_seq_len} positions; shorten the context or lower the max audio length"
            )
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        tok = torch.from_numpy(tokens).to(self.device).long().unsqueeze(0)
        msk = torch.from_numpy(mask).to(self.device).bool().unsqueeze(0)
        pos = torch.arange(n, device=self.device)
        audio_mask = torch.ones(1, 1, self.config.frame_width, dtype=torch.bool, device=self.device)
        audio_mask[..., -1] = False
        zero_text = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        frames = []
        for i in range(max_frames):
            codes = self.frame(tok, msk, pos, params, generator)  # [1, 32]
            if not codes.any():  # end of speech: an all-zero frame, not kept
                break
            frames.append(codes)
            if on_frame is not None:
                on_frame(i + 1)
            tok = torch.cat([codes, zero_text], dim=1).unsqueeze(1)  # [1, 1, 33]
            msk = audio_mask
            pos = pos[-1:] + 1
        if not frames:
            return np.zeros((0, self.config.audio_num_codebooks), dtype=np.int64)
        return torch.cat(frames).cpu().numpy().astype(np.int64)
