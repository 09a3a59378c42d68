"""Mimi codec: kyutai file loading, the transformers -> original name map, streaming decode, weight
resolution. Models are full size (Mimi's architecture is fixed) with random weights, built once per
session."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from csm.errors import CheckpointError, CsmError
from csm.mimi_names import original_to_transformers, transformers_to_original
from csm_torch import mimi as M
from fakes.mimi import (
    make_random_mimi,
    make_random_transformers_mimi,
    make_transformers_codec_state,
    save_kyutai_mimi_file,
    write_transformers_checkpoint,
)


@pytest.fixture(scope="session")
def audio() -> np.ndarray:
    """1 s of 24 kHz audio: a tone plus noise."""
    rng = np.random.default_rng(0)
    t = np.arange(M.SAMPLE_RATE) / M.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def moshi_model():
    return make_random_mimi(seed=0)


@pytest.fixture(scope="session")
def kyutai_file(tmp_path_factory, moshi_model) -> Path:
    return save_kyutai_mimi_file(tmp_path_factory.mktemp("kyutai") / M.MIMI_FILE, model=moshi_model)


@pytest.fixture(scope="session")
def kyutai_codec(kyutai_file):
    return M.load_mimi(mimi=kyutai_file)


@pytest.fixture(scope="session")
def kyutai_codes(kyutai_codec, audio) -> np.ndarray:
    return kyutai_codec.encode(audio)


@pytest.fixture(scope="session")
def kyutai_audio(kyutai_codec, kyutai_codes) -> np.ndarray:
    return kyutai_codec.decode(kyutai_codes)


@pytest.fixture(scope="session")
def tf_model():
    return make_random_transformers_mimi(seed=1)


@pytest.fixture(scope="session")
def tf_checkpoint(tmp_path_factory, tf_model):
    config, state = make_transformers_codec_state(model=tf_model)
    model_dir = write_transformers_checkpoint(tmp_path_factory.mktemp("csm_tf"), config, state, shards=2)
    return model_dir, config, state


# (a) kyutai file round trip


def test_kyutai_file_loads_with_original_names(kyutai_file, kyutai_codec, moshi_model):
    from safetensors import safe_open

    with safe_open(str(kyutai_file), framework="pt") as f:
        names = set(f.keys())
    # the file really uses the original attention names that moshi's load hook renames
    assert "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in names
    assert "decoder_transformer.transformer.layers.7.self_attn.out_proj.weight" in names
    assert not any("in_projs" in n or "out_projs" in n for n in names)
    loaded, want = kyutai_codec.model.state_dict(), moshi_model.state_dict()
    assert loaded.keys() == want.keys()
    for k in want:
        assert torch.equal(loaded[k], want[k]), k


def test_kyutai_round_trip_shapes(kyutai_codec, kyutai_codes, kyutai_audio):
    # moshi pads the last partial frame: 24000 samples = 12.5 frames -> T = 13
    assert kyutai_codec.sample_rate == 24000 and kyutai_codec.frame_size == 1920
    assert kyutai_codec.num_codebooks == 32
    assert kyutai_codes.shape == (13, 32)
    assert kyutai_codes.dtype == np.int64
    assert kyutai_codes.min() >= 0 and kyutai_codes.max() < 2048
    assert len(np.unique(kyutai_codes)) > 32  # random codebooks: codes are not all 0
    audio = kyutai_audio
    assert audio.dtype == np.float32 and audio.shape == (13 * 1920,)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    # decode_torch: [B, 32, T] -> [B, 1, T * 1920], same values
    out = kyutai_codec.decode_torch(torch.from_numpy(kyutai_codes).T.unsqueeze(0))
    assert out.shape == (1, 1, 13 * 1920) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0, 0].numpy(), audio, atol=1e-6)


# (b) transformers -> original name map, proven by identical outputs


def test_transformers_names_map_onto_all_original_names(tf_checkpoint, kyutai_file):
    from safetensors import safe_open

    _, _, state = tf_checkpoint
    mapped = transformers_to_original({k.removeprefix("codec_model."): v for k, v in state.items()})
    with safe_open(str(kyutai_file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == shapes


def test_transformers_checkpoint_matches_transformers_mimi(tf_checkpoint, tf_model, audio):
    audio = audio[:12000]  # 0.5 s (6.25 frames -> T = 7) keeps the two encoders' cost down
    model_dir, _, _ = tf_checkpoint
    assert M.resolve_mimi_weights(model_dir, None) == ("transformers", model_dir)
    codec = M.load_mimi(model_dir)
    codes = codec.encode(audio)
    with torch.inference_mode():
        want = tf_model.encode(torch.from_numpy(audio).view(1, 1, -1), num_quantizers=32).audio_codes
    assert codes.shape == (7, 32)
    assert len(np.unique(codes)) > 32
    np.testing.assert_array_equal(codes, want[0].T.numpy())
    decoded = codec.decode(codes)
    with torch.inference_mode():
        want_audio = tf_model.decode(torch.from_numpy(codes).T.unsqueeze(0)).audio_values[0, 0].numpy()
    assert decoded.shape == want_audio.shape == (7 * 1920,)
    assert np.abs(want_audio).max() > 1e-3
    np.testing.assert_allclose(decoded, want_audio, atol=1e-4, rtol=0)


def test_in_memory_transformers_names_also_map(tf_model):
    # transformers >= 5 nests the halves in memory (encoder.encoder_seanet.layers...); same result
    mem = tf_model.state_dict()
    assert any(k.startswith("encoder.encoder_seanet.") for k in mem)
    mapped = transformers_to_original(mem)
    assert "decoder.model.2.convtr.convtr.weight" in mapped
    assert mapped["upsample.convtr.convtr.convtr.weight"].shape == (512, 1, 4)
    assert mapped["encoder_transformer.transformer.layers.0.self_attn.in_proj_weight"].shape == (1536, 512)


def test_qkv_merge_and_rope_permutation_numpy():
    d, heads = 8, 2  # head_dim 4: transformers rows per head [re0, re1, im0, im1] -> [re0, im0, re1, im1]
    q = np.arange(d * 3, dtype=np.float32).reshape(d, 3)
    k, v = q + 100, q + 200
    prefix = "encoder_transformer.layers.0.self_attn."
    out = transformers_to_original(
        {prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v}, num_heads=heads
    )
    w = out["encoder_transformer.transformer.layers.0.self_attn.in_proj_weight"]
    assert isinstance(w, np.ndarray) and w.shape == (3 * d, 3)
    order = [0, 2, 1, 3, 4, 6, 5, 7]
    np.testing.assert_array_equal(w[:d], q[order])
    np.testing.assert_array_equal(w[d : 2 * d], k[order])
    np.testing.assert_array_equal(w[2 * d :], v)


def test_every_original_name_maps_to_transformers_and_back(kyutai_file, tf_checkpoint):
    from safetensors.torch import load_file

    kyutai = load_file(str(kyutai_file))  # every tensor of kyutai's layout, as moshi's model has them
    ours = original_to_transformers(kyutai)
    # onto transformers' MimiModel names exactly (each in_proj -> q, k, v), and back to every original name
    assert set(ours) == {k.removeprefix("codec_model.") for k in tf_checkpoint[2]}
    back = transformers_to_original(ours)
    assert back.keys() == kyutai.keys()
    assert all(torch.equal(back[k], kyutai[k]) for k in kyutai)
    # a name the table does not know, or a row's name with an index the row is not for, is refused either way
    for name in (
        "encoder.model.0.mystery.weight",
        "decoder.model.2.conv.conv.weight",  # layer 2 of the decoder is a transposed conv
        "decoder.model.3.convtr.convtr.weight",  # ... and layer 3 is not
        "quantizer.rvq_first.vq.layers.0._codebook.embed_sum",  # transformers' word on the original side
    ):
        with pytest.raises(CheckpointError, match=r"unknown Mimi.*in kyutai's checkpoint: " + re.escape(name)):
            original_to_transformers({name: torch.zeros(1)})
    for name in ("decoder.layers.2.convtr.weight", "quantizer.rvq_first.input_proj.weight"):
        with pytest.raises(CheckpointError, match=r"unknown Mimi.*transformers checkpoint: " + re.escape(name)):
            transformers_to_original({name: torch.zeros(1)})


# (c) streaming


STREAM_BLOCKS = (1, 3, 4, 5)  # uneven blocks, 13 frames in all


def test_stream_decode_equals_batch_decode(kyutai_codec, kyutai_codes, kyutai_audio):
    chunks = []
    with kyutai_codec.streaming_decoder() as dec:
        start = 0
        for size in STREAM_BLOCKS:
            piece = dec.decode(kyutai_codes[start : start + size])
            assert piece.shape == (size * 1920,) and piece.dtype == np.float32
            chunks.append(piece)
            start += size
        assert dec.decode(kyutai_codes[:0]).shape == (0,)
    assert start == len(kyutai_codes)
    np.testing.assert_allclose(np.concatenate(chunks), kyutai_audio, atol=1e-5, rtol=0)
    # the codec is usable in batch mode again afterwards, and a second stream starts from scratch
    np.testing.assert_allclose(kyutai_codec.decode(kyutai_codes[:2]), kyutai_audio[: 2 * 1920], atol=1e-5, rtol=0)
    with kyutai_codec.streaming_decoder() as dec:
        np.testing.assert_allclose(dec.decode(kyutai_codes[:2]), kyutai_audio[: 2 * 1920], atol=1e-5, rtol=0)


def test_streams_interleave_each_with_its_own_state(kyutai_codec, kyutai_codes, kyutai_audio, audio):
    """Two clips streamed at once, block by block in turn, each equal to its own batch decode,
    with batch encode and decode in between: no state is shared."""
    other = kyutai_codes[::-1].copy()
    other_audio = kyutai_codec.decode(other)
    a, b = kyutai_codec.streaming_decoder(), kyutai_codec.streaming_decoder()
    pieces_a, pieces_b, start = [], [], 0
    with a, b:
        for size in STREAM_BLOCKS:
            pieces_a.append(a.decode(kyutai_codes[start : start + size]))
            np.testing.assert_array_equal(kyutai_codec.encode(audio), kyutai_codec.encode(audio))
            pieces_b.append(b.decode(other[start : start + size]))
            start += size
    np.testing.assert_allclose(np.concatenate(pieces_a), kyutai_audio, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate(pieces_b), other_audio, atol=1e-5, rtol=0)


def test_a_closed_stream_refuses_blocks_and_bad_shapes_are_named(kyutai_codec, kyutai_codes):
    dec = kyutai_codec.streaming_decoder()
    with pytest.raises(CsmError, match=r"\[T, 32\]"):
        dec.decode(kyutai_codes[:, :8])
    dec.close()
    dec.close()  # closing twice is harmless
    with pytest.raises(CsmError, match="closed"):
        dec.decode(kyutai_codes[:1])


# (d) resolution order and the error


def _tiny_safetensors(path: Path, names) -> Path:
    from safetensors.torch import save_file

    save_file({n: torch.zeros(2) for n in names}, str(path))
    return path


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub_file = tmp_path / "hub" / M.MIMI_FILE
    hub_file.parent.mkdir()
    hub_file.write_bytes(b"")
    calls = []

    def download(repo, filename, **kw):
        calls.append((repo, filename))
        return str(hub_file)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return hub_file, calls


def test_resolution_order(tmp_path, fake_hub):
    hub_file, calls = fake_hub
    explicit = tmp_path / "mine.safetensors"
    explicit.write_bytes(b"")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    # nothing in model_dir -> the Hub
    assert M.resolve_mimi_weights(model_dir, None) == ("kyutai", hub_file)
    assert M.resolve_mimi_weights(None, None) == ("kyutai", hub_file)
    assert calls == [(M.MIMI_REPO, M.MIMI_FILE)] * 2
    # a safetensors without codec tensors -> still the Hub
    _tiny_safetensors(model_dir / "model.safetensors", ["backbone.x"])
    assert M.resolve_mimi_weights(model_dir, None) == ("kyutai", hub_file)
    # codec_model.* tensors -> transformers
    _tiny_safetensors(model_dir / "model.safetensors", ["backbone.x", "codec_model.encoder.layers.0.conv.weight"])
    assert M.resolve_mimi_weights(model_dir, None) == ("transformers", model_dir)
    # the kyutai file under its own name wins over the transformers tensors
    (model_dir / M.MIMI_FILE).write_bytes(b"")
    assert M.resolve_mimi_weights(model_dir, None) == ("kyutai", model_dir / M.MIMI_FILE)
    # an explicit --mimi wins over everything
    assert M.resolve_mimi_weights(model_dir, str(explicit)) == ("kyutai", explicit)
    assert len(calls) == 3
    with pytest.raises(CsmError, match="do not exist"):
        M.resolve_mimi_weights(model_dir, tmp_path / "missing.safetensors")


def test_resolution_sharded_index(tmp_path, fake_hub):
    hub_file, _ = fake_hub
    model_dir = tmp_path / "sharded"
    model_dir.mkdir()
    _tiny_safetensors(model_dir / "a.safetensors", ["backbone.x"])
    _tiny_safetensors(model_dir / "b.safetensors", ["codec_model.decoder.layers.0.conv.weight"])
    index = {"weight_map": {"backbone.x": "a.safetensors", "codec_model.decoder.layers.0.conv.weight": "b.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert M.resolve_mimi_weights(model_dir, None) == ("transformers", model_dir)
    index["weight_map"] = {"backbone.x": "a.safetensors"}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert M.resolve_mimi_weights(model_dir, None) == ("kyutai", hub_file)


def test_nothing_found_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    empty = tmp_path / "hf_home"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    # huggingface_hub reads the environment at import: patch its constants too
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HOME", str(empty))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(empty / "hub"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(CsmError) as err:
        M.resolve_mimi_weights(model_dir, None)
    msg = str(err.value)
    assert "pass --mimi PATH to tokenizer-e351c8d8-checkpoint125.safetensors" in msg
    assert "huggingface-cli download kyutai/moshiko-pytorch-bf16 tokenizer-e351c8d8-checkpoint125.safetensors" in msg
    assert not isinstance(err.value, CheckpointError)


# (e) bad checkpoints


def test_unknown_tensor_name_raises():
    state = {
        "encoder.layers.0.conv.weight": np.zeros((64, 1, 7), np.float32),
        "encoder.layers.0.mystery.weight": np.zeros(3, np.float32),
    }
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.mystery\.weight"):
        transformers_to_original(state)


def test_unknown_codec_tensor_in_checkpoint_raises(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _tiny_safetensors(
        model_dir / "model.safetensors", ["codec_model.encoder.layers.0.conv.weight", "codec_model.bogus.w"]
    )
    with pytest.raises(CheckpointError, match=r"bogus\.w"):
        M.load_mimi(model_dir)


def test_codec_config_mismatch_raises(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _tiny_safetensors(model_dir / "model.safetensors", ["codec_model.encoder.layers.0.conv.weight"])
    (model_dir / "config.json").write_text(json.dumps({"codec_config": {"num_hidden_layers": 4, "num_quantizers": 32}}))
    with pytest.raises(CheckpointError, match="num_hidden_layers=4"):
        M.load_mimi(model_dir)


def test_default_transformers_config_matches_moshi():
    from transformers import MimiConfig

    M.check_codec_config(MimiConfig(num_quantizers=32).to_dict())
    with pytest.raises(CheckpointError, match="num_quantizers=8"):
        M.check_codec_config(MimiConfig(num_quantizers=8).to_dict())
