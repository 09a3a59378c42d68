"""convert_weights.py / csm-convert: every layout to every other, bit-exact round trips."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import csm
from csm.convert import convert
from csm.errors import CsmError
from csm.mimi_files import CODEC_PREFIX, MIMI_FILE, TRANSFORMERS, resolve_mimi_weights
from csm.mimi_names import original_to_transformers, transformers_to_original

pytestmark = pytest.mark.usefixtures("torch_single_thread")
REPO = Path(__file__).resolve().parents[1]


def tensors(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.dtype == b[name].dtype and torch.equal(t, b[name]), name


def codec_part(state: dict) -> dict:
    return {k.removeprefix(CODEC_PREFIX): v for k, v in state.items() if k.startswith(CODEC_PREFIX)}


@pytest.fixture(scope="module")
def official_with_mimi(tiny_official_dir, tiny_model_dir, tmp_path_factory):
    """Sesame's layout as downloaded: torchtune names, kyutai's Mimi file beside the weights."""
    folder = tmp_path_factory.mktemp("official_mimi") / "model"
    shutil.copytree(tiny_official_dir, folder)
    shutil.copy(tiny_model_dir / MIMI_FILE, folder / MIMI_FILE)
    return folder


@pytest.fixture(scope="module")
def transformers_from_official(official_with_mimi, tmp_path_factory):
    return convert(official_with_mimi, tmp_path_factory.mktemp("from_official") / "t", to="transformers")


@pytest.mark.parametrize("via", ["official", "csm"])
def test_transformers_round_trip_is_bit_exact(tiny_model_dir, tmp_path, via):
    mid = convert(tiny_model_dir, tmp_path / via, to=via)
    back = convert(mid, tmp_path / "back", to="transformers")
    original, converted = tensors(tiny_model_dir), tensors(back)
    # save_pretrained keeps one of the two tied audio-embedding copies; we write both (TIED_COPIES)
    backbone_copy = converted.pop("backbone_model.embed_tokens.embed_audio_tokens.weight")
    assert torch.equal(backbone_copy, converted["depth_decoder.model.embed_tokens.weight"])
    assert_same({k: v for k, v in original.items() if not k.startswith("codec_model.")},
                {k: v for k, v in converted.items() if not k.startswith("codec_model.")})
    assert (mid / "tokenizer.json").is_file() and (mid / MIMI_FILE).is_file()
    assert json.loads((back / "config.json").read_text())["model_type"] == "csm"


def test_official_layout_permutes_qk_and_back(tiny_model_dir, tmp_path):
    official = convert(tiny_model_dir, tmp_path / "official", to="official")
    csm_dir = convert(tiny_model_dir, tmp_path / "csm", to="csm")
    o, c = tensors(official), tensors(csm_dir)
    q_official, q_ours = o["backbone.layers.0.attn.q_proj.weight"], c["backbone.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q_official, q_ours)  # interleaved rows differ from rotate-half rows
    assert_same(c, tensors(convert(official, tmp_path / "csm2", to="csm")))
    assert_same(o, tensors(convert(csm_dir, tmp_path / "official2", to="official")))


def test_all_layouts_generate_the_same_codes(tiny_model_dir, tmp_path):
    codes = [
        csm.load(str(d), device="cpu", dtype="float32").generate_codes("Same words.", topk=1, max_audio_length_ms=480)
        for d in (tiny_model_dir, convert(tiny_model_dir, tmp_path / "o", to="official"),
                  convert(tiny_model_dir, tmp_path / "c", to="csm"))
    ]
    assert (codes[0] == codes[1]).all() and (codes[0] == codes[2]).all()


def test_dtype_cast(tiny_model_dir, tmp_path):
    half = tensors(convert(tiny_model_dir, tmp_path / "bf16", to="csm", dtype="bfloat16"))
    full = tensors(convert(tiny_model_dir, tmp_path / "f32", to="csm"))
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)


def test_refuses_to_overwrite(tiny_model_dir, tmp_path):
    (tmp_path / "dst").mkdir()
    with pytest.raises(CsmError, match="already exists"):
        convert(tiny_model_dir, tmp_path / "dst", to="csm")
    convert(tiny_model_dir, tmp_path / "dst", to="csm", force=True)
    assert (tmp_path / "dst" / "model.safetensors").is_file()


def test_script_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(tmp_path / "missing"),
                        str(tmp_path / "out"), "--to", "csm"],
                       capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"}, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: model not found") and "Traceback" not in r.stderr


def test_transformers_loads_our_conversion(tiny_transformers_dir, tiny_model_dir, tmp_path):
    from transformers import CsmForConditionalGeneration

    theirs = convert(convert(tiny_model_dir, tmp_path / "o", to="official"), tmp_path / "t", to="transformers")
    hf, info = CsmForConditionalGeneration.from_pretrained(theirs, output_loading_info=True)
    hf.eval()
    # Mimi came along from kyutai's file beside the official weights: transformers' codec is not random
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = tiny_transformers_dir[1].generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False,
                                                     max_new_tokens=4)
        got = hf.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=4)
    assert torch.equal(expected, got)


def test_mimi_names_map_both_ways_exactly(tiny_model_dir):
    kyutai = load_file(str(tiny_model_dir / MIMI_FILE))
    ours = original_to_transformers(kyutai)
    assert_same(kyutai, transformers_to_original(ours))
    assert len(ours) == len(kyutai) + 2 * 16  # each in_proj (8 layers in each of 2 transformers) -> q, k, v


def test_official_to_transformers_carries_mimi_inside(official_with_mimi, transformers_from_official):
    t = transformers_from_official
    assert not (t / MIMI_FILE).exists()
    codec = codec_part(tensors(t))
    assert_same(original_to_transformers(load_file(str(official_with_mimi / MIMI_FILE))), codec)
    assert json.loads((t / "config.json").read_text())["codec_config"]["num_quantizers"] == 32


def test_official_transformers_official_round_trip_is_bit_exact(official_with_mimi, transformers_from_official,
                                                                 tmp_path):
    back = convert(transformers_from_official, tmp_path / "back", to="official")
    assert_same(tensors(official_with_mimi), tensors(back))
    # the same tensors as kyutai's file, bit for bit (written anew: not necessarily the same bytes)
    assert_same(load_file(str(official_with_mimi / MIMI_FILE)), load_file(str(back / MIMI_FILE)))
    assert (back / "tokenizer.json").read_bytes() == (official_with_mimi / "tokenizer.json").read_bytes()


def test_transformers_csm_transformers_carries_mimi(official_with_mimi, transformers_from_official, tmp_path):
    ours = convert(transformers_from_official, tmp_path / "csm", to="csm")
    assert_same(load_file(str(official_with_mimi / MIMI_FILE)), load_file(str(ours / MIMI_FILE)))
    again = convert(ours, tmp_path / "t", to="transformers")
    assert_same(tensors(transformers_from_official), tensors(again))


def test_our_loader_reads_the_converted_codec_offline(official_with_mimi, transformers_from_official):
    from csm_torch.mimi import load_mimi

    assert resolve_mimi_weights(transformers_from_official, None)[0] == TRANSFORMERS
    codes = np.random.default_rng(0).integers(0, 2048, size=(4, 32))
    expected = load_mimi(model_dir=official_with_mimi).decode(codes)
    got = load_mimi(model_dir=transformers_from_official).decode(codes)
    assert expected.shape == (4 * 1920,) and np.array_equal(expected, got)


def test_transformers_target_needs_a_mimi(tiny_official_dir, tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # offline, nothing cached
    with pytest.raises(CsmError, match="no Mimi codec.*--mimi"):
        convert(tiny_official_dir, tmp_path / "t", to="transformers")
    assert not [p for p in tmp_path.iterdir() if p.name == "t" or p.name.startswith(".t.")]  # nor a temporary one
    assert convert(tiny_official_dir, tmp_path / "csm", to="csm")  # the other layouts do without
    t = convert(tiny_official_dir, tmp_path / "t", to="transformers", mimi=tiny_model_dir / MIMI_FILE)
    assert_same(original_to_transformers(load_file(str(tiny_model_dir / MIMI_FILE))), codec_part(tensors(t)))


def test_mlx_target_without_mlx_is_one_clear_error(tiny_csm_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx", None)  # `import mlx.core` now fails as if not installed
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    monkeypatch.delitem(sys.modules, "csm_mlx.convert", raising=False)
    with pytest.raises(CsmError, match="--to mlx needs MLX"):
        convert(tiny_csm_dir, tmp_path / "m", to="mlx")
    assert not list(tmp_path.iterdir())


def test_core_imports_neither_torch_nor_mlx():
    code = "import sys, csm.convert; print(sorted(m for m in ('torch', 'mlx') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
