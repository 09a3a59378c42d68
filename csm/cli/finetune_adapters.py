"""`csm-finetune merge` and `csm-finetune export-adapter`: what to do with a trained LoRA adapter.

The commands are click objects for the `csm-finetune` group to register; bad input raises a
CsmError, which the group's entry point (`csm.cli.common.entry_point`) prints as one line.
"""

from __future__ import annotations

import click

from csm.convert import DTYPES
from csm.training.adapters import NAMES, export_adapter, merge_adapter

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
@click.option("--adapter", required=True, type=click.Path(), help="The adapter folder to export.")
@click.option("--output-dir", required=True, type=click.Path(), help="New folder for the exported adapter.")
@click.option("--names", type=click.Choice(NAMES), default="transformers", show_default=True,
              help="transformers: for peft on transformers' CsmForConditionalGeneration; csm: for csm.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def export_adapter_command(adapter: str, output_dir: str, names: str, force: bool) -> None:
    """Rewrite an adapter's keys in another model's names (tensors copied bit for bit)."""
    out = export_adapter(adapter, output_dir, names=names, force=force)
    click.echo(f"wrote the adapter in {names} names to {out}")
