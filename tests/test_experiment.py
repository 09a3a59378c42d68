"""The one-command experiment: `csm-finetune make-dialogues` (espeak-ng speaking scripted two-speaker
dialogues) and `run_experiment.sh` end to end (dialogues, prepare, csm-train of the tiny preset,
the `csm chat --mode test` demo), offline: the tiny random test model's tokenizer and Mimi stand in
for the Hub's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from csm.errors import CsmError
from csm.training.dialogues import DIALOGUES, MANIFEST, VOICES, write_dialogues
from csm.training.sources import open_source
from fakes.speech import require_espeak

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_experiment.sh"
SHORT = (("greeting", ("Hello there.", "Hi! How are you?", "Fine, thanks.")),)
# The end-to-end run is cut to what checks every step: 3 optimizer steps and one snapshot (the
# default, 100 steps, took 6 minutes of training alone on this busy 2-core machine), two dialogues,
# 0.5 s demo turns, no conversational evaluation (csm-train's own tests cover it).
STEPS, SAVE_EVERY = 3, 3


def make_dialogues(args):
    from click.testing import CliRunner

    from csm.cli.finetune import group

    return CliRunner().invoke(group, ["make-dialogues", *args])


def test_dialogues_alternate_speakers_and_read_as_conversations(tmp_path):
    require_espeak()
    corpus = write_dialogues(tmp_path / "d", dialogues=SHORT)
    lines = [json.loads(line) for line in corpus.manifest.read_text().splitlines()]
    assert [(r["conversation"], r["speaker"], r["text"]) for r in lines] == [
        ("greeting", i % 2, text) for i, text in enumerate(SHORT[0][1])]
    for r in lines:
        audio, rate = sf.read(str(corpus.folder / r["audio"]))
        assert rate == 24_000 and audio.ndim == 1
        assert 0.4 < len(audio) / rate < 3.0  # a few words, silence trimmed to 0.15 s a side
    assert corpus.turns == 3 and 1.0 < corpus.seconds < 8.0
    source = open_source(corpus.manifest)  # what `csm-finetune prepare --data` reads
    assert [(c.conversation, c.speaker) for c in source.clips] == [("greeting", 0), ("greeting", 1), ("greeting", 0)]
    assert not source.rejected


def test_make_dialogues_refuses_what_it_would_overwrite(tmp_path, monkeypatch):
    require_espeak()
    out = tmp_path / "d"
    write_dialogues(out, dialogues=SHORT)
    r = make_dialogues(["--output-dir", str(out), "--count", "1"])
    assert isinstance(r.exception, CsmError) and "--force" in str(r.exception)
    r = make_dialogues(["--output-dir", str(out), "--count", "1", "--force"])
    assert r.exit_code == 0, r.output
    assert {line["conversation"] for line in map(json.loads, (out / MANIFEST).read_text().splitlines())} == {
        DIALOGUES[0][0]}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = make_dialogues(["--output-dir", str(mine), "--force"])
    assert isinstance(r.exception, CsmError) and "choose another folder" in str(r.exception)
    assert (mine / "notes.txt").read_text() == "keep me"
    r = make_dialogues(["--output-dir", str(tmp_path / "x"), "--voices", VOICES[0]])
    assert isinstance(r.exception, CsmError) and "two espeak-ng voices" in str(r.exception)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(CsmError, match=r"espeak-ng not found.*apt-get install espeak-ng.*brew install espeak-ng"):
        write_dialogues(tmp_path / "y", dialogues=SHORT)
    assert not (tmp_path / "y").exists()


def fake_hub_cache(cache: Path, files: dict[tuple[str, str], Path]) -> Path:
    """A Hugging Face cache folder holding `files` ({(repo, filename): local file}) at revision
    main, as hf_hub_download leaves them: what it finds offline (HF_HUB_OFFLINE=1)."""
    revision = "0" * 40
    for (repo, name), source in files.items():
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(revision)
        (folder / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / revision / name).symlink_to(source)
    return cache


def test_run_experiment_end_to_end(tmp_path, tiny_model_dir, watermark_dir):
    """The default path (no CSM_EXPERIMENT_BASE: the base is made from the Hub's tokenizer and
    Mimi files), with the tiny test model's tokenizer and Mimi standing in for the Hub's."""
    from csm.mimi_files import MIMI_FILE, MIMI_REPO
    from csm.training.experiment import TOKENIZER_REPO

    require_espeak("run_experiment.sh speaks its dialogues with it")
    pytest.importorskip("tensorboard", reason="the experiment logs to TensorBoard: pip install 'csm-speech[train]'")
    out = tmp_path / "exp"
    cache = fake_hub_cache(tmp_path / "hub", {(TOKENIZER_REPO, "tokenizer.json"): tiny_model_dir / "tokenizer.json",
                                              (MIMI_REPO, MIMI_FILE): tiny_model_dir / MIMI_FILE})
    env = {**os.environ, "CSM_EXPERIMENT_PYTHON": sys.executable, "CSM_EXPERIMENT_DIR": str(out),
           "CSM_EXPERIMENT_STEPS": str(STEPS), "CSM_EXPERIMENT_SAVE_EVERY": str(SAVE_EVERY),
           "CSM_EXPERIMENT_DIALOGUES": "2", "CSM_EXPERIMENT_DEMO_MS": "500", "CSM_EXPERIMENT_EVAL_CONVERSATIONS": "0",
           "CSM_EXPERIMENT_WATERMARK_MODEL": str(watermark_dir), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "OMP_NUM_THREADS": "1"}  # torch's threads spin against each other on a busy 2-core machine
    env.pop("CSM_EXPERIMENT_BASE", None)
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "base" / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (out / "base" / MIMI_FILE).stat().st_size == (tiny_model_dir / MIMI_FILE).stat().st_size

    listed = dict(re.findall(r"^[ \t]*([a-zA-Z ]+):[ \t]+(\S+)", r.stdout.split("== done.")[1], re.M))
    for what in ("data", "prepared data", "config", "run folder", "checkpoints", "metrics", "TensorBoard logs",
                 "demo transcript"):
        assert Path(listed[what]).exists(), (what, listed)
    run = out / "run"
    assert Path(listed["run folder"]) == run
    checkpoints = run / "checkpoints"
    assert (checkpoints / "checkpoint_latest.pt").is_file()
    assert sorted(p.name for p in checkpoints.glob("model_epoch*_step*.pt")) == sorted(
        f"model_epoch{e}_step{s}.pt" for e, s in _epochs_at(run, range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)))
    assert any((run / "logs").iterdir())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)) and steps[-1]["total_steps"] == STEPS
    assert steps[-1]["loss"] < steps[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["preset"] == "tiny" and config["max_steps"] == STEPS

    wavs = sorted((out / "demo").glob("turn-*.wav"))
    assert [w.name for w in wavs] == [f"turn-0{i}.wav" for i in range(1, 5)]
    for wav in wavs:
        assert f"demo:              {wav}" in r.stdout
        info = sf.info(str(wav))
        assert info.samplerate == 24_000 and info.frames > 0


def _epochs_at(run: Path, steps) -> list[tuple[int, int]]:
    """(epoch, step) of each snapshot step, read off the run's own step records."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = {r["step"]: r["epoch"] for r in records if r["kind"] == "step"}
    return [(epoch[s], s) for s in steps]


def test_run_experiment_names_the_step_that_failed(tmp_path):
    env = {**os.environ, "CSM_EXPERIMENT_PYTHON": sys.executable, "CSM_EXPERIMENT_DIR": str(tmp_path / "exp"),
           "CSM_EXPERIMENT_STEPS": "0"}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "--steps" in r.stderr and "failed while writing the config" in r.stderr
    assert not (tmp_path / "exp" / "dialogues").exists()
    env |= {"CSM_EXPERIMENT_STEPS": "3", "CSM_EXPERIMENT_BASE": str(tmp_path / "no-such-model")}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "CSM_EXPERIMENT_BASE" in r.stderr and "is not a folder" in r.stderr
