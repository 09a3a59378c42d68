"""Convert CSM checkpoints between the official, transformers and csm layouts (with dtype cast).

    csm-convert SRC DST --to csm [--dtype bfloat16] [--force]
    python convert_weights.py SRC DST --to transformers
    python convert_weights.py SRC DST --to mlx [--quantize 4|8] [--group-size 64]

SRC is a folder, a weights file or a Hub id; DST a new folder, written atomically (a temporary
folder renamed into place). Tensors stream through `csm.weights`, the same table the loaders
use, so a round trip is bit-exact. The tokenizer and Mimi travel along: Mimi is stored inside
transformers checkpoints (`codec_model.*`) and beside the others as kyutai's original file.

`--to mlx` writes an mlx-lm-style folder (see `csm_mlx.convert`; it needs MLX); Mimi stays float.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click

from csm.checkpoint import Checkpoint, iter_tensors, open_checkpoint
from csm.config import flavor_name, to_official_dict, to_transformers_dict
from csm.errors import CsmError
from csm.hub import resolve_model
from csm.mimi_files import CODEC_PREFIX, MIMI_FILE
from csm.weights import FORMATS, convert_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = ("float32", "bfloat16", "float16")
TARGETS = (*FORMATS, "mlx")


def _config_dict(ckpt: Checkpoint, fmt: str) -> dict:
    config = ckpt.config
    if fmt == "transformers":
        d = to_transformers_dict(config)
        source = json.loads((ckpt.root / "config.json").read_text()) if (ckpt.root / "config.json").is_file() else {}
        # kyutai's Mimi at 32 codebooks; transformers' MimiConfig defaults describe the rest
        d["codec_config"] = source.get("codec_config") or {"model_type": "mimi", "num_quantizers": 32}
        return d
    if fmt == "official" and flavor_name(config.backbone) and flavor_name(config.decoder):
        return to_official_dict(config)
    return config.to_dict()  # csm's own, also for official-layout weights of unnamed dims


def _codec_tensors(ckpt: Checkpoint, cast) -> dict:
    """Mimi from a transformers checkpoint, still under transformers' names."""
    if ckpt.format != "transformers":
        return {}
    return {name: cast(t) for name, t in iter_tensors(ckpt) if name.startswith(CODEC_PREFIX)}


def _write_mlx(ckpt: Checkpoint, tmp: Path, dtype: str | None, quantize: int | None, group_size: int) -> None:
    try:
        from csm_mlx.convert import write_mlx
    except ImportError as exc:
        raise CsmError(f"--to mlx needs MLX ({exc}); install it with `pip install 'csm[mlx]'`") from None
    write_mlx(ckpt, tmp, dtype, quantize, group_size)


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None, force: bool = False,
            quantize: int | None = None, group_size: int = 64) -> Path:
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
    target = getattr(torch, dtype) if dtype else None

    def cast(t):
        t = t if target is None or not t.is_floating_point() else t.to(target)
        return t.contiguous()

    tensors = {} if to == "mlx" else dict(convert_state(iter_tensors(ckpt), ckpt.format, to, ckpt.config, cast))
    codec = _codec_tensors(ckpt, cast)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        if to == "transformers":
            tensors |= codec
        elif codec:
            from csm.mimi_names import transformers_to_original

            original = transformers_to_original({k[len(CODEC_PREFIX):]: v for k, v in codec.items()})
            save_file({k: v.contiguous() for k, v in original.items()}, str(tmp / MIMI_FILE))
        if to != "transformers" and (ckpt.root / MIMI_FILE).is_file():
            shutil.copy2(ckpt.root / MIMI_FILE, tmp / MIMI_FILE)
        if to == "mlx":
            _write_mlx(ckpt, tmp, dtype, quantize, group_size)
        else:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(_config_dict(ckpt, to), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (ckpt.root / name).is_file():
                shutil.copy2(ckpt.root / name, tmp / name)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(TARGETS), required=True, help="Layout to write (mlx: for csm-generate-mlx).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Cast floating-point weights (default: keep; mlx: float32).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="With --to mlx: 4- or 8-bit weights (Mimi stays float).")
@click.option("--group-size", type=int, default=64, show_default=True, help="Quantization group size (32, 64 or 128).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def main(src: str, dst: str, to: str, dtype: str | None, quantize: str | None, group_size: int, force: bool) -> None:
    """Convert the CSM checkpoint SRC (folder, file or Hub id) into a new folder DST."""
    try:
        out = convert(src, dst, to, dtype, force, None if quantize is None else int(quantize), group_size)
    except CsmError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {to} checkpoint to {out}")


if __name__ == "__main__":
    main()
