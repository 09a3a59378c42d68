"""The physical limit of one frame at batch 1: reading every weight it uses once from memory.

A frame reads the backbone once (its codebook-0 head included) and, 31 times, the decoder, the
projection into it and one codebook's slice of `audio_head`. The embedding tables are only
gathered (a few rows per frame), so they do not count. For csm-1b that is 4.55 G parameters per
frame (977 M for the backbone, 115 M for each decoder pass). Dividing a measured copy bandwidth
by those bytes gives the most frames/s the memory system allows; a batch reads the weights once
for every stream, so batched rows can pass this batch-1 bound.
"""

from __future__ import annotations

import functools
import time

from csm.config import CsmConfig, TransformerConfig

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}


def stack_params(t: TransformerConfig) -> int:
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    attention = t.hidden_size * (2 * q + 2 * kv)  # q, o; k, v
    mlp = 3 * t.hidden_size * t.intermediate_size
    norms = 2 * t.hidden_size
    return t.num_layers * (attention + mlp + norms) + t.hidden_size


def params_per_frame(config: CsmConfig) -> int:
    b, d = config.backbone, config.decoder
    backbone = stack_params(b) + config.audio_vocab_size * b.hidden_size  # + codebook-0 head
    decoder_step = stack_params(d) + b.hidden_size * d.hidden_size + d.hidden_size * config.audio_vocab_size
    return backbone + (config.audio_num_codebooks - 1) * decoder_step


def bytes_per_frame(config: CsmConfig, dtype: str) -> int:
    return params_per_frame(config) * BYTES_PER_ELEMENT[dtype]


def _best_rate(copy, sync, nbytes: int, repeats: int) -> float:
    """Bytes read + written per second of the fastest of `repeats` copies (after one warm-up)."""
    copy()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def torch_copy_bandwidth(device, nbytes: int, repeats: int = 10) -> float:
    """Measured copy bandwidth of a torch device, bytes/s."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if src.device.type == "cuda" else (lambda: None)
    rate = _best_rate(functools.partial(dst.copy_, src), sync, nbytes, repeats)
    del src, dst
    return rate


def mlx_copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Measured copy bandwidth of MLX's default device, bytes/s (`a + 0` reads a, writes a new array)."""
    import mlx.core as mx

    src = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(src)
    return _best_rate(lambda: mx.eval(src + 0), mx.synchronize, nbytes, repeats)
