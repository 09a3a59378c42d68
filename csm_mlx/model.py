"""CSM in MLX: mlx-lm's Llama blocks for both stacks, the frame embeddings and the codebook heads.

Spec sheet (the same model as `csm_torch.model`; dims from `csm.config.CsmConfig`):
- backbone and decoder: `mlx_lm.models.llama.TransformerBlock` stacks (GQA attention, SwiGLU,
  RMSNorm), no token embedding, no output head; RoPE is mlx-lm's `initialize_rope`, rotate-half
  (`traditional=False`) with Llama-3 scaling, which is the layout `csm.weights` converts every
  checkpoint to;
- KV caches are mlx-lm's `KVCache`, one per layer; positions come from the cache offset;
- a sequence position is a frame of 33 columns (32 codebooks + 1 text token); its embedding is
  the masked sum of the columns' embeddings;
- `audio_head` stays the bare [31, D_dec, V] parameter of the checkpoints; a quantized model
  holds a `QuantizedCodebookHeads` there instead (see `csm_mlx.quantize`).

Parameter names are csm's canonical names (`csm.weights`), which are mlx-lm's Llama names.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.llama import ModelArgs, TransformerBlock

from csm.config import CsmConfig, TransformerConfig


def llama_args(t: TransformerConfig) -> ModelArgs:
    """mlx-lm's description of one stack (its RoPE reads the transformers-style scaling dict)."""
    scaling = None
    if t.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **dataclasses.asdict(t.rope_scaling)}
    return ModelArgs(
        model_type="llama",
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        intermediate_size=t.intermediate_size,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.norm_eps,
        vocab_size=0,  # neither stack owns a token embedding
        max_position_embeddings=t.max_seq_len,
        rope_theta=t.rope_theta,
        rope_traditional=False,
        rope_scaling=scaling,
    )


class Transformer(nn.Module):
    """A Llama stack without embeddings or head: hidden states in, normalised hidden states out."""

    def __init__(self, t: TransformerConfig):
        super().__init__()
        args = llama_args(t)
        self.layers = [TransformerBlock(args) for _ in range(t.num_layers)]
        self.norm = nn.RMSNorm(t.hidden_size, eps=t.norm_eps)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def __call__(self, x: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """x [B, T, D] at the positions after those already in `cache` (from 0 without one)."""
        mask = create_attention_mask(x, cache[0] if cache else None)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if cache is None else cache[i])
        return self.norm(x)


class Model(nn.Module):
    """The CSM parameters and the pieces of one frame (embeddings, stacks, heads); the backend's
    frame loop drives them."""

    def __init__(self, config: CsmConfig):
        super().__init__()
        self.config = config
        b, d = config.backbone, config.decoder
        self.text_embeddings = nn.Embedding(config.text_vocab_size, b.hidden_size)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, b.hidden_size)
        self.backbone = Transformer(b)
        self.decoder = Transformer(d)
        self.projection = nn.Linear(b.hidden_size, d.hidden_size, bias=False)
        self.codebook0_head = nn.Linear(b.hidden_size, config.audio_vocab_size, bias=False)
        self.audio_head = mx.zeros((config.audio_num_codebooks - 1, d.hidden_size, config.audio_vocab_size))
        # not a parameter: a leading underscore keeps it out of the weights
        self._codebook_offsets = mx.arange(config.audio_num_codebooks) * config.audio_vocab_size

    @property
    def layers(self) -> list[TransformerBlock]:
        """The blocks of both stacks. mlx-lm's tuner (`linear_to_lora_layers`, `load_adapters`) walks
        `model.layers`; a property, not an attribute, so the blocks get no second parameter name."""
        return [*self.backbone.layers, *self.decoder.layers]

    # --- embeddings ---------------------------------------------------------------------------
    def embed_frames(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """tokens, mask [B, T, 33] -> [B, T, D]: masked sum of 32 audio columns and the text column."""
        text = self.text_embeddings(tokens[..., -1])  # [B, T, D]
        audio = self.audio_embeddings(tokens[..., :-1] + self._codebook_offsets)  # [B, T, 32, D]
        columns = mx.concatenate([audio, text[..., None, :]], axis=-2)  # [B, T, 33, D]
        return (columns * mask[..., None].astype(columns.dtype)).sum(axis=-2)

    def embed_audio(self, codebook: int, codes: mx.array) -> mx.array:
        """codes [B] of one codebook -> [B, D]."""
        return self.audio_embeddings(codes + codebook * self.config.audio_vocab_size)

    # --- heads ----------------------------------------------------------------------------------
    def codebook_logits(self, codebook: int, decoder_hidden: mx.array) -> mx.array:
        """Logits of codebook i >= 1 from the decoder's hidden state [..., D_dec]."""
        if isinstance(self.audio_head, mx.array):
            return decoder_hidden @ self.audio_head[codebook - 1]
        return self.audio_head(codebook, decoder_hidden)
