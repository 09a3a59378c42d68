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
    assert sel.num_decoder_frames == 3 + int(np.ceil(111 / 16))
    assert set(sel.example[sel.decoder]) == {0, 1, 2}
    # every trained frame is predicted from the position before it
    assert np.all(sel.c0_rows == sel.frame_rows - 1)
    again = select_frames(batch, fraction=1 / 16, rng=np.random.default_rng(1))
    assert np.array_equal(sel.decoder, again.decoder)
    assert select_frames(batch, fraction=1.0).num_decoder_frames == 114


CLIP_TEXTS = [("Short one.", 6), ("A much longer sentence for the second clip.", 15)]


def test_fine_tune_teaches_length_and_stop(tiny_transformers_dir, tmp_path):
    """Two clips of different lengths: after a LoRA fine-tune, greedy generation of each clip's
    text gives that clip and stops within two frames of its length, on torch and MLX; the
    untrained model never stops."""
    import csm

    base_dir = tiny_transformers_dir[0]
    rng = np.random.default_rng(0)
    clips = [(text, rng.integers(0, 2048, (n, 32))) for text, n in CLIP_TEXTS]
    examples = [Example(f"clip{i}", [Turn(0, text, codes)]) for i, (text, codes) in enumerate(clips)]
    tuner = CSMFineTuner(model_path=str(base_dir), output_dir=tmp_path / "voice", method="lora",
                         learning_rate=3e-2, epochs=150, decoder_fraction=1.0, precision="float32", warmup_steps=0)
    result = tuner.train(examples)
    assert result.steps == 150 and result.last_metrics["c0_accuracy"] == 1.0
    assert (tmp_path / "voice" / "adapter_model.safetensors").is_file()
    base = csm.load(str(base_dir), backend="torch", dtype="float32")
    tuned = csm.load(str(tmp_path / "voice"), backend="torch", dtype="float32")
    for text, codes in clips:
        assert len(base.generate_codes(text, 0, topk=1, max_audio_length_ms=2000)) == 25  # runs to the limit
        out = tuned.generate_codes(text, 0, topk=1, max_audio_length_ms=2000)
        assert abs(len(out) - len(codes)) <= 2
        assert np.array_equal(out[:len(codes)], codes[:len(out)])
    lines = (tmp_path / "voice" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 150
    # a voice loads on MLX too (LoRA merged at load), with the same greedy codes
    on_mlx = csm.load(str(tmp_path / "voice"), backend="mlx", dtype="float32")
    for text, codes in clips:
        assert np.array_equal(on_mlx.generate_codes(text, 0, topk=1, max_audio_length_ms=2000), codes)


def _run_script(args: list[str], env_extra: dict | None = None, launcher: list[str] | None = None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("training_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.Popen([*(launcher or [sys.executable]), str(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _killed_and_resumed(base: str, tmp_path, settings: list[str], kill_after: int) -> tuple[int, list[int]]:
    """Train `whole` straight through and `killed` SIGKILLed once `kill_after` steps are logged,
    then resumed, both with `settings`; returns the steps done before the kill and the steps
    `killed`'s metrics logged, in order."""
    import json
    import signal
    import time

    whole = _run_script([base, str(tmp_path / "whole"), *settings])
    killed = _run_script([base, str(tmp_path / "killed"), *settings])
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it mid-run, once a few steps are checkpointed
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    steps_done = len(metrics.read_text().splitlines())
    resumed = _run_script([base, str(tmp_path / "killed"), *settings, "resume=true"])
    assert resumed.wait() == 0, resumed.stdout.read()
    assert whole.wait() == 0, whole.stdout.read()
    return steps_done, [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_after_sigkill_is_bit_exact(tiny_transformers_dir, tmp_path):
    base = str(tiny_transformers_dir[0])
    settings = ["method=full", "epochs=6", "batch_size=2", "learning_rate=1e-3", "save_every=1",
                "decoder_fraction=0.25", "validation_split=0"]
    steps_done, steps = _killed_and_resumed(base, tmp_path, settings, kill_after=5)
    assert 5 <= steps_done < 12, steps_done
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps == list(range(1, 13))  # replayed steps were logged once


def test_two_process_ddp_equals_one_process(tiny_transformers_dir, tmp_path):
    import sys

    base = str(tiny_transformers_dir[0])
    settings = ["method=full", "epochs=2", "batch_size=4", "grad_accum=1", "learning_rate=1e-3",
                "decoder_fraction=0.5", "validation_split=0", "device=cpu"]
    one = _run_script([base, str(tmp_path / "one"), *settings])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = _run_script([base, str(tmp_path / "two"), *settings], launcher=torchrun)
    assert one.wait() == 0, one.stdout.read()
    assert two.wait() == 0, two.stdout.read()
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    changed = [k for k in a if not torch.equal(a[k], _weights_base(base)[k])]
    assert changed  # the runs trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _weights_base(base: str) -> dict:
    from csm.checkpoint import open_checkpoint
    from csm_torch.loading import checkpoint_tensors

    ckpt = open_checkpoint(base)
    return dict(checkpoint_tensors(ckpt, torch.device("cpu"), torch.float32))


def _with_positions(model_dir, dst, positions: int):
    """`model_dir` (hard-linked, not copied) with a backbone of `positions` positions: the sample
    clips' length is bounded by the positions left after the prompt, and the tiny random model
    rarely stops, so each sample clip is then ~2.5 s instead of the 10 s cap."""
    import json
    import os

    dst.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            os.link(f, dst / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_validation_keeps_best_and_speaks_samples(tiny_model_dir, watermark_dir, tmp_path, monkeypatch):
    """Validation every epoch on fixed frames: the best weights are the result, and each
    validation writes the sample prompts' clips."""
    import json

    monkeypatch.setenv("CSM_WATERMARK_MODEL", str(watermark_dir))
    rng = np.random.default_rng(0)
    examples = [random_example(rng, "a", 6), random_example(rng, "b", 9)]
    model = _with_positions(tiny_model_dir, tmp_path / "model", 48)
    tuner = CSMFineTuner(model_path=str(model), output_dir=tmp_path / "voice", learning_rate=1e-2,
                         epochs=2, precision="float32", sample_prompts=["Hello there."])
    result = tuner.train(examples, val_dataset=examples)
    records = [json.loads(line) for line in (tmp_path / "voice" / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r["kind"] == "validation"]
    assert len(validations) == 2 and result.best_validation_loss == min(r["loss"] for r in validations)
    assert sorted(p.name for p in (tmp_path / "voice" / "samples").iterdir()) == ["step000001_0.wav",
                                                                                  "step000002_0.wav"]
    # the same weights give the same validation loss: no random frames in validation
    again = CSMFineTuner(model_path=str(tmp_path / "voice"), output_dir=tmp_path / "x", precision="float32")
    assert again.evaluate(examples)["loss"] == pytest.approx(result.best_validation_loss, rel=1e-6)


def test_prepare_then_train_keeps_the_prepared_model(tiny_transformers_dir, tmp_path):
    """Sesame's API order: prepare_optimizer builds the model and optimizer; train's batch size and
    epochs do not build them again."""
    rng = np.random.default_rng(0)
    tuner = CSMFineTuner(model_path=str(tiny_transformers_dir[0]), output_dir=tmp_path / "v", learning_rate=2e-5,
                         precision="float32")
    tuner.prepare_optimizer(freeze_backbone=True)
    prepared = tuner._backend
    result = tuner.train(train_dataset=[random_example(rng, "a", 5)], batch_size=1, epochs=2)
    assert tuner._backend is prepared and result.steps == 2
    assert tuner.config.freeze_backbone and prepared.lora_regex.startswith("^((decoder)")
    assert set(tuner.evaluate([random_example(rng, "b", 4)])) >= {"loss", "semantic_loss", "acoustic_loss"}
