"""Fine-tuning on MLX: the tensor part of the objective (`csm.training.objective` chose the
frames), LoRA through mlx-lm's tuner (QLoRA on a quantized base), AdamW with parameter groups.

The run itself (batches, schedule, validation, checkpoints) is `csm.training.loop`'s; what trains
is `csm.training.targets`', so both backends train the same parameters by the same names. No
PyTorch here: a checkpoint is safetensors, the result is written from numpy arrays.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from csm.checkpoint import Checkpoint
from csm.errors import CsmError
from csm.files import write_file_atomic
from csm.training.config import TrainConfig
from csm.training.loop import LossScale, LossSums, TrainingBackend
from csm.training.objective import Batch, FrameSelection
from csm.training.targets import full_training_names, lora_target_regex, lr_scale, optimizer_group
from csm.weights import csm_tensors
from csm_mlx.loading import checkpoint_arrays, load_model, pick_device
from csm_mlx.model import Model

QUANTIZE_GROUP_SIZE = 64
# mlx-lm's LoRALinear keeps the wrapped layer as `.linear` and the factors as `.lora_a` [in, r],
# `.lora_b` [r, out]: peft's A and B transposed
LORA_KEYS = ("lora_a", "lora_b")


def objective(model: Model, tokens: mx.array, mask: mx.array, c0_rows: mx.array, frame_rows: mx.array,
              decoder_frames: mx.array, checkpointing: bool = False) -> tuple[mx.array, mx.array, mx.array]:
    """(codebook-0 cross-entropy sum, its correct count, per-codebook 1..31 sums) over the frames
    the core chose, as `csm_torch.training.ObjectiveModule`; rows are gathered by index (MLX has
    no boolean-mask indexing)."""
    backbone, decoder = model.backbone, model.decoder
    if checkpointing:  # one checkpoint per stack: its activations are recomputed in the backward pass
        backbone, decoder = nn.utils.checkpoint(backbone), nn.utils.checkpoint(decoder)
    b, t, width = tokens.shape
    hidden = backbone(model.embed_frames(tokens, mask)).reshape(b * t, -1)
    h = mx.take(hidden, c0_rows, axis=0)  # [N, D]: the state before each trained frame
    codes = mx.take(tokens.reshape(b * t, width), frame_rows, axis=0)[:, :-1]  # [N, 32]
    c0_logits = model.codebook0_head(h).astype(mx.float32)
    c0_sum = nn.losses.cross_entropy(c0_logits, codes[:, 0], reduction="sum")
    c0_correct = (mx.argmax(c0_logits, axis=-1) == codes[:, 0]).sum()
    h, codes = mx.take(h, decoder_frames, axis=0), mx.take(codes, decoder_frames, axis=0)  # [K, D], [K, 32]
    # the decoder's input, as at generation: [h, E(c0), ..., E(c30)], position k predicts ck
    offsets = model._codebook_offsets[:-1]
    embedded = model.audio_embeddings(codes[:, :-1] + offsets)  # [K, 31, D]
    dec_in = model.projection(mx.concatenate([h[:, None], embedded.astype(h.dtype)], axis=1))
    dec_h = decoder(dec_in)[:, 1:]  # [K, 31, D_dec]
    if isinstance(model.audio_head, mx.array):
        logits = (dec_h.swapaxes(0, 1) @ model.audio_head).swapaxes(0, 1)  # [K, 31, V]
    else:  # quantized heads: one matmul per codebook
        logits = mx.stack([model.codebook_logits(i + 1, dec_h[:, i]) for i in range(dec_h.shape[1])], axis=1)
    per_codebook = nn.losses.cross_entropy(logits.astype(mx.float32), codes[:, 1:], reduction="none").sum(axis=0)
    return c0_sum, c0_correct, per_codebook


class MlxTrainer(TrainingBackend):
    checkpoint_name = "checkpoint_latest.safetensors"

    def __init__(self, config: TrainConfig, ckpt: Checkpoint, base_model: str, adapter=None):
        self.config = config
        self.base_model = base_model
        if config.gradient_checkpointing and config.lora_dropout and config.method == "lora":
            # MLX's recomputation draws new dropout masks (its random key is no input of the
            # checkpoint), which would give gradients of another forward pass than the loss's
            raise CsmError("on MLX, --gradient-checkpointing and --lora-dropout cannot be combined: set "
                           "--lora-dropout 0, or drop --gradient-checkpointing")
        if ckpt.quantization is not None:
            raise CsmError(f"{ckpt.root} is quantized; fine-tune the float model (with --quantize 4 for QLoRA)")
        self.mlx_device = pick_device(config.device)
        mx.set_default_device(self.mlx_device)  # a process trains one model: its arrays live there
        self.device = "gpu" if self.mlx_device == mx.gpu else "cpu"
        # a LoRA run's frozen weights may live in bf16 on a GPU; trained ones are float32
        bf16 = config.precision == "bfloat16" or (config.precision == "auto" and self.device == "gpu")
        dtype = mx.bfloat16 if bf16 and config.method == "lora" else mx.float32
        tensors = csm_tensors(checkpoint_arrays(ckpt), ckpt.format, ckpt.config)
        if adapter is not None:  # training on from a LoRA voice: its adapter merged into the base, rounded once
            from csm.training.adapters import merged_tensors

            tensors = merged_tensors(tensors, adapter, ckpt.config, dtype=dtype)
        quantize = config.quantize
        if quantize is not None:
            from csm_mlx.quantize import check_quantization

            try:
                check_quantization(quantize, QUANTIZE_GROUP_SIZE, SimpleNamespace(config=ckpt.config))
            except CsmError as exc:  # its fix names inference's --group-size, which training has not
                problem = str(exc).split(";")[0]
                raise CsmError(f"{problem}; QLoRA quantizes in groups of {QUANTIZE_GROUP_SIZE}: train this model "
                               "without --quantize") from None
        model = load_model(ckpt.config, tensors, dtype, quantize=quantize, group_size=QUANTIZE_GROUP_SIZE,
                           source=f"{ckpt.format} checkpoint {ckpt.root}")
        self.model = model
        model.freeze()
        self.lora_regex: str | None = None
        self.lora_modules: list[str] = []
        if config.method == "lora":
            mx.random.seed(config.seed)  # LoRA's A matrices
            self._inject_lora(model)
        names = [n for n, _ in tree_flatten(model.parameters())]
        self.full_names = full_training_names(config, names)
        for name in self.full_names:
            module, key = self._owner(name)
            value = module[key]
            if value.dtype != mx.float32:  # trained in float32 even beside a bf16 frozen base
                module.update({key: value.astype(mx.float32)})
            module.unfreeze(keys=[key], recurse=False)
        trainable = tree_flatten(model.trainable_parameters())
        if not trainable:
            raise CsmError("nothing to train: every parameter is frozen")
        self.num_trainable = sum(p.size for _, p in trainable)
        self.num_parameters = sum(p.size for _, p in tree_flatten(model.parameters()))
        model.train()
        self.optimizer = self._optimizer(trainable)
        self.optimizer.init(model.trainable_parameters())
        self._loss_and_grad = nn.value_and_grad(model, self._loss)
        self._grads = None
        mx.eval(model.parameters(), self.optimizer.state)

    # --- setup ------------------------------------------------------------------------------------
    def _owner(self, name: str) -> tuple[nn.Module, str]:
        """The module holding parameter `name`, and its key there."""
        path, _, key = name.rpartition(".")
        return (dict(self.model.named_modules())[path] if path else self.model), key

    def _inject_lora(self, model: Model) -> None:
        from mlx_lm.tuner.lora import LoRALinear

        c = self.config
        self.lora_regex = lora_target_regex(c)
        pattern = re.compile(self.lora_regex)
        targets = [(name, m) for name, m in model.named_modules()
                   if pattern.match(name) and isinstance(m, (nn.Linear, nn.QuantizedLinear))]
        if not targets:  # a regex that matched nothing would leave a run that changes nothing
            raise CsmError(f"LoRA found no layer to adapt (targets {self.lora_regex}); check --lora-targets")
        # in module order (as peft walks them), so the seed gives every A the same values on each run
        targets.sort(key=lambda item: _natural_key(item[0]))
        wrapped = []
        for name, linear in targets:
            # peft's scale is alpha / r; mlx-lm's `scale` is that multiplier itself. B starts at zero
            lora = LoRALinear.from_base(linear, r=c.lora_rank, dropout=c.lora_dropout, scale=c.lora_scale)
            lora.freeze()
            lora.unfreeze(keys=list(LORA_KEYS), recurse=False)
            wrapped.append((name, lora))
        model.update_modules(tree_unflatten(wrapped))
        self.lora_modules = [name for name, _ in targets]

    def _optimizer(self, trainable: list[tuple[str, mx.array]]) -> optim.Optimizer:
        """AdamW as torch's (bias-corrected, eps 1e-8), one per parameter group of
        `TorchTrainer._param_groups`; each group's rate is the base rate times its scale."""
        c = self.config
        groups: dict[tuple[str, bool], set[str]] = {}
        for name, p in trainable:
            groups.setdefault(optimizer_group(name, p.ndim), set()).add(name)
        self.groups = list(groups.items())
        self.lr_scales = [lr_scale(c, kind) for (kind, _), _ in self.groups]
        optimizers = [optim.AdamW(learning_rate=c.learning_rate * s, betas=[0.9, 0.999], eps=1e-8,
                                  weight_decay=c.weight_decay if decay else 0.0, bias_correction=True)
                      for ((_, decay), _), s in zip(self.groups, self.lr_scales, strict=True)]
        filters = [lambda path, _g, names=names: path in names for _, names in self.groups[:-1]]
        return optim.MultiOptimizer(optimizers, filters)

    # --- steps --------------------------------------------------------------------------------------
    def _arrays(self, batch: Batch, selection: FrameSelection):
        as_index = lambda a: mx.array(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
        return (as_index(batch.tokens), mx.array(batch.mask), as_index(selection.c0_rows),
                as_index(selection.frame_rows), as_index(selection.decoder))

    def _loss(self, arrays, scale: LossScale):
        c0_sum, c0_correct, per_codebook = objective(self.model, *arrays,
                                                     checkpointing=self.config.gradient_checkpointing)
        loss = (scale.semantic_weight * c0_sum / max(scale.num_frames, 1)
                + scale.acoustic_weight * per_codebook.sum() / max(scale.num_decoder_frames * per_codebook.size, 1)
                ) * scale.scale
        return loss, c0_sum, c0_correct, per_codebook

    def train_micro_batch(self, batch: Batch, selection: FrameSelection, scale: LossScale, seed: int) -> LossSums:
        mx.random.seed(seed)  # LoRA dropout: a function of the position in the run
        (_, c0_sum, c0_correct, per_codebook), grads = self._loss_and_grad(self._arrays(batch, selection), scale)
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        mx.eval(self._grads, c0_sum, c0_correct, per_codebook)
        return LossSums(c0_sum.item(), c0_correct.item(), float(selection.num_frames),
                        np.array(per_codebook, dtype=np.float64), float(selection.num_decoder_frames))

    def optimizer_step(self, lr: float) -> float:
        if self._grads is None:
            raise CsmError("optimizer_step without a micro-batch before it")
        grads, self._grads = self._grads, None
        max_norm = self.config.max_grad_norm
        if max_norm:
            grads, norm = optim.clip_grad_norm(grads, max_norm)
        else:
            norm = mx.sqrt(sum(g.square().sum() for _, g in tree_flatten(grads)))
        for opt, s in zip(self.optimizer.optimizers, self.lr_scales, strict=True):
            opt.learning_rate = lr * s
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, norm)
        return norm.item()

    def eval_batch(self, batch: Batch, selection: FrameSelection) -> LossSums:
        self.model.eval()  # no dropout
        try:
            c0_sum, c0_correct, per_codebook = objective(self.model, *self._arrays(batch, selection))
            mx.eval(c0_sum, c0_correct, per_codebook)
        finally:
            self.model.train()
        return LossSums(c0_sum.item(), c0_correct.item(), float(selection.num_frames),
                        np.array(per_codebook, dtype=np.float64), float(selection.num_decoder_frames))

    def accumulated_gradients(self) -> dict[str, mx.array]:
        """The gradients summed since the last optimizer step, by trained parameter name."""
        return dict(tree_flatten(self._grads)) if self._grads is not None else {}

    # --- state --------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def save_checkpoint(self, path: Path, extra: dict[str, Any], optimizer: bool = True) -> None:
        arrays = {f"trainable/{k}": v for k, v in self.trainable_state().items()}
        if optimizer:
            arrays |= {f"optimizer/{k}": v for k, v in tree_flatten(self.optimizer.state)}
        # mx.save_safetensors wants a *.safetensors name: write_file_atomic's temporary one ends so too
        metadata = {"extra": json.dumps(extra)}
        write_file_atomic(path, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=metadata))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
            extra = json.loads(metadata["extra"])
        except Exception as exc:
            raise CsmError(f"cannot read the checkpoint {path}: {exc}") from None
        trainable = {k.removeprefix("trainable/"): v for k, v in arrays.items() if k.startswith("trainable/")}
        if set(trainable) != set(self.trainable_state()):
            raise CsmError(f"{path} was written by a run with other trained parameters (method, targets or "
                           "freezing differ); resume with the same settings, or start anew with --force")
        self.model.update(tree_unflatten(list(trainable.items())))
        state = [(k.removeprefix("optimizer/"), v) for k, v in arrays.items() if k.startswith("optimizer/")]
        try:
            self.optimizer.state = tree_unflatten(state)
        except ValueError as exc:
            raise CsmError(f"the optimizer state in {path} does not fit this run ({exc}); start anew with "
                           "--force") from None
        self._grads = None
        mx.eval(self.model.parameters(), self.optimizer.state)
        return extra

    def save_weights(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = self.trainable_state()
        as_numpy = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
        if self.config.method == "lora":
            from csm.training.outputs import write_run_adapter

            lora = {m: (as_numpy(state[f"{m}.lora_a"].T), as_numpy(state[f"{m}.lora_b"].T))
                    for m in self.lora_modules}
            full = {n: as_numpy(state[n]) for n in self.full_names}
            write_run_adapter(out_dir, self.config, lora, full, self.lora_regex, self.base_model)
        else:
            from csm.training.outputs import write_model_folder

            weights = {n: np.array(p) for n, p in tree_flatten(self.model.parameters())}
            write_model_folder(out_dir, weights, self.base_model)

    def peak_memory_bytes(self) -> int:
        """GPU: the most MLX has held; CPU: the process's peak resident memory (as torch's CPU runs)."""
        if self.device == "gpu":
            return int(mx.get_peak_memory())
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except (ImportError, AttributeError):
            return 0


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
