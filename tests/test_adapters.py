"""LoRA adapters: written by `write_adapter`, merged at load on both backends to the logits of the
unmerged peft model, peft's own files and transformers-named adapters, export round trips,
merged model folders, the CLI, and one clear error for every bad adapter."""

import json
import os
import shutil

import numpy as np
import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

import csm
from csm.checkpoint import open_checkpoint
from csm.errors import CsmError
from csm.training.adapters import (
    CONFIG_FILE,
    CSM_FILE,
    WEIGHTS_FILE,
    export_adapter,
    merge_adapter,
    merged_tensors,
    read_adapter,
    write_adapter,
)
from csm.weights import csm_tensors
from csm_torch.loading import checkpoint_tensors, load_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TARGETS = r"^(backbone|decoder)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CPU, F32 = torch.device("cpu"), torch.float32


def base_model(path):
    ckpt = open_checkpoint(path)
    return load_model(ckpt.config, checkpoint_tensors(ckpt, CPU, F32), CPU, F32)


def batch(config, frames=7, seed=0):
    """A text frame, then audio frames: tokens, mask [1, T, 33] and the codes of frames 1..T-1."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(1, frames, 33, dtype=torch.long)
    mask = torch.zeros(1, frames, 33, dtype=torch.bool)
    tokens[0, 0, -1], mask[0, 0, -1] = 17, True
    tokens[0, 1:, :32] = torch.randint(0, 2048, (frames - 1, 32), generator=g)
    mask[0, 1:, :32] = True
    return tokens, mask, tokens[:, 1:, :32]


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and "codec_model" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def as_lora_and_full(state):
    """peft's state dict -> write_adapter's (lora, full)."""
    lora, full = {}, {}
    for key, t in state.items():
        key = key.removeprefix("base_model.model.")
        for part, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                lora.setdefault(key[: -len(part)], [None, None])[i] = t
                break
        else:
            full[key] = t
    return {k: tuple(v) for k, v in lora.items()}, full


def close(ours, theirs, rel):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert np.abs(ours - theirs).max() <= rel * np.abs(theirs).max()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A peft LoRA on csm's Model (random non-zero lora_B, codebook0_head and audio_head trained in
    full), its unmerged logits, and the adapter folder write_adapter made of it."""
    model = base_model(tiny_model_dir)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator: the same whatever ran before
        torch.manual_seed(0)
        peft_model = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8,
                                                                modules_to_save=["codebook0_head"]))
    randomize_lora(peft_model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        head = peft_model.base_model.model.codebook0_head.modules_to_save["default"].weight
        head.copy_(torch.randn(head.shape, generator=g) * 0.08)
        model.audio_head.copy_(torch.randn(model.audio_head.shape, generator=g) * 0.08)
        # as in a trained model, the 3 spare ids above Mimi's 2048 codes are never the likeliest
        # (greedy generation would stop with "the model emitted one of its spare ids")
        head[2048:] = 0.0
        model.audio_head[..., 2048:] = 0.0
        logits = model.forward_train(*batch(model.config))
    lora, full = as_lora_and_full(get_peft_model_state_dict(peft_model))
    full["audio_head"] = model.audio_head.detach().clone()
    assert len(lora) == 28 and set(full) == {"codebook0_head.weight", "audio_head"}
    folder = write_adapter(tmp_path_factory.mktemp("adapters") / "voice", lora, alpha=8, rank=4,
                           target_modules=TARGETS, base_model=tiny_model_dir, full=full,
                           info={"speaker_id": 0, "method": "lora"})
    return dict(peft_model=peft_model, logits=logits, lora=lora, full=full, folder=folder, config=model.config)


def torch_logits(gen, config):
    with torch.no_grad():
        return gen._backend.model.forward_train(*batch(config))


def mlx_logits(gen, config):
    """`Model.forward_train` on the MLX model (csm_mlx has no training pass of its own)."""
    import mlx.core as mx

    tokens, mask, codes = (mx.array(t.numpy()) for t in batch(config))
    m = gen._backend.model
    h = m.backbone(m.embed_frames(tokens, mask))
    n = codes.shape[1]
    dec_in = mx.concatenate([h[:, :n, None, :], m.audio_embeddings(codes[..., :-1] + m._codebook_offsets[:-1])],
                            axis=2)
    dec_h = m.decoder(m.projection(dec_in).reshape(n, 32, -1))[:, 1:].reshape(1, n, 31, -1)
    return m.codebook0_head(h), mx.einsum("bnkd,kdv->bnkv", dec_h, m.audio_head)


def parameters(gen):
    return {k: v.detach().clone() for k, v in gen._backend.model.state_dict().items()}


# --- the files ----------------------------------------------------------------------------------

def test_writes_peft_files_and_reads_them_back(trained, tiny_model_dir):
    folder = trained["folder"]
    config = peft.LoraConfig.from_pretrained(str(folder))  # peft reads our config
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8, TARGETS)
    assert sorted(config.modules_to_save) == ["audio_head", "codebook0_head"]
    info = json.loads((folder / CSM_FILE).read_text())
    assert info["csm_adapter"] == 1 and info["names"] == "csm" and info["speaker_id"] == 0
    assert info["base_model"] == str(tiny_model_dir.resolve())  # absolute: the adapter may move
    adapter = read_adapter(folder)
    assert adapter.lora.keys() == trained["lora"].keys() and set(adapter.scale.values()) == {2.0}
    a, b = adapter.lora["backbone.layers.0.self_attn.q_proj"]
    assert torch.equal(a, trained["lora"]["backbone.layers.0.self_attn.q_proj"][0]) and b.shape == (64, 4)
    assert torch.equal(adapter.full["audio_head"], trained["full"]["audio_head"])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_peft_loads_our_adapter_to_the_same_logits(trained, tiny_model_dir):
    model = base_model(tiny_model_dir)
    reloaded = peft.PeftModel.from_pretrained(model, str(trained["folder"]))
    with torch.no_grad():
        logits = reloaded.base_model.model.forward_train(*batch(model.config))
    for ours, theirs in zip(logits, trained["logits"], strict=True):
        close(ours, theirs, 1e-6)


def test_scale_follows_rslora_and_peft_patterns(trained, tmp_path):
    folder = tmp_path / "patterns"
    shutil.copytree(trained["folder"], folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config |= {"use_rslora": True, "alpha_pattern": {r"decoder\.layers\.1\.mlp\.down_proj": 3}}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    adapter = read_adapter(folder)
    assert adapter.scale["decoder.layers.1.mlp.down_proj"] == 3 / 2
    assert adapter.scale["backbone.layers.0.self_attn.q_proj"] == 8 / 2


# --- loading with an adapter ----------------------------------------------------------------------

def test_torch_load_with_adapter_gives_the_peft_models_logits(trained, tiny_model_dir):
    gen = csm.load(tiny_model_dir, adapter=trained["folder"], backend="torch", dtype="float32")
    for ours, theirs in zip(torch_logits(gen, trained["config"]), trained["logits"], strict=True):
        close(ours, theirs, 1e-5)
    base = csm.load(tiny_model_dir, backend="torch", dtype="float32")
    assert not torch.allclose(torch_logits(base, trained["config"])[0], trained["logits"][0], atol=1e-3)


def test_mlx_load_with_adapter_gives_the_peft_models_logits(trained, tiny_model_dir):
    pytest.importorskip("mlx.core")
    gen = csm.load(tiny_model_dir, adapter=trained["folder"], backend="mlx", device="cpu", dtype="float32")
    for ours, theirs in zip(mlx_logits(gen, trained["config"]), trained["logits"], strict=True):
        close(ours, theirs, 1e-4)


def test_adapter_folder_alone_loads_its_base_model(trained, tiny_model_dir, tmp_path):
    expected = parameters(csm.load(tiny_model_dir, adapter=trained["folder"], backend="torch", dtype="float32"))
    gen = csm.load(trained["folder"], backend="torch", dtype="float32")
    assert gen._backend.model_dir.resolve() == tiny_model_dir.resolve()  # tokenizer and Mimi from the base
    assert all(torch.equal(v, expected[k]) for k, v in parameters(gen).items())
    # a relative base path is relative to the adapter folder, wherever the process runs
    moved = tmp_path / "moved"
    shutil.copytree(trained["folder"], moved)
    info = json.loads((moved / CSM_FILE).read_text())
    info["base_model"] = os.path.relpath(tiny_model_dir, moved)
    (moved / CSM_FILE).write_text(json.dumps(info))
    gen = csm.load(moved, backend="torch", dtype="float32")
    assert all(torch.equal(v, expected[k]) for k, v in parameters(gen).items())


def test_peft_save_pretrained_on_csm_names_loads(trained, tiny_model_dir, tmp_path):
    trained["peft_model"].save_pretrained(str(tmp_path / "peft"))
    gen = csm.load(tiny_model_dir, adapter=tmp_path / "peft", backend="torch", dtype="float32")
    c0, dec = torch_logits(gen, trained["config"])
    close(c0, trained["logits"][0], 1e-5)
    assert not torch.allclose(dec, trained["logits"][1], atol=1e-3)  # peft cannot save audio_head: base one
    with pytest.raises(CsmError, match="does not name its base model"):
        csm.load(tmp_path / "peft", backend="torch")


@pytest.fixture(scope="module")
def transformers_adapter(tiny_transformers_dir, tmp_path_factory):
    """peft on transformers' CsmForConditionalGeneration with unsloth's suffix targets (which hit
    Mimi's attention too), lm_head in full; saved, and merged by peft."""
    from fakes.csm_models import make_transformers_model, tiny_config

    model = make_transformers_model(tiny_config())  # the weights of tiny_transformers_dir (same seed)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(target_modules=UNSLOTH_TARGETS, r=4, lora_alpha=16,
                                                            modules_to_save=["lm_head"]))
    randomize_lora(peft_model, seed=3)
    with torch.no_grad():
        head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    folder = tmp_path_factory.mktemp("hf_adapter") / "voice"
    peft_model.save_pretrained(str(folder))
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return folder, merged


def test_transformers_named_adapter_merges_like_peft(transformers_adapter, tiny_transformers_dir):
    folder, peft_merged = transformers_adapter
    adapter = read_adapter(folder)
    assert adapter.names == "transformers" and len(adapter.lora) == 28  # Mimi's LoRAs skipped
    assert adapter.base_model is None  # peft's file names none: pass the base
    ckpt = open_checkpoint(tiny_transformers_dir[0])
    ours = dict(merged_tensors(checkpoint_tensors(ckpt, CPU, None), adapter, ckpt.config))
    theirs = dict(csm_tensors(peft_merged.items(), "transformers", ckpt.config))
    for name in ("backbone.layers.0.self_attn.q_proj.weight", "backbone.layers.1.mlp.down_proj.weight",
                 "decoder.layers.1.self_attn.k_proj.weight", "codebook0_head.weight", "projection.weight"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours["backbone.layers.0.self_attn.q_proj.weight"],
                           dict(checkpoint_tensors(ckpt, CPU, None))["backbone.layers.0.self_attn.q_proj.weight"])
    gen = csm.load(tiny_transformers_dir[0], adapter=folder, backend="torch", dtype="float32")
    assert torch.equal(gen._backend.model.codebook0_head.weight, ours["codebook0_head.weight"])


def test_export_round_trip_is_bit_exact(trained, tmp_path):
    from safetensors.torch import load_file

    hf = export_adapter(trained["folder"], tmp_path / "hf", names="transformers")
    back = export_adapter(hf, tmp_path / "back", names="csm")
    hf_tensors = load_file(str(hf / WEIGHTS_FILE))
    assert "base_model.model.backbone_model.layers.0.self_attn.q_proj.lora_A.weight" in hf_tensors
    assert "base_model.model.depth_decoder.codebooks_head.weight" in hf_tensors
    assert json.loads((hf / CSM_FILE).read_text())["names"] == "transformers"
    first, last = load_file(str(trained["folder"] / WEIGHTS_FILE)), load_file(str(back / WEIGHTS_FILE))
    assert first.keys() == last.keys()
    assert all(first[k].dtype == last[k].dtype and torch.equal(first[k], last[k]) for k in first)
    peft.LoraConfig.from_pretrained(str(hf))
    written = write_adapter(tmp_path / "written", trained["lora"], alpha=8, rank=4, target_modules=TARGETS,
                            base_model="unsloth/csm-1b", full=trained["full"], names="transformers")
    assert load_file(str(written / WEIGHTS_FILE)).keys() == hf_tensors.keys()
    with pytest.raises(CsmError, match="already exists"):
        export_adapter(trained["folder"], tmp_path / "hf", names="transformers")


def test_exported_adapter_is_what_peft_merges_on_transformers(trained, tmp_path, tiny_transformers_dir):
    from fakes.csm_models import make_transformers_model, tiny_config

    hf = export_adapter(trained["folder"], tmp_path / "hf")
    merged = peft.PeftModel.from_pretrained(make_transformers_model(tiny_config()), str(hf)).merge_and_unload()
    ckpt = open_checkpoint(tiny_transformers_dir[0])
    theirs = dict(csm_tensors(merged.state_dict().items(), "transformers", ckpt.config))
    ours = dict(merged_tensors(checkpoint_tensors(ckpt, CPU, None), read_adapter(trained["folder"]), ckpt.config))
    for name in ("decoder.layers.0.mlp.gate_proj.weight", "codebook0_head.weight", "audio_head"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)


# --- merged folders and the CLI -------------------------------------------------------------------

def test_merge_adapter_writes_a_model_that_loads_as_merged(trained, tiny_model_dir, tmp_path):
    out = merge_adapter(trained["folder"], tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    expected = parameters(csm.load(tiny_model_dir, adapter=trained["folder"], backend="torch", dtype="float32"))
    assert all(torch.equal(v, expected[k]) for k, v in parameters(csm.load(out, backend="torch")).items())
    with pytest.raises(CsmError, match="already exists"):
        merge_adapter(trained["folder"], out)


def test_merge_adapter_quantized_for_mlx(tmp_path):
    """On a model MLX quantizes in groups of 64; the LoRA given as mx and numpy arrays."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten

    from fakes.csm_models import save_transformers_dir
    from test_mlx_quantize import quantizable_config

    config = quantizable_config()
    base = tmp_path / "base"
    save_transformers_dir(base, config, seed=5)
    rng = np.random.default_rng(0)
    lora = {"backbone.layers.1.mlp.up_proj": (mx.array(rng.normal(size=(2, 128)).astype(np.float32)),
                                              rng.normal(size=(256, 2)).astype(np.float32) * 0.05),
            "decoder.layers.0.self_attn.v_proj": (mx.array(rng.normal(size=(2, 64)).astype(np.float32)),
                                                  rng.normal(size=(32, 2)).astype(np.float32) * 0.05)}
    adapter = write_adapter(tmp_path / "voice", lora, alpha=4, rank=2, target_modules=list(lora), base_model=base)
    out = merge_adapter(adapter, tmp_path / "q8", quantize=8)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    ours = dict(tree_flatten(csm.load(out, backend="mlx", device="cpu")._backend.model.parameters()))
    theirs = csm.load(adapter, backend="mlx", device="cpu", dtype="float32", quantize=8)
    theirs = dict(tree_flatten(theirs._backend.model.parameters()))
    assert ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    unmerged = dict(tree_flatten(csm.load(base, backend="mlx", device="cpu", quantize=8)._backend.model.parameters()))
    assert not mx.array_equal(ours["backbone.layers.1.mlp.up_proj.weight"],
                              unmerged["backbone.layers.1.mlp.up_proj.weight"]).item()


def run_command(command, args, capsys):
    from csm.cli.common import entry_point

    try:
        entry_point(command)(list(map(str, args)))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def test_merge_and_export_commands(trained, tmp_path, capsys):
    from csm.cli.finetune_adapters import export_adapter_command, merge_command

    code, out = run_command(merge_command, ["--adapter", trained["folder"], "--output-dir", tmp_path / "m",
                                            "--dtype", "bfloat16"], capsys)
    assert code == 0 and "wrote the merged model" in out.out
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    code, out = run_command(merge_command, ["--adapter", trained["folder"], "--output-dir", tmp_path / "m"], capsys)
    assert code != 0 and out.err.count("error:") == 1 and "--force" in out.err
    code, out = run_command(export_adapter_command, ["--adapter", trained["folder"], "--output-dir", tmp_path / "e",
                                                     "--names", "transformers"], capsys)
    assert code == 0 and read_adapter(tmp_path / "e").names == "transformers"
    code, out = run_command(export_adapter_command, ["--adapter", tmp_path / "nope", "--output-dir", tmp_path / "f"],
                            capsys)
    assert code != 0 and out.err.strip().splitlines() == [f"error: adapter folder not found: {tmp_path / 'nope'}"]


def test_generate_cli_with_adapter(trained, tmp_path, watermark_dir, cli_main):
    from test_cli import assert_one_line_error, run_cli

    args = ["--watermark-model", watermark_dir, "--device", "cpu", "--top-k", "1", "--max-audio-length-ms", 400]
    err = cli_main(["--text", "Hello there.", "--adapter", trained["folder"], *args, "-o", "out.wav"])
    assert "with adapter" in err and (tmp_path / "out.wav").is_file()
    assert_one_line_error(run_cli(["--text", "hi", "--adapter", tmp_path / "nope", *args], tmp_path),
                          "adapter folder not found")


# --- bad adapters ---------------------------------------------------------------------------------

def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(config | changes))


def edit_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))


Q = "backbone.layers.0.self_attn.q_proj"
Q_A = f"base_model.model.{Q}.lora_A.weight"


def _rename_module(old, new):
    """Move the LoRA of module path `old` to `new` (both halves)."""
    def change(tensors):
        for part in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{new}.{part}.weight"] = tensors.pop(f"base_model.model.{old}.{part}.weight")
    return change


BAD = {
    "no files": (lambda f: (f / WEIGHTS_FILE).unlink(), "no adapter in"),
    "DoRA": (lambda f: edit_config(f, use_dora=True), "DoRA adapters are not supported"),
    "IA3": (lambda f: edit_config(f, peft_type="IA3"), "LoRA adapters only"),
    "rank": (lambda f: edit_config(f, r=8), "says r=8"),
    "shapes": (lambda f: edit_tensors(f, lambda t: t.__setitem__(Q_A, torch.zeros(4, 65))),
               "does not fit the base model"),
    "missing half": (lambda f: edit_tensors(f, lambda t: t.pop(Q_A)), "no lora_A"),
    "layer the base lacks": (lambda f: edit_tensors(f, _rename_module(Q, Q.replace("layers.0", "layers.5"))),
                             "which the base model does not have"),
    "unknown name": (lambda f: edit_tensors(f, _rename_module(Q, Q.replace("self_attn", "cross_attn"))),
                     "not a CSM parameter in csm names"),
    "unknown name, plain peft": (lambda f: (edit_tensors(f, _rename_module(Q, "encoder.q_proj")),
                                            (f / CSM_FILE).unlink()),
                                 "neither a csm nor a transformers CSM name"),
    "newer format": (lambda f: (f / CSM_FILE).write_text('{"csm_adapter": 2}'), "newer than this csm reads"),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_adapters_raise_one_clear_error(problem, trained, tiny_model_dir, tmp_path):
    damage, message = BAD[problem]
    folder = tmp_path / "bad"
    shutil.copytree(trained["folder"], folder)
    damage(folder)
    with pytest.raises(CsmError, match=message):
        csm.load(tiny_model_dir, adapter=folder, backend="torch")


def test_missing_adapter_folder(tiny_model_dir, tmp_path):
    with pytest.raises(CsmError, match="adapter folder not found"):
        csm.load(tiny_model_dir, adapter=tmp_path / "nope", backend="torch")


def test_mimi_changed_by_a_transformers_adapter_is_refused(transformers_adapter, tmp_path):
    folder = tmp_path / "codec"
    shutil.copytree(transformers_adapter[0], folder)
    key = "base_model.model.codec_model.encoder.encoder_transformer.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(folder, lambda t: t[key].fill_(0.1))
    with pytest.raises(CsmError, match="changes Mimi"):
        read_adapter(folder)


def test_merge_refuses_an_adapter_the_stream_never_reaches(trained, tiny_model_dir):
    ckpt = open_checkpoint(tiny_model_dir)
    stream = ((n, t) for n, t in checkpoint_tensors(ckpt, CPU, None) if not n.startswith("decoder.layers.1."))
    with pytest.raises(CsmError, match="never reached"):
        list(merged_tensors(stream, read_adapter(trained["folder"]), ckpt.config))


def test_write_adapter_refuses_bad_input(tmp_path, trained):
    a, b = trained["lora"]["backbone.layers.0.self_attn.q_proj"]
    with pytest.raises(CsmError, match="not a CSM parameter"):
        write_adapter(tmp_path, {"backbone.layers.0.attn.q": (a, b)}, alpha=8, rank=4, target_modules=TARGETS,
                      base_model="unsloth/csm-1b")
    with pytest.raises(CsmError, match="expected A"):
        write_adapter(tmp_path, {"backbone.layers.0.self_attn.q_proj": (a, b)}, alpha=8, rank=8,
                      target_modules=TARGETS, base_model="unsloth/csm-1b")
