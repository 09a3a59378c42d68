"""`csm-train --config`: a new tiny model trained from one config file; bad settings as one error
line; a SIGKILLed run resumed bit-exactly; a two-process FSDP run resumed by one process; the
named checkpoints load with csm.load; TensorBoard event files; the conversational evaluation at
the end of a run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from csm.cli.train import main
from fakes.csm_models import TEXT_VOCAB, tiny_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLIPS = ["Short one.", "A longer sentence here.", "Third clip.", "And a fourth one."]


def _dims(stack) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(stack)))


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    """Four clips of noise with their transcripts, encoded once with the tiny Mimi (which the new
    model takes from its base, so the codes are its own)."""
    from csm.training.data import prepare_dataset

    root = tmp_path_factory.mktemp("train_config_data")
    clips = root / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for i, text in enumerate(CLIPS):
        n = int((0.4 + 0.16 * i) * 24_000)
        envelope = np.repeat(rng.uniform(0.05, 0.5, n // 960 + 1), 960)[:n]
        sf.write(clips / f"clip{i}.wav", (envelope * rng.standard_normal(n)).astype(np.float32), 24_000)
        (clips / f"clip{i}.txt").write_text(text + "\n")
    data = prepare_dataset(clips, root / "prepared", model_path=tiny_model_dir, validation_split=0.3,
                           backend="torch", device="cpu")
    assert data.examples("train") and data.examples("validation")
    return root / "prepared"


def _config(tmp_path, tiny_model_dir, prepared, **changes) -> dict:
    config = tiny_config()
    return {
        "model": {"backbone_flavor": _dims(config.backbone), "decoder_flavor": _dims(config.decoder),
                  "text_vocab_size": TEXT_VOCAB, "base": str(tiny_model_dir), "init_seed": 1},
        # two micro-batches a step: accumulation under DDP, FSDP and resuming is part of every run here
        "output_dir": str(tmp_path / "run"), "data": str(prepared), "epochs": 3, "batch_size": 1, "grad_accum": 2,
        "learning_rate": 1e-3, "warmup_steps": 0, "save_every": 2, "precision": "float32", "device": "cpu",
        "backend": "torch", "decoder_fraction": 0.5, "patience": 0,
        "logging": {"tensorboard": True}, **changes,
    }


def _write(path, config: dict):
    path.write_text(json.dumps(config))
    return str(path)


def _main(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def whole_run(tiny_model_dir, prepared, tmp_path_factory):
    """One run from a config file, in this process: (its config, its output folder); the resume
    test's uninterrupted reference too."""
    root = tmp_path_factory.mktemp("whole")
    config = _config(root, tiny_model_dir, prepared)
    with pytest.raises(SystemExit) as exc:
        main(["--config", _write(root / "config.json", config)])
        raise SystemExit(0)
    assert exc.value.code == 0
    return config, root / "run"


def test_config_run_writes_named_checkpoints_that_load(whole_run):
    import csm

    config, run = whole_run
    checkpoints = run / "checkpoints"
    snapshots = sorted(p.name for p in checkpoints.glob("model_epoch*_step*.pt"))
    assert snapshots and all(p.startswith("model_epoch") for p in snapshots), snapshots
    assert (checkpoints / "checkpoint_latest.pt").is_file() and (checkpoints / "best_model.pt").is_file()
    assert list((run / "logs").glob("events.out.tfevents.*"))  # TensorBoard scalars
    assert json.loads((run / "initial_model" / "config.json").read_text())["text_vocab_size"] == TEXT_VOCAB
    flavors = {"backbone_flavor": config["model"]["backbone_flavor"],
               "decoder_flavor": config["model"]["decoder_flavor"]}
    for name in (snapshots[-1], "best_model.pt", "checkpoint_latest.pt"):
        # a bare .pt: its tokenizer and Mimi are the run's model's (unsloth/csm-1b's by default)
        gen = csm.load(str(checkpoints / name), backend="torch", device="cpu", dtype="float32",
                       tokenizer=str(run / "initial_model"), mimi=str(run / "initial_model"), **flavors)
        audio = gen.generate("Hi.", speaker=0, max_audio_length_ms=240, seed=0, watermark=False)
        assert audio.ndim == 1 and audio.size > 0
    # the file says what it is: copied anywhere, it loads without the flavors too
    alone = csm.load(str(checkpoints / snapshots[-1]), backend="torch", device="cpu", dtype="float32",
                     tokenizer=str(run / "initial_model"), mimi=str(run / "initial_model"))
    assert alone.config == gen.config


@pytest.mark.parametrize(("change", "flags", "message"), [
    ({"epoch": 3}, [], "unknown key(s) epoch"),
    ({"learning_rate": "fast"}, [], "learning_rate must be a float"),
    ({}, ["--epochs", "0"], "epochs must be at least 1"),  # a flag wins over the file
    ({"model": {"preset": "huge"}}, [], "model preset must be one of"),
    ({}, ["--init", "no-such-llama/"], "init must be 'random' or a Llama-3.x model folder"),
])
def test_bad_setting_is_one_error_line(tmp_path, capsys, change, flags, message):
    config = _config(tmp_path, tmp_path / "base", tmp_path / "data") | change  # refused before either is read
    code, err = _main(["--config", _write(tmp_path / "config.json", config), *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "csm.train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigkilled_run_resumes_bit_exact(whole_run, tmp_path):
    from safetensors.torch import load_file

    config, whole = whole_run
    killed = _start("--config", _write(tmp_path / "config.json", config | {"output_dir": str(tmp_path / "k" / "run")}))
    metrics = tmp_path / "k" / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:  # kill it mid-run, after a few checkpoints
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL and 4 <= len(metrics.read_text().splitlines()) < 12
    resumed = _start("--resume", str(tmp_path / "k" / "run" / "checkpoints" / "checkpoint_latest.pt"))
    assert resumed.wait() == 0, resumed.stdout.read()
    a = load_file(str(whole / "model.safetensors"))
    b = load_file(str(tmp_path / "k" / "run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, len(steps) + 1))  # the replayed steps were logged once


def test_wandb_without_the_package_is_refused_up_front(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the refusal this checks only happens without it")
    config = _config(tmp_path, tmp_path / "base", tmp_path / "data")
    code, err = _main(["--config", _write(tmp_path / "config.json", config), "--wandb", "csm-tests"], capsys)
    assert code == 2 and err.startswith("error: --wandb needs the wandb package") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_fsdp_run_on_two_processes_resumes_on_one(whole_run, tmp_path):
    """torchrun with two processes under FSDP (each holding half of every weight and of the
    optimizer state; activations recomputed), killed mid-run, resumed by one process: the result
    equals the uninterrupted one-process run (to rounding: the gradient is summed in another order)."""
    from safetensors.torch import load_file

    config, whole = whole_run
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "csm.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    sharded = config | {"output_dir": str(run), "parallel": "fsdp", "gradient_checkpointing": True}
    killed = subprocess.Popen([*torchrun, "--config", _write(tmp_path / "config.json", sharded)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and killed.poll() is None:  # kill every process mid-run
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    output = killed.communicate()[0]
    assert 4 <= len(metrics.read_text().splitlines()) < 12, output
    resumed = _start("--resume", str(run / "checkpoints" / "checkpoint_latest.pt"))
    assert resumed.wait() == 0, resumed.stdout.read()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    initial = load_file(str(whole / "initial_model" / "model.safetensors"))
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_run_ends_with_a_conversational_evaluation(tiny_model_dir, tmp_path, capsys):
    """Held-out conversations are spoken by the trained model at the end of the run: the report
    (JSON and figure) covers every held-out turn after the first, per speaker."""
    reason = "the conversational evaluation needs the eval extra: pip install 'csm-speech[eval]'"
    pytest.importorskip("resemblyzer", reason=reason)
    pytest.importorskip("matplotlib", reason=reason)
    rng = np.random.default_rng(1)
    lines = []
    for c in range(3):  # three conversations of three turns, speakers 0 and 1 taking turns
        for t in range(3):
            n = int((0.4 + 0.08 * (c + t)) * 24_000)
            envelope = np.repeat(rng.uniform(0.05, 0.5, n // 960 + 1), 960)[:n]
            sf.write(tmp_path / f"c{c}t{t}.wav", (envelope * rng.standard_normal(n)).astype(np.float32), 24_000)
            lines.append({"audio": f"c{c}t{t}.wav", "text": CLIPS[t], "speaker": t % 2, "conversation": f"c{c}"})
    (tmp_path / "talk.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = _config(tmp_path, tiny_model_dir, None) | {
        "data": str(tmp_path / "talk.jsonl"), "validation_split": 0.34, "epochs": 1, "save_every": 1,
        "keep_snapshots": 2,
        "logging": {"tensorboard": False}, "evaluation": {"eval_conversations": 4}}
    with pytest.raises(SystemExit) as exc:
        main(["--config", _write(tmp_path / "config.json", config)])
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert exc.value.code == 0
    report = json.loads((tmp_path / "run" / "evaluation" / "conversations.json").read_text())
    assert report["summary"]["conversations"] == 1 and report["summary"]["turns"] == 2  # the held-out one
    assert [t["turn"] for t in report["turns"]] == [1, 2] and {t["speaker"] for t in report["turns"]} == {0, 1}
    assert all(0 <= t["duration_s"] and t["context_turns"] >= 1 for t in report["turns"])
    assert set(report["summary"]["speakers"]) == {"0", "1"} and report["summary"]["eos_rate"] is not None
    assert (tmp_path / "run" / "evaluation" / "conversations.png").stat().st_size > 1000
    assert "similarity_to_real" in out and "conversations.json" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = sorted((tmp_path / "run" / "checkpoints").glob("model_epoch*_step*.pt"))
    assert [p.name for p in kept] == [f"model_epoch0_step{s}.pt" for s in (max(steps) - 1, max(steps))]
