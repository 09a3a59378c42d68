"""Tensor names of the Mimi codec: transformers' ``MimiModel`` layout -> kyutai's original layout.

Backend-neutral (no torch import): the values may be torch tensors, numpy arrays or MLX arrays; only
``.shape``, ``.reshape`` and ``.swapaxes`` are used on them, plus a concatenation function that is
passed in (or picked from the value's type).

The original names are the ones in kyutai's ``tokenizer-e351c8d8-checkpoint125.safetensors`` (what
moshi and moshi_mlx load). transformers' checkpoints (e.g. the ``codec_model.`` part of a
``CsmForConditionalGeneration`` safetensors) use the flat ``MimiModel`` layout on disk
(``encoder.layers.N``, ``encoder_transformer.layers.N``, ``downsample``...); transformers >= 5 nests
them in memory (``encoder.encoder_seanet.layers.N``, ``encoder.encoder_transformer``...). Both are
accepted.

Layout differences besides names:

* attention: transformers has separate ``q_proj`` / ``k_proj`` / ``v_proj`` ``[D, D]`` weights; the
  original has one ``in_proj_weight`` ``[3D, D]`` = rows ``[q; k; v]``.
* RoPE: the original (moshi) rotates interleaved pairs ``(x0, x1), (x2, x3)...`` of each head,
  transformers rotates halves ``(x_i, x_{i+hd/2})``. transformers' conversion permuted the q and k
  rows of every head ``[re0, im0, re1, im1, ...] -> [re0, re1, ..., im0, im1, ...]``; we undo it.
* SEANet: transformers names every conv of the decoder ``conv`` including the transposed
  (upsampling) ones, the original calls those ``convtr.convtr``; the weight layouts are the same
  (torch ``Conv1d`` / ``ConvTranspose1d``).
* Codebooks: ``codebook.embed_sum`` / ``cluster_usage`` / ``initialized`` ->
  ``_codebook.embedding_sum`` / ``cluster_usage`` / ``_initialized`` (same values).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from csm.errors import CheckpointError
from csm.mimi_files import TRANSFORMER_NUM_HEADS

# Decoder SEANet layer indices that are transposed (upsampling) convolutions, for ratios [8, 6, 5, 4]:
# 0 conv, then per ratio (ELU, convtr, resblock), then ELU, conv.
DECODER_CONVTR_LAYERS = (2, 5, 8, 11)

# transformers >= 5 in-memory (nested) names -> the flat on-disk transformers names.
NESTED_TO_FLAT: tuple[tuple[str, str], ...] = (
    (r"^encoder\.encoder_seanet\.layers\.", "encoder.layers."),
    (r"^encoder\.encoder\.layers\.", "encoder.layers."),
    (r"^encoder\.encoder_transformer\.", "encoder_transformer."),
    (r"^encoder\.downsample\.", "downsample."),
    (r"^decoder\.upsample\.", "upsample."),
    (r"^decoder\.decoder_transformer\.", "decoder_transformer."),
    (r"^decoder\.decoder_seanet\.layers\.", "decoder.layers."),
    (r"^decoder\.decoder\.layers\.", "decoder.layers."),
)

_CONVTR = "|".join(str(i) for i in DECODER_CONVTR_LAYERS)
_TF = r"^(encoder|decoder)_transformer\.layers\.(\d+)\."
_ORIG_TF = r"\1_transformer.transformer.layers.\2."
_SEM = r"^quantizer\.semantic_residual_vector_quantizer\."
_ACO = r"^quantizer\.acoustic_residual_vector_quantizer\."

# Flat transformers names -> original names, first match wins. q/k/v are handled separately (QKV_RULE).
RULES: tuple[tuple[str, str], ...] = (
    # SEANet
    (rf"^decoder\.layers\.({_CONVTR})\.conv\.(weight|bias)$", r"decoder.model.\1.convtr.convtr.\2"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.conv\.(weight|bias)$", r"\1.model.\2.conv.conv.\3"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.block\.(\d+)\.conv\.(weight|bias)$", r"\1.model.\2.block.\3.conv.conv.\4"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.shortcut\.conv\.(weight|bias)$", r"\1.model.\2.shortcut.conv.conv.\3"),
    # resampling between the SEANet frame rate (25 Hz) and 12.5 Hz
    (r"^downsample\.conv\.weight$", "downsample.conv.conv.conv.weight"),
    (r"^upsample\.conv\.weight$", "upsample.convtr.convtr.convtr.weight"),
    # transformers
    (_TF + r"self_attn\.o_proj\.weight$", _ORIG_TF + "self_attn.out_proj.weight"),
    (_TF + r"mlp\.fc1\.weight$", _ORIG_TF + "linear1.weight"),
    (_TF + r"mlp\.fc2\.weight$", _ORIG_TF + "linear2.weight"),
    (_TF + r"input_layernorm\.(weight|bias)$", _ORIG_TF + r"norm1.\3"),
    (_TF + r"post_attention_layernorm\.(weight|bias)$", _ORIG_TF + r"norm2.\3"),
    (_TF + r"self_attn_layer_scale\.scale$", _ORIG_TF + "layer_scale_1.scale"),
    (_TF + r"mlp_layer_scale\.scale$", _ORIG_TF + "layer_scale_2.scale"),
    # quantizer: semantic = rvq_first (1 codebook), acoustic = rvq_rest (31 codebooks)
    (_SEM + r"(input_proj|output_proj)\.weight$", r"quantizer.rvq_first.\1.weight"),
    (_ACO + r"(input_proj|output_proj)\.weight$", r"quantizer.rvq_rest.\1.weight"),
    (_SEM + r"layers\.(\d+)\.codebook\.embed_sum$", r"quantizer.rvq_first.vq.layers.\1._codebook.embedding_sum"),
    (_ACO + r"layers\.(\d+)\.codebook\.embed_sum$", r"quantizer.rvq_rest.vq.layers.\1._codebook.embedding_sum"),
    (_SEM + r"layers\.(\d+)\.codebook\.cluster_usage$", r"quantizer.rvq_first.vq.layers.\1._codebook.cluster_usage"),
    (_ACO + r"layers\.(\d+)\.codebook\.cluster_usage$", r"quantizer.rvq_rest.vq.layers.\1._codebook.cluster_usage"),
    (_SEM + r"layers\.(\d+)\.codebook\.initialized$", r"quantizer.rvq_first.vq.layers.\1._codebook._initialized"),
    (_ACO + r"layers\.(\d+)\.codebook\.initialized$", r"quantizer.rvq_rest.vq.layers.\1._codebook._initialized"),
)

# q/k/v of one attention layer -> rows [q; k; v] of the original in_proj_weight.
QKV_RULE = (_TF + r"self_attn\.(q|k|v)_proj\.weight$", _ORIG_TF + "self_attn.in_proj_weight")

# Transformers-side names with no counterpart (non-persistent buffers some versions save).
IGNORED = (r"\.rotary_emb\.inv_freq$",)

_COMPILED = tuple((re.compile(p), r) for p, r in RULES)
_QKV = re.compile(QKV_RULE[0])
_NESTED = tuple((re.compile(p), r) for p, r in NESTED_TO_FLAT)
_IGNORED = tuple(re.compile(p) for p in IGNORED)


def flatten_name(name: str) -> str:
    """A transformers >= 5 nested name -> the flat on-disk transformers name (others unchanged)."""
    for pattern, repl in _NESTED:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def _default_concat(values: list) -> Any:
    module = type(values[0]).__module__.split(".")[0]
    if module == "torch":
        import torch  # only when the values already are torch tensors

        return torch.cat(values, dim=0)
    if module == "mlx":
        import mlx.core as mx

        return mx.concatenate(values, axis=0)
    import numpy as np

    return np.concatenate(values, axis=0)


def unrope_permute(weight: Any, num_heads: int) -> Any:
    """transformers' rotate-half q/k rows -> the original interleaved-pair rows, per head.

    Inverse of transformers' ``w.view(H, hd // 2, 2, D).transpose(1, 2).reshape(H * hd, D)``."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def transformers_to_original(
    state: dict[str, Any],
    num_heads: int = TRANSFORMER_NUM_HEADS,
    concat: Callable[[list], Any] | None = None,
) -> dict[str, Any]:
    """Rename (and re-layout) a transformers ``MimiModel`` state dict (no ``codec_model.`` prefix) to
    kyutai's original names. Raises CheckpointError naming any tensor it does not know, or an
    attention layer with q/k/v missing."""
    concat = concat or _default_concat
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for name, value in state.items():
        flat = flatten_name(name)
        if any(p.search(flat) for p in _IGNORED):
            continue
        m = _QKV.match(flat)
        if m:
            target = _QKV.sub(QKV_RULE[1], flat, count=1)
            qkv.setdefault(target, {})[m.group(3)] = value
            continue
        for pattern, repl in _COMPILED:
            if pattern.match(flat):
                out[pattern.sub(repl, flat, count=1)] = value
                break
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise CheckpointError(
            f"unknown Mimi codec tensor name(s) in the transformers checkpoint: {shown}; "
            "this is not a transformers MimiModel state dict this version understands"
        )
    for target, parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(
                f"Mimi codec attention {target.removesuffix('.in_proj_weight')} lacks "
                f"{', '.join(p + '_proj' for p in missing)} in the transformers checkpoint"
            )
        out[target] = concat(
            [unrope_permute(parts["q"], num_heads), unrope_permute(parts["k"], num_heads), parts["v"]]
        )
    return out
