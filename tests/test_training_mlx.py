"""Fine-tuning on MLX, through `csm.training.CSMFineTuner(backend="mlx")`, on tiny float32 models:
the same loss, gradients and AdamW step as the torch backend, a voice that loads on both
backends, bit-exact resume, and QLoRA on a 4-bit base."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="needs the mlx extra (MLX; its Linux CPU build is mlx[cpu])")
pytest.importorskip("mlx_lm", reason="needs the mlx extra (mlx-lm)")

import csm  # noqa: E402
from csm.errors import CsmError  # noqa: E402
from csm.training.examples import Example, Turn  # noqa: E402
from csm.training.loop import LossScale  # noqa: E402
from csm.training.objective import collate, select_frames  # noqa: E402
from csm.training.tuner import CSMFineTuner  # noqa: E402
from test_training import CLIP_TEXTS, _killed_and_resumed, random_example  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _torch_name(mlx_name: str) -> str:
    """peft's name of a trained parameter (mlx-lm's LoRA factors are lora_a / lora_b)."""
    for ours, theirs in ((".lora_a", ".lora_A.default.weight"), (".lora_b", ".lora_B.default.weight")):
        if mlx_name.endswith(ours):
            return mlx_name.removesuffix(ours) + theirs
    return mlx_name


def _as_torch_layout(name: str, value) -> np.ndarray:
    a = np.array(value)
    return a.T if name.endswith((".lora_a", ".lora_b")) else a


def _close(a: np.ndarray, b: np.ndarray, rel: float) -> bool:
    return float(np.linalg.norm(a - b)) <= rel * max(float(np.linalg.norm(b)), 1e-12)


def test_loss_gradients_and_step_equal_torch(tiny_transformers_dir, tmp_path):
    """One batch, the same weights (A and B nonzero, so every LoRA gradient is), a decoder subset,
    unequal loss weights and every optimizer group: MLX's loss sums, gradients, clipped norm and
    AdamW step are torch's."""
    import torch

    base = str(tiny_transformers_dir[0])
    rng = np.random.default_rng(0)
    examples = [random_example(rng, "a", 9, context=1), random_example(rng, "b", 5, speaker=1)]
    settings = dict(model_path=base, method="lora", lora_rank=4, lora_alpha=8.0, train_heads=True,
                    train_embeddings=True, precision="float32", weight_decay=0.1, max_grad_norm=0.5)
    on_torch = CSMFineTuner(output_dir=tmp_path / "t", backend="torch", **settings).prepare_optimizer()._backend
    on_mlx = CSMFineTuner(output_dir=tmp_path / "m", backend="mlx", **settings).prepare_optimizer()._backend
    recomputing = CSMFineTuner(output_dir=tmp_path / "c", backend="mlx", gradient_checkpointing=True,
                               **settings).prepare_optimizer()._backend
    assert set(on_mlx.lora_modules) == set(on_torch.lora_modules)
    assert len(on_mlx.lora_modules) == 2 * 7 * 2 and on_mlx.lora_regex == on_torch.lora_regex
    torch_params = dict(on_torch.model.named_parameters())
    for module in on_torch.lora_modules:  # the same nonzero factors on both
        a_t, b_t = torch_params[f"{module}.lora_A.default.weight"], torch_params[f"{module}.lora_B.default.weight"]
        a = rng.normal(0, 0.2, tuple(a_t.shape)).astype(np.float32)
        b = rng.normal(0, 0.2, tuple(b_t.shape)).astype(np.float32)
        with torch.no_grad():
            a_t.copy_(torch.from_numpy(a))
            b_t.copy_(torch.from_numpy(b))
        for trainer in (on_mlx, recomputing):
            layer = dict(trainer.model.named_modules())[module]
            layer.lora_a, layer.lora_b = mx.array(a.T), mx.array(b.T)

    batch = collate(CSMFineTuner(model_path=base, output_dir=tmp_path / "f").frames(examples))
    selection = select_frames(batch, fraction=0.3, rng=np.random.default_rng(3))
    assert 0 < selection.num_decoder_frames < selection.num_frames
    scale = LossScale(selection.num_frames, selection.num_decoder_frames, semantic_weight=3.0, acoustic_weight=0.5)
    sums_t = on_torch.train_micro_batch(batch, selection, scale, seed=7)
    sums_m = on_mlx.train_micro_batch(batch, selection, scale, seed=7)
    assert sums_m.c0 == pytest.approx(sums_t.c0, rel=1e-5) and sums_m.c0_correct == sums_t.c0_correct
    np.testing.assert_allclose(sums_m.codebooks, sums_t.codebooks, rtol=1e-5)

    grads = on_mlx.accumulated_gradients()
    assert {_torch_name(n) for n in grads} == {n for n, p in torch_params.items() if p.requires_grad}
    for name, g in grads.items():
        expected = torch_params[_torch_name(name)].grad.numpy()
        assert np.abs(expected).max() > 0, name
        assert _close(_as_torch_layout(name, g), expected, 1e-4), name

    recomputing.train_micro_batch(batch, selection, scale, seed=7)  # --gradient-checkpointing: the same gradients
    for name, g in recomputing.accumulated_gradients().items():
        np.testing.assert_allclose(np.array(g), np.array(grads[name]), rtol=1e-5, atol=1e-7, err_msg=name)

    lr = 1e-2
    norm_t, norm_m = on_torch.optimizer_step(lr), on_mlx.optimizer_step(lr)
    assert norm_m == pytest.approx(norm_t, rel=1e-4) and norm_t > 0.5  # clipped on both
    for name, value in on_mlx.trainable_state().items():
        expected = torch_params[_torch_name(name)].detach().numpy()
        assert _close(_as_torch_layout(name, value), expected, 1e-4), name


def test_fine_tune_on_mlx_teaches_length_and_stop(tiny_transformers_dir, tmp_path):
    """Two clips of different lengths: after a LoRA fine-tune on MLX, greedy generation of each
    clip's text stops within two frames of its length, and the voice gives the same greedy codes
    on torch as on MLX."""
    base_dir = tiny_transformers_dir[0]
    rng = np.random.default_rng(0)
    clips = [(text, rng.integers(0, 2048, (n, 32))) for text, n in CLIP_TEXTS]
    examples = [Example(f"clip{i}", [Turn(0, text, codes)]) for i, (text, codes) in enumerate(clips)]
    # the heads train in full beside the adapters: the random tiny model learns the clips in far
    # fewer (slow, on MLX's CPU kernels) steps than the torch test's adapters alone
    tuner = CSMFineTuner(model_path=str(base_dir), output_dir=tmp_path / "voice", backend="mlx", method="lora",
                         train_heads=True, learning_rate=3e-2, epochs=30, decoder_fraction=1.0, precision="float32",
                         warmup_steps=0)
    result = tuner.train(examples)
    assert result.steps == 30 and result.last_metrics["c0_accuracy"] == 1.0
    assert (tmp_path / "voice" / "adapter_model.safetensors").is_file()
    on_mlx = csm.load(str(tmp_path / "voice"), backend="mlx", device="cpu", dtype="float32")
    on_torch = csm.load(str(tmp_path / "voice"), backend="torch", device="cpu", dtype="float32")
    for text, codes in clips:
        out = on_mlx.generate_codes(text, 0, topk=1, max_audio_length_ms=2000)
        assert abs(len(out) - len(codes)) <= 2
        assert np.array_equal(on_torch.generate_codes(text, 0, topk=1, max_audio_length_ms=2000), out)


def test_mlx_resume_after_sigkill_is_bit_exact(tiny_transformers_dir, tmp_path):
    """LoRA with dropout and trained heads: a run killed mid-way and resumed writes the same
    adapter, bit for bit, as a run that never stopped."""

    from safetensors.numpy import load_file

    base = str(tiny_transformers_dir[0])
    settings = ["backend=mlx", "method=lora", "lora_dropout=0.1", "train_heads=true", "epochs=3", "batch_size=2",
                "learning_rate=1e-2", "save_every=1", "decoder_fraction=0.25", "validation_split=0"]
    steps_done, steps = _killed_and_resumed(base, tmp_path, settings, kill_after=2)
    assert 2 <= steps_done < 6, steps_done
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert steps == list(range(1, 7))  # replayed steps were logged once


def test_qlora_on_a_4_bit_base_learns(tmp_path_factory, tmp_path):
    """--quantize 4: the frozen base is 4-bit (widths are multiples of the group size), LoRA trains
    on it, and the loss on the two clips falls."""
    from fakes.csm_models import save_transformers_dir
    from test_mlx_quantize import quantizable_config

    base = tmp_path_factory.mktemp("quantizable_base")
    save_transformers_dir(base, quantizable_config(), seed=5)
    rng = np.random.default_rng(0)
    examples = [Example(f"clip{i}", [Turn(0, text, rng.integers(0, 2048, (n, 32)))])
                for i, (text, n) in enumerate(CLIP_TEXTS)]
    tuner = CSMFineTuner(model_path=str(base), output_dir=tmp_path / "voice", backend="mlx", quantize=4,
                         learning_rate=3e-2, epochs=8, decoder_fraction=0.25, precision="float32", warmup_steps=0)
    before = tuner.evaluate(examples)["loss"]
    result = tuner.train(examples)
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear

    layer = tuner._backend.model.backbone.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.linear, nn.QuantizedLinear)
    assert result.steps == 8 and tuner.evaluate(examples)["loss"] < 0.8 * before
    assert (tmp_path / "voice" / "adapter_model.safetensors").is_file()


def test_bad_quantize_settings_are_refused(tiny_transformers_dir, tmp_path):
    base = str(tiny_transformers_dir[0])
    with pytest.raises(CsmError, match="--method lora"):
        CSMFineTuner(model_path=base, output_dir=tmp_path / "a", method="full", quantize=4)
    with pytest.raises(CsmError, match="4 or 8"):
        CSMFineTuner(model_path=base, output_dir=tmp_path / "a", quantize=3)
    with pytest.raises(CsmError, match="--backend mlx"):
        CSMFineTuner(model_path=base, output_dir=tmp_path / "a", backend="torch", quantize=4).prepare_optimizer()
    with pytest.raises(CsmError, match="without --quantize"):  # decoder width 48 is no multiple of 64
        CSMFineTuner(model_path=base, output_dir=tmp_path / "a", backend="mlx", quantize=4).prepare_optimizer()
    with pytest.raises(CsmError, match="--lora-dropout 0"):
        CSMFineTuner(model_path=base, output_dir=tmp_path / "a", backend="mlx", gradient_checkpointing=True,
                     lora_dropout=0.1).prepare_optimizer()


def test_cli_quantize_and_backend_flags(tiny_transformers_dir, tmp_path, capsys):
    """`csm-finetune train --quantize` reaches the trainers: refused on torch, and on MLX for a base
    whose widths are no multiple of the group size, each as one error line."""
    from csm.cli.finetune import main

    base = str(tiny_transformers_dir[0])
    for backend, expected in (("torch", "add --backend mlx"), ("mlx", "train this model without --quantize")):
        with pytest.raises(SystemExit):
            main(["train", "--model-path", base, "--data", str(tmp_path), "--output-dir", str(tmp_path / "out"),
                  "--backend", backend, "--quantize", "4"])
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
