"""The rename table, the RoPE row permutation, format detection, completeness checks, and reading
checkpoints in every file layout (single, sharded, ckpt.pt), including broken ones."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import csm
from csm.checkpoint import SAFETENSORS_INDEX, open_checkpoint
from csm.errors import CheckpointError, CsmError
from csm.weights import (
    FORMATS,
    check_complete,
    convert_state,
    detect_format,
    expected_shapes,
    from_csm_name,
    half_to_interleaved,
    interleaved_to_half,
    to_csm_name,
)
from fakes.csm_models import tiny_config, write_json

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CONFIG = tiny_config()
NAMES = list(expected_shapes(CONFIG))


def greedy_codes(path):
    gen = csm.load(path, device="cpu", dtype="float32")
    return gen.generate_codes("checking the weights", speaker=1, topk=1, max_audio_length_ms=800)


@pytest.fixture(scope="module")
def reference_codes(tiny_csm_dir):
    codes = greedy_codes(tiny_csm_dir)
    assert codes.shape == (10, 32)
    return codes


# --- rename table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_rename_round_trip_every_name(fmt):
    external = [from_csm_name(n, fmt) for n in NAMES]
    assert len(set(external)) == len(external)  # one external name per parameter
    assert [to_csm_name(e, fmt) for e in external] == NAMES


@pytest.mark.parametrize("fmt, external, ours", [
    ("official", "backbone.layers.1.attn.q_proj.weight", "backbone.layers.1.self_attn.q_proj.weight"),
    ("official", "decoder.layers.0.attn.output_proj.weight", "decoder.layers.0.self_attn.o_proj.weight"),
    ("official", "backbone.layers.0.mlp.w1.weight", "backbone.layers.0.mlp.gate_proj.weight"),
    ("official", "backbone.layers.0.mlp.w3.weight", "backbone.layers.0.mlp.up_proj.weight"),
    ("official", "backbone.layers.0.mlp.w2.weight", "backbone.layers.0.mlp.down_proj.weight"),
    ("official", "decoder.layers.1.sa_norm.scale", "decoder.layers.1.input_layernorm.weight"),
    ("official", "decoder.layers.1.mlp_norm.scale", "decoder.layers.1.post_attention_layernorm.weight"),
    ("official", "backbone.norm.scale", "backbone.norm.weight"),
    ("official", "audio_head", "audio_head"),
    ("transformers", "lm_head.weight", "codebook0_head.weight"),
    ("transformers", "embed_text_tokens.weight", "text_embeddings.weight"),
    ("transformers", "backbone_model.embed_tokens.embed_audio_tokens.weight", "audio_embeddings.weight"),
    ("transformers", "depth_decoder.codebooks_head.weight", "audio_head"),
    ("transformers", "depth_decoder.model.inputs_embeds_projector.weight", "projection.weight"),
    ("transformers", "depth_decoder.model.layers.1.mlp.gate_proj.weight", "decoder.layers.1.mlp.gate_proj.weight"),
    ("transformers", "backbone_model.layers.12.self_attn.o_proj.weight", "backbone.layers.12.self_attn.o_proj.weight"),
    ("transformers", "depth_decoder.model.norm.weight", "decoder.norm.weight"),
    ("csm", "decoder.layers.3.self_attn.k_proj.weight", "decoder.layers.3.self_attn.k_proj.weight"),
])
def test_known_names(fmt, external, ours):
    assert to_csm_name(external, fmt) == ours
    if external != "backbone_model.embed_tokens.embed_audio_tokens.weight":  # the tied copy not written
        assert from_csm_name(ours, fmt) == external


def test_transformers_tied_copy_and_ignored_names():
    assert to_csm_name("depth_decoder.model.embed_tokens.weight", "transformers") == "audio_embeddings.weight"
    # the copy save_pretrained keeps is the one written, so transformers ties the other to it
    assert from_csm_name("audio_embeddings.weight", "transformers") == "depth_decoder.model.embed_tokens.weight"
    assert to_csm_name("codec_model.encoder.layers.0.conv.weight", "transformers") is None
    assert to_csm_name("backbone.layers.0.attn.pos_embeddings.theta", "official") is None
    for fmt in FORMATS:
        with pytest.raises(CheckpointError, match="unexpected tensor 'mystery.weight'"):
            to_csm_name("mystery.weight", fmt)
    with pytest.raises(CheckpointError, match="not a csm parameter"):
        from_csm_name("backbone.layers.0.attn.q_proj.weight", "official")


def test_real_transformers_state_dict_maps_onto_every_parameter(tiny_transformers_dir):
    _, hf = tiny_transformers_dir
    mapped = {to_csm_name(n, "transformers") for n in hf.state_dict()} - {None}
    assert mapped == set(NAMES)


# --- RoPE layout ----------------------------------------------------------------------------------

def test_interleaved_and_half_are_inverse_permutations():
    w = torch.randn(4 * 16, 24)
    half = interleaved_to_half(w, 4)
    assert not torch.equal(half, w)
    assert torch.equal(half_to_interleaved(half, 4), w)
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, 4), 4), w)
    # rows are only reordered, within each head: evens first, then odds
    head = w[16:32]
    assert torch.equal(half[16:32], torch.cat([head[0::2], head[1::2]]))
    # numpy arrays work the same
    a = w.numpy()
    np.testing.assert_array_equal(interleaved_to_half(a, 4), half.numpy())
    np.testing.assert_array_equal(half_to_interleaved(interleaved_to_half(a, 4), 4), a)


def _rope_interleaved(q, pos, freqs):  # torchtune: rotate pairs (2i, 2i+1)
    ang = pos[:, None, None] * freqs  # [T, 1, hd/2]
    x0, x1 = q[..., 0::2], q[..., 1::2]
    return torch.stack([x0 * ang.cos() - x1 * ang.sin(), x1 * ang.cos() + x0 * ang.sin()], dim=-1).flatten(-2)


def _rope_half(q, pos, freqs):  # Llama / transformers: rotate pairs (i, i + hd/2)
    ang = pos[:, None, None] * freqs
    x0, x1 = q.chunk(2, dim=-1)
    return torch.cat([x0 * ang.cos() - x1 * ang.sin(), x1 * ang.cos() + x0 * ang.sin()], dim=-1)


def test_interleaved_rope_with_original_weights_equals_rotate_half_with_permuted_weights():
    torch.manual_seed(0)
    heads, hd, dim, t = 3, 8, 20, 7
    wq, wk = torch.randn(heads * hd, dim, dtype=torch.float64), torch.randn(heads * hd, dim, dtype=torch.float64)
    x = torch.randn(t, dim, dtype=torch.float64)
    pos = torch.tensor([0, 1, 5, 17, 100, 333, 2047], dtype=torch.float64)
    freqs = 1.0 / 500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def project(w):
        return (x @ w.T).view(t, heads, hd)

    qi, ki = _rope_interleaved(project(wq), pos, freqs), _rope_interleaved(project(wk), pos, freqs)
    qh = _rope_half(project(interleaved_to_half(wq, heads)), pos, freqs)
    kh = _rope_half(project(interleaved_to_half(wk, heads)), pos, freqs)
    # the rotated vectors are the same up to the fixed per-head reordering...
    torch.testing.assert_close(qh, torch.cat([qi[..., 0::2], qi[..., 1::2]], dim=-1))
    # ...so attention scores are identical
    scores_i = torch.einsum("shd,thd->hst", qi, ki)
    scores_h = torch.einsum("shd,thd->hst", qh, kh)
    torch.testing.assert_close(scores_h, scores_i)
    # and mixing layouts (the trap) does not
    wrong = torch.einsum("shd,thd->hst", _rope_half(project(wq), pos, freqs), _rope_half(project(wk), pos, freqs))
    assert not torch.allclose(wrong, scores_i, atol=1e-3)


def test_convert_state_round_trips_through_every_format():
    torch.manual_seed(1)
    state = {n: torch.randn(s) for n, s in expected_shapes(CONFIG).items()}
    for fmt in FORMATS:
        out = dict(convert_state(state.items(), "csm", fmt, CONFIG))
        back = dict(convert_state(out.items(), fmt, "csm", CONFIG))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[n], state[n]) for n in state)
    official = dict(convert_state(state.items(), "csm", "official", CONFIG))
    q = "backbone.layers.0.self_attn.q_proj.weight"
    k = "decoder.layers.1.self_attn.k_proj.weight"
    q_official = official["backbone.layers.0.attn.q_proj.weight"]
    assert torch.equal(q_official, half_to_interleaved(state[q], CONFIG.backbone.num_heads))
    k_official = official["decoder.layers.1.attn.k_proj.weight"]
    assert torch.equal(k_official, half_to_interleaved(state[k], CONFIG.decoder.num_kv_heads))
    v_official = official["backbone.layers.0.attn.v_proj.weight"]
    assert torch.equal(v_official, state["backbone.layers.0.self_attn.v_proj.weight"])


# --- format detection and completeness ------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format(fmt):
    assert detect_format(from_csm_name(n, fmt) for n in NAMES) == fmt


def test_detect_format_error():
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        detect_format(["model.embed_tokens.weight", "lm_head.weight"])
    with pytest.raises(CheckpointError, match="cannot tell"):
        detect_format([])


def test_check_complete_accepts_exact_shapes():
    check_complete(expected_shapes(CONFIG), CONFIG, "test")


def test_check_complete_names_missing_unexpected_and_wrong_shape():
    found = dict(expected_shapes(CONFIG))
    del found["backbone.norm.weight"]
    found["extra.weight"] = (3,)
    found["projection.weight"] = (1, 2)
    pattern = (r"^my checkpoint does not match its config: missing: backbone\.norm\.weight; "
               r"unexpected: extra\.weight; wrong shape: projection\.weight: \(1, 2\) \(expected \(48, 64\)\)$")
    with pytest.raises(CheckpointError, match=pattern):
        check_complete(found, CONFIG, "my checkpoint")


def test_check_complete_lists_many_missing_briefly():
    with pytest.raises(CheckpointError, match=rf"missing: .* and {len(NAMES) - 6} more$"):
        check_complete({}, CONFIG, "empty")


# --- files ----------------------------------------------------------------------------------------

def _copy_meta(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_open_checkpoint_detects_each_layout(tiny_transformers_dir, tiny_official_dir, tiny_csm_dir):
    layouts = ((tiny_transformers_dir[0], "transformers"), (tiny_official_dir, "official"), (tiny_csm_dir, "csm"))
    for path, fmt in layouts:
        ckpt = open_checkpoint(path)
        assert ckpt.format == fmt
        assert ckpt.config == CONFIG
        assert ckpt.is_safetensors and ckpt.files == (path / "model.safetensors",)


def test_truncated_safetensors_is_a_checkpoint_error(tiny_csm_dir, tmp_path):
    d = _copy_meta(tiny_csm_dir, tmp_path / "truncated")
    data = (tiny_csm_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=re.escape(str(d / "model.safetensors"))):
        csm.load(d, device="cpu", dtype="float32")


def test_garbage_ckpt_pt_is_a_checkpoint_error(tiny_csm_dir, tmp_path):
    d = _copy_meta(tiny_csm_dir, tmp_path / "garbage")
    (d / "ckpt.pt").write_bytes(b"this is not a torch checkpoint" * 100)
    with pytest.raises(CheckpointError, match=re.escape(str(d / "ckpt.pt"))):
        open_checkpoint(d)


def test_ckpt_pt_without_state_dict_is_an_error(tiny_csm_dir, tmp_path):
    d = _copy_meta(tiny_csm_dir, tmp_path / "list")
    torch.save([torch.zeros(2)], d / "ckpt.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        open_checkpoint(d)


def test_no_weights_is_an_error(tiny_csm_dir, tmp_path):
    d = _copy_meta(tiny_csm_dir, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights in"):
        csm.load(d, device="cpu", dtype="float32")
    with pytest.raises(CsmError, match="model not found"):
        open_checkpoint(tmp_path / "does-not-exist")


def _write_shards(src, dst):
    state = load_file(str(src / "model.safetensors"))
    names = sorted(state)
    files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    _copy_meta(src, dst)
    for shard in set(files.values()):
        save_file({n: state[n] for n in names if files[n] == shard}, str(dst / shard))
    write_json(dst / SAFETENSORS_INDEX, {"metadata": {}, "weight_map": files})
    return dst


def test_sharded_safetensors_gives_same_codes(tiny_csm_dir, tmp_path, reference_codes):
    d = _write_shards(tiny_csm_dir, tmp_path / "sharded")
    ckpt = open_checkpoint(d)
    assert [f.name for f in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ckpt.format == "csm"
    np.testing.assert_array_equal(greedy_codes(d), reference_codes)


def test_missing_shard_is_named(tiny_csm_dir, tmp_path):
    d = _write_shards(tiny_csm_dir, tmp_path / "sharded")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shards .*model-00002-of-00002.safetensors"):
        csm.load(d, device="cpu", dtype="float32")


def test_bad_index_is_an_error(tiny_csm_dir, tmp_path):
    d = _copy_meta(tiny_csm_dir, tmp_path / "badindex")
    (d / SAFETENSORS_INDEX).write_text(json.dumps({"no_weight_map": {}}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        open_checkpoint(d)


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "model_wrapped"])
def test_ckpt_pt_gives_same_codes(tiny_official_dir, tmp_path, reference_codes, wrapped):
    state = load_file(str(tiny_official_dir / "model.safetensors"))
    assert "backbone.layers.0.attn.q_proj.weight" in state
    d = _copy_meta(tiny_official_dir, tmp_path / "pt")
    torch.save({"model": state} if wrapped else state, d / "ckpt.pt")
    ckpt = open_checkpoint(d)
    assert ckpt.format == "official" and ckpt.files == (d / "ckpt.pt",) and not ckpt.is_safetensors
    np.testing.assert_array_equal(greedy_codes(d), reference_codes)


def test_incomplete_checkpoint_fails_at_load(tiny_csm_dir, tmp_path):
    state = load_file(str(tiny_csm_dir / "model.safetensors"))
    del state["decoder.layers.1.mlp.up_proj.weight"]
    d = _copy_meta(tiny_csm_dir, tmp_path / "incomplete")
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: decoder\.layers\.1\.mlp\.up_proj\.weight"):
        csm.load(d, device="cpu", dtype="float32")


def test_bare_weights_without_config_are_refused_unless_csm_1b(tiny_csm_dir, tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(tiny_csm_dir / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CsmError, match="no config.json"):
        open_checkpoint(d)


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_paged_reader_copies_every_tensor_exactly_and_owns_it(tiny_csm_dir, tmp_path, monkeypatch, kind):
    """A chunk far smaller than the tensors: every tensor goes over in row blocks under fresh
    maps, and must still arrive bit-exact, cast on request, and not backed by the file."""
    import csm.checkpoint as checkpoint

    reference = load_file(tiny_csm_dir / "model.safetensors")
    d = _copy_meta(tiny_csm_dir, tmp_path / kind)
    if kind == "pt":
        torch.save({"model": reference}, d / "ckpt.pt")
    else:
        shutil.copy(tiny_csm_dir / "model.safetensors", d / "model.safetensors")
    chunk = max(t.nbytes for t in reference.values()) // 7  # the largest tensor in 8 blocks
    monkeypatch.setattr(checkpoint, "READ_CHUNK_BYTES", chunk)
    ckpt = open_checkpoint(d)
    for dtype in (None, torch.bfloat16):
        got = dict(checkpoint.iter_tensors(ckpt, dtype))
        assert got.keys() == reference.keys()
        for name, t in got.items():
            expected = reference[name] if dtype is None else reference[name].to(dtype)
            assert t.dtype == expected.dtype and torch.equal(t, expected), name
            assert t.untyped_storage().nbytes() == t.nbytes  # its own memory, not a view of the map


def test_tied_audio_embedding_copies_must_agree(tiny_transformers_dir, tmp_path):
    """transformers files may hold the audio embeddings twice (backbone and depth decoder). Equal
    copies load as one; different ones (a release that unties them saved the file) are refused,
    since CSM has one table and keeping either would silently be another model."""
    src = tiny_transformers_dir[0]
    state = load_file(src / "model.safetensors")
    table = state["depth_decoder.model.embed_tokens.weight"]
    expected = greedy_codes(src)
    for name, copy, ok in (("equal", table.clone(), True), ("different", table + 1e-3, False)):
        d = _copy_meta(src, tmp_path / name)
        save_file(state | {"backbone_model.embed_tokens.embed_audio_tokens.weight": copy}, d / "model.safetensors")
        if ok:
            np.testing.assert_array_equal(greedy_codes(d), expected)
        else:
            with pytest.raises(CheckpointError, match="two different 'audio_embeddings.weight' tables"):
                csm.load(d, device="cpu", dtype="float32")
