"""One configuration schema for CSM, whatever file it came from.

CSM = a Llama-style backbone over 33-column frames (32 Mimi codebooks + 1 text token) and a small
Llama-style decoder that fills in codebooks 1..31 of each frame. Both are described by
`TransformerConfig`; `CsmConfig` adds the vocabularies. Three config.json dialects are read:

- official (Sesame's Hub repo, written by `PyTorchModelHubMixin`): flavor names such as
  `"backbone_flavor": "llama-1B"`;
- transformers (`CsmConfig`, `model_type: "csm"`), with `depth_decoder_config` and its rope
  parameters, in the v4 (`rope_scaling`) or v5 (`rope_parameters`) spelling;
- ours (`"csm_format": 1`): the dataclasses below, as written by `to_dict`.

No framework imports here: both backends and the converter build from this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csm.errors import CsmError, read_json

CSM_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling. transformers spells the same frequencies with other numbers
    (e.g. original 1024 with low 0.125 instead of 8192 with low 1): only the wavelength bounds
    `original / low_freq_factor` and `original / high_freq_factor` matter, and both spellings
    give the same ones."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise CsmError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


# Sesame's named flavors: the dims of the torchtune llama3_2 builders Sesame's own CSM code calls,
# which its config.json names instead of listing dims.
FLAVORS: dict[str, TransformerConfig] = {
    "llama-1B": TransformerConfig(
        num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8, intermediate_size=8192,
    ),
    "llama-100M": TransformerConfig(
        num_layers=4, hidden_size=1024, num_heads=8, num_kv_heads=2, intermediate_size=8192,
    ),
    "llama-3B": TransformerConfig(
        num_layers=28, hidden_size=3072, num_heads=24, num_kv_heads=8, intermediate_size=8192,
    ),
    "llama-8B": TransformerConfig(
        num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, intermediate_size=14336,
        rope_scaling=RopeScaling(factor=8.0),
    ),
}


@dataclass(frozen=True)
class CsmConfig:
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256  # Llama-3's tokenizer
    audio_vocab_size: int = 2051  # per codebook: Mimi's 2048 codes + 3 spare ids (not Mimi codes)
    audio_num_codebooks: int = 32

    @property
    def frame_width(self) -> int:
        """Columns per sequence position: every codebook plus the text token."""
        return self.audio_num_codebooks + 1

    def to_dict(self) -> dict[str, Any]:
        return {"csm_format": CSM_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CsmConfig:
        """Any of the three dialects, detected from its keys."""
        if "csm_format" in d:
            return _from_ours(d)
        if d.get("model_type") == "csm" or "depth_decoder_config" in d:
            return _from_transformers(d)
        if "backbone_flavor" in d:
            return _from_official(d)
        raise CsmError(
            "config.json is not a CSM config: expected Sesame's (backbone_flavor), transformers' "
            "(model_type 'csm') or csm's own (csm_format) keys"
        )

    @classmethod
    def from_file(cls, path: str | Path) -> CsmConfig:
        return cls.from_dict(read_json(path, "config file"))


PRESETS: dict[str, CsmConfig] = {
    "csm-1b": CsmConfig(backbone=FLAVORS["llama-1B"], decoder=FLAVORS["llama-100M"]),
}


def _given(**values: Any) -> dict[str, Any]:
    """The values a config file states; a key it leaves out takes the dataclass default above, so
    each default (CSM-1B's value) is written once."""
    return {k: v for k, v in values.items() if v is not None}


def _flavor(name: str) -> TransformerConfig:
    try:
        return FLAVORS[name]
    except KeyError:
        raise CsmError(f"unknown model flavor {name!r}; known: {', '.join(FLAVORS)}") from None


def _from_official(d: dict[str, Any]) -> CsmConfig:
    return CsmConfig(
        backbone=_flavor(d["backbone_flavor"]),
        decoder=_flavor(d["decoder_flavor"]),
        **_given(text_vocab_size=d.get("text_vocab_size"), audio_vocab_size=d.get("audio_vocab_size"),
                 audio_num_codebooks=d.get("audio_num_codebooks")),
    )


def _from_ours(d: dict[str, Any]) -> CsmConfig:
    if d["csm_format"] > CSM_FORMAT_VERSION:
        raise CsmError(f"config written by a newer csm (format {d['csm_format']}); upgrade csm")

    def transformer(t: dict[str, Any]) -> TransformerConfig:
        t = dict(t)
        if t.get("rope_scaling") is not None:
            t["rope_scaling"] = RopeScaling(**t["rope_scaling"])
        return TransformerConfig(**t)

    return CsmConfig(
        backbone=transformer(d["backbone"]),
        decoder=transformer(d["decoder"]),
        text_vocab_size=d["text_vocab_size"],
        audio_vocab_size=d["audio_vocab_size"],
        audio_num_codebooks=d["audio_num_codebooks"],
    )


def _transformers_rope(d: dict[str, Any]) -> tuple[float | None, RopeScaling | None]:
    """(theta, scaling) from `rope_parameters` (transformers v5) or `rope_theta`/`rope_scaling` (v4);
    theta None when the file does not state it."""
    params = dict(d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", d.get("rope_theta"))
    theta = None if theta is None else float(theta)
    scaling = params or d.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CsmError(f"unsupported rope_type {kind!r} in config.json (expected 'llama3' or 'default')")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _transformers_stack(d: dict[str, Any]) -> TransformerConfig:
    theta, scaling = _transformers_rope(d)
    return TransformerConfig(
        num_layers=d["num_hidden_layers"],
        hidden_size=d["hidden_size"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        rope_scaling=scaling,
        **_given(head_dim=d.get("head_dim"), max_seq_len=d.get("max_position_embeddings"),
                 norm_eps=d.get("rms_norm_eps"), rope_theta=theta),
    )


def _from_transformers(d: dict[str, Any]) -> CsmConfig:
    return CsmConfig(
        backbone=_transformers_stack(d),
        decoder=_transformers_stack(d["depth_decoder_config"]),
        **_given(text_vocab_size=d.get("text_vocab_size"), audio_vocab_size=d.get("vocab_size"),
                 audio_num_codebooks=d.get("num_codebooks")),
    )


def to_transformers_dict(config: CsmConfig) -> dict[str, Any]:
    """A transformers `CsmConfig` dict (v5 spelling) describing the same model, without the codec."""

    def stack(t: TransformerConfig) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_theta": t.rope_theta, "rope_type": "default"}
        if t.rope_scaling is not None:
            rope.update(rope_type="llama3", **dataclasses.asdict(t.rope_scaling))
        return {
            "num_hidden_layers": t.num_layers,
            "hidden_size": t.hidden_size,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "intermediate_size": t.intermediate_size,
            "head_dim": t.head_dim,
            "max_position_embeddings": t.max_seq_len,
            "rms_norm_eps": t.norm_eps,
            "rope_parameters": rope,
            "hidden_act": "silu",
        }

    decoder = stack(config.decoder)
    decoder.update(
        model_type="csm_depth_decoder_model",
        num_codebooks=config.audio_num_codebooks,
        backbone_hidden_size=config.backbone.hidden_size,
        vocab_size=config.audio_vocab_size,
    )
    return {
        "architectures": ["CsmForConditionalGeneration"],
        "model_type": "csm",
        **stack(config.backbone),
        "num_codebooks": config.audio_num_codebooks,
        "vocab_size": config.audio_vocab_size,
        "text_vocab_size": config.text_vocab_size,
        "depth_decoder_config": decoder,
    }


def _architecture(t: TransformerConfig) -> tuple:
    """What decides a stack's outputs: everything but the position limit, with RoPE scaling
    reduced to the frequencies it produces (so transformers' spelling matches Sesame's)."""
    s = t.rope_scaling
    rope = None if s is None else (
        s.factor,
        s.original_max_position_embeddings / s.low_freq_factor,
        s.original_max_position_embeddings / s.high_freq_factor,
    )
    return (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.intermediate_size, t.head_dim,
            t.norm_eps, t.rope_theta, rope)


def flavor_name(t: TransformerConfig) -> str | None:
    return next((name for name, f in FLAVORS.items() if _architecture(f) == _architecture(t)), None)


def to_official_dict(config: CsmConfig) -> dict[str, Any]:
    """Sesame's config.json; only possible when both stacks are named flavors."""
    backbone, decoder = flavor_name(config.backbone), flavor_name(config.decoder)
    if backbone is None or decoder is None:
        raise CsmError(
            "the official format names its dims by flavor (llama-1B, llama-100M, ...); this model's "
            "dims match no flavor. Convert to the csm or transformers format instead."
        )
    return {
        "audio_num_codebooks": config.audio_num_codebooks,
        "audio_vocab_size": config.audio_vocab_size,
        "backbone_flavor": backbone,
        "decoder_flavor": decoder,
        "text_vocab_size": config.text_vocab_size,
    }
