"""What a run trains, by csm parameter name, for every backend: the LoRA targets, the weights
trained in full, and the optimizer group of each trained parameter. No framework imports here.
"""

from __future__ import annotations

import re

from csm.errors import CsmError
from csm.training.config import LORA_EXTRA_TARGETS, TrainConfig

# Which optimizer group a parameter belongs to (first match wins); the names are csm's.
EMBEDDINGS = re.compile(r"^(text|audio)_embeddings\.")
BACKBONE = re.compile(r"^(backbone\.|codebook0_head\.)")
DECODER = re.compile(r"^(decoder\.|projection\.|audio_head$)")


def lora_target_regex(config: TrainConfig) -> str:
    """peft's `target_modules` as one anchored regex: only the named linear layers of the trained
    stacks (a frozen stack gets no adapter)."""
    stacks = [s for s, frozen in (("backbone", config.freeze_backbone), ("decoder", config.freeze_decoder))
              if not frozen]
    attn = [t for t in config.lora_targets if t in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [t for t in config.lora_targets if t in ("gate_proj", "up_proj", "down_proj")]
    layer_parts = [f"self_attn\\.({'|'.join(attn)})"] * bool(attn) + [f"mlp\\.({'|'.join(mlp)})"] * bool(mlp)
    alternatives = []
    if stacks and layer_parts:
        alternatives.append(f"({'|'.join(stacks)})\\.layers\\.\\d+\\.({'|'.join(layer_parts)})")
    extra = {"projection": not config.freeze_decoder, "codebook0_head": not config.freeze_backbone}
    alternatives += [t for t in config.lora_targets if t in LORA_EXTRA_TARGETS and extra[t]]
    if not alternatives:
        raise CsmError("no LoRA target is left in a trained part of the model: check --lora-targets against "
                       "--freeze-backbone / --freeze-decoder")
    return "^(" + "|".join(alternatives) + ")$"


def full_training_names(config: TrainConfig, names: list[str]) -> list[str]:
    """Parameters trained in full: every one for full fine-tuning; in a LoRA run the heads and
    projection with --train-heads; the embeddings with --train-embeddings; never a frozen stack's."""
    chosen = []
    for name in names:
        if EMBEDDINGS.match(name):
            if config.trains_embeddings:
                chosen.append(name)
            continue
        in_backbone = bool(BACKBONE.match(name))
        if (in_backbone and config.freeze_backbone) or (not in_backbone and config.freeze_decoder):
            continue
        is_head = name in ("codebook0_head.weight", "projection.weight", "audio_head")
        if config.method == "full" or (is_head and config.train_heads):
            chosen.append(name)
    return chosen


def optimizer_group(name: str, ndim: int) -> tuple[str, bool]:
    """(kind, decays) of a trained parameter: its stack's learning rate scale (embeddings,
    backbone or decoder), and whether weight decay applies (not to norms' 1-D scales)."""
    kind = "embeddings" if EMBEDDINGS.match(name) else "backbone" if BACKBONE.match(name) else "decoder"
    return kind, ndim >= 2


def lr_scale(config: TrainConfig, kind: str) -> float:
    return {"backbone": config.backbone_lr_scale, "decoder": config.decoder_lr_scale,
            "embeddings": config.embeddings_lr_scale}[kind]
