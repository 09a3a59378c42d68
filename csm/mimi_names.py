"""Tensor names of the Mimi codec: transformers' ``MimiModel`` layout <-> kyutai's original layout.

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

The names are one table, `NAMES`, of template pairs read in both directions (as in csm/weights.py).
``original_to_transformers`` is the exact inverse of ``transformers_to_original`` (only renames,
row permutations and a split): a round trip gives back every tensor bit for bit.
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

# transformers >= 5 in-memory (nested) name prefixes -> the flat on-disk transformers prefixes.
NESTED_TO_FLAT: tuple[tuple[str, str], ...] = (
    ("encoder.encoder_seanet.layers.", "encoder.layers."),
    ("encoder.encoder.layers.", "encoder.layers."),
    ("encoder.encoder_transformer.", "encoder_transformer."),
    ("encoder.downsample.", "downsample."),
    ("decoder.upsample.", "upsample."),
    ("decoder.decoder_transformer.", "decoder_transformer."),
    ("decoder.decoder_seanet.layers.", "decoder.layers."),
    ("decoder.decoder.layers.", "decoder.layers."),
)

# What each "{placeholder}" of a template matches; the same text is put in on the other side.
PLACEHOLDERS = {
    "side": "encoder|decoder",
    "n": r"\d+",
    "i": r"\d+",
    "p": "weight|bias",
    "proj": "input_proj|output_proj",
    "qkv": "q|k|v",
    "convtr": "|".join(str(i) for i in DECODER_CONVTR_LAYERS),
}

_TF = "{side}_transformer.layers.{n}."  # a transformer layer: flat transformers / original
_ORIG_TF = "{side}_transformer.transformer.layers.{n}."
# per transformer layer; q/k/v are not renamed but merged (QKV)
_LAYER = (
    ("self_attn.o_proj.weight", "self_attn.out_proj.weight"),
    ("mlp.fc1.weight", "linear1.weight"),
    ("mlp.fc2.weight", "linear2.weight"),
    ("input_layernorm.{p}", "norm1.{p}"),
    ("post_attention_layernorm.{p}", "norm2.{p}"),
    ("self_attn_layer_scale.scale", "layer_scale_1.scale"),
    ("mlp_layer_scale.scale", "layer_scale_2.scale"),
)
# quantizer: semantic = rvq_first (1 codebook), acoustic = rvq_rest (31 codebooks)
_QUANTIZERS = (("semantic", "first"), ("acoustic", "rest"))
_CODEBOOK = (("embed_sum", "embedding_sum"), ("cluster_usage", "cluster_usage"), ("initialized", "_initialized"))

# (flat transformers template, original template), read in both directions; the first row whose
# template matches wins, and a name maps only if its image maps back to it, so the decoder's
# transposed convs (first row) never pass for plain convs either way.
NAMES: tuple[tuple[str, str], ...] = (
    # SEANet
    ("decoder.layers.{convtr}.conv.{p}", "decoder.model.{convtr}.convtr.convtr.{p}"),
    ("{side}.layers.{n}.conv.{p}", "{side}.model.{n}.conv.conv.{p}"),
    ("{side}.layers.{n}.block.{i}.conv.{p}", "{side}.model.{n}.block.{i}.conv.conv.{p}"),
    ("{side}.layers.{n}.shortcut.conv.{p}", "{side}.model.{n}.shortcut.conv.conv.{p}"),
    # resampling between the SEANet frame rate (25 Hz) and 12.5 Hz
    ("downsample.conv.weight", "downsample.conv.conv.conv.weight"),
    ("upsample.conv.weight", "upsample.convtr.convtr.convtr.weight"),
    *[(_TF + ours, _ORIG_TF + theirs) for ours, theirs in _LAYER],
    *[(f"quantizer.{q}_residual_vector_quantizer.{{proj}}.weight", f"quantizer.rvq_{rvq}.{{proj}}.weight")
      for q, rvq in _QUANTIZERS],
    *[(f"quantizer.{q}_residual_vector_quantizer.layers.{{i}}.codebook.{ours}",
       f"quantizer.rvq_{rvq}.vq.layers.{{i}}._codebook.{theirs}")
      for q, rvq in _QUANTIZERS for ours, theirs in _CODEBOOK],
)

# q/k/v of one attention layer <-> rows [q; k; v] of the original in_proj_weight.
QKV = (_TF + "self_attn.{qkv}_proj.weight", _ORIG_TF + "self_attn.in_proj_weight")

# Transformers-side names with no counterpart (non-persistent buffers some versions save).
IGNORED = (r"\.rotary_emb\.inv_freq$",)


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m[1]}>{PLACEHOLDERS[m[1]]})", re.escape(template)))


_TO_ORIGINAL = tuple((_template_regex(ours), theirs) for ours, theirs in NAMES)
_TO_TRANSFORMERS = tuple((_template_regex(theirs), ours) for ours, theirs in NAMES)
_QKV, _IN_PROJ = (_template_regex(t) for t in QKV)
_IGNORED = tuple(re.compile(p) for p in IGNORED)


def _first_match(name: str, rules: tuple) -> str | None:
    for pattern, template in rules:
        if m := pattern.fullmatch(name):
            return template.format(**m.groupdict())
    return None


def _rename(name: str, rules: tuple, inverse: tuple) -> str | None:
    """`name` through the first matching row of `rules`; None if no row matches or if the result
    does not map back to `name` through `inverse` (the table is a bijection whatever its order)."""
    out = _first_match(name, rules)
    return out if out is not None and _first_match(out, inverse) == name else None


def _unknown(names: list[str], where: str, what: str) -> CheckpointError:
    shown = ", ".join(names[:8]) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")
    return CheckpointError(
        f"unknown Mimi codec tensor name(s) in {where}: {shown}; this is not {what} this version understands"
    )


def flatten_name(name: str) -> str:
    """A transformers >= 5 nested name -> the flat on-disk transformers name (others unchanged)."""
    for nested, flat in NESTED_TO_FLAT:
        if name.startswith(nested):
            return flat + name[len(nested):]
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
        if m := _QKV.fullmatch(flat):
            qkv.setdefault(QKV[1].format(**m.groupdict()), {})[m["qkv"]] = value
        elif (target := _rename(flat, _TO_ORIGINAL, _TO_TRANSFORMERS)) is not None:
            out[target] = value
        else:
            unknown.append(name)
    if unknown:
        raise _unknown(unknown, "the transformers checkpoint", "a transformers MimiModel state dict")
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


def rope_permute(weight: Any, num_heads: int) -> Any:
    """The original interleaved-pair q/k rows -> transformers' rotate-half rows, per head (the
    inverse of `unrope_permute`)."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def original_to_transformers(state: dict[str, Any], num_heads: int = 8) -> dict[str, Any]:
    """Rename (and re-layout) kyutai's original Mimi state dict to the flat transformers
    ``MimiModel`` names (no ``codec_model.`` prefix): the inverse of `transformers_to_original`.
    Raises CheckpointError naming any tensor it does not know."""
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in state.items():
        if m := _IN_PROJ.fullmatch(name):
            dim = value.shape[0] // 3
            if value.shape[0] != 3 * dim:
                raise CheckpointError(f"Mimi codec tensor {name} has shape {tuple(value.shape)}: expected [3 * D, D]")
            q, k, v = (QKV[0].format(**m.groupdict(), qkv=part) for part in "qkv")
            out[q] = rope_permute(value[:dim], num_heads)
            out[k] = rope_permute(value[dim:2 * dim], num_heads)
            out[v] = value[2 * dim:]
        elif (target := _rename(name, _TO_TRANSFORMERS, _TO_ORIGINAL)) is not None:
            out[target] = value
        else:
            unknown.append(name)
    if unknown:
        raise _unknown(unknown, "kyutai's checkpoint", "a Mimi state dict")
    return out
