"""CSM in PyTorch: two Llama stacks, the frame embeddings and the codebook heads.

Spec sheet (CSM-1B; any dims come from `csm.config.CsmConfig`):
- backbone: Llama-3.2 style, 16 layers, width 2048, 32 query / 8 KV heads, SwiGLU 8192,
  RMSNorm, RoPE base 500k with Llama-3 scaling; no token embedding, no output head.
- decoder: same blocks, 4 layers, width 1024, 8 / 2 heads.
- a sequence position is a frame of 33 columns (32 codebooks + 1 text token); its embedding is
  the masked sum of the columns' embeddings.
- no biases anywhere; RoPE is rotate-half (q/k rows of Sesame's interleaved checkpoints are
  permuted at load, see `csm.weights`).
- static, preallocated KV caches written at on-device positions (gpt-fast style): shapes never
  change from one frame to the next, so a whole frame can be captured as a CUDA graph.

Parameter names are csm's canonical names (`csm.weights`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from csm.config import CsmConfig, TransformerConfig


def rope_frequencies(t: TransformerConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3 scaling of the long wavelengths."""
    inv_freq = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=torch.float64) / t.head_dim))
    s = t.rope_scaling
    if s is None:
        return inv_freq.float()
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_medium, blended, scaled).float()


def rope_table(t: TransformerConfig, num_positions: int) -> torch.Tensor:
    """cos and sin for every position: [num_positions, 2, head_dim/2], float32."""
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float32), rope_frequencies(t))
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim], table [B or 1, T, 2, head_dim/2]; in float32 like the reference."""
    cos, sin = table[:, None, :, 0], table[:, None, :, 1]  # [B, 1, T, head_dim/2]: shared by the heads
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32, scale in the model dtype (torchtune and transformers agree)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Preallocated keys and values [B, kv_heads, max_len, head_dim], written in place."""

    def __init__(self, batch_size: int, t: TransformerConfig, max_len: int, device, dtype):
        shape = (batch_size, t.num_kv_heads, max_len, t.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def rows(self, start: int, stop: int) -> KVCache:
        """The cache of rows start:stop (the same memory): a slot's, or a batch bucket's."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        return view

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, kv_heads, T, head_dim] at `input_pos`: [T] for every row alike, or
        [B, T] when each row (stream) of a batch is at its own position."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is [B, T, kv_heads, head_dim]
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, t: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.q_proj = nn.Linear(t.hidden_size, t.num_heads * t.head_dim, bias=False)
        self.k_proj = nn.Linear(t.hidden_size, t.num_kv_heads * t.head_dim, bias=False)
        self.v_proj = nn.Linear(t.hidden_size, t.num_kv_heads * t.head_dim, bias=False)
        self.o_proj = nn.Linear(t.num_heads * t.head_dim, t.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by `fuse`

    def fuse(self) -> None:
        """One [q; k; v] matmul instead of three: at batch 1 every matmul is a memory-bound
        kernel launch, and a frame runs 31 x 4 + 16 of these. Inference only: the checkpoint
        names (and training) use the separate projections, which are dropped here."""
        self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, rope, mask, input_pos=None, cache: KVCache | None = None):
        b, n, _ = x.shape
        if self.qkv_proj is not None:
            kv_width = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
        # grouped-query attention inside the kernel: no copy of the cache per query head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, t: TransformerConfig):
        super().__init__()
        self.intermediate_size = t.intermediate_size
        self.gate_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.up_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by `fuse`

    def fuse(self) -> None:
        """One [gate; up] matmul instead of two (see `Attention.fuse`)."""
        self.gate_up_proj = fused_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def fused_linear(*parts: nn.Linear) -> nn.Linear:
    """A bias-free Linear whose output is the concatenation of `parts`' outputs."""
    weight = torch.cat([p.weight for p in parts], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class TransformerBlock(nn.Module):
    def __init__(self, t: TransformerConfig):
        super().__init__()
        self.self_attn = Attention(t)
        self.mlp = MLP(t)
        self.input_layernorm = RMSNorm(t.hidden_size, t.norm_eps)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.norm_eps)

    def forward(self, x, rope, mask, input_pos=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, input_pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A Llama stack without embeddings or head: hidden states in, normalised hidden states out."""

    def __init__(self, t: TransformerConfig, num_positions: int):
        super().__init__()
        self.config = t
        self.layers = nn.ModuleList(TransformerBlock(t) for _ in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.norm_eps)
        self.register_buffer("rope", rope_table(t, num_positions), persistent=False)
        self.gradient_checkpointing = False  # training: recompute each layer's activations

    def make_cache(self, batch_size: int, max_len: int, device, dtype) -> list[KVCache]:
        return [KVCache(batch_size, self.config, max_len, device, dtype) for _ in self.layers]

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """x [B, T, D] at positions `input_pos`: [T] for every row, or [B, T] per row (a batch of
        streams at different positions). With a cache, attend to every cached position up to
        one's own; without, plain causal attention over x (training)."""
        pos = input_pos if input_pos.dim() == 2 else input_pos[None]  # [B or 1, T]
        rope = self.rope[pos]  # [B or 1, T, 2, hd/2]
        keys = pos[0] if cache is None else torch.arange(cache[0].k.shape[2], device=x.device)
        visible = (keys[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # [B or 1, 1, T, keys]
        # additive, in the activations' dtype, once per pass: a boolean mask is converted inside
        # every layer's attention call (one extra kernel per layer per decoder step)
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each layer's input; its activations are recomputed in the backward pass
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, input_pos, None, use_reentrant=False)
            else:
                x = layer(x, rope, mask, input_pos, None if cache is None else cache[i])
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
        self.backbone = Transformer(b, b.max_seq_len)
        self.decoder = Transformer(d, config.audio_num_codebooks)
        self.projection = nn.Linear(b.hidden_size, d.hidden_size, bias=False)
        self.codebook0_head = nn.Linear(b.hidden_size, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(
            torch.empty(config.audio_num_codebooks - 1, d.hidden_size, config.audio_vocab_size)
        )
        self.register_buffer(
            "codebook_offsets", torch.arange(config.audio_num_codebooks) * config.audio_vocab_size, persistent=False
        )

    # --- embeddings ---------------------------------------------------------------------------
    def embed_frames(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask [B, T, 33] -> [B, T, D]: masked sum of 32 audio columns and the text column."""
        text = self.text_embeddings(tokens[..., -1])  # [B, T, D]
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)  # [B, T, 32, D]
        columns = torch.cat([audio, text.unsqueeze(-2)], dim=-2)  # [B, T, 33, D]
        return (columns * mask.unsqueeze(-1).to(columns.dtype)).sum(dim=-2)

    def embed_audio(self, codebook: int, codes: torch.Tensor) -> torch.Tensor:
        """codes [B] of one codebook -> [B, D]."""
        return self.audio_embeddings(codes + codebook * self.config.audio_vocab_size)

    # --- heads ----------------------------------------------------------------------------------
    def codebook_logits(self, codebook: int, decoder_hidden: torch.Tensor) -> torch.Tensor:
        """Logits of codebook i >= 1 from the decoder's hidden state [..., D_dec]."""
        return decoder_hidden @ self.audio_head[codebook - 1]

    def fuse_projections(self, after_each_layer: Callable[[], None] | None = None) -> Model:
        """Fuse q/k/v and gate/up weights of both stacks for inference (see `Attention.fuse`),
        layer by layer, each layer's separate weights dropped before the next is fused;
        `after_each_layer` can hand the freed memory back (see `csm_torch.loading`)."""
        for stack in (self.backbone, self.decoder):
            for layer in stack.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()
                if after_each_layer is not None:
                    after_each_layer()
        return self

    # --- training -------------------------------------------------------------------------------
    def forward_train(
        self, tokens: torch.Tensor, mask: torch.Tensor, audio_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits.

        tokens, mask [B, T, 33] is the whole sequence; audio_codes [B, N, 32] are the codes of the
        N frames to train, and the backbone hidden state that predicts each of them must be picked
        by the caller. Here: every position t predicts frame t+1, so pass the frames of positions
        1..T as audio_codes (N = T - 1) and select afterwards.

        Returns (codebook-0 logits [B, T, V] for every position, decoder logits [B, N, 31, V]
        for codebooks 1..31 of the given frames, teacher-forced on their true codes).
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.backbone(self.embed_frames(tokens, mask), positions)  # [B, T, D]
        c0_logits = self.codebook0_head(h)
        n = audio_codes.shape[1]
        # decoder input per frame: [h_t, emb(c0), emb(c1), ..., emb(c30)] -> 32 positions
        codes = audio_codes[..., :-1] + self.codebook_offsets[:-1]  # [B, N, 31]
        dec_in = torch.cat([h[:, :n, None, :], self.audio_embeddings(codes)], dim=2)  # [B, N, 32, D]
        b = dec_in.shape[0]
        dec_in = self.projection(dec_in).flatten(0, 1)  # [B*N, 32, D_dec]
        dec_h = self.decoder(dec_in, torch.arange(dec_in.shape[1], device=tokens.device))
        dec_h = dec_h[:, 1:].unflatten(0, (b, n))  # [B, N, 31, D_dec]: position i predicts codebook i
        dec_logits = torch.einsum("bnkd,kdv->bnkv", dec_h, self.audio_head)
        return c0_logits, dec_logits
