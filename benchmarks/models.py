"""The models a benchmark runs: which dims, and where the weights come from.

`--random-weights` needs no download: every tensor of a preset (or of explicit dims) is drawn on
the CPU from one seed, one tensor at a time, and handed to the backend's model the way its
loader hands over a checkpoint's tensors. The same seed gives the same weights to every backend
and device, so greedy codes are comparable across rows. A real checkpoint goes through each
backend's own `load_model`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from csm.config import PRESETS, CsmConfig, TransformerConfig
from csm.errors import CsmError
from csm.mimi_files import CODEBOOK_SIZE
from csm.weights import expected_shapes

WEIGHT_STD = 0.02  # like a trained Llama's; logits then spread enough that greedy codes vary


def _stack(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
           max_seq_len: int) -> TransformerConfig:
    return TransformerConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                             intermediate_size=intermediate, max_seq_len=max_seq_len)


# Presets of the benchmark only: real vocabularies of audio (2051 x 32 codebooks, which the
# decoder's heads read every step) around narrow stacks, so a CPU run takes seconds. They keep
# the names tiny and small here (earlier results were measured on them), in place of the package's
# presets of those names, which carry the full text vocabulary.
BENCH_PRESETS: dict[str, CsmConfig] = {
    "small": CsmConfig(backbone=_stack(4, 512, 8, 2, 2048, 2048), decoder=_stack(2, 256, 4, 2, 1024, 33),
                       text_vocab_size=2048),
    "tiny": CsmConfig(backbone=_stack(2, 64, 4, 2, 128, 2048), decoder=_stack(2, 64, 4, 2, 128, 33),
                      text_vocab_size=512),
}
ALL_PRESETS = {**PRESETS, **BENCH_PRESETS}


def parse_dims(text: str) -> CsmConfig:
    """"LxDxHxKVxI,LxDxHxKVxI" (backbone, decoder: layers, width, heads, KV heads, MLP width)
    -> a config with csm-1b's vocabularies."""
    try:
        backbone, decoder = (tuple(int(v) for v in part.split("x")) for part in text.split(","))
        if len(backbone) != 5 or len(decoder) != 5:
            raise ValueError
    except ValueError:
        raise CsmError(f"--dims {text!r}: expected two groups of layers x width x heads x kv_heads x mlp_width, "
                       "e.g. 16x2048x32x8x8192,4x1024x8x2x8192") from None
    return CsmConfig(backbone=_stack(*backbone, 2048), decoder=_stack(*decoder, 33))


def describe(config: CsmConfig) -> str:
    """The dims in parse_dims' spelling (or the preset's name when it is one)."""
    for name, preset in ALL_PRESETS.items():
        if preset == config:
            return name
    b, d = config.backbone, config.decoder
    return ",".join(f"{t.num_layers}x{t.hidden_size}x{t.num_heads}x{t.num_kv_heads}x{t.intermediate_size}"
                    for t in (b, d))


@dataclass(frozen=True)
class ModelSource:
    """Random weights of `config` from `seed`, or the checkpoint at `path`."""

    config: CsmConfig
    seed: int = 0
    path: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.path}" if self.path else f"{describe(self.config)}, random weights (seed {self.seed})"


def random_tensors(config: CsmConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:  # noqa: F821
    """(csm name, float32 CPU tensor) for every parameter, drawn in a fixed order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
            continue
        t = torch.randn(shape, generator=gen) * WEIGHT_STD
        # Like the trained model, never predict a spare id: Mimi could not decode it. Zero logits
        # sit far below the top of 2048 random ones, so greedy and top-k never pick them.
        if name == "codebook0_head.weight":
            t[CODEBOOK_SIZE:] = 0
        elif name == "audio_head":
            t[..., CODEBOOK_SIZE:] = 0
        yield name, t


def torch_model(source: ModelSource, device, dtype):
    """A csm_torch `Model` on `device` in `dtype`, through the loader `csm.load` uses (unfused:
    transformers' rows share its separate projections; `csm_torch.loading.fuse_for_inference`
    fuses them for csm's rows)."""
    from csm_torch.loading import checkpoint_tensors, load_model

    if source.path is not None:
        from csm.checkpoint import open_checkpoint

        ckpt = open_checkpoint(source.path)
        return load_model(ckpt.config, checkpoint_tensors(ckpt, device, dtype), device, dtype, source=str(source.path))
    return load_model(source.config, random_tensors(source.config, source.seed), device, dtype, source="random weights")


def mlx_model(source: ModelSource, dtype):
    """A csm_mlx `Model` in `dtype` on MLX's default device, through the loader `csm.load` uses."""
    import mlx.core as mx

    from csm_mlx.loading import load_checkpoint, load_model

    if source.path is not None:
        from csm.checkpoint import open_checkpoint

        return load_checkpoint(open_checkpoint(source.path), dtype)
    tensors = ((name, mx.array(t.numpy())) for name, t in random_tensors(source.config, source.seed))
    return load_model(source.config, tensors, dtype, source="random weights")


def torch_mimi(source: ModelSource, device: str, mimi: str | None = None):
    """The torch Mimi codec: the checkpoint's (or `mimi`), else moshi's architecture with its
    random initialisation (decode time does not depend on the weights)."""
    from csm_torch.mimi import NUM_CODEBOOKS, MimiCodec, load_mimi

    if source.path is not None or mimi is not None:
        return load_mimi(model_dir=source.path, mimi=mimi, device=device)
    from moshi.models.loaders import get_mimi

    model = get_mimi(None, device=device, num_codebooks=NUM_CODEBOOKS)
    model.eval()
    return MimiCodec(model)


def mlx_mimi(source: ModelSource, mimi: str | None = None):
    """The MLX Mimi codec, as `torch_mimi`: moshi_mlx's architecture, randomly initialised."""
    from csm_mlx.mimi import NUM_CODEBOOKS, MimiCodec, load_mimi

    if source.path is not None or mimi is not None:
        return load_mimi(model_dir=source.path, mimi=mimi)
    from moshi_mlx.models.mimi import Mimi, mimi_202407

    return MimiCodec(Mimi(mimi_202407(NUM_CODEBOOKS)))
