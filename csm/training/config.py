"""Every setting of a fine-tuning run, in one dataclass: the CLI's flags, the config file's keys
and `CSMFineTuner`'s arguments are all these fields (one name each), so they cannot drift apart.

Presets are the settings of Sesame's fine-tuning design for each kind of run; a flag or key the
user gives always wins over the preset. No framework imports here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csm.errors import CsmError

METHODS = ("lora", "full")
# How processes under torchrun share a run: every process holds the whole model (ddp), or the
# weights, gradients and optimizer state are sharded across them (fsdp, torch's fully_shard).
PARALLEL = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "float32", "bfloat16")
TRAIN_ON = ("last", "speaker", "all")
# The linear layers LoRA may adapt, by their names in both stacks (never Mimi's: it is not in
# the model, and its codes are discrete, so no gradient could reach it anyway).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_EXTRA_TARGETS = ("projection", "codebook0_head")


@dataclass
class TrainConfig:
    """One fine-tuning run. Field docs are the CLI's help texts."""

    # --- what to train and where the result goes ---
    model_path: str = field(default="unsloth/csm-1b", metadata={"help": "base model: Hub id, folder or file"})
    output_dir: str | None = field(default=None, metadata={"help": "folder for the voice, checkpoints and logs"})
    data: str | None = field(default=None, metadata={
        "help": "training data: a prepared folder, an audio+.txt folder, metadata.csv, a .jsonl manifest "
                "or a Hugging Face dataset"})
    audio_dir: str | None = field(default=None, metadata={"help": "folder of recordings (with --transcript-dir)"})
    transcript_dir: str | None = field(default=None, metadata={"help": "folder of <stem>.txt transcripts"})
    validation_data: str | None = field(default=None, metadata={
        "help": "separate validation data (default: a split of the training data)"})
    speaker_id: int = field(default=0, metadata={"help": "speaker id the recordings are trained as"})
    style_name: str | None = field(default=None, metadata={"help": "a name for the style (kept with the result)"})
    # --- method ---
    method: str = field(default="lora", metadata={"help": "lora (adapter) or full (every weight)"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "linear layers to adapt: " + ", ".join(LORA_TARGETS + LORA_EXTRA_TARGETS)})
    freeze_backbone: bool = field(default=False, metadata={"help": "do not train the backbone"})
    freeze_decoder: bool = field(default=False, metadata={"help": "do not train the audio decoder"})
    train_embeddings: bool | None = field(default=None, metadata={
        "help": "train the text and audio embeddings (default: yes for full, no for LoRA)"})
    train_heads: bool = field(default=False, metadata={
        "help": "also train the codebook heads and the decoder projection in full (LoRA runs)"})
    # --- objective ---
    semantic_weight: float = field(default=1.0, metadata={"help": "weight of the codebook-0 loss"})
    acoustic_weight: float = field(default=1.0, metadata={"help": "weight of the mean codebook 1..31 loss"})
    decoder_fraction: float = field(default=1 / 16, metadata={
        "help": "share of audio frames the decoder loss is computed on (1 = all; all when the backbone is frozen)"})
    train_on: str = field(default="last", metadata={
        "help": "turns of a conversation trained: last (each turn once, after its context), speaker "
                "(--speaker-id's turns only) or all (runs of turns that fit, all trained)"})
    context_turns: int | None = field(default=None, metadata={
        "help": "at most this many earlier turns as context (default: all that fit)"})
    # --- optimisation ---
    learning_rate: float = field(default=1e-4, metadata={"help": "base learning rate"})
    epochs: int = field(default=5, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "at most this many examples per batch"})
    batch_frames: int = field(default=8192, metadata={"help": "at most this many padded positions per batch"})
    grad_accum: int = field(default=1, metadata={"help": "batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the accumulated gradient to this norm (0: off)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup in optimizer steps (default: 5% of the run)"})
    backbone_lr_scale: float = field(default=0.1, metadata={"help": "backbone learning rate / base"})
    decoder_lr_scale: float = field(default=1.0, metadata={"help": "decoder and heads learning rate / base"})
    embeddings_lr_scale: float = field(default=0.5, metadata={"help": "embeddings learning rate / base"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on GPUs, float32 on CPUs), "
                                                            "float32 or bfloat16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    seed: int = field(default=0, metadata={"help": "one seed for data order, frame choice, dropout and init"})
    # --- validation and checkpoints ---
    validation_split: float = field(default=0.1, metadata={"help": "share of the data held out for validation"})
    eval_every: int | None = field(default=None, metadata={"help": "validate every N optimizer steps "
                                                                   "(default: every epoch)"})
    patience: int | None = field(default=3, metadata={
        "help": "stop after this many validations without improvement (0: never stop early)"})
    save_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N optimizer steps"})
    keep_snapshots: int | None = field(default=None, metadata={
        "help": "keep only the newest N model_epoch*_step* snapshots (default: all of them)"})
    sample_prompts: list[str] = field(default_factory=list, metadata={
        "help": "texts spoken at each validation into samples/ (fixed seed)"})
    merge: bool = field(default=False, metadata={"help": "also write the merged full model (LoRA runs)"})
    eval_conversations: int | None = field(default=None, metadata={
        "help": "after training, speak this many held-out conversations with the result into "
                "evaluation/conversations.json and .png (0: off; default: 8 for csm-train, 0 for csm-finetune; "
                "needs the eval extra)"})
    # --- where it runs ---
    backend: str = field(default="auto", metadata={"help": "auto, torch or mlx"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu or mps (default: the best there is)"})
    parallel: str = field(default="auto", metadata={
        "help": "under torchrun: ddp (each process holds the whole model), fsdp (weights, gradients and optimizer "
                "state sharded: full training of the 3B and 8B flavors) or auto (fsdp for full training of "
                "models over 2B parameters, else ddp)"})
    quantize: int | None = field(default=None, metadata={
        "help": "QLoRA: hold the frozen base in 4 or 8 bits (MLX backend, LoRA only)"})
    normalize_loudness: bool = field(default=False, metadata={"help": "normalise each clip to -23 LUFS"})
    max_clip_seconds: float = field(default=30.0, metadata={
        "help": "refuse longer clips (a JSONL manifest's start/end cut long recordings into turns)"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise CsmError(message)

        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.train_on in TRAIN_ON, f"train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        need(self.lora_rank >= 1, f"lora_rank must be at least 1, got {self.lora_rank}")
        need(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS + LORA_EXTRA_TARGETS]
        need(not unknown, f"unknown LoRA target(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(LORA_TARGETS + LORA_EXTRA_TARGETS)}")
        need(bool(self.lora_targets) or self.method != "lora", "lora_targets is empty: name at least one layer")
        need(not (self.freeze_backbone and self.freeze_decoder and not self.trains_embeddings),
             "freeze_backbone and freeze_decoder together leave nothing to train")
        need(min(self.semantic_weight, self.acoustic_weight) >= 0 and self.semantic_weight + self.acoustic_weight > 0,
             "semantic_weight and acoustic_weight must be non-negative and not both zero")
        need(0 < self.decoder_fraction <= 1, f"decoder_fraction must be in (0, 1], got {self.decoder_fraction}")
        need(self.context_turns is None or self.context_turns >= 0, "context_turns must be 0 or more")
        need(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        need(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1")
        need(self.batch_size >= 1 and self.batch_frames >= 1 and self.grad_accum >= 1,
             "batch_size, batch_frames and grad_accum must be at least 1")
        need(self.max_grad_norm >= 0 and self.weight_decay >= 0, "max_grad_norm and weight_decay must be >= 0")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be 0 or more")
        need(0 <= self.validation_split < 1, f"validation_split must be in [0, 1), got {self.validation_split}")
        need(self.eval_every is None or self.eval_every >= 1, "eval_every must be at least 1")
        need(self.patience is None or self.patience >= 0, "patience must be 0 or more")
        need(self.save_every >= 1, "save_every must be at least 1")
        need(self.keep_snapshots is None or self.keep_snapshots >= 1, "keep_snapshots must be at least 1 (or unset: "
                                                                       "keep every snapshot)")
        need(self.eval_conversations is None or self.eval_conversations >= 0, "eval_conversations must be 0 or more")
        need(self.max_clip_seconds > 0, "max_clip_seconds must be positive")
        need(self.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        need(not (self.parallel == "fsdp" and self.method == "lora"),
             "parallel fsdp shards full training; a LoRA run keeps its frozen base whole on every GPU: use "
             "--parallel ddp (or auto) with --method lora, or --method full with fsdp")
        need(self.quantize in (None, 4, 8), f"quantize must be 4 or 8 bits, got {self.quantize!r}")
        need(self.quantize is None or self.method == "lora",
             "quantize (QLoRA) keeps the base frozen: use it with --method lora, or drop --quantize")
        need(self.quantize is None or not (self.train_heads or self.trains_embeddings),
             "a quantized base cannot train the heads or embeddings in full: drop --train-heads / "
             "--train-embeddings, or drop --quantize")

    @property
    def trains_embeddings(self) -> bool:
        return self.method == "full" if self.train_embeddings is None else self.train_embeddings

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def decoder_frames_fraction(self) -> float:
        """The decoder sees every frame when the backbone is frozen: the amortisation exists to
        save the backbone's training memory and time, and a frozen backbone leaves only the
        decoder to learn from each frame."""
        return 1.0 if self.freeze_backbone else self.decoder_fraction

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Sesame's fine-tuning design, one preset per kind of run. Its learning rates are for updating
# the weights themselves; a LoRA run of a preset uses LORA_LR_FACTOR times as much (its update
# starts from zero and lives in a few directions) unless a learning rate is given.
LORA_LR_FACTOR = 10.0
PRESETS: dict[str, dict[str, Any]] = {
    # 5-10 minutes of one voice: decoder and codebook projections; the backbone keeps its language
    "voice-adapt": {"freeze_backbone": True, "learning_rate": 2e-5, "epochs": 5,
                    "semantic_weight": 20.0, "acoustic_weight": 1.0},
    # 3-5 minutes in one style: style lives in the semantic tokens, so the backbone trains too
    "style-tune": {"freeze_backbone": False, "learning_rate": 1e-5, "epochs": 3,
                   "semantic_weight": 50.0, "acoustic_weight": 1.0},
    # 20+ minutes of domain vocabulary: pronunciation is the backbone's; the voice stays
    "domain": {"freeze_decoder": True, "learning_rate": 5e-6, "epochs": 5,
               "semantic_weight": 150.0, "acoustic_weight": 1.0},
    # multi-speaker conversations: earlier turns (text and audio) as context
    "conversational": {"context_turns": 4, "learning_rate": 2e-5, "epochs": 3, "train_on": "speaker"},
}


def config_from(preset: str | None = None, file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then the config file's keys, then `overrides` (None = not given)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise CsmError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values |= PRESETS[preset]
    if file is not None:
        values |= read_config_file(file)
    given = {k: v for k, v in overrides.items() if v is not None}
    values |= given
    from_preset = preset is not None and "learning_rate" in PRESETS[preset] and (
        values.get("learning_rate") == PRESETS[preset]["learning_rate"] and "learning_rate" not in given
        and (file is None or "learning_rate" not in read_config_file(file)))
    if from_preset and values.get("method", "lora") == "lora":
        values["learning_rate"] = PRESETS[preset]["learning_rate"] * LORA_LR_FACTOR
    return TrainConfig(**values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON (or YAML, when PyYAML is installed) object whose keys are TrainConfig fields,
    with '-' or '_' between words."""
    data = parse_config_file(path)
    unknown = sorted(k for k in data if k not in FIELDS)
    if unknown:
        raise CsmError(f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys are the "
                       "csm-finetune train flags (see csm-finetune train --help)")
    return data


def check_types(values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` (TrainConfig fields) with each value checked against its field's type (a float field
    takes an int, or a number written as a string, as YAML reads 1e-4); a wrong one is refused
    naming the key, so no comparison in `validate` ever meets a value of the wrong kind."""
    import typing

    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in values.items():
        hint = hints[key]
        optional = type(None) in typing.get_args(hint)
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = kinds[0]
        if value is None and optional:
            out[key] = value
            continue
        if kind is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if typing.get_origin(kind) is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            name = "a list of strings" if typing.get_origin(kind) is list else f"a {kind.__name__}"
            raise CsmError(f"{where}: {key} must be {name}{' or null' if optional else ''}, got {value!r}")
        out[key] = value
    return out


def parse_config_file(path: str | Path) -> dict[str, Any]:
    """The object a JSON (or YAML) settings file holds, '-' in its top-level keys read as '_'."""
    path = Path(path)
    if not path.is_file():
        raise CsmError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise CsmError(f"config file {path} cannot be parsed ({exc})") from None
    if not isinstance(data, dict):
        raise CsmError(f"config file {path} must hold an object of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
