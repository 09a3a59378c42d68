"""The MLX backend: loading a checkpoint into `Model`, and the frame loop.

One frame = 1 backbone step + 31 decoder steps + 32 samples (CSM_FACTS §3), as in
`csm_torch.generator`:
1. backbone over the new positions (the whole prompt the first time) with its mlx-lm KV cache;
2. codebook 0 sampled from `codebook0_head(h)`;
3. decoder from position 0 on [h, emb(c0)] with fresh caches, then one position per codebook i,
   logits from `audio_head[i-1]`;
4. stop on an all-zero frame (not kept) or after `max_frames`.

Steps 2-3 have the same shapes every frame, so they are one `mx.compile`d function (sampling
included); the backbone step is not compiled: its cache grows every frame, and a new shape
would mean a new trace. Frame i+1 is queued (`mx.async_eval`) before frame i is read back for
the end-of-speech check, so building one frame's graph overlaps computing the last.
RoPE is mlx-lm's (`mx.fast.rope` with its frequency table computed once per layer).
"""

from __future__ import annotations

import secrets
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from csm.backend import FrameLoop
from csm.checkpoint import Checkpoint, iter_tensors
from csm.config import CsmConfig
from csm.errors import CheckpointError, CsmError
from csm.prompt import check_fits
from csm.sampling import SamplingParams
from csm.weights import check_complete, csm_tensors
from csm_mlx.model import Model
from csm_mlx.quantize import quantize_model, quantize_skeleton
from csm_mlx.sampling import sample

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
GPU_NAMES = ("gpu", "mps", "cuda", "metal")


def pick_device(device: str | None) -> mx.Device:
    if device is None:
        return mx.default_device()
    name = device.split(":")[0].lower()
    if name == "cpu":
        return mx.cpu
    if name in GPU_NAMES:
        if not mx.is_available(mx.gpu):
            raise CsmError(f"device {device!r} requested but this MLX build has no GPU here; use --device cpu")
        return mx.gpu
    raise CsmError(f"unknown device {device!r} for MLX; use gpu or cpu")


def pick_dtype(dtype: str | None, device: mx.Device) -> mx.Dtype:
    if dtype is None:
        # bf16 halves the bytes read per frame on GPUs; MLX's CPU kernels run float32 fastest
        return mx.bfloat16 if device == mx.gpu else mx.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CsmError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def _mlx_tensors(ckpt: Checkpoint):
    """(name, mx.array) in the checkpoint's own naming. safetensors through `mx.load`, which
    reads bfloat16 (safetensors' own MLX reader goes through numpy, which has no bfloat16);
    ckpt.pt goes through torch once, at load."""
    if ckpt.is_safetensors:
        for f in ckpt.files:
            yield from _mx_load(f).items()
        return
    import torch

    for name, tensor in iter_tensors(ckpt):
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: carry the bits, not a float32 copy
            yield name, mx.array(tensor.view(torch.uint16).numpy()).view(mx.bfloat16)
        else:
            yield name, mx.array(tensor.numpy())


def _mx_load(path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (truncated or not a safetensors file?)") from None


def load_model(ckpt: Checkpoint, dtype: mx.Dtype = mx.float32, quantize: int | None = None, group_size: int = 64) -> Model:
    """Any checkpoint the torch backend loads, or a directory converted for MLX (quantized ones
    included: their config.json says how). `quantize` quantizes a float checkpoint at load."""
    config = ckpt.config
    model = Model(config)
    source = f"{ckpt.format} checkpoint {ckpt.root}"
    if ckpt.quantization is not None:
        if quantize is not None:
            raise CsmError(f"{ckpt.root} is already quantized ({ckpt.quantization}); load it without --quantize")
        quantize_skeleton(model, ckpt.quantization)
        weights = [(name, t) for f in ckpt.files for name, t in _mx_load(f).items()]
        try:
            model.load_weights(weights, strict=True)
        except ValueError as exc:
            raise CsmError(f"the quantized weights of {ckpt.root} do not fit its config: {exc}") from None
    else:
        weights = []
        for ours, t in csm_tensors(_mlx_tensors(ckpt), ckpt.format, config):
            weights.append((ours, t.astype(dtype) if mx.issubdtype(t.dtype, mx.floating) else t))
        check_complete({k: tuple(v.shape) for k, v in weights}, config, source)
        model.load_weights(weights, strict=True)
        if quantize is not None:
            quantize_model(model, quantize, group_size)
    mx.eval(model.parameters())
    return model.eval()


class FrameGenerator(FrameLoop):
    """Runs the frame loop of one model; `compile` traces the per-frame decoder work once per
    sampling setting; `overlap` queues each frame before the last one is read back (off: each
    frame is evaluated before the next is built, for measuring what the overlap buys)."""

    def __init__(self, model: Model, compile: bool = True, overlap: bool = True):
        self.model = model
        self.config: CsmConfig = model.config
        self.max_seq_len = self.config.backbone.max_seq_len
        self.compile = compile
        self.overlap = overlap
        self._frame_tails: dict[SamplingParams, Callable] = {}

    def frame_tail(self, h: mx.array, key: mx.array, params: SamplingParams) -> mx.array:
        """The last backbone state h [B, D] -> the frame's 32 codes [B, 32] (int32)."""
        m = self.model
        keys = mx.random.split(key, self.config.audio_num_codebooks)
        c = sample(m.codebook0_head(h), params, keys[0])
        codes = [c]
        cache = m.decoder.make_cache()  # positions restart at 0 every frame
        x = mx.stack([h, m.embed_audio(0, c)], axis=1)  # [B, 2, D]
        for i in range(1, self.config.audio_num_codebooks):
            state = m.decoder(m.projection(x), cache)[:, -1]  # [B, D_dec]
            c = sample(m.codebook_logits(i, state), params, keys[i])
            codes.append(c)
            x = m.embed_audio(i, c)[:, None]  # [B, 1, D]
        return mx.stack(codes, axis=1)

    def _tail_for(self, params: SamplingParams) -> Callable:
        if params not in self._frame_tails:
            def tail(h, key):
                return self.frame_tail(h, key, params)
            # the weights are inputs of the trace (not constants baked into it)
            self._frame_tails[params] = mx.compile(tail, inputs=self.model.state) if self.compile else tail
        return self._frame_tails[params]

    def frame(self, x: mx.array, cache, key: mx.array, params: SamplingParams) -> mx.array:
        """One frame of codes [B, 32] after the new positions' embeddings x [B, T, D]."""
        h = self.model.backbone(x, cache)[:, -1]  # [B, D]
        return self._tail_for(params)(h, key)

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
        """Prompt frames [T, 33] -> blocks of generated codes [n, 32]. The end-of-speech check
        runs every frame here (MLX evaluates lazily, the check is the evaluation), so every frame
        is its own block; `first_block` and `check_every` exist for the shared protocol."""
        n = tokens.shape[0]
        check_fits(n, max_frames, self.max_seq_len)
        m = self.model
        key = mx.random.key(seed if seed is not None else secrets.randbits(63))
        cache = m.backbone.make_cache()
        audio_mask = mx.array([[[True] * self.config.audio_num_codebooks + [False]]])  # [1, 1, 33]
        zero_text = mx.zeros((1, 1), dtype=mx.int32)

        def next_frame(x: mx.array) -> mx.array:
            nonlocal key
            key, frame_key = mx.random.split(key)
            codes = self.frame(x, cache, frame_key, params)  # [1, 32], lazy
            mx.async_eval(codes)
            return codes

        def after(codes: mx.array) -> mx.array:
            return m.embed_frames(mx.concatenate([codes, zero_text], axis=1)[:, None], audio_mask)  # [1, 1, D]

        # Frame i+1's graph depends only on frame i's lazy codes: it is built and queued before
        # frame i is read back for the end-of-speech check, so building overlaps computing. Once
        # an all-zero frame ends the loop, the one frame queued after it is dropped (the loop is
        # causal: the frames before are the same as without it). Measured on MLX 0.32.4's Linux
        # CPU build (tiny bench model, 16 frames, interleaved): 0.97-1.06x, i.e. noise, because
        # there `async_eval` itself blocks until all but the last few ops are dispatched (a
        # 400-op graph: it returned after 2.65 of 2.98 s); on Metal it returns once the work is
        # committed, which is what mlx-lm's generate relies on. Re-measure on a Mac with
        # `benchmarks/mlx_vs_torch.py --impl mlx-sync mlx`.
        codes = next_frame(m.embed_frames(mx.array(tokens)[None], mx.array(mask)[None]))  # prompt [1, T, D]
        for i in range(max_frames):
            last = i + 1 == max_frames
            queued = next_frame(after(codes)) if self.overlap and not last else None
            block = np.array(codes).astype(np.int64)
            if not block.any():  # end of speech: an all-zero frame, not kept
                return
            yield block
            if not last:
                codes = queued if self.overlap else next_frame(after(codes))
