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

from typing import Iterator, Sequence

import numpy as np
import torch

from csm.checkpoint import Checkpoint, iter_tensors, return_freed_memory
from csm.config import CsmConfig
from csm.errors import CsmError
from csm.backend import FrameLoop
from csm.prompt import check_fits
from csm.sampling import SamplingParams
from csm.weights import check_complete, csm_tensors
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
    tensors = iter_tensors(ckpt, dtype, device)  # cast and placed on the way in: no second copy
    for ours, t in csm_tensors(tensors, ckpt.format, config):
        state[ours] = t.to(device=device, dtype=dtype)
    check_complete({k: tuple(v.shape) for k, v in state.items()}, config, f"{ckpt.format} checkpoint {ckpt.root}")
    model.load_state_dict(state, strict=True, assign=True)
    init_buffers(model, device)
    if device.type == "cpu":
        return_freed_memory()  # the copies cast or converted on the way (see csm.checkpoint)
    return model.eval().requires_grad_(False)


def init_buffers(model: Model, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints: compute them where the model lives."""
    config = model.config
    model.backbone.rope = rope_table(config.backbone, config.backbone.max_seq_len).to(device)
    model.decoder.rope = rope_table(config.decoder, config.audio_num_codebooks).to(device)
    model.codebook_offsets = (torch.arange(config.audio_num_codebooks) * config.audio_vocab_size).to(device)


COMPILE_MODES = ("default", "max-autotune")


def compile_options(compile: bool | str) -> dict | None:
    """inductor options for `compile`: False -> eager; True / "default" -> fused elementwise work
    around cuBLAS matmuls (~30 s to compile csm-1b on an H100: 8.0 ms/frame, from 16.7 graphed
    eager); "max-autotune" -> also Triton matmuls tuned per shape (~2 min: 7.4 ms/frame)."""
    if compile is False or compile is None:
        return None
    if compile is True or compile == "default":
        return {}
    if compile == "max-autotune":
        # the decode matmuls are skinny (M = batch): tuned Triton tiles beat cuBLAS's split-K ones
        return {"max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": False}
    raise CsmError(f"unknown compile mode {compile!r}; use one of {', '.join(COMPILE_MODES)} (or True/False)")


class FrameGenerator(FrameLoop):
    """Owns the static caches of one model for a batch size, and runs the frame loop.

    With `cuda_graph=True` (CUDA only) the prompt's backbone pass runs eagerly; the first frame's
    tail (31 decoder steps + 32 samples) and every further whole frame (backbone step + tail)
    are captured as CUDA graphs over static buffers and replayed. Eager and graphed loops run the
    same code on the same pre-drawn noise, so they give the same codes. Batches of streams run
    at per-stream positions (see `_blocks`).
    """

    def __init__(self, model: Model, batch_size: int = 1, cuda_graph: bool = False, compile: bool | str = False):
        self.model = model
        # torch.compile fuses each stack's small kernels (norms, RoPE, SwiGLU) for the fixed decode
        # shapes; the prompt's prefill, whose length varies, stays eager.
        options = compile_options(compile)
        self._backbone_step = model.backbone if options is None else torch.compile(model.backbone, dynamic=False, options=options)
        self._decoder = model.decoder if options is None else torch.compile(model.decoder, dynamic=False, options=options)
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
        self.step_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # per stream
        self.tail_h = torch.zeros(batch_size, self.config.backbone.hidden_size, device=self.device, dtype=self.dtype)
        self._graphs: dict[tuple[str, SamplingParams], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}

    @property
    def default_check_every(self) -> int:
        """Frames between end-of-speech checks: every frame eagerly (a sync costs little next to
        an eager frame), every 8 graphed (a sync would stall the replay queue each frame)."""
        return 8 if self.cuda_graph else 1

    def frame(self, tokens, mask, input_pos, params: SamplingParams, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One decode frame of codes [B, 32] after tokens/mask [B, 1, 33] at positions `input_pos`
        [B, 1]; `noise` [32, B, k] from `draw_noise` (None when greedy)."""
        m = self.model
        h = self._backbone_step(m.embed_frames(tokens, mask), input_pos, self.backbone_cache)[:, -1]  # [B, D]
        return self.frame_tail(h, params, noise)

    def prefill(self, tokens, mask, last: torch.Tensor) -> torch.Tensor:
        """The backbone over right-padded prompts [B, T, 33] from position 0 (eager: prompt
        lengths vary); returns each row's hidden state at its last real position `last` [B]."""
        m = self.model
        h = m.backbone(m.embed_frames(tokens, mask), torch.arange(tokens.shape[1], device=self.device), self.backbone_cache)
        return h[torch.arange(len(h), device=self.device), last]  # [B, D]

    def frame_tail(self, h: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None) -> torch.Tensor:
        """The last backbone state h [B, D] -> the frame's codes [B, 32]: codebook 0 from the
        backbone's head, then 31 decoder steps, each sampling the next codebook."""
        m = self.model
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

    def _work(self, kind: str, params: SamplingParams, noise) -> torch.Tensor:
        """The two pieces of work the loop repeats, on the static buffers: a whole decode frame
        ("step"), or the frame tail after a prefill ("tail", from `tail_h`)."""
        if kind == "step":
            return self.frame(self.step_tokens, self.step_mask, self.step_pos, params, noise)
        return self.frame_tail(self.tail_h, params, noise)

    def _graph(self, kind: str, params: SamplingParams):
        """The captured work of this kind for these sampling settings (captured once, then reused)."""
        if (kind, params) not in self._graphs:
            noise = self._noise(params, None)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # warm-up allocations happen outside the graph; the warm-up writes the caches exactly
            # where the replay is about to write them, so it changes nothing
            with torch.cuda.stream(side):
                self._work(kind, params, noise)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._work(kind, params, noise)
            self._graphs[kind, params] = (graph, out, noise)
        return self._graphs[kind, params]

    def _run(self, kind: str, params: SamplingParams, generator) -> torch.Tensor:
        """Run one piece of work: replayed from its graph, or launched eagerly."""
        if not self.cuda_graph:
            return self._work(kind, params, self._noise(params, generator))
        graph, out, noise = self._graph(kind, params)
        if noise is not None:
            self._noise(params, generator, out=noise)
        graph.replay()
        return out

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
        """Prompt frames [T, 33] -> blocks of generated codes [n, 32], as soon as they are known:
        after `first_block` frames, then every `check_every` frames (`default_check_every`)."""
        if self.batch_size != 1:
            raise CsmError("stream() runs one stream; make a FrameGenerator with batch_size=1")
        for block in self._blocks([(tokens, mask)], max_frames, params, seed, first_block, check_every):
            silent = np.flatnonzero(~block[0].any(axis=1))
            if len(silent):  # end of speech: an all-zero frame, not kept
                if silent[0]:
                    yield block[0, : silent[0]]
                return
            yield block[0]

    def generate_batch(
        self,
        prompts: Sequence[tuple[np.ndarray, np.ndarray]],
        max_frames: int,
        params: SamplingParams,
        seed: int | None = None,
        check_every: int | None = None,
    ) -> list[np.ndarray]:
        """Several prompts (tokens, mask) [T_i, 33] at once -> codes [F_i, 32] per prompt.

        Every stream stops on its own all-zero frame; a finished stream's row keeps being computed
        (the batch's shapes are fixed) but its frames are dropped, and the loop ends when every
        stream has stopped. Sampling noise is drawn for the whole batch, so a seeded stream's codes
        depend on its place in the batch; greedy codes equal those of `generate`.
        """
        if len(prompts) != self.batch_size:
            raise CsmError(f"this FrameGenerator runs batches of {self.batch_size}, got {len(prompts)} prompts")
        kept: list[list[np.ndarray]] = [[] for _ in prompts]
        running = np.ones(len(prompts), dtype=bool)
        check_every = check_every or self.default_check_every
        for block in self._blocks(prompts, max_frames, params, seed, check_every, check_every):
            for row in np.flatnonzero(running):
                silent = np.flatnonzero(~block[row].any(axis=1))
                kept[row].append(block[row, : silent[0]] if len(silent) else block[row])
                running[row] = not len(silent)
            if not running.any():
                break
        width = self.config.audio_num_codebooks
        return [np.concatenate(k) if k else np.zeros((0, width), dtype=np.int64) for k in kept]

    def _blocks(self, prompts, max_frames: int, params: SamplingParams, seed: int | None,
                first_block: int, check_every: int | None) -> Iterator[np.ndarray]:
        """The frame loop over a batch of prompts: yields the frames [B, n, 32] generated since
        the previous check, at every check point. Each check is the loop's only host sync.

        Prompts are right-padded to one length and prefilled together; each stream then decodes
        at its own position, writing over its padding before anything attends to it (attention
        only reaches a stream's own past), so padding changes no stream's result.
        """
        lengths = [len(tokens) for tokens, _ in prompts]
        for n in lengths:
            check_fits(n, max_frames, self.max_seq_len)
        checks = check_points(max_frames, first_block, check_every or self.default_check_every)
        width, books = self.config.frame_width, self.config.audio_num_codebooks
        with torch.inference_mode():
            tok = torch.zeros(len(prompts), max(lengths), width, dtype=torch.long)
            msk = torch.zeros(len(prompts), max(lengths), width, dtype=torch.bool)
            for row, (tokens, mask) in enumerate(prompts):
                tok[row, : len(tokens)] = torch.from_numpy(tokens)
                msk[row, : len(mask)] = torch.from_numpy(mask)
            generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
            length = torch.tensor(lengths, device=self.device)
            frames = torch.zeros(max_frames, len(prompts), books, dtype=torch.long, device=self.device)
            # time to first audio: the prompt runs eagerly once, the first frame's 31 decoder steps replay
            self.tail_h.copy_(self.prefill(tok.to(self.device), msk.to(self.device), last=length - 1))
            frames[0] = self._run("tail", params, generator)
            self.step_pos.copy_(length[:, None])
        checked = 0
        for i in range(1, max_frames + 1):
            if i in checks:
                yield frames[checked:i].transpose(0, 1).cpu().numpy().astype(np.int64)  # the sync
                checked = i
            if i == max_frames:
                return
            with torch.inference_mode():
                self.step_tokens[:, 0, :-1] = frames[i - 1]
                frames[i] = self._run("step", params, generator)
                self.step_pos += 1


def check_points(max_frames: int, first_block: int, every: int) -> set[int]:
    """Frame counts after which the loop syncs: first_block, then every `every`, and the end."""
    first = max(1, min(first_block, max_frames))
    return set(range(first, max_frames, max(1, every))) | {max_frames}
