"""Checkpoint formats and the one rename table between them.

Three layouts hold the same tensors:

- ``official``: Sesame's torchtune names (``backbone.layers.0.attn.q_proj.weight``), q/k rows in
  torchtune's *interleaved* RoPE order; ``model.safetensors`` or ``ckpt.pt``.
- ``transformers``: ``CsmForConditionalGeneration`` (``backbone_model.layers.0.self_attn...``),
  q/k rows permuted for rotate-half RoPE; Mimi stored inside as ``codec_model.*``.
- ``csm``: ours, the names both backends' modules use (mlx-lm's Llama names), rotate-half RoPE.

The RoPE layout is decided once, here: everything is converted to rotate-half on the way in,
so neither backend ever sees interleaved weights. Each table row is a pair of templates read in
both directions, so one table serves loading and converting. No framework imports: values are
torch tensors or numpy arrays, whichever the caller holds (both have ``reshape``/``swapaxes``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from csm.config import CsmConfig
from csm.errors import CheckpointError

FORMATS = ("official", "transformers", "csm")

# Per transformer layer: (official suffix, csm suffix). transformers' suffixes equal ours.
_LAYER_OFFICIAL = [
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.output_proj.weight", "self_attn.o_proj.weight"),
    ("mlp.w1.weight", "mlp.gate_proj.weight"),
    ("mlp.w3.weight", "mlp.up_proj.weight"),
    ("mlp.w2.weight", "mlp.down_proj.weight"),
    ("sa_norm.scale", "input_layernorm.weight"),
    ("mlp_norm.scale", "post_attention_layernorm.weight"),
]
_LAYER_SUFFIXES = [ours for _, ours in _LAYER_OFFICIAL]
_STACKS = ("backbone", "decoder")
_TRANSFORMERS_STACK = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}

# (external template, csm template); "{n}" stands for a layer number.
RENAMES: dict[str, list[tuple[str, str]]] = {
    "official": [
        ("text_embeddings.weight", "text_embeddings.weight"),
        ("audio_embeddings.weight", "audio_embeddings.weight"),
        ("projection.weight", "projection.weight"),
        ("codebook0_head.weight", "codebook0_head.weight"),
        ("audio_head", "audio_head"),
        *[(f"{s}.norm.scale", f"{s}.norm.weight") for s in _STACKS],
        *[(f"{s}.layers.{{n}}.{theirs}", f"{s}.layers.{{n}}.{ours}")
          for s in _STACKS for theirs, ours in _LAYER_OFFICIAL],
    ],
    "transformers": [
        ("embed_text_tokens.weight", "text_embeddings.weight"),
        # Two tied copies of the audio embeddings: save_pretrained keeps only the depth decoder's,
        # which is the name written; either one loads. The other is written too (TIED_COPIES).
        ("depth_decoder.model.embed_tokens.weight", "audio_embeddings.weight"),
        ("backbone_model.embed_tokens.embed_audio_tokens.weight", "audio_embeddings.weight"),
        ("depth_decoder.model.inputs_embeds_projector.weight", "projection.weight"),
        ("lm_head.weight", "codebook0_head.weight"),
        ("depth_decoder.codebooks_head.weight", "audio_head"),
        *[(f"{_TRANSFORMERS_STACK[s]}.norm.weight", f"{s}.norm.weight") for s in _STACKS],
        *[(f"{_TRANSFORMERS_STACK[s]}.layers.{{n}}.{x}", f"{s}.layers.{{n}}.{x}")
          for s in _STACKS for x in _LAYER_SUFFIXES],
    ],
    "csm": [(name, name) for name in (
        "text_embeddings.weight", "audio_embeddings.weight", "projection.weight", "codebook0_head.weight",
        "audio_head", *[f"{s}.norm.weight" for s in _STACKS],
        *[f"{s}.layers.{{n}}.{x}" for s in _STACKS for x in _LAYER_SUFFIXES],
    )],
    # A Llama-3.x text model in transformers' layout (`LlamaForCausalLM`): its stack is a CSM backbone
    # and its token embeddings CSM's text embeddings (how Sesame's larger models start). Read only,
    # never written: rotate-half q/k rows like ours, so no permutation.
    "llama": [
        ("model.embed_tokens.weight", "text_embeddings.weight"),
        ("model.norm.weight", "backbone.norm.weight"),
        *[(f"model.layers.{{n}}.{x}", f"backbone.layers.{{n}}.{x}") for x in _LAYER_SUFFIXES],
    ],
}

# csm tensors a format stores under more than one name. transformers ties the backbone's audio
# embeddings to the depth decoder's, but releases before 5.21 (their CsmConfig forces
# tie_word_embeddings=False) leave the backbone's copy randomly initialised when only one is in the file:
# writing both makes a converted checkpoint load right in every release.
TIED_COPIES: dict[str, dict[str, tuple[str, ...]]] = {
    "official": {},
    "transformers": {"audio_embeddings.weight": ("backbone_model.embed_tokens.embed_audio_tokens.weight",)},
    "csm": {},
    "llama": {},
}

# Tensors a format may hold that are not model parameters: tied copies, caches, buffers.
IGNORED: dict[str, list[str]] = {
    "official": [r".*causal_mask$", r".*\.kv_cache\..*", r".*\.cache_pos$", r".*pos_embeddings\..*"],
    # Mimi is loaded by the codec, not the LM
    "transformers": [r"^codec_model\..*",
                     r".*rotary_emb\.inv_freq$", r".*audio_tokens_offsets$"],
    "csm": [],
    # the text head predicts text tokens, which CSM never does
    "llama": [r"^lm_head\.weight$", r".*rotary_emb\.inv_freq$"],
}


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)") + "$")


_RULES = {
    fmt: [(_template_regex(theirs), ours, _template_regex(ours), theirs) for theirs, ours in rows]
    for fmt, rows in RENAMES.items()
}
_IGNORED = {fmt: [re.compile(p) for p in pats] for fmt, pats in IGNORED.items()}


def to_csm_name(name: str, fmt: str) -> str | None:
    """The csm name of an external tensor name; None for tensors the format may hold but the
    model does not use (see IGNORED). Unknown names raise."""
    for theirs, ours, _, _ in _RULES[fmt]:
        if m := theirs.match(name):
            return ours.format(**m.groupdict())
    if any(p.match(name) for p in _IGNORED[fmt]):
        return None
    raise CheckpointError(f"unexpected tensor {name!r} for the {fmt} checkpoint format")


def from_csm_name(name: str, fmt: str) -> str:
    for _, _, ours, theirs in _RULES[fmt]:
        if m := ours.match(name):
            return theirs.format(**m.groupdict())
    raise CheckpointError(f"{name!r} is not a csm parameter name")


def detect_format(names: Iterable[str]) -> str:
    names = set(names)
    if any(n.startswith(("backbone_model.", "depth_decoder.", "embed_text_tokens")) for n in names):
        return "transformers"
    if any(".attn." in n or n.endswith(".sa_norm.scale") for n in names):
        return "official"
    if any(".self_attn." in n for n in names):
        return "csm"
    raise CheckpointError(
        "cannot tell the checkpoint format: its tensors match neither Sesame's (backbone.layers.N.attn.*), "
        "transformers' (backbone_model.*) nor csm's (backbone.layers.N.self_attn.*) names"
    )


# --- RoPE layout -------------------------------------------------------------------------------
# Interleaved RoPE rotates rows (2i, 2i+1) of each head together; rotate-half rotates rows
# (i, i + head_dim/2). Reordering the rows of q_proj / k_proj turns one into the other.

def interleaved_to_half(w: Any, num_heads: int) -> Any:
    out_dim, in_dim = w.shape
    head_dim = out_dim // num_heads
    # [heads, head_dim/2, 2, in] -> [heads, 2, head_dim/2, in]: evens first, then odds
    return w.reshape(num_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: Any, num_heads: int) -> Any:
    out_dim, in_dim = w.shape
    head_dim = out_dim // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


_QK = re.compile(r"^(backbone|decoder)\.layers\.\d+\.self_attn\.(q|k)_proj\.weight$")


def _rope_heads(config: CsmConfig, csm_name: str) -> int | None:
    """How many heads a q/k projection holds (None for every other tensor)."""
    m = _QK.match(csm_name)
    if not m:
        return None
    stack = config.backbone if m.group(1) == "backbone" else config.decoder
    return stack.num_heads if m.group(2) == "q" else stack.num_kv_heads


def to_csm(name: str, tensor: Any, fmt: str, config: CsmConfig) -> tuple[str, Any] | None:
    """One external tensor in csm naming and layout (None when it is to be skipped)."""
    ours = to_csm_name(name, fmt)
    if ours is None:
        return None
    if fmt == "official" and (heads := _rope_heads(config, ours)) is not None:
        tensor = interleaved_to_half(tensor, heads)
    return ours, tensor


def from_csm(name: str, tensor: Any, fmt: str, config: CsmConfig) -> tuple[str, Any]:
    if fmt == "official" and (heads := _rope_heads(config, name)) is not None:
        tensor = half_to_interleaved(tensor, heads)
    return from_csm_name(name, fmt), tensor


def expected_shapes(config: CsmConfig) -> dict[str, tuple[int, ...]]:
    """Every csm parameter and its shape: what a checkpoint must hold, exactly."""
    shapes: dict[str, tuple[int, ...]] = {
        "text_embeddings.weight": (config.text_vocab_size, config.backbone.hidden_size),
        "audio_embeddings.weight": (config.audio_vocab_size * config.audio_num_codebooks, config.backbone.hidden_size),
        "projection.weight": (config.decoder.hidden_size, config.backbone.hidden_size),
        "codebook0_head.weight": (config.audio_vocab_size, config.backbone.hidden_size),
        "audio_head": (config.audio_num_codebooks - 1, config.decoder.hidden_size, config.audio_vocab_size),
    }
    for stack_name, t in (("backbone", config.backbone), ("decoder", config.decoder)):
        q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        shapes[f"{stack_name}.norm.weight"] = (t.hidden_size,)
        for i in range(t.num_layers):
            p = f"{stack_name}.layers.{i}."
            shapes |= {
                p + "self_attn.q_proj.weight": (q, t.hidden_size),
                p + "self_attn.k_proj.weight": (kv, t.hidden_size),
                p + "self_attn.v_proj.weight": (kv, t.hidden_size),
                p + "self_attn.o_proj.weight": (t.hidden_size, q),
                p + "mlp.gate_proj.weight": (t.intermediate_size, t.hidden_size),
                p + "mlp.up_proj.weight": (t.intermediate_size, t.hidden_size),
                p + "mlp.down_proj.weight": (t.hidden_size, t.intermediate_size),
                p + "input_layernorm.weight": (t.hidden_size,),
                p + "post_attention_layernorm.weight": (t.hidden_size,),
            }
    return shapes


def check_complete(found: Mapping[str, tuple[int, ...]], config: CsmConfig, source: str) -> None:
    """Raise one error listing every missing, extra and mis-shaped tensor."""
    expected = expected_shapes(config)
    problems = []
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    wrong = [f"{n}: {tuple(found[n])} (expected {expected[n]})"
             for n in expected if n in found and tuple(found[n]) != expected[n]]
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def convert_state(
    tensors: Iterable[tuple[str, Any]], src: str, dst: str, config: CsmConfig,
    cast: Callable[[Any], Any] = lambda t: t,
) -> Iterable[tuple[str, Any]]:
    """Stream (name, tensor) pairs from one format to another, one tensor at a time."""
    for ours, tensor in csm_tensors(tensors, src, config):
        out_name, out = from_csm(ours, tensor, dst, config)
        out = cast(out)
        yield out_name, out
        for copy_name in TIED_COPIES[dst].get(ours, ()):
            yield copy_name, out.clone()  # its own storage: safetensors refuses shared tensors


def csm_tensors(tensors: Iterable[tuple[str, Any]], fmt: str, config: CsmConfig) -> Iterable[tuple[str, Any]]:
    """A checkpoint's (name, tensor) pairs in csm naming and layout, each csm name once. A tied
    copy (transformers' second audio-embedding table) must equal the first: CSM has one table,
    and silently keeping either of two different ones would be a different model."""
    tied: dict[str, tuple[str, Any]] = {}
    for name, tensor in tensors:
        converted = to_csm(name, tensor, fmt, config)
        if converted is None:
            continue
        ours, t = converted
        if ours in tied:
            first_name, first = tied[ours]
            if tuple(first.shape) != tuple(t.shape) or not bool((first == t).all()):
                raise CheckpointError(
                    f"the checkpoint holds two different {ours!r} tables, {first_name!r} and {name!r}, where CSM "
                    "has one; transformers releases before 5.21 untie them and save such files: keep the table "
                    "that was trained and delete the other tensor from the file")
            continue
        if ours in TIED_COPIES[fmt]:
            tied[ours] = (name, t)
        yield ours, t
