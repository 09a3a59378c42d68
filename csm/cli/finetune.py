"""`csm-finetune`: prepare data, train (LoRA or full, from a preset or a config file), merge.

    csm-finetune voice-adapt --model-path unsloth/csm-1b --speaker-id 5 \\
        --audio-dir rec/ --transcript-dir txt/ --output-dir my-voice --epochs 5 --freeze-backbone
    csm-finetune train --config config.json [--resume]
    torchrun --nproc_per_node=4 -m csm.training train --config config.json

Every training flag is a `TrainConfig` field (also a key of --config files); a flag given on the
command line wins over the config file, which wins over the preset.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any

import click

from csm.cli.common import entry_point
from csm.errors import CsmError
from csm.training.config import FIELDS, PRESETS, TrainConfig


def _field_type(f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def training_options(command):
    """One option per TrainConfig field, every default None (= not given: the preset, the config
    file or the field's default decides)."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            option = click.option(flag, f.name, default=None, help=help_text + " (comma-separated)",
                                  callback=lambda _c, _p, v: None if v is None else [x.strip() for x in v.split(",")
                                                                                      if x.strip()])
        else:
            option = click.option(flag, f.name, type=kind, default=None, help=help_text)
        command = option(command)
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                           help="JSON/YAML file of settings (keys are these flags' names).")(command)
    command = click.option("--resume", is_flag=True, help="Continue the run in --output-dir from its checkpoint.")(
        command)
    command = click.option("--force", is_flag=True, help="Start over in an --output-dir a run already used.")(command)
    return command


def _run(preset: str | None, config_file: str | None, resume: bool, force: bool, settings: dict[str, Any]) -> None:
    from csm.training.config import config_from
    from csm.training.tuner import CSMFineTuner

    config = config_from(preset, config_file, **settings)
    if config.output_dir is None:
        raise click.UsageError("--output-dir is required")
    check_evaluation(config.eval_conversations)
    tuner = CSMFineTuner(**{**config.to_dict(), "preset": None})
    progress = _Progress()
    try:
        result = tuner.train(resume=resume, force=force, on_event=progress)
    finally:
        progress.close()
    echo_result(result)
    evaluate_after_training(tuner, tuner.config.eval_conversations or 0)


def echo_result(result, where: str = "") -> None:
    """The run's one summary line: steps, time, early stop, best validation, where it wrote."""
    best = "" if result.best_validation_loss is None else (
        f", best validation loss {result.best_validation_loss:.4f} at step {result.best_step}")
    early = " (stopped early)" if result.stopped_early else ""
    click.echo(f"trained {result.steps} steps in {result.seconds:.0f} s{early}{best}; wrote {result.output_dir}{where}")


def eval_extra_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("resemblyzer", "silero_vad", "matplotlib"))


def check_evaluation(eval_conversations: int | None) -> None:
    """An evaluation asked for needs its extra: refused before training, not after."""
    if eval_conversations and not eval_extra_installed():
        raise CsmError("eval_conversations needs the eval extra (resemblyzer, silero-vad, matplotlib): pip install "
                       "'csm-speech[eval]', or set --eval-conversations 0")


def evaluate_after_training(tuner, count: int, *, optional: bool = False) -> None:
    """The result speaks `count` held-out conversations into <output_dir>/evaluation/ (the first
    process only). A data set without held-out conversations gets a note, not an error; so does a
    missing eval extra when the evaluation is `optional` (on by default, not asked for)."""
    from csm.files import write_file_atomic, write_json_atomic
    from csm.training.processes import is_first_process

    if not count or not is_first_process():
        return
    if optional and not eval_extra_installed():
        click.echo("note: no conversational evaluation: it needs the eval extra (pip install 'csm-speech[eval]')",
                   err=True)
        return
    try:
        with tqdm_bar(desc="speaking held-out conversations", unit="turn") as bar:
            def on_turn(done: int, total: int) -> None:
                bar.total = total
                bar.update(1)

            report = tuner.evaluate_conversations(max_conversations=count, seed=tuner.config.seed, on_turn=on_turn)
    except CsmError as exc:
        if "holds no conversation" not in str(exc):
            raise
        click.echo(f"note: no conversational evaluation: {exc}", err=True)
        return
    folder = tuner.output_dir / "evaluation"
    json_path = write_json_atomic(folder / "conversations.json", report.to_dict())
    figure = write_file_atomic(folder / "conversations.png", report.figure)
    click.echo(report.table())
    click.echo(f"wrote {json_path} and {figure}")


def tqdm_bar(**kwargs):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


class _Progress:
    """A tqdm bar over optimizer steps: loss, steps/s, peak memory, time left; one line per validation."""

    def __init__(self):
        self.bar = None

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        from tqdm import tqdm

        if kind == "step":
            if self.bar is None:
                self.bar = tqdm(total=record["total_steps"], initial=record["step"] - 1, unit="step",
                                dynamic_ncols=True)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", sem=f"{record['semantic_loss']:.3f}",
                                 ac=f"{record['acoustic_loss']:.3f}", sps=f"{record['steps_per_s']:.2f}",
                                 mem=f"{record['peak_memory_gb']:.1f}G", refresh=False)
            self.bar.update(1)
        elif kind == "validation":
            line = (f"validation at step {record['step']}: loss {record['loss']:.4f} (semantic "
                    f"{record['semantic_loss']:.4f}, acoustic {record['acoustic_loss']:.4f})"
                    + (" best" if record["improved"] else ""))
            (self.bar.write if self.bar else click.echo)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.group(name="csm-finetune", context_settings={"help_option_names": ["-h", "--help"]})
def group():
    """Fine-tune CSM on your recordings: prepare, train, merge."""


def _train_command(name: str, preset: str | None, doc: str):
    def command(config_file, resume, force, **settings):
        _run(preset, config_file, resume, force, settings)

    command.__doc__ = doc
    return group.command(name=name)(training_options(command))


_train_command("train", None, "Train from flags and/or --config (LoRA by default).")
_train_command("voice-adapt", "voice-adapt",
               f"Adapt to one voice (5-10 minutes of speech). Preset: {PRESETS['voice-adapt']}.")
_train_command("style-tune", "style-tune", f"Tune a speaking style (3-5 minutes). Preset: {PRESETS['style-tune']}.")
_train_command("domain", "domain", f"Domain vocabulary (20+ minutes, several speakers). Preset: {PRESETS['domain']}.")
_train_command("conversational", "conversational",
               f"Multi-turn conversations with earlier turns as context. Preset: {PRESETS['conversational']}.")


def _register_optional() -> None:
    """The data and adapter commands live in their own modules."""
    import importlib

    for module, names in (("csm.cli.finetune_data", ("prepare_command", "make_dialogues_command")),
                          ("csm.cli.finetune_adapters", ("merge_command", "export_adapter_command")),
                          ("csm.cli.finetune_init", ("init_command",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for attr in names:
            if hasattr(mod, attr):
                group.add_command(getattr(mod, attr))


_register_optional()
assert set(FIELDS)  # every field became an option
main = entry_point(group)

if __name__ == "__main__":
    main()
