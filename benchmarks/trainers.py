"""Every fine-tuning implementation the training task times, behind one small interface.

A trainer is built on the benchmark's checkpoint folder and one fixed batch; `step()` is one
optimizer step on that batch (forward, backward, clipping, AdamW), `sync()` waits for the
device. The measurement (`benchmarks.train_task`) knows nothing else about them.

- csm's rows go through the real `TorchTrainer` or `MlxTrainer` (built by `CSMFineTuner`, on
  torch's device or MLX's default one: the Apple GPU on a Mac, the CPU elsewhere; `csm-mlx-qlora4`
  on a 4-bit base) and make exactly the
  calls `csm.training.loop.run_training` makes for one optimizer step on one process: collate,
  choose the frames, `train_micro_batch`, `optimizer_step`. Left out: the metrics record and the
  checkpoint writes (every 100 steps by default), which are not the step.
- transformers' rows run `CsmForConditionalGeneration` on the same weights (shared with a
  csm_torch model loaded from the same file), fed as the tests feed it: inputs_embeds from its own
  embeddings of the 33 columns, labels = the trained frames' codes, -100 elsewhere. Its depth
  decoder then trains on every trained frame, which is transformers' default. LoRA comes from
  peft's `get_peft_model` with our rank, alpha, dropout and target layers, on the backbone and the
  depth decoder only (the codec it carries never trains); AdamW, clipping at the same norm.

Both run float32 on a CPU and bf16 autocast on CUDA; a LoRA run keeps its frozen base in bf16
under autocast, as `TorchTrainer` does.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm.training.config import LORA_TARGETS, TrainConfig
from csm.training.examples import TrainingFrames
from csm.training.loop import LossScale
from csm.training.objective import collate, select_frames


@dataclass(frozen=True)
class TrainImpl:
    name: str
    library: str  # "csm" (torch), "csm-mlx" or "transformers"
    method: str  # "lora" or "full"
    label: str
    quantize: int | None = None  # bits of a QLoRA base (MLX)


IMPLS = {i.name: i for i in (
    TrainImpl("csm-lora", "csm", "lora", "csm LoRA (TorchTrainer)"),
    TrainImpl("csm-full", "csm", "full", "csm full fine-tune (TorchTrainer)"),
    TrainImpl("csm-mlx-lora", "csm-mlx", "lora", "csm LoRA on MLX (MlxTrainer)"),
    TrainImpl("csm-mlx-qlora4", "csm-mlx", "lora", "csm QLoRA, 4-bit base, on MLX (MlxTrainer)", quantize=4),
    TrainImpl("csm-mlx-full", "csm-mlx", "full", "csm full fine-tune on MLX (MlxTrainer)"),
    TrainImpl("transformers-peft", "transformers", "lora", "transformers + peft LoRA"),
    TrainImpl("transformers-full", "transformers", "full", "transformers full fine-tune"),
)}


@dataclass(frozen=True)
class TrainSettings:
    """What every row of one run shares (TrainConfig's defaults unless the command line says)."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16" (bf16 autocast)
    lora_rank: int = 16
    decoder_fraction: float = TrainConfig.decoder_fraction
    seed: int = 0

    def train_config(self, **changes) -> TrainConfig:
        return TrainConfig(lora_rank=self.lora_rank, decoder_fraction=self.decoder_fraction, seed=self.seed,
                           precision=self.dtype, device=self.device, **changes)


class CsmTrainer:
    """csm's `TorchTrainer` or `MlxTrainer`, stepped as `run_training` steps it."""

    def __init__(self, impl: TrainImpl, folder: Path, frames: list[TrainingFrames], settings: TrainSettings):
        from csm.training.tuner import CSMFineTuner

        self.mlx = impl.library == "csm-mlx"
        # MLX trains on its default device (the Apple GPU; the CPU elsewhere) unless the run is a CPU's
        device = settings.device if not self.mlx or settings.device == "cpu" else None
        self._out = tempfile.TemporaryDirectory()  # the tuner needs one; building writes nothing
        tuner = CSMFineTuner(model_path=str(folder), output_dir=self._out.name, method=impl.method,
                             precision=settings.dtype, lora_rank=settings.lora_rank,
                             decoder_fraction=settings.decoder_fraction, seed=settings.seed,
                             device=device, batch_size=len(frames), backend="mlx" if self.mlx else "torch",
                             quantize=impl.quantize)
        self.config = tuner.config
        self.backend = tuner._build()
        self.frames = frames
        self.trainable_params = self.backend.num_trainable
        self.device = self.backend.device
        self.steps_done = 0
        self.last_loss: float | None = None
        self.decoder_frames_per_step = self._selection(0)[1].num_decoder_frames

    def _selection(self, step: int):
        """The batch and frame choice `run_training` makes at optimizer step `step` (grad_accum 1)."""
        batch = collate(self.frames)
        rng = np.random.default_rng([self.config.seed, step, 1])
        return batch, select_frames(batch, self.config.decoder_frames_fraction, rng)

    def step(self) -> None:
        c = self.config
        batch, selection = self._selection(self.steps_done)
        scale = LossScale(selection.num_frames, selection.num_decoder_frames, c.semantic_weight, c.acoustic_weight)
        sums = self.backend.train_micro_batch(batch, selection, scale,
                                              seed=c.seed * 1_000_003 + self.steps_done * 64)
        self.backend.optimizer_step(c.learning_rate)  # the schedule's value does not change the work
        self.last_loss = sums.metrics(c.semantic_weight, c.acoustic_weight)["loss"]
        self.steps_done += 1

    def sync(self) -> None:
        if self.mlx:
            import mlx.core as mx

            mx.synchronize()  # the optimizer step evaluated the weights; wait for the device too
        else:
            _sync(self.device)

    def mlx_peak_memory(self) -> int | None:
        """MLX's own high-water mark of its arrays (the Apple GPU's memory is not the process's RSS)."""
        if not self.mlx:
            return None
        import mlx.core as mx

        return int(mx.get_peak_memory())

    def reset_mlx_peak(self) -> None:
        if self.mlx:
            import mlx.core as mx

            mx.reset_peak_memory()

    def close(self) -> None:
        self._out.cleanup()


def peft_target_regex() -> str:
    """The layers `TorchTrainer` adapts by default, in transformers' names: q, k, v, o, gate, up,
    down of the backbone's and the depth decoder's layers (never `codec_model.`'s)."""
    attn = "|".join(t for t in LORA_TARGETS if t in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = "|".join(t for t in LORA_TARGETS if t in ("gate_proj", "up_proj", "down_proj"))
    return rf"^(backbone_model|depth_decoder\.model)\.layers\.\d+\.(self_attn\.({attn})|mlp\.({mlp}))$"


class TransformersTrainer:
    """transformers' `CsmForConditionalGeneration` (with peft LoRA, or in full), a plain AdamW loop."""

    def __init__(self, impl: TrainImpl, folder: Path, frames: list[TrainingFrames], settings: TrainSettings):
        import torch

        from benchmarks import engines, models
        from csm.checkpoint import open_checkpoint

        config = settings.train_config(method=impl.method)
        self.device = torch.device(settings.device)
        self.autocast = settings.dtype == "bfloat16"
        # as TorchTrainer: a LoRA run's frozen base in bf16 under autocast, trained weights in float32
        weights = torch.bfloat16 if self.autocast and impl.method == "lora" else torch.float32
        source = models.ModelSource(open_checkpoint(folder).config, path=folder)
        hf = engines.transformers_model(models.torch_model(source, self.device, weights))
        hf.train()
        for name, p in hf.named_parameters():
            p.requires_grad_(impl.method == "full" and not name.startswith("codec_model."))
        if impl.method == "lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(settings.seed)
            with warnings.catch_warnings():  # peft asks transformers about a renamed method: not ours to fix
                warnings.simplefilter("ignore", FutureWarning)
                lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules=peft_target_regex(), bias="none")
                hf = get_peft_model(hf, lora)
        self.model = hf
        self.params = [p for p in hf.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.max_grad_norm = config.max_grad_norm
        self.batch = collate(frames)
        self.decoder_frames_per_step = select_frames(self.batch, 1.0).num_frames  # every trained frame
        self.last_loss: float | None = None

    def _inputs(self):
        """inputs_embeds, attention mask and labels of the batch, as tests/test_training.py's `hf_loss`."""
        import torch

        b, dev = self.batch, self.device
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        tokens = torch.as_tensor(b.tokens, device=dev)
        mask = torch.as_tensor(b.mask, device=dev)
        offsets = torch.arange(tokens.shape[-1] - 1, device=dev) * base.config.vocab_size
        audio = base.backbone_model.embed_tokens.embed_audio_tokens(tokens[..., :-1] + offsets)
        text = base.embed_text_tokens(tokens[..., -1])
        embeds = (torch.cat([audio, text[..., None, :]], dim=-2) * mask[..., None]).sum(-2)
        labels = torch.full(tokens[..., :-1].shape, -100, device=dev)
        trained = torch.as_tensor(b.trained, device=dev)
        labels[trained] = tokens[..., :-1][trained]
        attention = torch.as_tensor(np.arange(b.tokens.shape[1])[None] < b.lengths[:, None], device=dev).long()
        return embeds, attention, labels

    def step(self) -> None:
        import torch

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            embeds, attention, labels = self._inputs()
            loss = self.model(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())  # a training loop logs it, as csm's step does

    def sync(self) -> None:
        _sync(self.device)

    def close(self) -> None:
        pass


def import_libraries() -> None:
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import CsmForConditionalGeneration  # noqa: F401  (its lazy module)


def build(impl: TrainImpl, folder: Path, frames: list[TrainingFrames], settings: TrainSettings):
    cls = TransformersTrainer if impl.library == "transformers" else CsmTrainer
    return cls(impl, folder, frames, settings)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
