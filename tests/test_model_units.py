"""Units of csm_torch.model on tiny dims: the static KV cache written at per-row positions, a batch
of streams at different positions against each stream alone, and the RoPE table (against plain
cos/sin, transformers' rotate-half, and mlx-lm's RoPE as the MLX backend runs it).

Llama-3 frequency scaling against transformers' ROPE_INIT_FUNCTIONS["llama3"] is tested on
CSM-1B's dims in test_config.py (`test_rope_frequencies_match_transformers_llama3_init`)."""

import numpy as np
import pytest
import torch

from csm.config import RopeScaling, TransformerConfig
from csm_torch.model import KVCache, Transformer, apply_rope, rope_frequencies, rope_table

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SCALED = TransformerConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64,
                           head_dim=8, max_seq_len=32, rope_scaling=RopeScaling())
UNSCALED = TransformerConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64,
                             head_dim=8, max_seq_len=32, rope_scaling=None)
SENTINEL = 7.0


# --- KV cache ---------------------------------------------------------------------------------------


def sentinel_cache(batch_size: int, max_len: int = 8) -> KVCache:
    cache = KVCache(batch_size, SCALED, max_len, "cpu", torch.float32)
    cache.k.fill_(SENTINEL)
    cache.v.fill_(-SENTINEL)
    return cache


def kv(batch_size: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, SCALED.num_kv_heads, steps, SCALED.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_kv_cache_per_row_positions_write_each_row_at_its_own():
    cache = sentinel_cache(batch_size=2)
    k, v = kv(2, steps=2)
    positions = torch.tensor([[1, 2], [4, 5]])  # row 0 at 1..2, row 1 at 4..5
    cache.update(positions, k, v)
    for row, written in enumerate(positions.tolist()):
        torch.testing.assert_close(cache.k[row, :, written], k[row], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[row, :, written], v[row], rtol=0, atol=0)
        untouched = [p for p in range(cache.k.shape[2]) if p not in written]
        assert (cache.k[row, :, untouched] == SENTINEL).all()
        assert (cache.v[row, :, untouched] == -SENTINEL).all()


def test_kv_cache_shared_positions_write_every_row():
    cache = sentinel_cache(batch_size=2)
    k, v = kv(2, steps=2)
    cache.update(torch.tensor([0, 3]), k, v)
    torch.testing.assert_close(cache.k[:, :, [0, 3]], k, rtol=0, atol=0)
    torch.testing.assert_close(cache.v[:, :, [0, 3]], v, rtol=0, atol=0)
    untouched = [1, 2, 4, 5, 6, 7]
    assert (cache.k[:, :, untouched] == SENTINEL).all() and (cache.v[:, :, untouched] == -SENTINEL).all()


def test_batch_at_per_row_positions_equals_each_row_alone():
    """Two streams with histories of 3 and 7 positions, prefilled right-padded to 7 and then
    decoded at their own positions (the short row overwrites its padding before anything
    attends to it), give each row's hidden states of that stream run alone."""
    torch.manual_seed(0)
    stack = Transformer(SCALED, SCALED.max_seq_len).eval()
    lengths, steps, d = [3, 7], 4, SCALED.hidden_size
    history = [torch.randn(1, n, d) for n in lengths]
    new = torch.randn(2, steps, d)  # one new position per stream per step

    with torch.inference_mode():
        alone = []
        for row, n in enumerate(lengths):
            cache = stack.make_cache(1, SCALED.max_seq_len, "cpu", torch.float32)
            stack(history[row], torch.arange(n), cache)
            alone.append(torch.cat([stack(new[row, None, i, None], torch.tensor([n + i]), cache)
                                    for i in range(steps)], dim=1))  # [1, steps, D]

        cache = stack.make_cache(2, SCALED.max_seq_len, "cpu", torch.float32)
        padded = torch.zeros(2, max(lengths), d)
        for row, n in enumerate(lengths):
            padded[row, :n] = history[row][0]
            padded[row, n:] = 100.0  # padding that must never reach a result
        stack(padded, torch.arange(max(lengths)), cache)
        position = torch.tensor(lengths)[:, None]  # [B, 1]
        batched = []
        for i in range(steps):
            batched.append(stack(new[:, i, None], position, cache))
            position = position + 1
        batched = torch.cat(batched, dim=1)  # [2, steps, D]

    for row in range(2):
        torch.testing.assert_close(batched[row], alone[row][0], rtol=1e-5, atol=1e-5)


# --- RoPE ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [SCALED, UNSCALED], ids=["llama3-scaled", "unscaled"])
def test_rope_table_is_cos_and_sin_of_position_times_frequency(t):
    n = 24
    table = rope_table(t, n)
    assert table.shape == (n, 2, t.head_dim // 2) and table.dtype == torch.float32
    angles = torch.arange(n, dtype=torch.float64)[:, None] * rope_frequencies(t).double()[None]
    torch.testing.assert_close(table[:, 0].double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(table[:, 1].double(), angles.sin(), rtol=0, atol=1e-6)


def test_unscaled_rope_frequencies_match_transformers_default():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=UNSCALED.hidden_size, num_attention_heads=UNSCALED.num_heads,
                     head_dim=UNSCALED.head_dim, rope_theta=UNSCALED.rope_theta)
    if "default" in ROPE_INIT_FUNCTIONS:  # transformers 4
        expected, _ = ROPE_INIT_FUNCTIONS["default"](hf, "cpu")
    else:  # transformers 5 moved it onto the rotary embedding class
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    torch.testing.assert_close(rope_frequencies(UNSCALED), expected.float(), rtol=1e-6, atol=0)


def test_apply_rope_is_transformers_rotate_half():
    """The q/k layout every checkpoint is converted to: dims i and i + head_dim/2 form a pair."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t = SCALED
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, t.num_heads, 5, t.head_dim, generator=g) for _ in "qk")
    positions = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])  # [B, T]: rows at their own positions
    table = rope_table(t, t.max_seq_len)[positions]  # [B, T, 2, hd/2]
    cos, sin = (torch.cat([table[:, :, j]] * 2, dim=-1) for j in (0, 1))  # transformers' [B, T, hd]
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, table), want_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, table), want_k, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [SCALED, UNSCALED], ids=["llama3-scaled", "unscaled"])
def test_mlx_lm_rope_after_its_kv_cache_matches_apply_rope(t):
    """What csm_mlx runs (an mlx-lm Llama block's RoPE at its KV cache's offset) rotates q exactly
    as csm_torch does at the same positions."""
    mx = pytest.importorskip("mlx.core")
    from csm_mlx.model import Transformer as MlxTransformer

    stack = MlxTransformer(t)
    rope = stack.layers[0].self_attn.rope
    table = rope_table(t, t.max_seq_len)
    rng = np.random.default_rng(0)
    steps = 3
    for position in (0, 1, 5, 20):
        cache = stack.make_cache()[0]
        if position:  # fill the cache up to `position`, as earlier frames would
            filler = mx.zeros((1, t.num_kv_heads, position, t.head_dim))
            cache.update_and_fetch(filler, filler)
        assert cache.offset == position
        q = rng.standard_normal((1, t.num_heads, steps, t.head_dim)).astype(np.float32)
        ours = apply_rope(torch.from_numpy(q), table[None, position : position + steps])
        theirs = np.array(rope(mx.array(q), offset=cache.offset))
        np.testing.assert_allclose(theirs, ours.numpy(), rtol=0, atol=1e-5, err_msg=f"position {position}")
