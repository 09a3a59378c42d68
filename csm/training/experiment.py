"""The Python steps of the one-command experiment (`run_experiment.sh`, `run_experiment.bat`), so
that the bash and the cmd script share them rather than each quoting Python and JSON its own way.

    python -m csm.training.experiment config experiment/config.json --base experiment/base \\
        --data experiment/prepared --output-dir experiment/run --steps 100
    python -m csm.training.experiment base experiment/base    # the tokenizer and Mimi, ~400 MB

`config` writes the csm-train config of the experiment: the `tiny` preset trained from scratch in
full for exactly `steps` optimizer steps. `base` makes the stand-in for a base model that
preparation and the new model take their tokenizer and Mimi from: a `tiny` model folder holding
unsloth/csm-1b's tokenizer and kyutai's Mimi file, two downloads instead of csm-1b's 6 GB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from csm.cli.common import entry_point

TOKENIZER_REPO = "unsloth/csm-1b"  # the tokenizer csm-1b itself uses
# epochs only bound the run: max_steps ends it, so a small data set still trains `steps` steps
EPOCHS_BOUND = 100_000


def experiment_config(*, base: str | os.PathLike, data: str | os.PathLike, output_dir: str | os.PathLike,
                      steps: int = 100, save_every: int = 50, batch_size: int = 4, learning_rate: float = 1e-3,
                      eval_conversations: int | None = None) -> dict[str, Any]:
    """The csm-train config: the tiny preset from random weights (tokenizer and Mimi from `base`),
    trained on the prepared `data` for exactly `steps` steps, validated and snapshotted every
    `save_every` steps, never stopped early; TensorBoard logs. `eval_conversations` None leaves
    the end-of-run evaluation to csm-train's default."""
    config: dict[str, Any] = {
        "model": {"preset": "tiny", "base": str(base), "init_seed": 0},
        "output_dir": str(output_dir),
        "data": str(data),
        "train_on": "last",  # every turn of a conversation is trained, its earlier turns as context
        "learning_rate": learning_rate,
        "epochs": EPOCHS_BOUND,
        "max_steps": steps,
        "batch_size": batch_size,
        "eval_every": save_every,
        "save_every": save_every,
        "patience": 0,
        "seed": 0,
        "logging": {"tensorboard": True},
    }
    if eval_conversations is not None:
        config["evaluation"] = {"eval_conversations": eval_conversations}
    return config


def make_base(folder: str | os.PathLike) -> Path:
    """`folder` as a tiny model holding unsloth/csm-1b's tokenizer and kyutai's Mimi (downloaded
    once into the Hugging Face cache); an existing one is kept."""
    from csm.hub import hub_file
    from csm.mimi_files import MIMI_FILE, MIMI_REPO
    from csm.text import TOKENIZER_FILE
    from csm.training.init_model import init_model

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    tokenizer = hub_file(TOKENIZER_REPO, TOKENIZER_FILE, "the text tokenizer")
    mimi = hub_file(MIMI_REPO, MIMI_FILE, "the Mimi codec")
    return init_model(folder, "tiny", tokenizer=tokenizer, mimi=mimi, force=True)


@click.group(name="python -m csm.training.experiment", context_settings={"help_option_names": ["-h", "--help"]})
def group():
    """The Python steps of run_experiment.sh / run_experiment.bat."""


@group.command("config")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--base", required=True, help="the model folder the tokenizer and Mimi come from")
@click.option("--data", required=True, help="the prepared data")
@click.option("--output-dir", required=True, help="the run's folder")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="optimizer steps")
@click.option("--save-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="a snapshot and a validation every N steps")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="examples per step")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="the peak learning rate")
@click.option("--eval-conversations", type=click.IntRange(min=0), default=None,
              help="held-out conversations spoken after training (default: csm-train's)")
def config_command(path, base, data, output_dir, steps, save_every, batch_size, learning_rate, eval_conversations):
    """Write the experiment's csm-train config to PATH."""
    from csm.files import write_json_atomic

    config = experiment_config(base=Path(base).resolve(), data=Path(data).resolve(),
                               output_dir=Path(output_dir).resolve(), steps=steps, save_every=save_every,
                               batch_size=batch_size, learning_rate=learning_rate,
                               eval_conversations=eval_conversations)
    click.echo(f"wrote {write_json_atomic(path, config)}")


@group.command("base")
@click.argument("folder", type=click.Path(file_okay=False))
def base_command(folder):
    """Make FOLDER a tiny model with csm-1b's tokenizer and Mimi (downloads about 400 MB once)."""
    click.echo(f"tokenizer and Mimi in {make_base(folder)}")


main = entry_point(group)

if __name__ == "__main__":
    main()
