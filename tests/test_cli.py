"""csm-generate end to end on a tiny model folder, and one clear line for every bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from csm.audio import MODEL_SAMPLE_RATE


def run_cli(args, tmp_path, env=None, module="csm.cli.generate"):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1",
                "CSM_WATERMARK_MODEL": "", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v != ""}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=tmp_path, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def base_args(tiny_model_dir, watermark_dir):
    return ["--model", tiny_model_dir, "--watermark-model", watermark_dir, "--device", "cpu", "--top-k", "1",
            "--max-audio-length-ms", 400]


def test_generates_a_wav_matching_the_frames(tmp_path, base_args):
    r = run_cli(["--text", "Hello there.", *base_args, "-o", "out.wav", "--seed", 3], tmp_path)
    assert r.returncode == 0, r.stderr
    frames = int(r.stderr.split(" frames)")[0].rsplit("(", 1)[1])
    assert frames == 5 and "RTF" in r.stderr
    info = sf.info(str(tmp_path / "out.wav"))
    assert info.samplerate == MODEL_SAMPLE_RATE and info.channels == 1 and info.frames == frames * 1920
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.wav")]  # no temp file left


def test_context_file_with_audio(tmp_path, base_args, cli_main):
    t = np.arange(MODEL_SAMPLE_RATE // 2) / 16_000
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 300 * t)], axis=1) * 0.3
    sf.write(tmp_path / "turn1.wav", stereo, 16_000)  # other rate, two channels: resampled and averaged
    (tmp_path / "ctx.json").write_text(json.dumps([{"speaker": 1, "text": "Hi!", "audio": "turn1.wav"}]))
    err = cli_main(["--text", "Hello.", *base_args, "--context", "ctx.json", "-o", "out.wav", "--no-watermark"])
    assert "warning: --no-watermark" in err
    assert sf.info(str(tmp_path / "out.wav")).frames == 5 * 1920


def test_refuses_to_overwrite_without_force(tmp_path, base_args, cli_main):
    (tmp_path / "out.wav").write_bytes(b"precious")
    r = run_cli(["--text", "Hello.", *base_args, "-o", "out.wav"], tmp_path)
    assert_one_line_error(r, "already exists", "--force")
    assert (tmp_path / "out.wav").read_bytes() == b"precious"
    cli_main(["--text", "Hello.", *base_args, "-o", "out.wav", "--force", "--no-watermark"])
    assert sf.info(str(tmp_path / "out.wav")).frames == 5 * 1920


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--text", ""], ["text is empty"]),
        (["--text", "   "], ["text is empty"]),
        (["--text", "hi", "--temperature", "-0.5"], ["temperature must be a number >= 0"]),
        (["--text", "hi", "--top-k", "0"], ["top-k must be a whole number >= 1"]),
        (["--text", "hi", "--top-p", "0"], ["top-p must be in (0, 1]"]),
        (["--text", "hi", "--max-audio-length-ms", "0"], ["max audio length must be positive"]),
        (["--text", "hi", "--dtype", "float8"], ["--dtype"]),
        (["--text", "hi", "--watermark-key", "1,2,3"], ["5"]),
        (["--text", "hi", "--context", "missing.json"], ["context file not found"]),
        (["--text", "hi", "--device", "cuda:7"], ["CUDA is not available"]),
        (["--text", "hi", "--backend", "tpu"], ["unknown backend 'tpu'"]),
    ],
)
def test_bad_arguments(tmp_path, base_args, extra, fragments):
    assert_one_line_error(run_cli([*base_args, *extra], tmp_path), *fragments)


def test_missing_model(tmp_path, watermark_dir):
    r = run_cli(["--text", "hi", "--model", tmp_path / "nope", "--watermark-model", watermark_dir], tmp_path)
    assert_one_line_error(r, "model not found")


def test_corrupt_model(tmp_path, tiny_model_dir, watermark_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run_cli(["--text", "hi", "--model", bad, "--watermark-model", watermark_dir, "--device", "cpu"], tmp_path)
    assert_one_line_error(r, "model.safetensors")


def test_context_longer_than_the_model_takes(tmp_path, base_args):
    (tmp_path / "ctx.json").write_text(json.dumps([{"speaker": 1, "text": "word " * 60}]))
    r = run_cli(["--text", "hi", *base_args, "--context", "ctx.json", "--no-watermark"], tmp_path)
    assert_one_line_error(r, "does not fit", "shorten the context")


def test_context_audio_file_missing(tmp_path, base_args):
    (tmp_path / "ctx.json").write_text(json.dumps([{"speaker": 1, "text": "hi", "audio": "gone.wav"}]))
    r = run_cli(["--text", "hi", *base_args, "--context", "ctx.json"], tmp_path)
    assert_one_line_error(r, "audio file not found", "gone.wav")


def test_watermark_weights_unavailable(tmp_path, tiny_model_dir):
    r = run_cli(["--text", "hi", "--model", tiny_model_dir, "--device", "cpu"], tmp_path)
    assert_one_line_error(r, "watermark", "--no-watermark")
    assert not (tmp_path / "output.wav").exists()


def test_play_without_audio_device(tmp_path, base_args):
    # No PortAudio (or no output device) on CI machines: a clear error, not a crash.
    r = run_cli(["--text", "hi", *base_args, "--play", "--no-watermark"], tmp_path, env={"SD_ENABLE_ASIO": ""})
    if r.returncode == 0:  # a machine with a working (or null) output device plays fine
        return
    assert_one_line_error(r, "cannot play audio")


def test_mimi_unavailable_fails_before_generating(tmp_path, tiny_official_dir, watermark_dir):
    # no Mimi in the folder, offline with an empty Hub cache: the codec is loaded before the first
    # frame, so the run stops before the progress bar (and a long clip) starts
    r = run_cli(["--text", "hi", "--model", tiny_official_dir, "--watermark-model", watermark_dir, "--device", "cpu",
                 "--max-audio-length-ms", 90_000, "-o", "out.wav"], tmp_path)
    assert_one_line_error(r, "no Mimi codec weights found", "--mimi")
    assert "generating" not in r.stderr and "loaded" not in r.stderr, r.stderr
    assert not (tmp_path / "out.wav").exists()
