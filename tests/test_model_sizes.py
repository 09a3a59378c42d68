"""CSM at every named size: configs, new models (random or from a Llama), training, bare weights files.

Full-size models cannot run here, so each flavor is scaled down to its own structure (the same
query:KV head ratio, MLP:width ratio, RoPE scaling and norms; 2 layers of 8-wide heads)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import csm
from csm.checkpoint import open_checkpoint
from csm.config import (
    FLAVORS,
    PRESET_FLAVORS,
    PRESETS,
    CsmConfig,
    TransformerConfig,
    model_config,
    to_official_dict,
    to_transformers_dict,
)
from csm.errors import CsmError
from csm.mimi_files import MIMI_FILE
from csm.training.examples import Example, Turn
from csm.training.init_model import init_model
from csm.training.tuner import CSMFineTuner
from fakes.csm_models import TEXT_VOCAB, write_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def assets(tiny_model_dir):
    """A folder with a Llama-3-style tokenizer.json and a random kyutai Mimi file (the session's
    tiny model folder, built once for every test file)."""
    return tiny_model_dir


def scaled(t: TransformerConfig) -> TransformerConfig:
    kv = 2
    heads = kv * (t.num_heads // t.num_kv_heads)
    hidden = heads * 8
    mlp = max(8, round(hidden * t.intermediate_size / t.hidden_size / 8) * 8)
    return dataclasses.replace(t, num_layers=2, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                               intermediate_size=mlp, head_dim=8, max_seq_len=128)


# --- configs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_round_trips_every_dialect(preset):
    config = PRESETS[preset]
    backbone, decoder = PRESET_FLAVORS[preset]
    assert model_config(preset) == config == model_config(backbone=backbone, decoder=decoder)
    assert CsmConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert CsmConfig.from_dict(to_transformers_dict(config)) == config
    official = to_official_dict(config)
    assert (official["backbone_flavor"], official["decoder_flavor"]) == (backbone, decoder)
    assert CsmConfig.from_dict(official) == config


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_every_flavor_round_trips_as_a_backbone(flavor):
    config = model_config(backbone=flavor)
    assert config.decoder == FLAVORS["llama-100M"]
    assert CsmConfig.from_dict(to_transformers_dict(config)) == config
    assert CsmConfig.from_dict(to_official_dict(config)) == config
    small = model_config(backbone=scaled(FLAVORS[flavor]), text_vocab_size=TEXT_VOCAB)
    assert CsmConfig.from_dict(small.to_dict()) == small
    assert CsmConfig.from_dict(to_transformers_dict(small)) == small
    with pytest.raises(CsmError, match="flavor"):
        to_official_dict(small)  # unnamed dims: the official dialect cannot say them


def test_instruct_alias_is_llama_3b():
    assert model_config(backbone="llama-3B-instruct") == PRESETS["csm-3b"]
    official = {**to_official_dict(PRESETS["csm-3b"]), "backbone_flavor": "llama-3B-instruct"}
    assert CsmConfig.from_dict(official) == PRESETS["csm-3b"]
    assert to_official_dict(CsmConfig.from_dict(official))["backbone_flavor"] == "llama-3B"


def test_explicit_dims():
    dims = {"num_layers": 3, "hidden_size": 96, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 256,
            "rope_scaling": None}
    config = model_config(backbone=dims, decoder="tiny-decoder", text_vocab_size=500)
    assert config.backbone.head_dim == 16 and config.backbone.rope_scaling is None
    assert config.decoder == FLAVORS["tiny-decoder"] and config.text_vocab_size == 500
    assert model_config("tiny", decoder=dims).backbone == FLAVORS["tiny-backbone"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="huge"), "unknown model preset 'huge'"),
    (dict(backbone="llama-70B"), "unknown model flavor 'llama-70B'.*llama-3B-instruct"),
    (dict(), "give a model preset"),
    (dict(backbone={"num_layers": 2, "hidden_size": 64}), "backbone dims: missing num_heads"),
    (dict(backbone={"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
                    "intermediate_size": 128, "layers": 3}), "unknown key.*layers"),
    (dict(backbone={"num_layers": 2, "hidden_size": 60, "num_heads": 4, "num_kv_heads": 2,
                    "intermediate_size": 128}), "head_dim 15 is odd"),
    (dict(backbone={"num_layers": 0, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
                    "intermediate_size": 128}), "num_layers must be a positive integer"),
    (dict(backbone={"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 3,
                    "intermediate_size": 128}), "not a multiple of num_kv_heads"),
    (dict(preset="tiny", text_vocab_size=-1), "text_vocab_size must be a positive integer"),
    (dict(preset="tiny", vocab=5), "unknown model setting"),
])
def test_bad_model_configs(kwargs, match):
    with pytest.raises(CsmError, match=match):
        model_config(**kwargs)


# --- new models at every size: train one step, generate -------------------------------------------------

def _examples(seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example("a", [Turn(0, "a few words", rng.integers(0, 2048, (6, 32)))])]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_scaled_model_trains_and_generates(preset, assets, tmp_path):
    config = PRESETS[preset]
    model_dir = init_model(tmp_path / "new", backbone=scaled(config.backbone), decoder=scaled(config.decoder),
                           tokenizer=assets, mimi=assets / MIMI_FILE, dtype="float32", text_vocab_size=TEXT_VOCAB)
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json", MIMI_FILE}
    before = open_checkpoint(model_dir).config
    assert before.backbone.num_heads // before.backbone.num_kv_heads == (config.backbone.num_heads
                                                                         // config.backbone.num_kv_heads)
    tuner = CSMFineTuner(model_path=str(model_dir), output_dir=tmp_path / "run", method="full", precision="float32",
                         learning_rate=1e-3, max_steps=1, epochs=1, warmup_steps=0, device="cpu")
    result = tuner.train(_examples())
    assert result.steps == 1 and np.isfinite(result.last_metrics["loss"])
    trained = csm.load(str(tmp_path / "run"), backend="torch", device="cpu", dtype="float32")
    assert trained.config == before
    codes = trained.generate_codes("hello", 0, topk=1, max_audio_length_ms=240)
    assert codes.shape == (3, 32)
    if preset == "tiny":  # Mimi decodes a new model's codes like any other's
        audio = trained.generate("hello", 0, topk=1, max_audio_length_ms=160, watermark=False)
        assert audio.dtype == np.float32 and len(audio) == 2 * 1920


def test_random_init_is_deterministic_and_scaled(assets, tmp_path):
    from safetensors.torch import load_file

    kwargs = dict(tokenizer=assets, dtype="float32", text_vocab_size=TEXT_VOCAB)
    a = load_file(init_model(tmp_path / "a", "tiny", seed=3, **kwargs) / "model.safetensors")
    b = load_file(init_model(tmp_path / "b", "tiny", seed=3, **kwargs) / "model.safetensors")
    c = load_file(init_model(tmp_path / "c", "tiny", seed=4, **kwargs) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["audio_head"], c["audio_head"])
    assert a["text_embeddings.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    layers = PRESETS["tiny"].backbone.num_layers
    assert a["backbone.layers.0.mlp.down_proj.weight"].std().item() == pytest.approx(0.02 / (2 * layers) ** 0.5,
                                                                                      rel=0.05)
    assert torch.equal(a["decoder.norm.weight"], torch.ones(PRESETS["tiny"].decoder.hidden_size))
    with pytest.raises(CsmError, match="already exists.*force"):
        init_model(tmp_path / "a", "tiny", **kwargs)
    with pytest.raises(CsmError, match="tokenizer"):
        init_model(tmp_path / "d", "tiny", dtype="float32")
    with pytest.raises(CsmError, match="raise text_vocab_size"):
        init_model(tmp_path / "d", "tiny", tokenizer=assets, text_vocab_size=100)


def test_init_command(assets, tmp_path, capsys):
    from csm.cli.common import entry_point
    from csm.cli.finetune import group

    main = entry_point(group)
    dims = json.dumps(dataclasses.asdict(scaled(FLAVORS["llama-8B"])))
    args = ["init", str(tmp_path / "m"), "--backbone", dims, "--decoder", "tiny-decoder", "--tokenizer", str(assets),
            "--text-vocab-size", str(TEXT_VOCAB), "--seed", "1"]
    main(args)
    config = open_checkpoint(tmp_path / "m").config
    assert config.backbone == scaled(FLAVORS["llama-8B"]) and config.decoder == FLAVORS["tiny-decoder"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path / "n"), "--backbone", "{oops", "--tokenizer", str(assets)])
    assert capsys.readouterr().err.startswith("error: --backbone: not a flavor name nor a JSON object")


# --- a backbone from a Llama-3.x checkpoint ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random `LlamaForCausalLM` folder (Llama-3 RoPE, GQA, untied head) with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=TEXT_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         rope_theta=500000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a missed or misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path, model


def test_backbone_from_llama_gives_its_hidden_states(tiny_llama, assets, tmp_path):
    from csm_torch.loading import checkpoint_tensors, load_model

    llama_dir, llama = tiny_llama
    out = init_model(tmp_path / "from-llama", llama=llama_dir, mimi=assets / MIMI_FILE, decoder="tiny-decoder",
                     dtype="float32")
    ckpt = open_checkpoint(out)
    assert ckpt.config.text_vocab_size == TEXT_VOCAB and ckpt.config.backbone.num_layers == 2
    assert ckpt.config.backbone.max_seq_len == 2048 and ckpt.config.decoder == FLAVORS["tiny-decoder"]
    assert (out / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    cpu = torch.device("cpu")
    model = load_model(ckpt.config, checkpoint_tensors(ckpt, cpu, torch.float32), cpu, torch.float32)
    ids = torch.tensor([[1, 50, 70, 90, 33, 12, 256, 5, 200, 140]])
    with torch.no_grad():
        ours = model.backbone(model.text_embeddings(ids), torch.arange(ids.shape[1]))
        theirs = llama.model(input_ids=ids).last_hidden_state  # after the final norm, like our stack's output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the random parts are the seed's, whatever came from the Llama
    random = open_checkpoint(init_model(tmp_path / "random", backbone=ckpt.config.backbone, decoder="tiny-decoder",
                                        tokenizer=assets, dtype="float32", text_vocab_size=TEXT_VOCAB))
    from safetensors.torch import load_file

    a, b = load_file(ckpt.files[0]), load_file(random.files[0])
    assert torch.equal(a["audio_head"], b["audio_head"]) and torch.equal(a["decoder.layers.0.mlp.up_proj.weight"],
                                                                         b["decoder.layers.0.mlp.up_proj.weight"])
    assert torch.equal(a["text_embeddings.weight"], llama.model.embed_tokens.weight)


def test_llama_that_is_not_the_backbone(tiny_llama, tmp_path):
    llama_dir, _ = tiny_llama
    with pytest.raises(CsmError, match="is not the chosen backbone.*leave the backbone out"):
        init_model(tmp_path / "x", llama=llama_dir, backbone="llama-1B")
    not_llama = tmp_path / "mistral"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(CsmError, match="not a Llama"):
        init_model(tmp_path / "y", llama=not_llama)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- a bare weights file (a training checkpoint) --------------------------------------------------------

def test_bare_training_checkpoint_loads_with_its_flavor(assets, tmp_path):
    """A `model_epoch9_step1000.pt` as training repos write it: {"model": Sesame-named weights, ...},
    in a folder without config.json, of dims no preset has."""
    from csm.weights import convert_state

    model_dir = init_model(tmp_path / "model", "tiny", tokenizer=assets, mimi=assets / MIMI_FILE, dtype="float32",
                           text_vocab_size=TEXT_VOCAB)
    ckpt = open_checkpoint(model_dir)
    from csm.checkpoint import iter_tensors

    state = dict(convert_state(iter_tensors(ckpt), "csm", "official", ckpt.config))
    (tmp_path / "checkpoints").mkdir()
    pt = tmp_path / "checkpoints" / "model_epoch9_step1000.pt"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": 9}, pt)
    common = dict(backend="torch", device="cpu", dtype="float32", tokenizer=str(assets), mimi=str(assets / MIMI_FILE))

    with pytest.raises(CsmError, match="backbone_flavor="):
        csm.load(str(pt), **common)
    with pytest.raises(CsmError, match=r"backbone_flavor='llama-1B'.*another flavor\?"):
        csm.load(str(pt), backbone_flavor="llama-1B", **common)
    with pytest.raises(CsmError, match="decoder"):
        csm.load(str(pt), backbone_flavor="tiny-backbone", **common)  # the decoder is not llama-100M

    expected = csm.load(str(model_dir), **common).generate_codes("hi", 0, topk=1, max_audio_length_ms=160)
    gen = csm.load(str(pt), backbone_flavor="tiny-backbone", decoder_flavor="tiny-decoder", **common)
    assert gen.config == ckpt.config  # text vocabulary read off the embeddings
    assert np.array_equal(gen.generate_codes("hi", 0, topk=1, max_audio_length_ms=160), expected)
    # Sesame's entry point, the file first
    del common["backend"], common["device"]
    sesame = csm.load_csm_1b(str(pt), device="cpu", backbone_flavor="tiny-backbone", decoder_flavor="tiny-decoder",
                             **common)
    assert sesame.generator.config == ckpt.config
    # the same weights as a bare safetensors file
    shutil.copy(model_dir / "model.safetensors", tmp_path / "checkpoints" / "weights.safetensors")
    bare = csm.load(str(tmp_path / "checkpoints" / "weights.safetensors"), backend="torch", device="cpu",
                    dtype="float32", backbone_flavor=dataclasses.asdict(FLAVORS["tiny-backbone"]) | {"rope_scaling": {
                        "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}},
                    decoder_flavor="tiny-decoder", tokenizer=str(assets), mimi=str(assets / MIMI_FILE))
    assert bare.config == ckpt.config
