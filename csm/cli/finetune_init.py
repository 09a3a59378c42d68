"""`csm-finetune init`: a new model folder to train from scratch (`csm.training.init_model`).

    csm-finetune init my-tiny --preset tiny --base unsloth/csm-1b
    csm-finetune init csm-3b-init --backbone llama-3B-instruct --llama Llama-3.2-3B-Instruct/ --base unsloth/csm-1b
    csm-finetune train --model-path csm-3b-init --method full --data clips/ --output-dir csm-3b-run
"""

from __future__ import annotations

import json

import click

from csm.config import FLAVORS, PRESETS
from csm.errors import CsmError


def _stack(value: str | None, what: str):
    """A flavor name, or explicit dims as a JSON object."""
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise CsmError(f"--{what}: not a flavor name nor a JSON object of dims ({exc})") from None


@click.command(name="init")
@click.argument("out_dir", type=click.Path())
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Named dims (tiny, small: CPU experiments).")
@click.option("--backbone", help=f"Backbone flavor ({', '.join(FLAVORS)}, llama-3B-instruct) or JSON dims.")
@click.option("--decoder", help="Decoder flavor or JSON dims (default: the preset's, else llama-100M).")
@click.option("--llama", type=click.Path(exists=True, file_okay=False),
              help="A Llama-3.x transformers folder whose stack and text embeddings start the backbone.")
@click.option("--base", help="A CSM model (folder or Hub id) whose tokenizer and Mimi to reuse.")
@click.option("--tokenizer", type=click.Path(exists=True), help="tokenizer.json (or its folder) to use instead.")
@click.option("--mimi", type=click.Path(exists=True, dir_okay=False), help="kyutai's Mimi file to include.")
@click.option("--text-vocab-size", type=int, help="Text embedding rows (default: the preset's, or the Llama's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32", "float16"]), default="bfloat16",
              show_default=True, help="dtype of the written weights.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def init_command(out_dir, preset, backbone, decoder, llama, base, tokenizer, mimi, text_vocab_size, seed, dtype,
                 force):
    """Write a new model (random weights, or a Llama backbone) to OUT_DIR."""
    from csm.training.init_model import init_model

    sizes = {} if text_vocab_size is None else {"text_vocab_size": text_vocab_size}
    path = init_model(out_dir, preset, backbone=_stack(backbone, "backbone"), decoder=_stack(decoder, "decoder"),
                      llama=llama, base=base, tokenizer=tokenizer, mimi=mimi, seed=seed, dtype=dtype, force=force,
                      **sizes)
    click.echo(f"wrote {path}")
