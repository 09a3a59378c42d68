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

from typing import Callable, Iterator

import numpy as np
import torch

from csm.checkpoint import Checkpoint, iter_tensors
from csm.config import CsmConfig
from csm.errors import CsmError
from csm.backend import collect_blocks
from csm.prompt import check_fits
from csm.sampling import SamplingParams
from csm.weights import check_complete, to_csm
from csm_torch.model import Model, rope_table
from csm_torch.sampling import draw_noise, sample

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
    """Owns the static caches of one model for a batch size, and runs the frame loop.

    With `cuda_graph=True` (CUDA only) the prompt is prefilled eagerly, then one whole frame,
    backbone step + 31 decoder steps + 32 samples, is captured as a CUDA graph over static
    input buffers and replayed for every further frame. Eager and graphed loops run the same
    `frame` code on the same pre-drawn noise, so they give the same codes.
    """

    def __init__(self, model: Model, batch_size: int = 1, cuda_graph: bool = False, compile: bool = False):
        self.model = model
        # torch.compile fuses each stack's small kernels (norms, RoPE, SwiGLU) for the fixed decode
        # shapes; the prompt's prefill, whose length varies, stays eager.
        self._backbone_step = torch.compile(model.backbone, dynamic=False) if compile else model.backbone
        self._decoder = torch.compile(model.decoder, dynamic=False) if compile else model.decoder
        self.config: CsmConfig = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if cuda_graph and self.device.type != "cuda":
            raise CsmError("CUDA graphs need a CUDA device")
        self.cuda_graph = cuda_graph
        self.batch_size = batch_size
        self.max_seq_len = self.config.backbone.max_seq_len
        self.backbone_cache = model.backbone.make_cache(batch_size, self.max_seq_len, self.device, self.dtype)
        self.decoder_cache = model.decoder.make_cache(batch_size, self.config.audio_num_codebooks, self.device, self.dtype)
        self._decoder_positions = torch.arange(self.config.audio_num_codebooks + 1, device=self.device)
        # one decode step's inputs: last frame's codes (text column off), its position
        width = self.config.frame_width
        self.step_tokens = torch.zeros(batch_size, 1, width, dtype=torch.long, device=self.device)
        self.step_mask = torch.ones(batch_size, 1, width, dtype=torch.bool, device=self.device)
        self.step_mask[..., -1] = False
        self.step_pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graphs: dict[SamplingParams, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}

    def frame(self, tokens, mask, input_pos, params: SamplingParams, noise: torch.Tensor | None = None,
              prefill: bool = False) -> torch.Tensor:
        """One frame of codes [B, 32] for the positions `input_pos` of tokens/mask [B, T, 33];
        `noise` [32, B, k] from `draw_noise` (None when greedy)."""
        m = self.model
        backbone = m.backbone if prefill else self._backbone_step
        h = backbone(m.embed_frames(tokens, mask), input_pos, self.backbone_cache)[:, -1]  # [B, D]
        c = sample(m.codebook0_head(h), params, None if noise is None else noise[0])
        codes = [c]
        x = torch.stack([h, m.embed_audio(0, c)], dim=1)  # [B, 2, D]
        pos = self._decoder_positions[:2]
        for i in range(1, self.config.audio_num_codebooks):
            state = self._decoder(m.projection(x), pos, self.decoder_cache)[:, -1]  # [B, D_dec]
            c = sample(m.codebook_logits(i, state), params, None if noise is None else noise[i])
            codes.append(c)
            x = m.embed_audio(i, c).unsqueeze(1)
            pos = self._decoder_positions[i + 1 : i + 2]
        return torch.stack(codes, dim=1)

    def _noise(self, params: SamplingParams, generator, out=None):
        return draw_noise(params, self.config.audio_num_codebooks, self.batch_size, self.config.audio_vocab_size,
                          self.device, generator, out)

    def _graph(self, params: SamplingParams):
        """The captured decode step for these sampling settings (captured once, then reused)."""
        if params not in self._graphs:
            noise = self._noise(params, None)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up allocations happen outside the graph
                self.frame(self.step_tokens, self.step_mask, self.step_pos, params, noise)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.frame(self.step_tokens, self.step_mask, self.step_pos, params, noise)
            self._graphs[params] = (graph, out, noise)
        return self._graphs[params]

    def _step(self, params: SamplingParams, generator) -> torch.Tensor:
        """One decode frame from the static step buffers."""
        if not self.cuda_graph:
            return self.frame(self.step_tokens, self.step_mask, self.step_pos, params, self._noise(params, generator))
        graph, out, noise = self._graph(params)
        if noise is not None:
            self._noise(params, generator, out=noise)
        graph.replay()
        return out

    def generate(
        self,
        tokens: np.ndarray,
        mask: np.ndarray,
        max_frames: int,
        params: SamplingParams,
        seed: int | None = None,
        on_frame: Callable[[int], None] | None = None,
        check_every: int | None = None,
    ) -> np.ndarray:
        """Prompt frames [T, 33] -> generated codes [F, 32] (F <= max_frames)."""
        return collect_blocks(self.stream(tokens, mask, max_frames, params, seed, check_every=check_every),
                              self.config.audio_num_codebooks, on_frame)

    def stream(
        self,
        tokens: np.ndarray,
        mask: np.ndarray,
        max_frames: int,
        params: SamplingParams,
        seed: int | None = None,
        first_block: int = 1,
        check_every: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Prompt frames [T, 33] -> blocks of generated codes [n, 32], as soon as they are known.

        The end-of-speech check (an all-zero frame) is the only host sync: it runs after
        `first_block` frames, then every `check_every` frames (default 1 eager, 8 graphed), and
        each check hands the frames it cleared out as one block. Frames after the stop are
        dropped: attention is causal, so the frames before it do not depend on them.
        """
        n = tokens.shape[0]
        check_fits(n, max_frames, self.max_seq_len)
        if self.batch_size != 1:
            raise CsmError("stream() runs one stream; make a FrameGenerator with batch_size=1")
        check_every = check_every or (8 if self.cuda_graph else 1)
        checks = check_points(max_frames, first_block, check_every)
        with torch.inference_mode():
            generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
            tok = torch.from_numpy(tokens).to(self.device).long().unsqueeze(0)
            msk = torch.from_numpy(mask).to(self.device).bool().unsqueeze(0)
            frames = torch.zeros(max_frames, self.config.audio_num_codebooks, dtype=torch.long, device=self.device)
            frames[0] = self.frame(tok, msk, torch.arange(n, device=self.device), params,
                                   self._noise(params, generator), prefill=True)[0]
            self.step_pos.fill_(n)
        checked = 0
        for i in range(1, max_frames + 1):
            if i in checks:
                block = frames[checked:i].cpu().numpy().astype(np.int64)  # the sync
                silent = np.flatnonzero(~block.any(axis=1))
                if len(silent):
                    if silent[0]:
                        yield block[: silent[0]]
                    return
                yield block
                checked = i
            if i == max_frames:
                return
            with torch.inference_mode():
                self.step_tokens[0, 0, :-1] = frames[i - 1]
                frames[i] = self._step(params, generator)[0]
                self.step_pos += 1


def check_points(max_frames: int, first_block: int, every: int) -> set[int]:
    """Frame counts after which the loop syncs: first_block, then every `every`, and the end."""
    first = max(1, min(first_block, max_frames))
    return set(range(first, max_frames, max(1, every))) | {max_frames}
