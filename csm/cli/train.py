"""`csm-train`: one experiment from one config file: a new model (preset, flavors or dims; random
weights or a Llama backbone), the data, the objective, the schedule, checkpoints and logs.

    csm-train --config config.json
    csm-train --resume runs/exp1/checkpoints/checkpoint_latest.pt
    torchrun --nproc_per_node=8 -m csm.train --config config.json

The config's keys are `csm-finetune train`'s (TrainConfig's) plus a `model` section for the new
model and a `logging` section (both may also be flat keys; an `evaluation` section may hold
eval_conversations); every key is also a flag, and a flag wins over the file. After training the
result speaks up to eval_conversations (default 8) held-out conversations into
<output_dir>/evaluation/conversations.json and .png (`CSMFineTuner.evaluate_conversations`).
The model folder is written once, to <output_dir>/initial_model, by `csm.training.init_model`;
training is full fine-tuning of it (the `csm-finetune` run, loop and checkpoints). A thin layer: nothing here trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from csm.cli.common import entry_point
from csm.cli.finetune import _Progress, check_evaluation, echo_result, evaluate_after_training, training_options
from csm.errors import CsmError
from csm.training.processes import is_first_process, process_count

INITIAL_MODEL = "initial_model"
# the `model` section: how the new model is made (`init_model`'s arguments)
MODEL_KEYS = {
    "preset": "named dims of the new model: tiny, small, csm-1b, csm-3b or csm-8b",
    "backbone_flavor": "the backbone: a flavor (llama-1B, llama-3B-instruct, ...) or a JSON object of dims",
    "decoder_flavor": "the audio decoder: a flavor (default llama-100M) or a JSON object of dims",
    "init": "random (seeded by init_seed) or a Llama-3.x folder (transformers layout) to start the backbone from",
    "init_seed": "seed of the random weights (default: seed)",
    "base": "a CSM model (folder or Hub id) whose tokenizer and Mimi the new model takes",
    "tokenizer": "a Llama-3 tokenizer.json (or a folder holding one) instead of base's",
    "mimi": "kyutai's Mimi weights file instead of base's",
    "text_vocab_size": "rows of the text embeddings (default: the preset's, or the Llama's with init; at least "
                       "the tokenizer's ids)",
    "model_dtype": "dtype the new model's weights are stored in: float32, bfloat16 or float16",
}
LOGGING_KEYS = {
    "tensorboard": "TensorBoard scalars in <output_dir>/logs (default: on when tensorboard is installed)",
    "wandb": "also log to this Weights & Biases project (needs the wandb package)",
}
SECTIONS = ("model", "logging", "evaluation")
EVAL_CONVERSATIONS = 8  # csm-train's default: an experiment ends with its conversational evaluation


def split_settings(values: dict[str, Any], where: str) -> tuple[dict, dict, dict]:
    """(training, model, logging) settings from a config file's object: sections (`model`,
    `logging`, `evaluation`) or flat keys, '-' or '_' between words; an unknown key is refused,
    naming the known."""
    from csm.training.config import FIELDS

    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            flat |= {k.replace("-", "_"): v for k, v in value.items()}
        elif key in SECTIONS:
            raise CsmError(f"{where}: '{key}' must be an object of settings, got {value!r}")
        else:
            flat[key] = value
    unknown = sorted(k for k in flat if k not in FIELDS and k not in MODEL_KEYS and k not in LOGGING_KEYS)
    if unknown:
        raise CsmError(f"{where}: unknown key(s) {', '.join(unknown)}; known: the csm-finetune train flags' names, "
                       f"model keys ({', '.join(MODEL_KEYS)}) and logging keys ({', '.join(LOGGING_KEYS)}) "
                       "(see csm-train --help)")
    pick = lambda keys: {k: v for k, v in flat.items() if k in keys}  # noqa: E731
    return pick(FIELDS), pick(MODEL_KEYS), pick(LOGGING_KEYS)


def read_settings(path: str | Path) -> tuple[dict, dict, dict]:
    from csm.training.config import parse_config_file

    return split_settings(parse_config_file(path), f"config file {path}")


def check_model_settings(model: dict[str, Any]) -> None:
    """Every model key's value, before anything is written or trained."""
    from csm.config import FLAVORS, PRESETS
    from csm.training.init_model import DTYPES

    if (preset := model.get("preset")) is not None and preset not in PRESETS:
        raise CsmError(f"model preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    for key in ("backbone_flavor", "decoder_flavor"):
        value = model.get(key)
        if value is not None and not isinstance(value, dict) and value not in FLAVORS:
            raise CsmError(f"{key} must be one of {', '.join(FLAVORS)} or an object of dims, got {value!r}")
    init = model.get("init", "random")
    if not isinstance(init, str) or (init != "random" and not Path(init).expanduser().is_dir()):
        raise CsmError(f"init must be 'random' or a Llama-3.x model folder, got {init!r} (no such folder)")
    seed = model.get("init_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise CsmError(f"init_seed must be a non-negative integer, got {seed!r}")
    vocab = model.get("text_vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise CsmError(f"text_vocab_size must be a positive integer, got {vocab!r}")
    if (dtype := model.get("model_dtype")) is not None and dtype not in DTYPES:
        raise CsmError(f"model_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if model.get("decoder_flavor") is not None and model.get("backbone_flavor") is None and "preset" not in model:
        raise CsmError("decoder_flavor needs the backbone too: add backbone_flavor (or a preset)")


def makes_new_model(model: dict[str, Any]) -> bool:
    return any(model.get(k) is not None for k in ("preset", "backbone_flavor")) or model.get("init", "random") != \
        "random"


def create_model(output_dir: Path, model: dict[str, Any], seed: int, force: bool) -> Path:
    """<output_dir>/initial_model, written once (again with `force`) by the first process; under
    torchrun the others wait for it at a barrier of the run's process group (a file appearing
    would not tell a new model from the one `force` replaces)."""
    from csm.training.init_model import init_model

    path = output_dir / INITIAL_MODEL
    if not is_first_process():
        return path
    if path.is_dir() and not force:
        return path  # a run's model is made once: a new start trains the same initial weights
    init = model.get("init", "random")
    sizes = {} if model.get("text_vocab_size") is None else {"text_vocab_size": model["text_vocab_size"]}
    init_model(path, model.get("preset"), backbone=model.get("backbone_flavor"), decoder=model.get("decoder_flavor"),
               llama=None if init == "random" else init, base=model.get("base"), tokenizer=model.get("tokenizer"),
               mimi=model.get("mimi"), seed=model.get("init_seed", seed), dtype=model.get("model_dtype", "float32"),
               force=True, **sizes)
    return path


def _model_options(command):
    from csm.cli.finetune_init import _stack

    for key, help_text in reversed(list(MODEL_KEYS.items())):
        flag = "--" + key.replace("_", "-")
        if key in ("init_seed", "text_vocab_size"):
            option = click.option(flag, key, type=int, default=None, help=help_text)
        elif key.endswith("_flavor"):
            option = click.option(flag, key, default=None, help=help_text,
                                  callback=lambda _c, p, v: _stack(v, p.name.replace("_", "-")))
        else:
            option = click.option(flag, key, default=None, help=help_text)
        command = option(command)
    command = click.option("--wandb", "wandb", default=None, help=LOGGING_KEYS["wandb"])(command)
    command = click.option("--tensorboard/--no-tensorboard", "tensorboard", default=None,
                           help=LOGGING_KEYS["tensorboard"])(command)
    return command


def _training_and_resume(command):
    """TrainConfig's flags (csm-finetune's), with --resume taking the checkpoint to continue."""
    command = training_options(command)
    for param in command.__click_params__:
        if param.name == "resume":
            command.__click_params__.remove(param)
            break
    return click.option("--resume", "resume", type=click.Path(dir_okay=False), default=None,
                        help="Continue the run whose checkpoints/checkpoint_latest.pt this is, exactly.")(command)


@click.command(name="csm-train", context_settings={"help_option_names": ["-h", "--help"]})
@_model_options
@_training_and_resume
def command(config_file, resume, force, **given):
    """Train a CSM model from one config file (JSON/YAML): model, data, objective, schedule,
    checkpoints and logs. Every key is also a flag; a flag wins over the file."""
    from csm.training.config import FIELDS, check_types, config_from
    from csm.training.run_logs import RunLogger, check_wandb, combine, tensorboard_available
    from csm.training.tuner import RUN_FILE, CSMFineTuner

    given = {k: v for k, v in given.items() if v is not None}
    flags_train = {k: v for k, v in given.items() if k in FIELDS}
    flags_model = {k: v for k, v in given.items() if k in MODEL_KEYS}
    flags_logging = {k: v for k, v in given.items() if k in LOGGING_KEYS}
    if resume is not None:
        if config_file is not None or flags_model:
            raise CsmError("--resume continues a run with its own settings: drop --config and the model flags")
        checkpoint = Path(resume)
        if not checkpoint.is_file():
            raise CsmError(f"checkpoint not found: {checkpoint}")
        if checkpoint.stem != "checkpoint_latest" or checkpoint.parent.name != "checkpoints":
            raise CsmError(f"{checkpoint} is not a run's checkpoints/checkpoint_latest.pt: a run resumes from its "
                           "latest checkpoint (model_epoch*_step*.pt holds no optimizer state)")
        output_dir = checkpoint.parent.parent
        try:
            saved = json.loads((output_dir / RUN_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise CsmError(f"cannot read the run's settings {output_dir / RUN_FILE} ({exc})") from None
        overrides = check_types(flags_train, "flags")
        config = config_from(None, None, **{**saved, **overrides, "output_dir": str(output_dir)})
        model_settings: dict[str, Any] = {}
    else:
        file_train, model_settings, logging_settings = (
            read_settings(config_file) if config_file is not None else ({}, {}, {}))
        model_settings = {k: v for k, v in (model_settings | flags_model).items() if v is not None}
        flags_logging = logging_settings | flags_logging
        check_model_settings(model_settings)
        values = {"method": "full", **check_types(file_train, f"config file {config_file}"),
                  **check_types(flags_train, "flags")}
        config = config_from(None, None, **values)
        check_evaluation(config.eval_conversations)
        if config.output_dir is None:
            raise CsmError("output_dir is required: the folder for the model, checkpoints and logs "
                           "(--output-dir or the config's output_dir)")
        new_model = makes_new_model(model_settings)
        if new_model and "model_path" in values:
            raise CsmError("give either model_path (train an existing model) or a new model (preset, "
                           "backbone_flavor or init), not both")
        if not new_model and set(model_settings) - {"init"}:
            raise CsmError("the model keys (" + ", ".join(sorted(model_settings)) + ") describe a new model: add its "
                           "dims (preset or backbone_flavor), or drop them to train model_path")
        output_dir = Path(config.output_dir)
    use_tensorboard = flags_logging.get("tensorboard")
    if use_tensorboard and not tensorboard_available():
        raise CsmError("tensorboard logs need the tensorboard package: pip install 'csm-speech[train]', or pass "
                       "--no-tensorboard")
    if flags_logging.get("wandb") is not None:
        check_wandb()
    if resume is None and makes_new_model(model_settings):
        # the first process checks (the others would see its files appear); the tuner checks again
        used = output_dir.is_dir() and any(p.name != INITIAL_MODEL for p in output_dir.iterdir())
        if is_first_process() and not force and used:
            raise CsmError(f"{output_dir} already exists and is not empty; pass --resume "
                           f"{output_dir / 'checkpoints' / 'checkpoint_latest.pt'} to continue its run or --force "
                           "to start over (a new model and new checkpoints)")
        distributed = process_count() > 1
        if distributed:  # the run's process group, started before the first process writes the model
            from csm_torch.training import init_distributed

            init_distributed(config.device)
        try:
            path = create_model(output_dir, model_settings, config.seed, force)
        finally:
            if distributed:
                import torch.distributed as dist

                dist.barrier()
        config = config.replace(model_path=str(path))

    logger = RunLogger(output_dir / "logs" if use_tensorboard is not False and tensorboard_available() else None,
                       flags_logging.get("wandb"), config.to_dict(), run_name=output_dir.name)
    tuner = CSMFineTuner(**{**config.to_dict(), "preset": None})
    progress = _Progress()
    try:
        result = tuner.train(resume=resume is not None, force=force, on_event=combine(progress, logger))
    finally:
        progress.close()
        logger.close()
    echo_result(result, f" (checkpoints in {result.output_dir / 'checkpoints'})")
    asked = tuner.config.eval_conversations
    evaluate_after_training(tuner, EVAL_CONVERSATIONS if asked is None else asked, optional=asked is None)


main = entry_point(command)

if __name__ == "__main__":
    main()
