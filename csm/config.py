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
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise CsmError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                               "change one, or give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise CsmError(f"head_dim {self.head_dim} is odd; RoPE rotates pairs of dims, so use an even head_dim")
        if self.num_heads % self.num_kv_heads:
            raise CsmError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise CsmError(f"norm_eps ({self.norm_eps}) and rope_theta ({self.rope_theta}) must be positive")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CsmError(f"{name} must be a positive integer, got {value!r}")


# Sesame's named flavors: the dims of the torchtune llama3_2 builders Sesame's own CSM code calls,
# which its config.json names instead of listing dims. llama-3B and llama-8B are Llama-3.2-3B's and
# Llama-3.1-8B's stacks, so their weights can start a backbone (`csm.training.init_model`).
SESAME_FLAVORS: dict[str, TransformerConfig] = {
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

# csm's own small stacks, for experiments that must train in minutes on a CPU: Llama-3 structure
# (GQA 4:1 in the backbone, 2:1 in the decoder, SwiGLU 4x, Llama-3 RoPE), narrow and shallow. With
# the real vocabularies (128,256 text ids, 32 x 2051 audio ids) the embeddings are most of them:
# `tiny` is ~63M parameters (4.3M in its stacks), `small` ~149M (32M in its stacks). Sesame's code
# knows none of these names: a config.json naming them is read by csm alone.
CSM_FLAVORS: dict[str, TransformerConfig] = {
    "tiny-backbone": TransformerConfig(
        num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=1024,
    ),
    "tiny-decoder": TransformerConfig(
        num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=512,
    ),
    "small-backbone": TransformerConfig(
        num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=2, intermediate_size=2048,
    ),
    "small-decoder": TransformerConfig(
        num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=1024,
    ),
}

FLAVORS: dict[str, TransformerConfig] = {**SESAME_FLAVORS, **CSM_FLAVORS}

# Other names for a flavor: Sesame's 3B starts from Llama-3.2-3B-Instruct, whose stack is llama-3B's.
FLAVOR_ALIASES: dict[str, str] = {"llama-3B-instruct": "llama-3B"}


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


# Named models: (backbone, decoder) flavor pairs with the real vocabularies. A bare weights file
# of exactly one of these shapes loads without a config.json.
PRESET_FLAVORS: dict[str, tuple[str, str]] = {
    "csm-1b": ("llama-1B", "llama-100M"),  # Sesame's released model
    "csm-3b": ("llama-3B", "llama-100M"),
    "csm-8b": ("llama-8B", "llama-100M"),
    "tiny": ("tiny-backbone", "tiny-decoder"),
    "small": ("small-backbone", "small-decoder"),
}
PRESETS: dict[str, CsmConfig] = {
    name: CsmConfig(backbone=FLAVORS[b], decoder=FLAVORS[d]) for name, (b, d) in PRESET_FLAVORS.items()
}
DEFAULT_DECODER_FLAVOR = "llama-100M"  # every released and preset CSM but the experiment ones

# What explicit dims may state: TransformerConfig's fields (rope_scaling as a dict of RopeScaling's).
DIM_FIELDS = tuple(f.name for f in dataclasses.fields(TransformerConfig))


def _given(**values: Any) -> dict[str, Any]:
    """The values a config file states; a key it leaves out takes the dataclass default above, so
    each default (CSM-1B's value) is written once."""
    return {k: v for k, v in values.items() if v is not None}


def _flavor(name: str) -> TransformerConfig:
    try:
        return FLAVORS[FLAVOR_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        known = ", ".join([*FLAVORS, *FLAVOR_ALIASES])
        raise CsmError(f"unknown model flavor {name!r}; known: {known}") from None


def transformer_config(spec: str | TransformerConfig | dict[str, Any], what: str = "backbone") -> TransformerConfig:
    """One stack from a flavor name (or alias), a `TransformerConfig`, or a dict of explicit dims
    (`TransformerConfig`'s fields; `rope_scaling` a dict of `RopeScaling`'s, or None for plain RoPE)."""
    if isinstance(spec, TransformerConfig):
        return spec
    if isinstance(spec, str):
        return _flavor(spec)
    if not isinstance(spec, dict):
        raise CsmError(f"{what}: give a flavor name ({', '.join(FLAVORS)}) or a dict of dims, not {spec!r}")
    unknown = sorted(set(spec) - set(DIM_FIELDS))
    if unknown:
        raise CsmError(f"{what} dims: unknown key(s) {', '.join(unknown)}; known: {', '.join(DIM_FIELDS)}")
    required = [f.name for f in dataclasses.fields(TransformerConfig) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in spec]
    if missing:
        raise CsmError(f"{what} dims: missing {', '.join(missing)} (required: {', '.join(required)})")
    dims = dict(spec)
    if isinstance(dims.get("rope_scaling"), dict):
        try:
            dims["rope_scaling"] = RopeScaling(**dims["rope_scaling"])
        except TypeError as exc:
            raise CsmError(f"{what} dims: bad rope_scaling ({exc})") from None
    try:
        return TransformerConfig(**dims)
    except CsmError as exc:
        raise CsmError(f"{what} dims: {exc}") from None


def model_config(preset: str | CsmConfig | None = None, *, backbone: str | TransformerConfig | dict | None = None,
                 decoder: str | TransformerConfig | dict | None = None, **sizes: int) -> CsmConfig:
    """The `CsmConfig` of a preset name (`PRESETS`), of a (backbone, decoder) pair of flavor names
    or explicit dims (see `transformer_config`), or of a preset with either stack replaced.
    `sizes`: text_vocab_size, audio_vocab_size, audio_num_codebooks, to override. Without a preset
    the backbone is required and the decoder defaults to llama-100M."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise CsmError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)} (or give backbone= and "
                           "decoder= flavors or dims)")
        base = PRESETS[preset]
    elif isinstance(preset, CsmConfig) or preset is None:
        base = preset
    else:
        raise CsmError(f"a model preset is a name ({', '.join(PRESETS)}) or a CsmConfig, not {preset!r}")
    if base is None and backbone is None:
        raise CsmError(f"give a model preset ({', '.join(PRESETS)}) or a backbone flavor ({', '.join(FLAVORS)}) "
                       "or dims")
    unknown = sorted(set(sizes) - {"text_vocab_size", "audio_vocab_size", "audio_num_codebooks"})
    if unknown:
        raise CsmError(f"unknown model setting(s) {', '.join(unknown)}; known: text_vocab_size, audio_vocab_size, "
                       "audio_num_codebooks")
    for name, value in sizes.items():
        _check_positive_int(name, value)
    if sizes.get("audio_num_codebooks", 2) < 2:
        raise CsmError("audio_num_codebooks must be at least 2: the decoder predicts codebooks 1 and up")
    return CsmConfig(
        backbone=transformer_config(backbone, "backbone") if backbone is not None else base.backbone,
        decoder=(transformer_config(decoder, "decoder") if decoder is not None
                 else base.decoder if base is not None else FLAVORS[DEFAULT_DECODER_FLAVOR]),
        **{k: v for k, v in _sizes(base).items() if k not in sizes}, **sizes,
    )


def _sizes(config: CsmConfig | None) -> dict[str, int]:
    if config is None:
        return {}
    return {"text_vocab_size": config.text_vocab_size, "audio_vocab_size": config.audio_vocab_size,
            "audio_num_codebooks": config.audio_num_codebooks}


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


def transformers_stack(d: dict[str, Any]) -> TransformerConfig:
    """One stack from a transformers config dict (a CSM's backbone or depth decoder, or a Llama)."""
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
        backbone=transformers_stack(d),
        decoder=transformers_stack(d["depth_decoder_config"]),
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


def same_architecture(a: TransformerConfig, b: TransformerConfig) -> bool:
    """Whether two stacks compute the same function of the same weights (positions aside)."""
    return _architecture(a) == _architecture(b)


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
