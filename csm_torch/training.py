"""Fine-tuning on PyTorch: the tensor part of the objective (`csm.training.objective` chose the
frames), LoRA through peft, AdamW with parameter groups; under torchrun DistributedDataParallel,
or torch's FSDP (`fully_shard`: each transformer layer, then the rest) for full training of
models too big to hold whole, with its optimizer state, on every GPU.

Checkpoints hold the whole model and the whole optimizer state keyed by parameter name,
whatever the number of processes or the sharding that wrote them: a run saved on N processes
resumes on M, under DDP, FSDP or alone. Under FSDP every process takes part in gathering them
and the first writes them.

The run itself (batches, schedule, validation, checkpoints) is `csm.training.loop`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from csm.checkpoint import Checkpoint
from csm.errors import CsmError
from csm.files import write_file_atomic
from csm.training.config import TrainConfig
from csm.training.loop import LossScale, LossSums, TrainingBackend
from csm.training.objective import Batch, FrameSelection
from csm.training.processes import process_count
from csm.training.targets import full_training_names, lora_target_regex, lr_scale, optimizer_group
from csm_torch.loading import checkpoint_tensors, load_model, pick_device
from csm_torch.model import Model


class ObjectiveModule(nn.Module):
    """The model with the training objective as its forward (so DistributedDataParallel, which
    hooks `forward`, sees the whole step): loss sums for the frames the core chose."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask, c0_rows, frame_rows, decoder_frames):
        m = self.model
        b, t, _ = tokens.shape
        hidden = m.backbone(m.embed_frames(tokens, mask), torch.arange(t, device=tokens.device)).flatten(0, 1)
        h = hidden[c0_rows]  # [N, D]: the state before each trained frame
        codes = tokens.flatten(0, 1)[frame_rows, :-1]  # [N, 32]: each trained frame's codes
        c0_logits = m.codebook0_head(h).float()
        c0_sum = F.cross_entropy(c0_logits, codes[:, 0], reduction="sum")
        c0_correct = (c0_logits.argmax(-1) == codes[:, 0]).sum()
        h, codes = h[decoder_frames], codes[decoder_frames]  # [K, D], [K, 32]
        # the decoder's input, as at generation: [h, E(c0), ..., E(c30)], position k predicts ck
        embedded = m.audio_embeddings(codes[:, :-1] + m.codebook_offsets[:-1])  # [K, 31, D]
        dec_in = m.projection(torch.cat([h[:, None], embedded], dim=1))
        dec_h = m.decoder(dec_in, torch.arange(dec_in.shape[1], device=tokens.device))[:, 1:]  # [K, 31, D_dec]
        logits = torch.einsum("kcd,cdv->kcv", dec_h, m.audio_head).float()
        per_codebook = F.cross_entropy(logits.flatten(0, 1), codes[:, 1:].flatten(), reduction="none")
        return c0_sum, c0_correct, per_codebook.view(-1, logits.shape[1]).sum(0)


# parallel="auto" shards full training of models above this many parameters: csm-1b's full
# training (weights, gradients and AdamW's two moments in float32: 16 bytes a parameter) fits
# on one 80 GB GPU with room for activations; the 3B flavor's (~50 GB before activations) does not.
FSDP_AUTO_PARAMETERS = 2_000_000_000


class TorchTrainer(TrainingBackend):
    checkpoint_name = "checkpoint_latest.pt"

    def __init__(self, config: TrainConfig, ckpt: Checkpoint, base_model: str, adapter=None):
        self.config = config
        self.base_model = base_model
        self.model_config = ckpt.config  # carried by every checkpoint, so that each loads alone
        self._init_distributed(config)
        self.precision = self._precision(config)
        # frozen weights of a LoRA run may live in bf16 on a GPU; trained ones are float32
        load_dtype = torch.bfloat16 if self.precision == torch.bfloat16 and config.method == "lora" else torch.float32
        torch.manual_seed(config.seed)  # LoRA's A matrices
        if adapter is None:
            tensors = checkpoint_tensors(ckpt, self.device, load_dtype)
        else:  # training on from a LoRA voice: its adapter merged into the base, rounded once
            from csm.training.adapters import merged_tensors

            tensors = merged_tensors(checkpoint_tensors(ckpt, self.device, None), adapter, ckpt.config,
                                     dtype=load_dtype)
        model = load_model(ckpt.config, tensors, self.device, load_dtype,
                           source=f"{ckpt.format} checkpoint {ckpt.root}")
        self.model = model
        self.lora_regex: str | None = None
        if config.method == "lora":
            self._inject_lora(model)
        self.full_names = full_training_names(config, [n for n, _ in model.named_parameters()])
        for name, p in model.named_parameters():
            p.requires_grad_(name in self.full_names or ".lora_" in name)
        for name in self.full_names:  # trained in float32 even beside a bf16 frozen base
            param = model.get_parameter(name)
            if param.dtype != torch.float32:
                param.data = param.data.float()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise CsmError("nothing to train: every parameter is frozen")
        self.num_trainable = sum(p.numel() for _, p in trainable)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        for stack in (model.backbone, model.decoder):
            stack.gradient_checkpointing = config.gradient_checkpointing
        model.train()
        self.objective = ObjectiveModule(model)
        self.step_module: nn.Module = self.objective
        self.parallel = self._parallel_mode(config)
        if self.parallel == "fsdp":
            self._fully_shard(model)
            # FSDP put its own (sharded) parameters in place of the model's
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        elif self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self._param_groups(trainable), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self._pending_micro = 0

    # --- setup ------------------------------------------------------------------------------------
    def _init_distributed(self, config: TrainConfig) -> None:
        self.rank, self.world_size, self.device = init_distributed(config.device)

    def _parallel_mode(self, config: TrainConfig) -> str:
        """none (one process), ddp or fsdp."""
        if self.world_size == 1:
            return "none"
        if config.parallel == "auto":
            big = self.num_parameters > FSDP_AUTO_PARAMETERS
            return "fsdp" if big and config.method == "full" else "ddp"
        return config.parallel

    def _fully_shard(self, model: Model) -> None:
        """torch's FSDP: each transformer layer is one unit (gathered for its forward and backward,
        freed after), the embeddings, heads and norms one more at the root. The gradient is
        reduce-scattered at every micro-batch, so accumulation holds shards, not whole gradients."""
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise CsmError("--parallel fsdp needs torch 2.6 or newer (torch.distributed.fsdp.fully_shard); upgrade "
                           "torch, or use --parallel ddp") from None
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for stack in (model.backbone, model.decoder):
            for layer in stack.layers:
                fully_shard(layer, mesh=mesh)
        fully_shard(self.objective, mesh=mesh)

    def _precision(self, config: TrainConfig) -> torch.dtype:
        if config.precision == "float32" or (config.precision == "auto" and self.device.type != "cuda"):
            return torch.float32
        if self.device.type == "cpu" and config.precision == "bfloat16":
            return torch.bfloat16
        return torch.bfloat16

    def _inject_lora(self, model: Model) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise CsmError("LoRA needs peft: install the train extra (pip install 'csm-speech[train]', or "
                           "uv run --extra train ...)") from None

        c = self.config
        self.lora_regex = lora_target_regex(c)
        lora = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          target_modules=self.lora_regex, bias="none")
        inject_adapter_in_model(lora, model)
        injected = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
        if not injected:  # a regex that matched nothing would leave a run that changes nothing
            raise CsmError(f"LoRA found no layer to adapt (targets {self.lora_regex}); check --lora-targets")
        self.lora_modules = [n.removesuffix(".lora_A") for n in injected]

    def _param_groups(self, trainable: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
        c = self.config
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in trainable:
            groups.setdefault(optimizer_group(name.replace(".base_layer", ""), p.ndim), []).append(p)
        return [{"params": params, "lr_scale": lr_scale(c, kind), "weight_decay": c.weight_decay if decay else 0.0,
                 "name": f"{kind}{'' if decay else '_no_decay'}"} for (kind, decay), params in groups.items()]

    # --- steps --------------------------------------------------------------------------------------
    def _tensors(self, batch: Batch, selection: FrameSelection):
        as_long = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=self.device)  # noqa: E731
        return (as_long(batch.tokens), torch.as_tensor(batch.mask, device=self.device), as_long(selection.c0_rows),
                as_long(selection.frame_rows), as_long(selection.decoder))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == torch.bfloat16)

    def train_micro_batch(self, batch: Batch, selection: FrameSelection, scale: LossScale, seed: int) -> LossSums:
        torch.manual_seed(seed)  # LoRA dropout: a function of the position in the run
        self._pending_micro += 1
        last = self._pending_micro == self.config.grad_accum or self.world_size == 1
        sync = self.step_module.no_sync() if (self.parallel == "ddp" and not last) else _nothing()
        with sync, self._autocast():
            c0_sum, c0_correct, per_codebook = self.step_module(*self._tensors(batch, selection))
            loss = (scale.semantic_weight * c0_sum / max(scale.num_frames, 1)
                    + scale.acoustic_weight * per_codebook.sum() / max(scale.num_decoder_frames * per_codebook.numel(),
                                                                      1)) * scale.scale
        loss.backward()
        return LossSums(float(c0_sum.detach()), float(c0_correct), float(selection.num_frames),
                        per_codebook.detach().double().cpu().numpy(), float(selection.num_decoder_frames))

    def optimizer_step(self, lr: float) -> float:
        self._pending_micro = 0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.config.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding the norm over every shard
            norm = norm.full_tensor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def eval_batch(self, batch: Batch, selection: FrameSelection) -> LossSums:
        self.model.eval()
        try:
            with self._autocast():
                c0_sum, c0_correct, per_codebook = self.objective(*self._tensors(batch, selection))
        finally:
            self.model.train()
        return LossSums(float(c0_sum), float(c0_correct), float(selection.num_frames),
                        per_codebook.double().cpu().numpy(), float(selection.num_decoder_frames))

    # --- state --------------------------------------------------------------------------------------
    # Every process calls these (under FSDP gathering the state is collective); the first writes.
    def trainable_state(self) -> dict[str, torch.Tensor]:
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: t for n, t in self._model_state().items() if n in trained}

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The whole model under csm's names (under FSDP: gathered to the first process, on the CPU;
        the others get an empty dict)."""
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.objective, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
            return {n.removeprefix("model."): t for n, t in state.items()}
        return {n: t.detach() for n, t in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict[str, Any]:
        """AdamW's state keyed by parameter name, whole (under FSDP gathered like the model)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = self.parallel == "fsdp"
        return get_optimizer_state_dict(self.objective, self.optimizer,
                                        options=StateDictOptions(full_state_dict=full, cpu_offload=full))

    def _takes_part_in_writes(self) -> bool:
        """The first process writes; under FSDP the others take part in gathering what it writes."""
        return self.rank == 0 or self.parallel == "fsdp"

    def save_checkpoint(self, path: Path, extra: dict[str, Any], optimizer: bool = True) -> None:
        if not self._takes_part_in_writes():
            return
        state: dict[str, Any] = {"extra": json.dumps(extra)}  # plain JSON: loadable with weights_only=True
        if self.config.method == "full":
            # the whole model under "model" (csm's names) and its dims, which `open_checkpoint`
            # reads from a .pt: the file loads with csm.load(path); the trained ones are among them
            state["csm_config"] = json.dumps(self.model_config.to_dict())
            state["model"] = self._model_state()
        else:
            state["trainable"] = self.trainable_state()
        if optimizer:
            state["optimizer"] = self._optimizer_state()
        if self.rank == 0:
            write_file_atomic(path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        sharded = self.parallel == "fsdp"
        state: dict[str, Any] = {}
        if not sharded or self.rank == 0:  # under FSDP the first process reads and sends each shard
            try:
                state = torch.load(path, map_location="cpu" if sharded else self.device, weights_only=True,
                                   mmap=sharded)
            except Exception as exc:
                raise CsmError(f"cannot read the checkpoint {path}: {exc}") from None
            trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if "model" in state:
                state["trainable"] = {n: t for n, t in state["model"].items() if n in trained}
            if set(state["trainable"]) != trained:
                raise CsmError(f"{path} was written by a run with other trained parameters (method, targets or "
                               "freezing differ); resume with the same settings, or start anew with --force")
        if sharded:
            return self._load_sharded(state)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        if "optimizer" in state:  # a snapshot has none: its weights alone
            self._load_optimizer(state["optimizer"])
        return json.loads(state["extra"])

    def _load_optimizer(self, saved: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if any(isinstance(k, int) for k in saved.get("state", {})):  # written before states were keyed by name
            self.optimizer.load_state_dict(saved)
        else:
            set_optimizer_state_dict(self.objective, self.optimizer, saved)

    def _load_sharded(self, state: dict[str, Any]) -> dict[str, Any]:
        """The first process's `state` sent to every shard (the others pass an empty dict)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        header = [None]
        if self.rank == 0:
            header = [{"extra": state["extra"], "optimizer": "optimizer" in state}]
        dist.broadcast_object_list(header, src=0)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        weights = state.get("model", state.get("trainable", {}))
        set_model_state_dict(self.objective, {f"model.{n}": t for n, t in weights.items()}, options=options)
        if header[0]["optimizer"]:
            set_optimizer_state_dict(self.objective, self.optimizer, state.get("optimizer", {}), options=options)
        return json.loads(header[0]["extra"])

    def save_weights(self, out_dir: Path) -> None:
        if not self._takes_part_in_writes():
            return
        if self.config.method == "lora":  # never sharded (see TrainConfig.parallel): the first process alone
            from csm.training.outputs import write_run_adapter

            out_dir.mkdir(parents=True, exist_ok=True)
            named = dict(self.model.named_modules())
            lora = {m: (named[m].lora_A["default"].weight.detach().float().cpu(),
                        named[m].lora_B["default"].weight.detach().float().cpu()) for m in self.lora_modules}
            full = {n.replace(".base_layer", ""): self.model.get_parameter(n).detach().float().cpu()
                    for n in self.full_names}
            write_run_adapter(out_dir, self.config, lora, full, self.lora_regex, self.base_model)
        else:
            from csm.training.outputs import write_model_folder

            state = {n: t.cpu() for n, t in self._model_state().items()}
            if self.rank == 0:
                write_model_folder(out_dir, state, self.base_model)

    def peak_memory_bytes(self) -> int:
        """CUDA: the most the run's tensors have held; CPU: the process's peak resident memory
        (model loading included: a CPU run has no allocator statistics of its own)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except (ImportError, AttributeError):
            return 0

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: under torchrun (WORLD_SIZE > 1) the process
    group is started (once; NCCL on GPUs, gloo on CPUs) and each process takes its LOCAL_RANK's
    GPU; alone, the best device there is (a training run on a Mac uses the CPU unless told `mps`)."""
    if process_count() == 1:
        chosen = pick_device(device)
        if chosen.type == "mps" and device is None:
            chosen = torch.device("cpu")
        return 0, 1, chosen
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device in (None, "cuda")
    chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), chosen


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
