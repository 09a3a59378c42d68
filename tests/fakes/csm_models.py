"""Tiny random CSM models in the real file formats (transformers, official, csm), and a small
Llama-3-style tokenizer, built locally: tests never touch the network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from csm.config import CsmConfig, RopeScaling, TransformerConfig, to_transformers_dict

TEXT_VOCAB = 384  # 256 byte tokens + specials, padded


def tiny_config(max_seq_len: int = 256) -> CsmConfig:
    """Real structure (GQA, Llama-3 RoPE scaling, 32 codebooks, 2051 audio ids), tiny widths."""
    rope = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    return CsmConfig(
        backbone=TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                                   head_dim=16, max_seq_len=max_seq_len, rope_scaling=rope),
        decoder=TransformerConfig(num_layers=2, hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=96,
                                  head_dim=12, max_seq_len=33, rope_scaling=rope),
        text_vocab_size=TEXT_VOCAB,
    )


def write_tokenizer(path: Path) -> Path:
    """A byte-level BPE with Llama-3's special tokens; like the real tokenizer.json, its
    post-processor adds <|begin_of_text|> (so a double BOS would show)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def tiny_codec_config() -> dict:
    """A very small transformers Mimi (the codec stored inside transformers checkpoints)."""
    from transformers import MimiConfig

    return MimiConfig(num_filters=8, num_hidden_layers=1, intermediate_size=64, codebook_dim=16,
                      vector_quantization_hidden_dimension=16, num_quantizers=32).to_dict()


def make_transformers_model(config: CsmConfig, seed: int = 0, codec_config: dict | None = None):
    """A random `CsmForConditionalGeneration` with our dims (float32, eval)."""
    from transformers import CsmConfig as HFCsmConfig
    from transformers import CsmForConditionalGeneration

    d = to_transformers_dict(config)
    d["codec_config"] = codec_config or tiny_codec_config()
    hf_config = HFCsmConfig(**{k: v for k, v in d.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # larger-than-default weights so logits are far from ties
        for name, p in model.named_parameters():
            if not name.startswith("codec_model.") and p.ndim >= 2:
                p.normal_(0, 0.08)
        # Like the trained model, never score the 3 spare ids above Mimi's 2048 codes highly:
        # zero logits sit far below the top of 2048 random ones, so they are never sampled.
        model.lm_head.weight[2048:] = 0
        model.depth_decoder.codebooks_head.weight[..., 2048:] = 0
        # CSM has one audio-embedding table, which transformers ties between the backbone and the
        # depth decoder, except in releases < 5.21 (they force tie_word_embeddings=False): share
        # it by hand so the reference model is CSM in every release.
        backbone_table = model.backbone_model.embed_tokens.embed_audio_tokens
        if backbone_table.weight is not model.depth_decoder.model.embed_tokens.weight:
            backbone_table.weight = model.depth_decoder.model.embed_tokens.weight
    return model


def save_transformers_dir(path: Path, config: CsmConfig | None = None, seed: int = 0, codec_config: dict | None = None):
    """A folder like `unsloth/csm-1b`: config.json, model.safetensors, tokenizer.json."""
    config = config or tiny_config()
    model = make_transformers_model(config, seed, codec_config)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))
