"""Convert CSM checkpoints between the official, transformers and csm layouts (with dtype cast).

    csm-convert SRC DST --to csm [--dtype bfloat16] [--force]
    python convert_weights.py SRC DST --to transformers
    python convert_weights.py SRC DST --to mlx [--quantize 4|8] [--group-size 64]

SRC is a folder, a weights file or a Hub id; DST a new folder, written atomically (a temporary
folder renamed into place). Tensors stream through `csm.weights`, the same table the loaders
use, so a round trip is bit-exact. The tokenizer and Mimi travel along. Mimi is the one the
loaders would use: `--mimi`, else kyutai's file beside the weights, else the checkpoint's own
``codec_model.*`` tensors. A transformers checkpoint holds it inside (``codec_model.*``, names
mapped by `csm.mimi_names`; from the Hugging Face cache if SRC has none, since transformers cannot
look elsewhere); every other layout gets kyutai's original file beside the weights. Mapping the
names is exact both ways, so official -> transformers -> official gives back kyutai's tensors bit
for bit (in a file of its own making: the same tensors, not necessarily the same bytes). `--dtype`
casts the codec inside a transformers checkpoint with the rest; kyutai's file is never cast.

`--to mlx` writes an mlx-lm-style folder (see `csm_mlx.convert`; it needs MLX); Mimi stays float.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from csm.checkpoint import Checkpoint, iter_tensors, open_checkpoint, tensor_shapes
from csm.config import flavor_name, to_official_dict, to_transformers_dict
from csm.errors import CheckpointError, CsmError
from csm.files import folder_atomic, link_or_copy
from csm.hub import resolve_model
from csm.mimi_files import (
    CODEC_PREFIX,
    KYUTAI_FILE,
    MIMI_FILE,
    MIMI_REPO,
    NUM_CODEBOOKS,
    TRANSFORMERS,
    read_codec_config,
    read_codec_state,
    resolve_mimi_weights,
)
from csm.weights import FORMATS, convert_state, csm_tensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = ("float32", "bfloat16", "float16")
TARGETS = (*FORMATS, "mlx")
# transformers' MimiConfig defaults are kyutai's Mimi; CSM uses all 32 codebooks
KYUTAI_CODEC_CONFIG = {"model_type": "mimi", "num_quantizers": NUM_CODEBOOKS}
KYUTAI_NUM_HEADS = 8


def _config_dict(ckpt: Checkpoint, fmt: str, codec_config: dict | None) -> dict:
    config = ckpt.config
    if fmt == "transformers":
        d = to_transformers_dict(config)
        d["codec_config"] = codec_config or KYUTAI_CODEC_CONFIG
        return d
    if fmt == "official" and flavor_name(config.backbone) and flavor_name(config.decoder):
        return to_official_dict(config)
    return config.to_dict()  # csm's own, also for official-layout weights of unnamed dims


def _find_mimi(ckpt: Checkpoint, mimi: str | Path | None, to: str) -> tuple[str, Path] | None:
    """The Mimi to carry along, as (kind, location) like `resolve_mimi_weights`: `mimi`, kyutai's
    file beside the weights, the checkpoint's ``codec_model.*`` tensors; for a transformers
    target also the Hub cache (an error if none). None: SRC has no Mimi, and the loaders of the
    other layouts find it in the Hub cache themselves."""
    if mimi is not None or (ckpt.root / MIMI_FILE).is_file():
        return resolve_mimi_weights(ckpt.root, mimi)
    if ckpt.format == "transformers" and any(n.startswith(CODEC_PREFIX) for n in tensor_shapes(ckpt.files)):
        return TRANSFORMERS, ckpt.root
    if to != "transformers":
        return None
    try:
        return resolve_mimi_weights(None, None)
    except CsmError:
        raise CsmError(
            f"no Mimi codec in {ckpt.root} nor in the Hugging Face cache, and a transformers checkpoint must "
            f"hold it; pass --mimi PATH to {MIMI_FILE}, or download it once with "
            f"`huggingface-cli download {MIMI_REPO} {MIMI_FILE}`"
        ) from None


def _kyutai_state(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read the Mimi weights {path}: {exc}") from None


def _write_codec(found: tuple[str, Path], ckpt: Checkpoint, to: str, tmp: Path, cast) -> tuple[dict, dict | None]:
    """Mimi into the new folder: kyutai's file beside the weights for every layout but transformers
    (copied, or mapped from ``codec_model.*``). For transformers: returns (the ``codec_model.*``
    tensors to save inside, the codec_config that describes them)."""
    from csm.mimi_names import original_to_transformers, transformers_to_original

    kind, location = found
    if to != "transformers":
        if kind == KYUTAI_FILE:
            link_or_copy(location, tmp / MIMI_FILE)
        else:
            from safetensors.torch import save_file  # here only: a copy (an MLX run's) needs no torch

            heads = (read_codec_config(location) or {}).get("num_attention_heads") or KYUTAI_NUM_HEADS
            original = transformers_to_original(read_codec_state(location), num_heads=heads)
            save_file({k: v.contiguous() for k, v in original.items()}, str(tmp / MIMI_FILE))
        return {}, None
    if kind == KYUTAI_FILE:
        state, codec_config = original_to_transformers(_kyutai_state(location), KYUTAI_NUM_HEADS), KYUTAI_CODEC_CONFIG
    else:
        state, codec_config = read_codec_state(location), read_codec_config(location)
    return {CODEC_PREFIX + k: cast(v) for k, v in state.items()}, codec_config


def _write_mlx(ckpt: Checkpoint, tmp: Path, dtype: str | None, quantize: int | None, group_size: int,
               adapter=None) -> None:
    try:
        from csm_mlx.convert import write_mlx
    except ImportError as exc:
        raise CsmError(f"--to mlx needs MLX ({exc}); install it with `pip install 'csm-speech[mlx]'`") from None
    write_mlx(ckpt, tmp, dtype, quantize, group_size, adapter)


def _source_tensors(ckpt: Checkpoint, adapter, target) -> tuple[Iterable[tuple[str, Any]], str]:
    """The checkpoint's tensors and their layout; with an adapter (`csm.training.adapters`), merged
    (in csm's layout), each merged tensor rounded once, into `target` or its own dtype."""
    if adapter is None:
        return iter_tensors(ckpt), ckpt.format
    from csm.training.adapters import merged_tensors

    tensors = csm_tensors(iter_tensors(ckpt), ckpt.format, ckpt.config)
    return merged_tensors(tensors, adapter, ckpt.config, dtype=target), "csm"


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None, force: bool = False,
            quantize: int | None = None, group_size: int = 64, mimi: str | Path | None = None,
            adapter=None) -> Path:
    """Write the checkpoint `src` in layout `to` into the new folder `dst` (see the module doc);
    `mimi`: kyutai's Mimi file to carry along instead of the one SRC has (or has not); `adapter`:
    a `csm.training.adapters.Adapter` to merge into the weights on the way."""
    import torch
    from safetensors.torch import save_file

    if to not in TARGETS:
        raise CsmError(f"unknown format {to!r}; use one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise CsmError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if quantize is not None and to != "mlx":
        raise CsmError("--quantize writes MLX weights; use it with --to mlx")
    dst = Path(dst)
    if dst.exists() and not force:
        raise CsmError(f"{dst} already exists; pass --force to replace it")
    ckpt = open_checkpoint(resolve_model(src))
    if ckpt.quantization is not None and to != "mlx":
        raise CsmError(f"{ckpt.root} holds weights quantized for MLX; convert the float checkpoint instead")
    found_mimi = _find_mimi(ckpt, mimi, to)  # before the long part: a transformers target needs one
    target = getattr(torch, dtype) if dtype else None

    def cast(t):
        t = t if target is None or not t.is_floating_point() else t.to(target)
        return t.contiguous()

    with folder_atomic(dst) as tmp:
        codec, codec_config = _write_codec(found_mimi, ckpt, to, tmp, cast) if found_mimi else ({}, None)
        if to == "mlx":
            _write_mlx(ckpt, tmp, dtype, quantize, group_size, adapter)
        else:
            source, layout = _source_tensors(ckpt, adapter, target)
            # convert_state leaves a transformers checkpoint's codec_model.* out: Mimi is `codec`
            tensors = dict(convert_state(source, layout, to, ckpt.config, cast)) | codec
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(_config_dict(ckpt, to, codec_config), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (ckpt.root / name).is_file():
                shutil.copy2(ckpt.root / name, tmp / name)
    return dst


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(TARGETS), required=True,
              help="Layout to write (mlx: for csm-generate-mlx).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Cast floating-point weights (default: keep; mlx: float32).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="With --to mlx: 4- or 8-bit weights (Mimi stays float).")
@click.option("--group-size", type=int, default=64, show_default=True, help="Quantization group size (32, 64 or 128).")
@click.option("--mimi", type=click.Path(), default=None,
              help=f"Mimi to carry along ({MIMI_FILE}) if SRC has none, or instead of its own.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def main(src: str, dst: str, to: str, dtype: str | None, quantize: str | None, group_size: int, mimi: str | None,
         force: bool) -> None:
    """Convert the CSM checkpoint SRC (folder, file or Hub id) into a new folder DST."""
    try:
        out = convert(src, dst, to, dtype, force, None if quantize is None else int(quantize), group_size, mimi)
    except CsmError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {to} checkpoint to {out}")


if __name__ == "__main__":
    main()
