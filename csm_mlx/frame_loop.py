"""The MLX frame loop: the tensor work of one running batch of streams (the policy around it is
`csm.engine`'s), the same frame as `csm_torch.frame_loop`:

1. the backbone over the new position (the whole prompt when a stream starts), with mlx-lm's
   KV caches;
2. codebook 0 sampled from `codebook0_head(h)`;
3. the decoder from position 0 on [h, emb(c0)] with fresh caches, then one position per codebook
   i, logits from `audio_head[i-1]`.

The batch is mlx-lm's continuous batching: a starting stream's prompt is prefilled alone into
plain `KVCache`s, then its caches join the running `BatchKVCache`s (left-padded to a common
length, each row with its own RoPE offset and a mask over its padding); a leaving stream's row
is filtered out. Rows are the running streams in the order they joined; `_rows` maps them to slots.

Steps 2-3 have the same shapes for a batch size, so they are one `mx.compile`d function
(sampling included, traced once per batch size and greedy or not); the backbone step is not
compiled: its cache grows every frame, and a new shape would mean a new trace. Within an
`advance`, frame i+1 is queued (`mx.async_eval`) before frame i is read back, so building one
frame's graph overlaps computing the last.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from csm.backends import FrameLoop
from csm.errors import CsmError
from csm.sampling import Sampling, row_settings
from csm_mlx.model import Model
from csm_mlx.sampling import exponential_noise, sample


class MlxFrameLoop(FrameLoop):
    """One model's running batch of `max_batch_size` slots; `compile` traces the per-frame decoder
    work; `overlap` queues each frame before the last one is read back (off: each frame is
    evaluated before the next is built, for measuring what the overlap buys)."""

    # frames per host sync: a few, so that queued frames overlap (an all-zero frame ends a stream
    # at most 3 frames of work early, and a new stream waits at most 4 frames to join)
    block_frames = 4

    def __init__(self, model: Model, max_batch_size: int = 1, compile: bool = True, overlap: bool = True):
        self.model = model
        self.config = model.config
        self.max_batch_size = max_batch_size
        self.compile = compile
        self.overlap = overlap
        self._tails: dict[tuple[int | None, int], Callable] = {}
        self._cache: list[BatchKVCache] | None = None
        self._rows: list[int] = []  # slot of each batch row
        self._settings: dict[int, Sampling] = {}
        self._keys: dict[int, mx.array] = {}
        self._last: mx.array | None = None  # [rows, 32] the last frame of each row (lazy)
        self._audio_mask = mx.array([[[True] * self.config.audio_num_codebooks + [False]]])  # [1, 1, 33]

    # --- the protocol -------------------------------------------------------------------------
    def start(self, slot: int, tokens: np.ndarray, mask: np.ndarray, sampling: Sampling, seed: int) -> np.ndarray:
        if slot in self._rows:
            raise CsmError(f"slot {slot} is taken")
        m = self.model
        self._settings[slot] = sampling
        self._keys[slot] = mx.random.key(seed)
        cache = m.backbone.make_cache()
        h = m.backbone(m.embed_frames(mx.array(tokens)[None], mx.array(mask)[None]), cache)[:, -1]  # [1, D]
        codes = self._tail(h, [slot])
        joining = [BatchKVCache.merge([c]) for c in cache]
        if self._cache is None:
            self._cache = joining
        else:
            for batch, new in zip(self._cache, joining, strict=True):  # one cache per layer on both sides
                batch.extend(new)
        self._rows.append(slot)
        self._last = codes if self._last is None else mx.concatenate([self._last, codes])
        return np.array(codes[0]).astype(np.int64)  # the sync: the stream's first frame is known

    def advance(self, n: int) -> np.ndarray:
        out = np.zeros((self.max_batch_size, n, self.config.audio_num_codebooks), dtype=np.int64)
        if not self._rows:
            return out
        frames = []
        for _ in range(n):
            self._last = self._step(self._last)
            frames.append(self._last)
            if self.overlap:
                mx.async_eval(self._last)
            else:
                mx.eval(self._last)
        block = np.array(mx.stack(frames, axis=1)).astype(np.int64)  # the sync: [rows, n, 32]
        out[self._rows] = block
        return out

    def drop(self, slot: int) -> None:
        self._settings.pop(slot, None)
        self._keys.pop(slot, None)
        if slot not in self._rows:
            return
        keep = [row for row, s in enumerate(self._rows) if s != slot]
        self._rows = [self._rows[row] for row in keep]
        if not keep:  # mlx-lm's filter cannot empty a batch: start afresh
            self._cache, self._last = None, None
            return
        index = mx.array(keep)
        for c in self._cache:
            c.filter(index)
        self._last = self._last[index]

    # --- the work -----------------------------------------------------------------------------
    def _step(self, last: mx.array) -> mx.array:
        """The next frame of every row [rows, 32] after their last one (lazy)."""
        m = self.model
        zero_text = mx.zeros((last.shape[0], 1), dtype=last.dtype)
        x = m.embed_frames(mx.concatenate([last, zero_text], axis=1)[:, None], self._audio_mask)  # [B, 1, D]
        h = m.backbone(x, self._cache)[:, -1]  # [B, D]
        return self._tail(h, self._rows)

    def _tail(self, h: mx.array, slots: list[int]) -> mx.array:
        """The last backbone states h [B, D] of `slots` -> their frame's codes [B, 32] (int32)."""
        settings = [row_settings(self._settings[s]) for s in slots]
        greedy = all(self._settings[s].greedy for s in slots)
        temperature = mx.array([t for t, _, _ in settings], dtype=mx.float32)
        topk = mx.array([k for _, k, _ in settings])
        top_p = mx.array([p for _, _, p in settings], dtype=mx.float32)
        if greedy:
            return self._tail_for(None, len(slots))(h, temperature, topk, top_p)
        # candidates to sort: a power of two (fewer traces), at least every row's top-k
        kept = min(1 << (max(k for _, k, _ in settings) - 1).bit_length(), self.config.audio_vocab_size)
        noise = mx.stack([self._noise(s, kept) for s in slots])  # [B, 32, kept]
        return self._tail_for(kept, len(slots))(h, temperature, topk, top_p, noise)

    def _noise(self, slot: int, kept: int) -> mx.array:
        """A stream's noise for its next frame [32, kept]: drawn for its own top-k ranks from its
        own key, ones beyond (greedy streams draw none)."""
        sampling, books = self._settings[slot], self.config.audio_num_codebooks
        if sampling.greedy:
            return mx.ones((books, kept))
        self._keys[slot], frame_key = mx.random.split(self._keys[slot])
        ranks = min(sampling.topk, self.config.audio_vocab_size)  # a top-k above the vocabulary keeps all of it
        return mx.pad(exponential_noise(frame_key, (books, ranks)), [(0, 0), (0, kept - ranks)], constant_values=1.0)

    def frame_tail(self, h, temperature, topk, top_p, noise, kept: int | None = None) -> mx.array:
        """h [B, D] -> the frame's 32 codes [B, 32]: codebook 0 from the backbone's head, then 31
        decoder steps, each sampling the next codebook."""
        m = self.model

        def pick(logits, i):
            return sample(logits, temperature, topk, top_p, None if noise is None else noise[:, i], kept)

        c = pick(m.codebook0_head(h), 0)
        codes = [c]
        cache = m.decoder.make_cache()  # positions restart at 0 every frame
        x = mx.stack([h, m.embed_audio(0, c)], axis=1)  # [B, 2, D]
        for i in range(1, self.config.audio_num_codebooks):
            state = m.decoder(m.projection(x), cache)[:, -1]  # [B, D_dec]
            c = pick(m.codebook_logits(i, state), i)
            codes.append(c)
            x = m.embed_audio(i, c)[:, None]  # [B, 1, D]
        return mx.stack(codes, axis=1)

    def _tail_for(self, kept: int | None, rows: int) -> Callable:
        """The frame tail for a batch size and sampling shape (`kept` None: all greedy)."""
        key = (kept, rows)
        if key not in self._tails:
            if kept is None:
                def tail(h, temperature, topk, top_p):
                    return self.frame_tail(h, temperature, topk, top_p, None)
            else:
                def tail(h, temperature, topk, top_p, noise):
                    return self.frame_tail(h, temperature, topk, top_p, noise, kept)
            # the weights are inputs of the trace (not constants baked into it)
            self._tails[key] = mx.compile(tail, inputs=self.model.state) if self.compile else tail
        return self._tails[key]
