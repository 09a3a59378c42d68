"""MLX conversion and 4/8-bit quantization: `convert_weights.py --to mlx [--quantize N]` folders load
with no flags and generate; their codebook-0 logits stay close to the float model's."""

from __future__ import annotations

import json

import numpy as np
import pytest

import csm
from csm.config import CsmConfig, RopeScaling, TransformerConfig
from csm.convert import convert

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXT = "Hello there, how are you?"


def quantizable_config() -> CsmConfig:
    """Like the tiny test model, with every width a multiple of 64 (MLX quantizes in groups of 32-128)."""
    rope = RopeScaling()
    return CsmConfig(
        backbone=TransformerConfig(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                                   head_dim=32, max_seq_len=256, rope_scaling=rope),
        decoder=TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                                  head_dim=16, max_seq_len=33, rope_scaling=rope),
        text_vocab_size=384,
    )


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    from fakes.csm_models import save_transformers_dir

    path = tmp_path_factory.mktemp("quantizable")
    save_transformers_dir(path, quantizable_config(), seed=5)
    return path


def load_mlx(path, **kw):
    return csm.load(path, backend="mlx", device="cpu", dtype="float32", **kw)


def codebook0_logits(gen) -> np.ndarray:
    m = gen._backend.model
    prompt = gen.prompt(TEXT, 0)
    h = m.backbone(m.embed_frames(mx.array(prompt.tokens)[None], mx.array(prompt.mask)[None]))[:, -1]
    return np.array(m.codebook0_head(h)[0].astype(mx.float32))


def cosine(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def float_logits(float_dir):
    return codebook0_logits(load_mlx(float_dir))


@pytest.mark.parametrize("bits, group_size, min_cosine", [(8, 64, 0.99), (4, 32, 0.95)])
def test_quantized_folder_loads_without_flags_and_stays_close(
    float_dir, float_logits, tmp_path, bits, group_size, min_cosine
):
    dst = convert(float_dir, tmp_path / f"q{bits}", "mlx", quantize=bits, group_size=group_size)
    config = json.loads((dst / "config.json").read_text())
    assert (config["quantization"]["group_size"], config["quantization"]["bits"]) == (group_size, bits)
    assert (dst / "tokenizer.json").is_file()
    gen = load_mlx(dst)
    m = gen._backend.model
    from csm_mlx.quantize import QuantizedCodebookHeads

    assert isinstance(m.audio_head, QuantizedCodebookHeads) and m.audio_head.bits == bits
    assert m.backbone.layers[0].self_attn.q_proj.bits == bits
    assert m.text_embeddings.bits == m.audio_embeddings.bits == 8  # lookups: more bits cost no time
    similarity = cosine(codebook0_logits(gen), float_logits)
    print(f"{bits}-bit (group {group_size}) codebook-0 logits cosine similarity: {similarity:.5f}")
    assert similarity >= min_cosine
    codes = gen.generate_codes(TEXT, topk=1, max_audio_length_ms=640)
    assert codes.shape[1] == 32 and len(codes) >= 1
    # quantizing at load gives the very same model as the converted folder
    on_the_fly = load_mlx(float_dir, quantize=bits) if group_size == 64 else None
    if on_the_fly is not None:
        np.testing.assert_array_equal(codebook0_logits(on_the_fly), codebook0_logits(gen))


def test_quantized_decoder_logits_stay_close(float_dir):
    """The decoder's heads (`audio_head`, quantized explicitly) too."""
    from mlx.utils import tree_flatten

    ref, q8 = load_mlx(float_dir)._backend.model, load_mlx(float_dir, quantize=8)._backend.model
    names = dict(tree_flatten(q8.parameters()))
    assert "audio_head.scales" in names and "text_embeddings.scales" in names
    h = mx.random.normal((1, 64), key=mx.random.key(0))
    for i in (1, 31):
        assert cosine(np.array(q8.codebook_logits(i, h)[0]), np.array(ref.codebook_logits(i, h)[0])) >= 0.99


def test_float_mlx_folder_loads_in_both_backends(float_dir, tmp_path):
    dst = convert(float_dir, tmp_path / "mlx", "mlx")
    assert "quantization" not in json.loads((dst / "config.json").read_text())
    ours = load_mlx(dst).generate_codes(TEXT, topk=1, max_audio_length_ms=640)
    torch_gen = csm.load(dst, backend="torch", device="cpu", dtype="float32")
    theirs = torch_gen.generate_codes(TEXT, topk=1, max_audio_length_ms=640)
    np.testing.assert_array_equal(ours, theirs)


def test_quantization_errors_name_the_fix(float_dir, tiny_csm_dir, tmp_path):
    q = convert(float_dir, tmp_path / "q4", "mlx", quantize=4)
    with pytest.raises(csm.CsmError, match="quantized for MLX"):
        csm.load(q, backend="torch", device="cpu")
    with pytest.raises(csm.CsmError, match="already quantized"):
        load_mlx(q, quantize=8)
    with pytest.raises(csm.CsmError, match="group size"):
        load_mlx(tiny_csm_dir, quantize=4)  # decoder width 48 is no multiple of 64
    with pytest.raises(csm.CsmError, match="--to mlx"):
        convert(float_dir, tmp_path / "x", "csm", quantize=4)
    with pytest.raises(csm.CsmError, match="4 or 8"):
        load_mlx(float_dir, quantize=3)


def test_convert_script_writes_a_quantized_folder(float_dir, tmp_path):
    from click.testing import CliRunner

    from csm.convert import main

    args = [str(float_dir), str(tmp_path / "q8"), "--to", "mlx", "--quantize", "8", "--group-size", "32"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 32
    r = CliRunner().invoke(main, [str(float_dir), str(tmp_path / "q8"), "--to", "mlx", "--quantize", "8"])
    assert r.exit_code == 2 and "already exists" in r.output
