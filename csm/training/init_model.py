"""A new CSM model to train from scratch: a model folder in csm's format (`model.safetensors`,
`config.json`, tokenizer, Mimi) that `csm.load` and `CSMFineTuner(method="full")` open like any other.

    from csm.training.init_model import init_model
    init_model("my-tiny-csm", "tiny", base="unsloth/csm-1b")  # its tokenizer and Mimi
    init_model("csm-3b-init", backbone="llama-3B-instruct", llama="Llama-3.2-3B-Instruct/", base="unsloth/csm-1b")

Every weight is random (`random_weights`), or, given `llama=` (a `LlamaForCausalLM` folder in
transformers' layout, e.g. meta-llama/Llama-3.2-3B-Instruct), the backbone and the text embeddings
are the Llama's, renamed through `csm.weights` ("llama" rows) and checked against the backbone's
shapes; then the decoder, the audio embeddings, the projection and both heads are random, and the
Llama's tokenizer is the model's. Sesame's larger CSMs start this way from Llama-3.2-3B-Instruct.

Random initialisation, per tensor (deterministic from `seed` and the tensor's name, so the same
seed gives the same random tensors whichever others come from a Llama):
- every linear layer and embedding: normal, std 0.02 (Llama's `initializer_range`);
- the last projection of each residual branch (`o_proj`, `down_proj`): std 0.02 / sqrt(2 x layers)
  of its stack, so the residual stream's variance does not grow with depth (GPT-2's scheme);
- RMSNorm weights: 1;
- the heads' logits of the spare audio ids above Mimi's 2048 codes: 0, where random logits would
  make an untrained model emit codes Mimi cannot decode (training never asks for them).
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from csm.checkpoint import Checkpoint, iter_tensors, open_checkpoint, tensor_shapes, weight_files
from csm.config import (
    CsmConfig,
    TransformerConfig,
    flavor_name,
    model_config,
    same_architecture,
    transformers_stack,
)
from csm.errors import CsmError, read_json
from csm.files import folder_atomic, link_or_copy
from csm.mimi_files import CODEBOOK_SIZE, MIMI_FILE
from csm.text import TOKENIZER_FILE, TextTokenizer
from csm.weights import check_complete, csm_tensors, expected_shapes

INIT_STD = 0.02  # Llama's initializer_range
DTYPES = ("float32", "bfloat16", "float16")
# what a Llama checkpoint supplies; everything else of a CSM is drawn at random
LLAMA_PART = ("text_embeddings.weight", "backbone.")


def _rng(seed: int, name: str):
    """One tensor's own generator, from the seed and its name: independent of the order tensors are
    drawn in (numpy's, since torch's CPU generator keeps only 32 bits of a seed)."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CsmError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def init_std(name: str, config: CsmConfig) -> float:
    """The standard deviation `random_weights` draws parameter `name` with (see the module doc)."""
    if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
        stack = config.backbone if name.startswith("backbone.") else config.decoder
        return INIT_STD / math.sqrt(2 * stack.num_layers)
    return INIT_STD


def random_weights(config: CsmConfig, seed: int = 0, skip=lambda name: False) -> Iterator[tuple[str, Any]]:
    """(csm name, float32 CPU torch tensor) for every parameter of `config` but those `skip` names,
    one tensor at a time."""
    import torch

    for name, shape in expected_shapes(config).items():
        if skip(name):
            continue
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
            continue
        t = torch.from_numpy(_rng(seed, name).standard_normal(shape, dtype="float32")).mul_(init_std(name, config))
        if name == "codebook0_head.weight":
            t[CODEBOOK_SIZE:] = 0
        elif name == "audio_head":
            t[..., CODEBOOK_SIZE:] = 0
        yield name, t


def init_model(out_dir: str | os.PathLike, preset: str | CsmConfig | None = None, *,
               backbone: str | TransformerConfig | dict | None = None,
               decoder: str | TransformerConfig | dict | None = None,
               llama: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
               tokenizer: str | os.PathLike | None = None, mimi: str | os.PathLike | None = None,
               seed: int = 0, dtype: str = "bfloat16", force: bool = False, **sizes: int) -> Path:
    """Write a new model folder at `out_dir` and return it.

    The dims: a preset name (`csm.config.PRESETS`: tiny, small, csm-1b, csm-3b, csm-8b), and/or
    `backbone` / `decoder` flavors or dims (`csm.config.model_config`); with `llama` alone the
    backbone is the Llama's own stack. `sizes` override text_vocab_size, audio_vocab_size,
    audio_num_codebooks (the Llama's vocabulary wins with `llama`).
    The tokenizer: `tokenizer` (a tokenizer.json or a folder holding one), else the Llama's, else
    `base`'s. Mimi: `mimi` (kyutai's file), else `base`'s (a model folder or Hub id whose tokenizer
    and codec to reuse, e.g. unsloth/csm-1b); without either the folder has none and loading
    finds kyutai's file in the Hugging Face cache, as for Sesame's own checkpoints.
    `dtype` of the written weights: bfloat16 (as released models), float32 or float16.
    An existing non-empty `out_dir` is replaced only with `force`."""
    import torch

    if dtype not in DTYPES:
        raise CsmError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not force:
        raise CsmError(f"{out_dir} already exists; pass force=True (--force) to replace it, or choose another folder")
    base_ckpt = _open_base(base) if base is not None else None
    llama_ckpt = None
    if llama is not None:
        llama_ckpt, config = _llama_checkpoint(Path(llama), preset, backbone, decoder, sizes)
    else:
        if preset is None and backbone is None:
            raise CsmError("give the new model's dims: a preset (tiny, small, csm-1b, csm-3b, csm-8b), a backbone "
                           "flavor or dims, or a Llama checkpoint (llama=) to start the backbone from")
        config = model_config(preset, backbone=backbone, decoder=decoder, **sizes)
    tokenizer_file = _tokenizer_file(tokenizer, llama_ckpt, base_ckpt)
    _check_tokenizer(tokenizer_file, config)

    cast = getattr(torch, dtype)
    state = {}
    if llama_ckpt is not None:
        for name, t in csm_tensors(iter_tensors(llama_ckpt, torch.float32), "llama", config):
            state[name] = t.to(cast)
    for name, t in random_weights(config, seed, skip=lambda n: n in state):
        state[name] = t.to(cast)
    check_complete({k: tuple(v.shape) for k, v in state.items()}, config, "the new model")

    with folder_atomic(out_dir) as tmp:
        _write_folder(tmp, config, state, tokenizer_file, mimi, base_ckpt)
    return out_dir


def _open_base(base: str | os.PathLike) -> Checkpoint:
    from csm.hub import resolve_model

    return open_checkpoint(resolve_model(base))


def _write_folder(tmp: Path, config: CsmConfig, state: dict, tokenizer_file: Path, mimi, base_ckpt) -> None:
    from safetensors.torch import save_file

    from csm.convert import TOKENIZER_FILES, _find_mimi, _write_codec
    from csm.files import write_json_atomic

    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(tmp / "config.json", config.to_dict())
    for name in TOKENIZER_FILES:  # the tokenizer's companions (chat template, specials) travel with it
        if (tokenizer_file.parent / name).is_file():
            shutil.copy2(tokenizer_file.parent / name, tmp / name)
    shutil.copy2(tokenizer_file, tmp / TOKENIZER_FILE)
    if mimi is not None:
        from csm.mimi_files import resolve_mimi_weights

        _, path = resolve_mimi_weights(None, mimi)
        link_or_copy(path, tmp / MIMI_FILE)
    elif base_ckpt is not None and (found := _find_mimi(base_ckpt, None, "csm")) is not None:
        _write_codec(found, base_ckpt, "csm", tmp, lambda t: t)


def _tokenizer_file(tokenizer, llama_ckpt: Checkpoint | None, base_ckpt: Checkpoint | None) -> Path:
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            raise CsmError(f"tokenizer not found: {path} (give a tokenizer.json or a folder holding one)")
        return path
    for ckpt, what in ((llama_ckpt, "the Llama checkpoint"), (base_ckpt, "the base model")):
        if ckpt is not None:
            if (ckpt.root / TOKENIZER_FILE).is_file():
                return ckpt.root / TOKENIZER_FILE
            raise CsmError(f"{what} {ckpt.root} has no {TOKENIZER_FILE}; pass tokenizer= (--tokenizer) too")
    raise CsmError("the new model needs a text tokenizer: pass tokenizer= / --tokenizer (a Llama-3 tokenizer.json), "
                   "base= / --base (a CSM model whose tokenizer and Mimi to reuse, e.g. unsloth/csm-1b) or "
                   "llama= / --llama")


def _check_tokenizer(path: Path, config: CsmConfig) -> None:
    tok = TextTokenizer.from_file(path)  # refuses one without Llama-3's <|begin_of_text|> / <|end_of_text|>
    size = tok.vocab_size
    if size > config.text_vocab_size:
        raise CsmError(f"the tokenizer {path} has {size} ids but the model's text embeddings only "
                       f"{config.text_vocab_size}; raise text_vocab_size to at least {size}")


def _llama_checkpoint(path: Path, preset, backbone, decoder, sizes: dict) -> tuple[Checkpoint, CsmConfig]:
    """The Llama folder as a checkpoint in the "llama" weight format, and the new model's config
    (the Llama's vocabulary; its stack must be the backbone's, shapes and all)."""
    if not (path / "config.json").is_file():
        raise CsmError(f"{path} is not a transformers Llama folder: it has no config.json (expected "
                       "LlamaForCausalLM's config.json, model.safetensors and tokenizer.json, e.g. "
                       "meta-llama/Llama-3.2-3B-Instruct)")
    d = read_json(path / "config.json", "Llama config")
    if d.get("model_type") != "llama":
        raise CsmError(f"{path} holds a {d.get('model_type')!r} model, not a Llama (model_type 'llama'): only "
                       "Llama-3.x text models can start a CSM backbone")
    if d.get("attention_bias") or d.get("mlp_bias") or d.get("hidden_act", "silu") != "silu":
        raise CsmError(f"{path}: a Llama with biases or a {d.get('hidden_act')!r} MLP is not CSM's backbone "
                       "(bias-free, SwiGLU)")
    theirs = transformers_stack(d)
    files = weight_files(path)
    shapes = tensor_shapes(files)
    vocab = shapes.get("model.embed_tokens.weight", (None,))[0]
    if vocab is None:
        raise CsmError(f"{path} has no model.embed_tokens.weight: not a LlamaForCausalLM checkpoint")
    if preset is None and backbone is None:
        backbone = TransformerConfig(**{**vars(theirs), "max_seq_len": 2048})  # CSM's context, not the Llama's
    config = model_config(preset, backbone=backbone, decoder=decoder, **{**sizes, "text_vocab_size": vocab})
    if not same_architecture(config.backbone, theirs):
        fits = flavor_name(theirs)
        hint = f"use backbone {fits!r}" if fits else "leave the backbone out to take the Llama's own dims"
        raise CsmError(f"the Llama in {path} ({_describe(theirs)}) is not the chosen backbone "
                       f"({_describe(config.backbone)}): {hint}")
    from csm.weights import to_csm_name

    found = {}
    for name, shape in shapes.items():
        ours = to_csm_name(name, "llama")  # an unexpected tensor raises, naming it
        if ours is not None:
            found[ours] = shape
    wanted = {n: s for n, s in expected_shapes(config).items() if n.startswith(LLAMA_PART)}
    missing = [n for n in wanted if n not in found]
    wrong = [f"{n}: {found[n]} (expected {wanted[n]})" for n in wanted if n in found and tuple(found[n]) != wanted[n]]
    if missing or wrong:
        raise CsmError(f"the Llama weights in {path} do not fit the backbone: "
                       + "; ".join(p for p in (missing and f"missing {', '.join(missing[:6])}",
                                               wrong and f"wrong shape {', '.join(wrong[:6])}") if p))
    return Checkpoint(root=path, files=files, format="llama", config=config), config


def _describe(t: TransformerConfig) -> str:
    rope = "no RoPE scaling" if t.rope_scaling is None else f"RoPE scaling x{t.rope_scaling.factor:g}"
    return (f"{t.num_layers} layers, width {t.hidden_size}, {t.num_heads}/{t.num_kv_heads} heads of {t.head_dim}, "
            f"MLP {t.intermediate_size}, rope_theta {t.rope_theta:g}, {rope}, norm_eps {t.norm_eps:g}")
