"""Fine-tuning on PyTorch, through `csm.training.CSMFineTuner` and `csm-finetune`, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm.training.examples import Example, Turn
from csm.training.objective import collate, select_frames
from csm.training.tuner import CSMFineTuner

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def random_example(rng: np.random.Generator, name: str, frames: int, speaker: int = 0, context: int = 0) -> Example:
    turns = [Turn(speaker=1 - speaker, text=f"context {i} of {name}", codes=rng.integers(0, 2048, (4, 32)),
                  train=False) for i in range(context)]
    turns.append(Turn(speaker=speaker, text=f"the words of {name}", codes=rng.integers(0, 2048, (frames, 32))))
    return Example(name, turns)


def hf_loss(hf_model, batch) -> tuple[float, float, float]:
    """transformers' CsmForConditionalGeneration loss on the same frames: its own embeddings of
    the 33 columns, labels = the trained frames' codes (-100 elsewhere)."""
    tokens = torch.as_tensor(batch.tokens)
    mask = torch.as_tensor(batch.mask)
    offsets = torch.arange(32) * hf_model.config.vocab_size
    audio = hf_model.backbone_model.embed_tokens.embed_audio_tokens(tokens[..., :-1] + offsets)
    text = hf_model.embed_text_tokens(tokens[..., -1])
    embeds = (torch.cat([audio, text[..., None, :]], dim=-2) * mask[..., None]).sum(-2)
    labels = torch.full(tokens[..., :-1].shape, -100)
    trained = torch.as_tensor(batch.trained)
    labels[trained] = tokens[..., :-1][trained]
    attention = torch.as_tensor(np.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None]).long()
    with torch.no_grad():
        out = hf_model(inputs_embeds=embeds, attention_mask=attention, labels=labels)
    return float(out.loss), float(out.backbone_loss), float(out.depth_decoder_loss)


def test_loss_equals_transformers(tiny_transformers_dir, tmp_path):
    """With every frame in the decoder and both weights 1, our loss is transformers' loss."""
    path, hf_model = tiny_transformers_dir
    rng = np.random.default_rng(0)
    examples = [random_example(rng, "a", 9, context=1), random_example(rng, "b", 5, speaker=1)]
    tuner = CSMFineTuner(model_path=str(path), output_dir=tmp_path / "run", method="full", precision="float32")
    ours = tuner.evaluate(examples)
    batch = collate(tuner.frames(examples))
    theirs, backbone, depth = hf_loss(hf_model.float(), batch)
    assert ours["semantic_loss"] == pytest.approx(backbone, rel=1e-5)
    assert ours["acoustic_loss"] == pytest.approx(depth, rel=1e-5)
    assert ours["loss"] == pytest.approx(theirs, rel=1e-5)


def test_frame_selection_counts_and_eos():
    rng = np.random.default_rng(0)
    from csm.text import TextTokenizer  # noqa: F401  (the frames need no tokenizer here)
    from csm.training.examples import TrainingFrames

    def frames(n_text, n_audio):
        t = n_text + n_audio + 1
        tokens = np.zeros((t, 33), dtype=np.int64)
        mask = np.zeros((t, 33), dtype=bool)
        mask[:n_text, -1] = True
        mask[n_text:, :-1] = True
        tokens[n_text:-1, :-1] = rng.integers(1, 2048, (n_audio, 32))
        trained = np.zeros(t, dtype=bool)
        trained[n_text:] = True
        return TrainingFrames(tokens, mask, trained)

    batch = collate([frames(3, 40), frames(5, 70), frames(2, 1)])
    sel = select_frames(batch, fraction=1 / 16, rng=np.random.default_rng(1))
    assert sel.num_frames == 41 + 71 + 2
    assert sel.is_eos.sum() == 3 and set(np.flatnonzero(sel.is_eos)) <= set(sel.decoder)
    assert sel.num_decoder_frames == max(3, int(np.ceil(114 / 16)))
    assert set(sel.example[sel.decoder]) == {0, 1, 2}
    # every trained frame is predicted from the position before it
    assert np.all(sel.c0_rows == sel.frame_rows - 1)
    again = select_frames(batch, fraction=1 / 16, rng=np.random.default_rng(1))
    assert np.array_equal(sel.decoder, again.decoder)
    assert select_frames(batch, fraction=1.0).num_decoder_frames == 114
