"""4- and 8-bit weights for the MLX model (mlx-lm style: `nn.quantize` plus a config entry).

`nn.quantize` covers every `nn.Linear` and `nn.Embedding`. The decoder's `audio_head` is a bare
[31, D_dec, V] parameter that it skips, and at ~65 M parameters it is most of the decoder's
weights per step: it is quantized explicitly here, as 31 [V, D_dec] matrices (groups run along
D_dec, the axis the matmul reduces over, as in `nn.QuantizedLinear`). The Mimi codec is never
quantized (it is a separate model). A quantized directory stores, besides csm's names, only the
`.scales` / `.biases` companions mlx writes and the packed `audio_head.weight`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from csm.errors import CsmError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
EMBEDDING_BITS = 8


class QuantizedCodebookHeads(nn.Module):
    """`audio_head` quantized: codebook i's logits = h @ dequantized(weight[i-1]).T."""

    def __init__(self, num_heads: int, dims: int, vocab: int, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        packed = dims * bits // 32
        self.weight = mx.zeros((num_heads, vocab, packed), dtype=mx.uint32)
        self.scales = mx.zeros((num_heads, vocab, dims // group_size))
        self.biases = mx.zeros((num_heads, vocab, dims // group_size))

    @classmethod
    def from_float(cls, audio_head: mx.array, group_size: int, bits: int) -> QuantizedCodebookHeads:
        num_heads, dims, vocab = audio_head.shape
        heads = cls(num_heads, dims, vocab, group_size, bits)
        # [31, D, V] -> [31, V, D]: quantize along D
        heads.weight, heads.scales, heads.biases = mx.quantize(audio_head.swapaxes(1, 2), group_size, bits)
        return heads

    def __call__(self, codebook: int, h: mx.array) -> mx.array:
        i = codebook - 1
        return mx.quantized_matmul(h, self.weight[i], self.scales[i], self.biases[i], transpose=True,
                                   group_size=self.group_size, bits=self.bits)


def check_quantization(bits: int, group_size: int, model) -> None:
    """Every quantized matrix's reduced axis must be a whole number of groups."""
    if bits not in BITS:
        raise CsmError(f"cannot quantize to {bits} bits; use --quantize 4 or 8")
    if group_size not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES))
        raise CsmError(f"group size {group_size} is not supported by MLX; use one of {sizes}")
    c = model.config
    widths = {c.backbone.hidden_size, c.decoder.hidden_size, c.backbone.intermediate_size, c.decoder.intermediate_size,
              c.backbone.num_heads * c.backbone.head_dim, c.decoder.num_heads * c.decoder.head_dim}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise CsmError(f"this model's widths {bad} are not multiples of the group size {group_size}; "
                       f"choose a group size that divides them (--group-size 32)")


def quantization_config(bits: int, group_size: int = 64) -> dict:
    """mlx-lm's `quantization` entry for csm: defaults, plus per-module overrides for the embeddings.

    The embeddings stay at 8 bits whatever `bits` is: a lookup reads a few rows per frame, so fewer
    bits save memory but no time, and their error goes straight into the residual stream (on the
    tiny test model, 4-bit embeddings cost more logit fidelity than all 4-bit layers together)."""
    embeddings = {"group_size": group_size, "bits": max(bits, EMBEDDING_BITS)}
    return {"group_size": group_size, "bits": bits, "text_embeddings": embeddings, "audio_embeddings": dict(embeddings)}


def _parse(quantization: dict) -> tuple[int, int]:
    try:
        return int(quantization["bits"]), int(quantization["group_size"])
    except (KeyError, TypeError, ValueError):
        raise CsmError(f"config.json has a malformed quantization entry {quantization!r}; "
                       'expected {"group_size": 64, "bits": 4}') from None


def _quantize_layers(model, quantization: dict) -> None:
    """nn.quantize with mlx-lm's per-path overrides (a dict entry under the module's path)."""
    bits, group_size = _parse(quantization)
    check_quantization(bits, group_size, model)

    def predicate(path: str, module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        override = quantization.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)


def quantize_model(model, bits: int, group_size: int = 64) -> dict:
    """Quantize `model` in place (every Linear and Embedding, and `audio_head`); returns the
    config entry that describes it."""
    quantization = quantization_config(bits, group_size)
    _quantize_layers(model, quantization)
    model.audio_head = QuantizedCodebookHeads.from_float(model.audio_head, group_size, bits)
    mx.eval(model.parameters())
    return quantization


def quantize_skeleton(model, quantization: dict) -> None:
    """Give a freshly built model the quantized layout described by a config's `quantization`
    entry, so that a quantized directory's weights load into it as they are."""
    _quantize_layers(model, quantization)
    bits, group_size = _parse(quantization)
    num_heads, dims, vocab = model.audio_head.shape
    model.audio_head = QuantizedCodebookHeads(num_heads, dims, vocab, group_size, bits)
