"""Config dialects: Sesame's flavors, transformers' CsmConfig (v4 and v5 rope spellings), ours.
The RoPE tests prove that transformers' different-looking Llama-3 numbers give Sesame's frequencies."""

import json

import pytest
import torch

from csm.config import (
    FLAVORS,
    PRESETS,
    CsmConfig,
    RopeScaling,
    TransformerConfig,
    to_official_dict,
    to_transformers_dict,
)
from csm.errors import CsmError
from csm_torch.model import rope_frequencies
from fakes.csm_models import tiny_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OFFICIAL_HUB_CONFIG = {
    "audio_num_codebooks": 32,
    "audio_vocab_size": 2051,
    "backbone_flavor": "llama-1B",
    "decoder_flavor": "llama-100M",
    "text_vocab_size": 128256,
}

# transformers' spelling of the same Llama-3 scaling: other numbers, the same wavelength bounds
# (original / low_freq_factor, original / high_freq_factor), hence the same frequencies
HF_BACKBONE_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.125, "high_freq_factor": 0.5,
                    "original_max_position_embeddings": 1024}
HF_DECODER_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.001953125, "high_freq_factor": 0.0078125,
                   "original_max_position_embeddings": 16}


def _hf_stack(layers, width, heads, kv, head_dim, mlp, max_pos, rope, v5):
    d = {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads, "num_key_value_heads": kv,
         "head_dim": head_dim, "intermediate_size": mlp, "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5,
         "hidden_act": "silu"}
    if v5:
        d["rope_parameters"] = {"rope_theta": 500000.0, **rope}
    else:
        d["rope_theta"] = 500000.0
        d["rope_scaling"] = dict(rope)
    return d


def hf_csm_1b_dict(v5: bool = True) -> dict:
    """What `unsloth/csm-1b`'s config.json holds (codec config left out)."""
    decoder = _hf_stack(4, 1024, 8, 2, 128, 8192, 33, HF_DECODER_ROPE, v5)
    decoder.update(model_type="csm_depth_decoder_model", num_codebooks=32, backbone_hidden_size=2048, vocab_size=2051)
    return {
        "architectures": ["CsmForConditionalGeneration"],
        "model_type": "csm",
        **_hf_stack(16, 2048, 32, 8, 64, 8192, 2048, HF_BACKBONE_ROPE, v5),
        "num_codebooks": 32,
        "vocab_size": 2051,
        "text_vocab_size": 128256,
        "depth_decoder_config": decoder,
    }


def assert_csm_1b_dims(c: CsmConfig):
    b, d = c.backbone, c.decoder
    def dims(t: TransformerConfig) -> tuple:
        return t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size

    assert dims(b) == (16, 2048, 32, 8, 64, 8192)
    assert dims(d) == (4, 1024, 8, 2, 128, 8192)
    assert b.rope_theta == d.rope_theta == 500000.0
    assert b.norm_eps == d.norm_eps == 1e-5
    assert (c.text_vocab_size, c.audio_vocab_size, c.audio_num_codebooks, c.frame_width) == (128256, 2051, 32, 33)


def test_official_hub_config_gives_csm_1b_dims():
    c = CsmConfig.from_dict(OFFICIAL_HUB_CONFIG)
    assert_csm_1b_dims(c)
    assert c.backbone.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert c.decoder.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert c == PRESETS["csm-1b"]


def test_official_config_from_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_HUB_CONFIG))
    assert CsmConfig.from_file(tmp_path / "config.json") == PRESETS["csm-1b"]


@pytest.mark.parametrize("v5", [True, False], ids=["rope_parameters", "rope_scaling"])
def test_transformers_config_parses_both_rope_spellings(v5):
    c = CsmConfig.from_dict(hf_csm_1b_dict(v5))
    assert_csm_1b_dims(c)
    assert c.backbone.max_seq_len == 2048
    assert c.backbone.rope_scaling == RopeScaling(32.0, 0.125, 0.5, 1024)
    assert c.decoder.rope_scaling == RopeScaling(32.0, 0.001953125, 0.0078125, 16)


def test_keys_a_config_leaves_out_take_csm_1b_defaults():
    official = {k: v for k, v in OFFICIAL_HUB_CONFIG.items() if k.endswith("_flavor")}
    assert CsmConfig.from_dict(official) == PRESETS["csm-1b"]
    d = hf_csm_1b_dict()
    for key in ("text_vocab_size", "vocab_size", "num_codebooks"):
        del d[key]
    for stack in (d, d["depth_decoder_config"]):
        for key in ("head_dim", "max_position_embeddings", "rms_norm_eps"):
            del stack[key]
        del stack["rope_parameters"]["rope_theta"]
    c = CsmConfig.from_dict(d)
    assert (c.text_vocab_size, c.audio_vocab_size, c.audio_num_codebooks) == (128256, 2051, 32)
    for t in (c.backbone, c.decoder):
        assert (t.max_seq_len, t.norm_eps, t.rope_theta) == (2048, 1e-5, 500000.0)
    assert (c.backbone.head_dim, c.decoder.head_dim) == (64, 128)


def test_transformers_v4_and_v5_spellings_agree():
    assert CsmConfig.from_dict(hf_csm_1b_dict(True)) == CsmConfig.from_dict(hf_csm_1b_dict(False))


@pytest.mark.parametrize("stack", ["backbone", "decoder"])
def test_transformers_rope_spelling_gives_sesame_frequencies(stack):
    hf = getattr(CsmConfig.from_dict(hf_csm_1b_dict()), stack)
    sesame = getattr(PRESETS["csm-1b"], stack)
    assert hf.rope_scaling != sesame.rope_scaling  # the numbers do look different...
    ours_hf, ours_sesame = rope_frequencies(hf), rope_frequencies(sesame)
    assert ours_hf.shape == (hf.head_dim // 2,)
    torch.testing.assert_close(ours_hf, ours_sesame, rtol=1e-6, atol=0)  # ...but give the same frequencies
    # and the scaling is really applied: the longest wavelengths are divided by the factor
    base = 1.0 / (500000.0 ** (torch.arange(0, hf.head_dim, 2, dtype=torch.float64) / hf.head_dim))
    torch.testing.assert_close(ours_hf[-1].double(), base[-1] / 32, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_hf[0].double(), base[0], rtol=1e-6, atol=0)


def test_rope_frequencies_match_transformers_llama3_init():
    from transformers import CsmConfig as HFCsmConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = hf_csm_1b_dict()
    hf_config = HFCsmConfig(**{k: v for k, v in d.items() if k != "architectures"})
    ours = CsmConfig.from_dict(d)
    for hf_stack, stack in ((hf_config, ours.backbone), (hf_config.depth_decoder_config, ours.decoder)):
        assert hf_stack.rope_parameters["rope_type"] == "llama3"
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_stack, "cpu")
        torch.testing.assert_close(rope_frequencies(stack), expected.float(), rtol=1e-5, atol=0)
        # Sesame's spelling gives transformers' frequencies too
        sesame = FLAVORS["llama-1B"] if stack is ours.backbone else FLAVORS["llama-100M"]
        torch.testing.assert_close(rope_frequencies(sesame), expected.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", [PRESETS["csm-1b"], tiny_config(), CsmConfig.from_dict(hf_csm_1b_dict())],
                         ids=["csm-1b", "tiny", "from-transformers"])
def test_own_dict_round_trip(config, tmp_path):
    d = config.to_dict()
    assert d["csm_format"] == 1
    assert CsmConfig.from_dict(d) == config
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert CsmConfig.from_file(tmp_path / "config.json") == config


def test_own_dict_without_rope_scaling_round_trips():
    t = TransformerConfig(
        num_layers=1, hidden_size=8, num_heads=2, num_kv_heads=1, intermediate_size=16, rope_scaling=None
    )
    c = CsmConfig(backbone=t, decoder=t, text_vocab_size=10)
    assert CsmConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_to_transformers_dict_round_trip():
    for config in (PRESETS["csm-1b"], tiny_config()):
        assert CsmConfig.from_dict(to_transformers_dict(config)) == config


def test_to_official_dict_of_transformers_config():
    c = CsmConfig.from_dict(hf_csm_1b_dict())
    assert to_official_dict(c) == OFFICIAL_HUB_CONFIG
    assert to_official_dict(CsmConfig.from_dict(hf_csm_1b_dict(v5=False))) == OFFICIAL_HUB_CONFIG


def test_to_official_dict_refuses_unnamed_dims():
    with pytest.raises(CsmError, match="flavor"):
        to_official_dict(tiny_config())


def test_unknown_flavor_is_an_error():
    with pytest.raises(CsmError, match="llama-42B"):
        CsmConfig.from_dict({**OFFICIAL_HUB_CONFIG, "backbone_flavor": "llama-42B"})
    with pytest.raises(CsmError, match="llama-7M"):
        CsmConfig.from_dict({**OFFICIAL_HUB_CONFIG, "decoder_flavor": "llama-7M"})


@pytest.mark.parametrize("d", [
    {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16},
    {},
    {"architectures": ["MimiModel"]},
])
def test_non_csm_config_is_an_error(d):
    with pytest.raises(CsmError, match="not a CSM config"):
        CsmConfig.from_dict(d)


def test_unsupported_rope_type_is_an_error():
    d = hf_csm_1b_dict()
    d["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(CsmError, match="yarn"):
        CsmConfig.from_dict(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(CsmError, match="not found"):
        CsmConfig.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CsmError, match="not valid JSON"):
        CsmConfig.from_file(tmp_path / "bad.json")


def test_newer_own_format_is_an_error():
    d = tiny_config().to_dict()
    d["csm_format"] = 99
    with pytest.raises(CsmError, match="newer"):
        CsmConfig.from_dict(d)
