"""The PyTorch frame loop: the tensor work of one running batch of streams (the policy around
it, when to stop and whom to admit, is `csm.engine`'s).

One frame = 1 backbone step + 31 decoder steps + 32 samples:
1. the backbone over the new position (the whole prompt when a stream starts): hidden state h;
2. codebook 0 sampled from `codebook0_head(h)`;
3. the decoder from position 0 on [h, emb(c0)], then one position per codebook i, logits
   `state @ audio_head[i-1]`; its cache is overwritten every frame (positions restart at 0).

Slots: the backbone's static cache has one row per slot, and each row runs at its own position.
A stream starts by a prefill of its prompt into its slot's row from position 0; attention only
reaches a row's own positions up to its current one, so whatever an earlier stream left further
along that row is never seen. `advance` runs the first `bucket` rows, the smallest batch bucket
(1, 2, 4, ..., 64) that covers every occupied slot; free rows in it are computed and ignored, and
their positions stay at 0, so they stay in range.

With `cuda_graph=True` (CUDA only) a stream's prompt runs eagerly (its length varies), and the
first frame's tail (31 decoder steps + 32 samples) and every whole batched frame are captured as
CUDA graphs over the static buffers, one per batch bucket and sampling shape, and replayed.
Eager and graphed loops run the same code on the same pre-drawn noise, so they give the same codes.
"""

from __future__ import annotations

import numpy as np
import torch

from csm.backends import FrameLoop
from csm.errors import CsmError
from csm.sampling import Sampling
from csm_torch.model import KVCache, Model
from csm_torch.sampling import SlotSampling, sample

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
COMPILE_MODES = ("default", "max-autotune")


def compile_options(compile: bool | str) -> dict | None:
    """inductor options for `compile`: False -> eager; True / "default" -> fused elementwise work
    around cuBLAS matmuls; "max-autotune" -> also Triton matmuls tuned per shape (minutes at
    first use; figures in benchmarks/RESULTS.md)."""
    if compile is False or compile is None:
        return None
    if compile is True or compile == "default":
        return {}
    if compile == "max-autotune":
        # the decode matmuls are skinny (M = batch): tuned Triton tiles beat cuBLAS's split-K ones
        return {"max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": False}
    raise CsmError(f"unknown compile mode {compile!r}; use one of {', '.join(COMPILE_MODES)} (or True/False)")


def buckets_for(max_batch_size: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in BATCH_BUCKETS if b < max_batch_size} | {max_batch_size}))


class TorchFrameLoop(FrameLoop):
    """Static caches and buffers of one model for `max_batch_size` slots, and the work on them."""

    def __init__(self, model: Model, max_batch_size: int = 1, cuda_graph: bool = False, compile: bool | str = False):
        self.model = model
        config = self.config = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if cuda_graph and self.device.type != "cuda":
            raise CsmError("CUDA graphs need a CUDA device")
        self.cuda_graph = cuda_graph
        self.max_batch_size = max_batch_size
        # a sync stalls the replay queue, so graphed frames go in blocks; eagerly a sync costs little
        self.block_frames = 8 if cuda_graph else 1
        self.buckets = buckets_for(max_batch_size)
        # torch.compile fuses each stack's small kernels for the fixed decode shapes (one trace per
        # bucket); a prompt's prefill, whose length varies, stays eager.
        options = compile_options(compile)
        if options is not None:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        2 * len(self.buckets) + 4)
        self._backbone_step = (model.backbone if options is None
                               else torch.compile(model.backbone, dynamic=False, options=options))
        self._decoder = (model.decoder if options is None
                         else torch.compile(model.decoder, dynamic=False, options=options))

        books, width, vocab = config.audio_num_codebooks, config.frame_width, config.audio_vocab_size
        with torch.device(self.device):
            self._backbone_cache = model.backbone.make_cache(max_batch_size, config.backbone.max_seq_len, self.device,
                                                             self.dtype)
            self._decoder_cache = model.decoder.make_cache(max_batch_size, books, self.device, self.dtype)
            self._start_decoder_cache = model.decoder.make_cache(1, books, self.device, self.dtype)
            self._decoder_positions = torch.arange(books + 1)
            # one decode step's inputs per slot: the last frame's codes (text column off), its position
            self._step_tokens = torch.zeros(max_batch_size, 1, width, dtype=torch.long)
            self._step_mask = torch.ones(max_batch_size, 1, width, dtype=torch.bool)
            self._step_mask[..., -1] = False
            self._step_pos = torch.zeros(max_batch_size, 1, dtype=torch.long)
            self._live = torch.zeros(max_batch_size, 1, dtype=torch.long)  # 1 where a stream's position advances
            self._start_h = torch.zeros(1, config.backbone.hidden_size, dtype=self.dtype)
        self._sampling = SlotSampling(max_batch_size, books, vocab, self.device)
        self._start_sampling = SlotSampling(1, books, vocab, self.device)  # a starting stream's first frame
        # cache views are made once: a compiled stack traces once per cache object it is given
        self._slot_caches = [[c.rows(s, s + 1) for c in self._backbone_cache] for s in range(max_batch_size)]
        self._bucket_caches = {b: ([c.rows(0, b) for c in self._backbone_cache],
                                   [c.rows(0, b) for c in self._decoder_cache])
                               for b in self.buckets}
        self._occupied = [False] * max_batch_size
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # --- the protocol -------------------------------------------------------------------------
    def start(self, slot: int, tokens: np.ndarray, mask: np.ndarray, sampling: Sampling, seed: int) -> np.ndarray:
        if self._occupied[slot]:
            raise CsmError(f"slot {slot} is taken")
        m = self.model
        with torch.inference_mode():
            generator = torch.Generator(self.device).manual_seed(seed)
            self._sampling.set(slot, sampling, generator)
            self._start_sampling.set(0, sampling, generator)
            tok = torch.from_numpy(tokens).to(self.device)[None]  # [1, T, 33]
            msk = torch.from_numpy(mask).to(self.device)[None]
            positions = torch.arange(len(tokens), device=self.device)
            self._start_h.copy_(m.backbone(m.embed_frames(tok, msk), positions, self._slot_caches[slot])[:, -1])
            self._start_sampling.draw(1)
            codes = self._run("start", 1, self._start_sampling.kept(1))[0]  # [32]
            self._step_tokens[slot, 0, :-1] = codes
            self._step_pos[slot] = len(tokens)
            self._live[slot] = 1
            self._occupied[slot] = True
            return codes.cpu().numpy().astype(np.int64)  # the sync: the stream's first frame is known

    def advance(self, n: int) -> np.ndarray:
        rows = self._bucket()
        kept = self._sampling.kept(rows)
        with torch.inference_mode():
            frames = torch.empty(n, rows, self.config.audio_num_codebooks, dtype=torch.long, device=self.device)
            for i in range(n):
                self._sampling.draw(rows)
                frames[i] = self._run("step", rows, kept)
            block = frames.transpose(0, 1).cpu().numpy()  # the sync
        out = np.zeros((self.max_batch_size, n, self.config.audio_num_codebooks), dtype=np.int64)
        out[:rows] = block
        return out

    def drop(self, slot: int) -> None:
        self._sampling.clear(slot)
        self._start_sampling.clear(0)
        with torch.inference_mode():
            self._live[slot] = 0
            self._step_pos[slot] = 0
        self._occupied[slot] = False

    # --- the work -----------------------------------------------------------------------------
    def _bucket(self) -> int:
        highest = max((s for s, taken in enumerate(self._occupied) if taken), default=0)
        return next(b for b in self.buckets if b > highest)

    def frame_tail(self, h: torch.Tensor, slots: SlotSampling, rows: int, kept: tuple[int, bool] | None,
                   cache: list[KVCache]) -> torch.Tensor:
        """The last backbone states h [B, D] -> the frame's codes [B, 32]: codebook 0 from the
        backbone's head, then 31 decoder steps, each sampling the next codebook."""
        m = self.model
        c = sample(m.codebook0_head(h), slots, rows, kept, 0)
        codes = [c]
        x = torch.stack([h, m.embed_audio(0, c)], dim=1)  # [B, 2, D]
        pos = self._decoder_positions[:2]
        for i in range(1, self.config.audio_num_codebooks):
            state = self._decoder(m.projection(x), pos, cache)[:, -1]  # [B, D_dec]
            c = sample(m.codebook_logits(i, state), slots, rows, kept, i)
            codes.append(c)
            x = m.embed_audio(i, c).unsqueeze(1)
            pos = self._decoder_positions[i + 1 : i + 2]
        return torch.stack(codes, dim=1)

    def _work(self, kind: str, rows: int, kept: tuple[int, bool] | None) -> torch.Tensor:
        """The two pieces of work the loop repeats, on the static buffers: a starting stream's first
        frame after its prefill ("start"), or a whole frame of the first `rows` slots ("step"),
        whose codes and positions feed the next step."""
        if kind == "start":
            return self.frame_tail(self._start_h, self._start_sampling, 1, kept, self._start_decoder_cache)
        m = self.model
        backbone_cache, decoder_cache = self._bucket_caches[rows]
        x = m.embed_frames(self._step_tokens[:rows], self._step_mask[:rows])
        h = self._backbone_step(x, self._step_pos[:rows], backbone_cache)[:, -1]  # [B, D]
        codes = self.frame_tail(h, self._sampling, rows, kept, decoder_cache)
        self._step_tokens[:rows, 0, :-1] = codes
        self._step_pos[:rows] += self._live[:rows]
        return codes

    def _run(self, kind: str, rows: int, kept: tuple[int, bool] | None) -> torch.Tensor:
        """Run one piece of work: replayed from its graph, or launched eagerly."""
        if not self.cuda_graph:
            return self._work(kind, rows, kept)
        graph, out = self._graph(kind, rows, kept)
        graph.replay()
        return out

    def _graph(self, kind: str, rows: int, kept: tuple[int, bool] | None):
        """The captured work for this kind, bucket and sampling shape (captured once, then reused)."""
        key = (kind, rows, kept)
        if key not in self._graphs:
            # warm-up allocations happen outside the graph; the warm-up's writes are undone (the
            # caches it writes are written again, at the same places, by the replay that follows)
            saved = self._step_tokens.clone(), self._step_pos.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._work(kind, rows, kept)
            torch.cuda.current_stream().wait_stream(side)
            self._step_tokens.copy_(saved[0])
            self._step_pos.copy_(saved[1])
            graph = torch.cuda.CUDAGraph()
            # thread_local: streams' Mimi decoders may run on other threads while this captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._work(kind, rows, kept)
            self._graphs[key] = (graph, out)
        return self._graphs[key]
