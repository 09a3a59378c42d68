"""Adapters in mlx-lm's layout: the files mlx-lm's own `load_adapters` puts on csm's MLX model,
bit-exact conversions to and from peft's layout, loading and merging either layout to the same
weights and greedy codes on both backends, the CLI, and one clear error for every bad folder."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import csm
import test_adapters
from csm.errors import CsmError
from csm.training.adapters import (
    CONFIG_FILE,
    CSM_FILE,
    WEIGHTS_FILE,
    convert_adapter,
    merge_adapter,
    read_adapter,
    write_adapter,
)
from csm.training.mlx_adapters import MLX_FULL_FILE, MLX_WEIGHTS_FILE, alpha_for, write_mlx_adapter
from test_adapters import run_command

mx = pytest.importorskip("mlx.core", reason="needs the mlx extra (MLX; its Linux CPU build is mlx[cpu])")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

trained = test_adapters.trained  # the peft adapter fixture, shared
Q = "backbone.layers.0.self_attn.q_proj"
MAX_MS = 400  # 5 frames


@pytest.fixture(scope="module")
def mlx_folder(trained, tmp_path_factory):
    """The peft adapter of test_adapters converted to mlx-lm's layout."""
    return convert_adapter(trained["folder"], tmp_path_factory.mktemp("mlx") / "voice", to="mlx")


def tensors_of(folder, name):
    return load_file(str(folder / name))


def assert_same_tensors(first, second):
    assert first.keys() == second.keys()
    for k in first:
        assert first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]), k


# --- the files ----------------------------------------------------------------------------------

def test_mlx_layout_files(trained, mlx_folder, tiny_model_dir):
    config = json.loads((mlx_folder / CONFIG_FILE).read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": sorted(trained["lora"])}
    info = json.loads((mlx_folder / CSM_FILE).read_text())
    assert info["layout"] == "mlx" and info["base_model"] == str(tiny_model_dir.resolve()) and info["speaker_id"] == 0
    lora = tensors_of(mlx_folder, MLX_WEIGHTS_FILE)
    assert len(lora) == 2 * len(trained["lora"])
    a, b = trained["lora"][Q]
    assert torch.equal(lora[f"{Q}.lora_a"], a.T) and torch.equal(lora[f"{Q}.lora_b"], b.T)
    assert lora[f"{Q}.lora_a"].shape == (64, 4) and lora[f"{Q}.lora_b"].shape == (4, 64)  # [in, r], [r, out]
    full = tensors_of(mlx_folder, MLX_FULL_FILE)
    assert full.keys() == trained["full"].keys()
    adapter = read_adapter(mlx_folder)
    assert adapter.lora.keys() == trained["lora"].keys() and set(adapter.scale.values()) == {2.0}
    assert not [p for p in mlx_folder.iterdir() if p.name.startswith(".")]


def test_mlx_lm_load_adapters_puts_our_file_on_our_model(mlx_folder, tiny_model_dir):
    """mlx-lm's own loader and fuse on csm_mlx.model.Model give the LoRA weights csm merges."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load_adapters

    model = csm.load(tiny_model_dir, backend="mlx", device="cpu", dtype="float32")._backend.model
    load_adapters(model, str(mlx_folder))
    lora_params = {k for k, _ in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
    assert lora_params == set(tensors_of(mlx_folder, MLX_WEIGHTS_FILE))
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    fused = dict(tree_flatten(model.parameters()))
    ours = csm.load(tiny_model_dir, adapter=mlx_folder, backend="mlx", device="cpu", dtype="float32")
    ours = dict(tree_flatten(ours._backend.model.parameters()))
    for module in json.loads((mlx_folder / CONFIG_FILE).read_text())["lora_parameters"]["keys"]:
        np.testing.assert_allclose(np.array(fused[f"{module}.weight"]), np.array(ours[f"{module}.weight"]),
                                   rtol=1e-5, atol=1e-6)


# --- conversions ----------------------------------------------------------------------------------

def test_peft_to_mlx_to_peft_is_bit_exact(trained, mlx_folder, tmp_path):
    back = convert_adapter(mlx_folder, tmp_path / "back", to="peft")
    assert_same_tensors(tensors_of(trained["folder"], WEIGHTS_FILE), tensors_of(back, WEIGHTS_FILE))
    first, last = read_adapter(trained["folder"]), read_adapter(back)
    assert first.scale == last.scale and first.alpha == last.alpha and last.config["r"] == 4
    assert "layout" not in json.loads((back / CSM_FILE).read_text())
    hf = convert_adapter(mlx_folder, tmp_path / "hf", to="transformers")
    assert read_adapter(hf).names == "transformers"
    with pytest.raises(CsmError, match="already exists"):
        convert_adapter(mlx_folder, back, to="peft")


def test_mlx_to_peft_to_mlx_is_bit_exact_with_any_scale(tmp_path, tiny_model_dir):
    """bfloat16 tensors and a scale that alpha = scale * rank would round away from."""
    rng = np.random.default_rng(0)
    bf16 = lambda *shape: torch.from_numpy(rng.normal(size=shape).astype(np.float32)).bfloat16()  # noqa: E731
    lora = {Q: (bf16(3, 64), bf16(64, 3)), "decoder.layers.1.mlp.down_proj": (mx.array(rng.normal(size=(3, 96))),
                                                                              rng.normal(size=(48, 3)))}
    scale = next(s for s in (0.1 * i for i in range(1, 100)) if (s * 3) / 3 != s)
    first = write_mlx_adapter(tmp_path / "first", lora, scale=scale, rank=3, dropout=0.05, base_model=tiny_model_dir,
                              full={"projection.weight": bf16(48, 64)})
    peft_dir = convert_adapter(first, tmp_path / "peft", to="peft")
    config = json.loads((peft_dir / CONFIG_FILE).read_text())
    assert config["lora_alpha"] / config["r"] == pytest.approx(scale, rel=1e-15) and config["lora_dropout"] == 0.05
    assert json.loads((peft_dir / CSM_FILE).read_text())["lora_scale"] == scale  # alpha / r misses it by a rounding
    last = convert_adapter(peft_dir, tmp_path / "last", to="mlx")
    for name in (MLX_WEIGHTS_FILE, MLX_FULL_FILE, CONFIG_FILE, CSM_FILE):
        assert (first / name).read_bytes() == (last / name).read_bytes(), name
    assert set(read_adapter(last).scale.values()) == {scale} == set(read_adapter(peft_dir).scale.values())
    assert alpha_for(2.0, 4) == 8


def test_several_ranks_cannot_become_mlx(trained, tmp_path):
    folder = tmp_path / "patterned"
    shutil.copytree(trained["folder"], folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(config | {"alpha_pattern": {"q_proj": 16}}))
    with pytest.raises(CsmError, match="one rank and one scale"):
        convert_adapter(folder, tmp_path / "mlx", to="mlx")
    assert not (tmp_path / "mlx").exists()


# --- loading and merging --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_greedy_codes_equal_with_either_layout(trained, mlx_folder, tiny_model_dir, backend):
    gens = [csm.load(tiny_model_dir, adapter=folder, backend=backend, device="cpu", dtype="float32")
            for folder in (trained["folder"], mlx_folder)]
    codes = [g.generate_codes("Hello there.", 0, topk=1, max_audio_length_ms=MAX_MS) for g in gens]
    assert len(codes[0]) >= 4
    np.testing.assert_array_equal(codes[0], codes[1])
    if backend == "torch":  # the adapter changes the codes (MLX's codes equal torch's: test_mlx_parity)
        plain = csm.load(tiny_model_dir, backend=backend, device="cpu", dtype="float32")
        assert not np.array_equal(plain.generate_codes("Hello there.", 0, topk=1, max_audio_length_ms=MAX_MS),
                                  codes[0])


def test_merge_from_either_layout_writes_the_same_model(trained, mlx_folder, tmp_path):
    from_peft = tensors_of(merge_adapter(trained["folder"], tmp_path / "peft"), "model.safetensors")
    assert_same_tensors(from_peft, tensors_of(merge_adapter(mlx_folder, tmp_path / "mlx"), "model.safetensors"))


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """A base model MLX quantizes (widths multiples of 64), of other widths than the tiny one."""
    from fakes.csm_models import save_transformers_dir
    from test_mlx_quantize import quantizable_config

    base = tmp_path_factory.mktemp("wide") / "base"
    save_transformers_dir(base, quantizable_config(), seed=5)
    return base


def test_quantized_merge_from_either_layout_is_the_same(wide_base, tmp_path):
    from mlx.utils import tree_flatten

    base = wide_base
    rng = np.random.default_rng(1)
    lora = {"backbone.layers.1.mlp.up_proj": (rng.normal(size=(2, 128)).astype(np.float32),
                                              rng.normal(size=(256, 2)).astype(np.float32) * 0.05)}
    peft_dir = write_adapter(tmp_path / "voice", lora, alpha=3, rank=2, target_modules=list(lora), base_model=base)
    mlx_dir = convert_adapter(peft_dir, tmp_path / "voice-mlx", to="mlx")
    merged = [merge_adapter(d, tmp_path / f"q8-{d.name}", quantize=8) for d in (peft_dir, mlx_dir)]
    first, second = (dict(tree_flatten(csm.load(m, backend="mlx", device="cpu")._backend.model.parameters()))
                     for m in merged)
    assert first.keys() == second.keys() and all(mx.array_equal(first[k], second[k]).item() for k in first)


# --- the CLI --------------------------------------------------------------------------------------

def test_export_adapter_command_converts_both_ways(trained, tmp_path, capsys):
    from csm.cli.finetune_adapters import export_adapter_command

    code, out = run_command(export_adapter_command, [trained["folder"], tmp_path / "m", "--to", "mlx"], capsys)
    assert code == 0 and "mlx-lm's layout" in out.out and (tmp_path / "m" / MLX_WEIGHTS_FILE).is_file()
    code, out = run_command(export_adapter_command, [tmp_path / "m", tmp_path / "p", "--to", "peft"], capsys)
    assert code == 0
    assert_same_tensors(tensors_of(trained["folder"], WEIGHTS_FILE), tensors_of(tmp_path / "p", WEIGHTS_FILE))
    code, out = run_command(export_adapter_command, [tmp_path / "m", tmp_path / "p", "--to", "peft"], capsys)
    assert code == 2 and out.err.count("error:") == 1 and "--force" in out.err
    code, out = run_command(export_adapter_command, [tmp_path / "m", tmp_path / "x", "--to", "mlx", "--names", "csm"],
                            capsys)
    assert code == 2 and out.err.count("error:") == 1


@pytest.mark.parametrize("module", ["csm.cli.generate", "csm.cli.generate_mlx"])
def test_generate_clis_take_an_mlx_layout_adapter(mlx_folder, tmp_path, watermark_dir, module, capsys):
    import importlib

    command = importlib.import_module(module).command
    args = ["--text", "Hello there.", "--adapter", mlx_folder, "--watermark-model", watermark_dir, "--device", "cpu",
            "--top-k", "1", "--max-audio-length-ms", MAX_MS, "-o", tmp_path / "out.wav"]
    code, out = run_command(command, args, capsys)
    assert code == 0, out.err
    assert "with adapter" in out.err and (tmp_path / "out.wav").is_file()


# --- bad folders ----------------------------------------------------------------------------------

def edit_mlx_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["lora_parameters"] |= changes
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def edit_type(folder, fine_tune_type):
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(config | {"fine_tune_type": fine_tune_type}))


def edit_mlx_tensors(folder, change):
    tensors = load_file(str(folder / MLX_WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / MLX_WEIGHTS_FILE))


BAD = {
    "neither layout": (lambda f: (f / MLX_WEIGHTS_FILE).unlink(), "no adapter in"),
    "both layouts": (lambda f: (f / WEIGHTS_FILE).write_bytes(b""), "keep one layout per folder"),
    "missing half": (lambda f: edit_mlx_tensors(f, lambda t: t.pop(f"{Q}.lora_b")), "no lora_b for"),
    "rank": (lambda f: edit_mlx_config(f, rank=8), "lora_parameters.rank=8"),
    "alpha for scale": (lambda f: edit_mlx_config(f, scale=None, alpha=8), "not alpha"),
    "DoRA": (lambda f: edit_type(f, "dora"), "DoRA adapters are not supported"),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_mlx_folders_give_one_error_line(problem, mlx_folder, tmp_path, capsys):
    from csm.cli.finetune_adapters import merge_command

    damage, message = BAD[problem]
    folder = tmp_path / "bad"
    shutil.copytree(mlx_folder, folder)
    damage(folder)
    capsys.readouterr()
    code, out = run_command(merge_command, ["--adapter", folder, "--output-dir", tmp_path / "merged"], capsys)
    errors = out.err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], out.err
    assert not (tmp_path / "merged").exists()


def test_mlx_adapter_on_a_mismatched_base_gives_one_error_line(mlx_folder, wide_base, tmp_path, capsys):
    from csm.cli.finetune_adapters import merge_command

    code, out = run_command(merge_command, ["--adapter", mlx_folder, "--model-path", wide_base,
                                            "--output-dir", tmp_path / "merged"], capsys)
    errors = out.err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and "does not fit the base model" in errors[0], out.err
    assert not (tmp_path / "merged").exists()


def test_folders_as_mlx_lm_writes_them(trained, mlx_folder, tiny_model_dir, tmp_path):
    """No csm_adapter.json (the base is the config's "model"), trained heads saved in
    adapters.safetensors itself, and a full fine-tune."""
    folder = tmp_path / "mlx-lm"
    shutil.copytree(mlx_folder, folder)
    (folder / CSM_FILE).unlink()
    tensors = tensors_of(folder, MLX_WEIGHTS_FILE) | tensors_of(folder, MLX_FULL_FILE)
    (folder / MLX_FULL_FILE).unlink()
    save_file(tensors, str(folder / MLX_WEIGHTS_FILE))
    adapter, ours = read_adapter(folder), read_adapter(mlx_folder)
    assert adapter.base_model == str(tiny_model_dir.resolve()) and adapter.full.keys() == ours.full.keys()
    assert all(torch.equal(adapter.lora[m][i], ours.lora[m][i]) for m in ours.lora for i in (0, 1))
    full = tmp_path / "full"
    full.mkdir()
    save_file({"codebook0_head.weight": ours.full["codebook0_head.weight"]}, str(full / MLX_WEIGHTS_FILE))
    (full / CONFIG_FILE).write_text(json.dumps({"fine_tune_type": "full", "num_layers": -1, "model": "x/y"}))
    adapter = read_adapter(full)
    assert not adapter.lora and adapter.full.keys() == {"codebook0_head.weight"} and adapter.base_model == "x/y"


def test_write_mlx_adapter_refuses_bad_input(trained, tmp_path):
    a, b = trained["lora"][Q]
    with pytest.raises(CsmError, match="not a CSM parameter"):
        write_mlx_adapter(tmp_path / "x", {"backbone.layers.0.attn.q": (a, b)}, scale=2.0, rank=4, base_model="a/b")
    with pytest.raises(CsmError, match="expected A"):
        write_mlx_adapter(tmp_path / "x", {Q: (a, b)}, scale=2.0, rank=8, base_model="a/b")
    with pytest.raises(CsmError, match="scale must be a number"):
        write_mlx_adapter(tmp_path / "x", {Q: (a, b)}, scale=float("nan"), rank=4, base_model="a/b")
    with pytest.raises(CsmError, match="holds a peft-layout adapter"):
        write_mlx_adapter(trained["folder"], {Q: (a, b)}, scale=2.0, rank=4, base_model="a/b")
