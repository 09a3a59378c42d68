"""`csm-finetune` end to end: recordings in, a voice out that both backends load; and every bad
input as one line and a non-zero exit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from csm.cli.finetune import group

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLIPS = {"short": ("Short one.", 0.56), "long": ("A much longer sentence for the second clip.", 1.2)}


def write_recordings(root, rate=16_000, channels=2):
    """Two clips at another rate, in stereo, with their transcripts: noise whose loudness changes
    every 40 ms, so every frame's codes differ (as speech's do)."""
    rng = np.random.default_rng(0)
    audio_dir, text_dir = root / "rec", root / "txt"
    audio_dir.mkdir(parents=True)
    text_dir.mkdir()
    for stem, (text, seconds) in CLIPS.items():
        n = int(seconds * rate)
        envelope = np.repeat(rng.uniform(0.05, 0.5, n // (rate // 25) + 1), rate // 25)[:n]
        mono = envelope * rng.standard_normal(n)
        sf.write(audio_dir / f"{stem}.wav", np.stack([mono] * channels, axis=1).astype(np.float32), rate)
        (text_dir / f"{stem}.txt").write_text(text + "\n")
    return audio_dir, text_dir


def invoke(args):
    return CliRunner().invoke(group, args)


def test_voice_from_recordings_loads_on_both_backends(tiny_model_dir, tmp_path):
    """A full fine-tune from a folder of recordings (stereo, 16 kHz): the voice folder loads with
    csm.load on torch and MLX, and greedy generation of each clip's text stops within two frames
    of the clip's length. (LoRA's end to end is in test_training.py.)"""
    import csm
    from csm.training.data import PreparedDataset

    audio_dir, text_dir = write_recordings(tmp_path)
    out = tmp_path / "voice"
    result = invoke(["train", "--model-path", str(tiny_model_dir), "--audio-dir", str(audio_dir),
                     "--transcript-dir", str(text_dir), "--output-dir", str(out), "--epochs", "150",
                     "--method", "full", "--learning-rate", "3e-3", "--decoder-fraction", "1",
                     "--validation-split", "0", "--precision", "float32", "--warmup-steps", "0",
                     "--save-every", "1000", "--speaker-id", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["method"] == "full"
    examples = PreparedDataset.open(out / "data").examples("train")
    lengths = {e.turns[-1].text: len(e.turns[-1].codes) for e in examples}
    assert sorted(lengths.values()) == [7, 15]  # 0.56 s and 1.2 s at 80 ms per frame, resampled
    for backend in ("torch", "mlx"):
        voice = csm.load(str(out), backend=backend, dtype="float32")
        for text, frames in lengths.items():
            codes = voice.generate_codes(text, 0, topk=1, max_audio_length_ms=2000)
            assert abs(len(codes) - frames) <= 2, (backend, text, len(codes), frames)


def test_bad_inputs_are_one_line_and_nonzero(tiny_model_dir, tmp_path):
    audio_dir, text_dir = write_recordings(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    base = ["train", "--model-path", str(tiny_model_dir), "--epochs", "1", "--precision", "float32"]
    cases = {
        "no audio": [*base, "--audio-dir", str(empty), "--transcript-dir", str(text_dir), "--output-dir",
                     str(tmp_path / "o1")],
        "no transcripts": [*base, "--audio-dir", str(audio_dir), "--transcript-dir", str(empty), "--output-dir",
                           str(tmp_path / "o2")],
        "output exists": [*base, "--audio-dir", str(audio_dir), "--transcript-dir", str(text_dir), "--output-dir",
                          str(tmp_path / "taken")],
        "bad model": ["train", "--model-path", str(empty), "--audio-dir", str(audio_dir), "--transcript-dir",
                      str(text_dir), "--output-dir", str(tmp_path / "o3")],
        "nothing to resume": [*base, "--audio-dir", str(audio_dir), "--transcript-dir", str(text_dir),
                              "--output-dir", str(tmp_path / "o4"), "--resume"],
        "no lora target left": [*base, "--audio-dir", str(audio_dir), "--transcript-dir", str(text_dir),
                                "--output-dir", str(tmp_path / "o5"), "--lora-targets", "projection",
                                "--freeze-decoder"],
        "bad setting": [*base, "--data", str(audio_dir), "--output-dir", str(tmp_path / "o6"), "--lora-rank", "0"],
        "no data": [*base, "--output-dir", str(tmp_path / "o7")],
    }
    from csm.cli.finetune import main

    for name, args in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code != 0, name


def test_bad_inputs_messages(tiny_model_dir, tmp_path, capsys):
    from csm.cli.finetune import main

    audio_dir, text_dir = write_recordings(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning-rate": 1e-4, "lerning_rate": 2}))
    for args, expected in (
        (["train", "--config", str(config), "--output-dir", str(tmp_path / "x")], "unknown key(s) lerning_rate"),
        (["train", "--model-path", str(tiny_model_dir), "--data", str(audio_dir), "--output-dir",
          str(tmp_path / "taken")], "already exists"),
        (["voice-adapt", "--model-path", str(tiny_model_dir), "--data", str(audio_dir), "--output-dir",
          str(tmp_path / "y"), "--method", "qlora"], "method must be one of"),
    ):
        with pytest.raises(SystemExit):
            main(args)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_out_of_memory_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    from csm.cli.finetune import main
    from csm_torch.training import TorchTrainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(TorchTrainer, "train_micro_batch", oom)
    audio_dir, text_dir = write_recordings(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model-path", str(tiny_model_dir), "--audio-dir", str(audio_dir), "--transcript-dir",
              str(text_dir), "--output-dir", str(tmp_path / "o"), "--validation-split", "0"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ran out of memory") and "--gradient-checkpointing" in err
