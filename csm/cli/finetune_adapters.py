"""`csm-finetune merge` and `csm-finetune export-adapter`: what to do with a trained LoRA adapter.

The commands are click objects for the `csm-finetune` group to register; bad input raises a
CsmError, which the group's entry point (`csm.cli.common.entry_point`) prints as one line.
"""

from __future__ import annotations

import click

from csm.convert import DTYPES
from csm.training.adapters import CONVERSIONS, NAMES, convert_adapter, merge_adapter

_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command("merge", context_settings=_CONTEXT)
@click.option("--adapter", required=True, type=click.Path(), help="The adapter folder to merge.")
@click.option("--output-dir", required=True, type=click.Path(), help="New folder for the merged model.")
@click.option("--model-path", help="Base model (folder, file or Hub id) [default: the one the adapter names].")
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast the weights [default: keep the base model's].")
@click.option("--quantize", type=click.Choice(["4", "8"]), callback=lambda ctx, param, v: None if v is None else int(v),
              help="Write 4- or 8-bit MLX weights (for csm-generate-mlx).")
@click.option("--group-size", type=int, default=64, show_default=True, help="Quantization group size (32, 64 or 128).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def merge_command(adapter: str, output_dir: str, model_path: str | None, dtype: str | None, quantize: int | None,
                  group_size: int, force: bool) -> None:
    """Merge a LoRA adapter into its base model: a standalone model folder (weights, config,
    tokenizer, Mimi) that csm-generate loads without --adapter."""
    out = merge_adapter(adapter, output_dir, model_path=model_path, dtype=dtype, quantize=quantize,
                        group_size=group_size, force=force)
    click.echo(f"wrote the merged model to {out}")


@click.command("export-adapter", context_settings=_CONTEXT)
@click.argument("src", required=False, type=click.Path())
@click.argument("dst", required=False, type=click.Path())
@click.option("--adapter", type=click.Path(), help="The adapter folder to export (or give it as SRC).")
@click.option("--output-dir", type=click.Path(), help="New folder for the exported adapter (or give it as DST).")
@click.option("--to", "to", type=click.Choice(CONVERSIONS),
              help="peft: peft's layout in csm's names; mlx: mlx-lm's layout (adapters.safetensors); "
                   "transformers: peft's layout for transformers' CsmForConditionalGeneration [default: transformers].")
@click.option("--names", type=click.Choice(NAMES),
              help="Older spelling of --to: csm is --to peft, transformers is --to transformers.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def export_adapter_command(src: str | None, dst: str | None, adapter: str | None, output_dir: str | None,
                           to: str | None, names: str | None, force: bool) -> None:
    """Convert an adapter from SRC into the new folder DST: another layout (peft's or mlx-lm's) or
    another model's names. Tensors are copied bit for bit (A and B transposed between layouts)."""
    source, target = _one_of(src, adapter, "SRC", "--adapter"), _one_of(dst, output_dir, "DST", "--output-dir")
    if to is not None and names is not None:
        raise click.UsageError("give --to or --names, not both")
    layout = to or {"csm": "peft", None: "transformers"}.get(names, names)
    out = convert_adapter(source, target, to=layout, force=force)
    click.echo(f"wrote the adapter in {_DESCRIBED[layout]} to {out}")


_DESCRIBED = {"peft": "peft's layout (csm names)", "mlx": "mlx-lm's layout",
              "transformers": "peft's layout (transformers names)"}


def _one_of(positional: str | None, option: str | None, name: str, flag: str) -> str:
    if positional is not None and option is not None:
        raise click.UsageError(f"give {name} or {flag}, not both")
    if positional is None and option is None:
        raise click.UsageError(f"missing {name} (or {flag})")
    return positional if positional is not None else option
