"""Random-weight Mimi codecs for tests (the architecture is fixed: full size, 79 M params, but random).

Building one takes about a second; keep them in session-scoped fixtures.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

NUM_CODEBOOKS = 32


def _fill_codebooks(model: torch.nn.Module, gen: torch.Generator, scale: float) -> None:
    """moshi and transformers both start with all-zero codebooks (every code is 0): make them random."""
    for name, buf in sorted(model.named_buffers()):
        if name.endswith("embedding_sum") or name.endswith("embed_sum"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * scale)
        elif name.endswith("cluster_usage"):
            buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
        elif name.endswith("_initialized") or name.endswith("codebook.initialized"):
            buf.fill_(1.0)
    for module in model.modules():  # drop cached embeddings derived from the old buffers
        if hasattr(module, "_embedding") and isinstance(module._embedding, torch.Tensor):
            module._embedding = None
        if hasattr(module, "_cached_initialized"):
            module._cached_initialized = False


def make_random_mimi(seed: int = 0):
    """moshi's MimiModel (kyutai's architecture, 32 codebooks) with deterministic random weights and codebooks."""
    from moshi.models.loaders import get_mimi

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_mimi(None, device="cpu", num_codebooks=NUM_CODEBOOKS)
    # moshi's default init maps every frame of the test audio to the same codes: re-init it all
    # codebooks on the scale of the random latents, so the codes vary from frame to frame
    _random_init_(model, torch.Generator().manual_seed(seed), codebook_scale=0.03)
    model.eval()
    return model


def moshi_to_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moshi's in-memory names -> the names of kyutai's checkpoint file (undoes moshi's `_load_hook`)."""
    out = {}
    for name, value in state.items():
        name = name.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        name = name.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        out[name] = value.detach().contiguous().clone()
    return out


def save_kyutai_mimi_file(path, seed: int = 0, model=None) -> Path:
    """Write a random Mimi under kyutai's ORIGINAL checkpoint names; returns the path."""
    from safetensors.torch import save_file

    model = model if model is not None else make_random_mimi(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(moshi_to_original_state(model.state_dict()), str(path))
    return path


def _random_init_(model: torch.nn.Module, gen: torch.Generator, codebook_scale: float) -> None:
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                bound = 1.0 / math.sqrt(math.prod(p.shape[1:]))
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif name.endswith(".scale"):  # layer scales
                p.copy_(torch.rand(p.shape, generator=gen) * 0.15 + 0.05)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + (torch.rand(p.shape, generator=gen) * 2 - 1) * 0.1)
            else:  # biases
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * 0.1)
        _fill_codebooks(model, gen, codebook_scale)


def transformers_codec_config() -> dict:
    """transformers' MimiConfig defaults are kyutai's Mimi; CSM uses 32 codebooks."""
    from transformers import MimiConfig

    return MimiConfig(num_quantizers=NUM_CODEBOOKS).to_dict()


def make_random_transformers_mimi(seed: int = 0):
    """A transformers MimiModel (kyutai's architecture, 32 codebooks) with deterministic random weights."""
    from transformers import MimiConfig, MimiModel
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = MimiModel(MimiConfig(num_quantizers=NUM_CODEBOOKS))
    # larger codebooks than make_random_mimi's: the nearest code then wins by a wide margin at every
    # stage, so float differences between implementations cannot flip an argmin (0.03 does: ties)
    _random_init_(model, torch.Generator().manual_seed(seed), codebook_scale=1.0)
    model.eval()
    return model


def make_transformers_codec_state(seed: int = 0, model=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(codec_config dict, state dict under `codec_model.` with the names transformers writes on disk).

    The names come from transformers' own save_pretrained (the flat on-disk MimiModel layout, e.g.
    `encoder.layers.0.conv.weight`, `encoder_transformer.layers.0.self_attn.q_proj.weight`)."""
    from safetensors.torch import load_file

    model = model if model is not None else make_random_transformers_mimi(seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = load_file(str(Path(tmp) / "model.safetensors"))
        config = json.loads((Path(tmp) / "config.json").read_text())
    return config, {"codec_model." + k: v for k, v in state.items()}


def write_transformers_checkpoint(model_dir, codec_config: dict, codec_state: dict, shards: int = 1) -> Path:
    """A transformers-format CSM directory holding only the codec part (plus one fake LM tensor),
    sharded with a `model.safetensors.index.json` when shards > 1."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(
        json.dumps({"architectures": ["CsmForConditionalGeneration"], "codec_config": codec_config})
    )
    state = dict(codec_state)
    state["backbone_model.embed_tokens.weight"] = torch.zeros(4, 4)
    names = sorted(state)
    if shards == 1:
        save_file(state, str(model_dir / "model.safetensors"))
        return model_dir
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i::shards]}
        save_file(part, str(model_dir / fname))
        weight_map.update({n: fname for n in part})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model_dir
