"""csm-generate-mlx end to end on a tiny model folder: the csm-generate parser with MLX fixed."""

import numpy as np
import pytest
import soundfile as sf

from csm.audio import MODEL_SAMPLE_RATE
from test_cli import assert_one_line_error, run_cli

pytest.importorskip("mlx.core")

MODULE = "csm.cli.generate_mlx"


@pytest.fixture
def base_args(tiny_model_dir, watermark_dir):
    return ["--model", tiny_model_dir, "--watermark-model", watermark_dir, "--device", "cpu", "--top-k", "1",
            "--max-audio-length-ms", 400]


def test_generates_a_watermarked_wav_on_mlx(tmp_path, base_args, cli_main):
    err = cli_main(["--text", "Hello there.", *base_args, "-o", "out.wav", "--seed", 3], module=MODULE)
    assert "on mlx/cpu" in err
    frames = int(err.split(" frames)")[0].rsplit("(", 1)[1])
    assert frames == 5 and "RTF" in err
    info = sf.info(str(tmp_path / "out.wav"))
    assert info.samplerate == MODEL_SAMPLE_RATE and info.channels == 1 and info.frames == frames * 1920
    audio, _ = sf.read(str(tmp_path / "out.wav"))
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_same_wav_as_csm_generate_without_watermark(tmp_path, base_args, cli_main):
    args = ["--text", "Hello there.", *base_args, "--no-watermark"]
    cli_main([*args, "-o", "mlx.wav"], module=MODULE)
    cli_main([*args, "-o", "torch.wav", "--backend", "torch"])
    ours, _ = sf.read(str(tmp_path / "mlx.wav"), dtype="float32")
    theirs, _ = sf.read(str(tmp_path / "torch.wav"), dtype="float32")
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-3


def test_backend_flag_is_fixed_and_quantize_is_checked(tmp_path, base_args):
    r = run_cli(["--text", "Hi.", *base_args, "--backend", "torch"], tmp_path, module=MODULE)
    assert_one_line_error(r, "--backend")
    r = run_cli(["--text", "Hi.", *base_args, "--quantize", "3"], tmp_path, module=MODULE)
    assert_one_line_error(r, "--quantize")
    # the tiny model's widths (48) are no multiple of MLX's group sizes: one clear line
    r = run_cli(["--text", "Hi.", *base_args, "--quantize", "4", "-o", "q.wav"], tmp_path, module=MODULE)
    assert_one_line_error(r, "group size")
    r = run_cli(["--help"], tmp_path, module=MODULE)
    assert r.returncode == 0 and "--quantize" in r.stdout and "--backend" not in r.stdout


def test_stream_flag_gives_the_whole_clip_samples_on_mlx(tmp_path, base_args, cli_main):
    args = ["--text", "Hello there.", *base_args, "--no-watermark", "--seed", 5]
    err = cli_main([*args, "--stream", "--first-chunk-frames", 1, "--chunk-frames", 3, "-o", "streamed.wav"],
                   module=MODULE)
    assert "on mlx/cpu" in err and "first audio after" in err
    cli_main([*args, "-o", "whole.wav"], module=MODULE)
    streamed, _ = sf.read(str(tmp_path / "streamed.wav"), dtype="float32")
    whole, _ = sf.read(str(tmp_path / "whole.wav"), dtype="float32")
    assert streamed.shape == whole.shape == (5 * 1920,)
    assert np.abs(streamed - whole).max() <= 1 / 32768  # 16-bit WAV: at most one step apart


def test_torch_only_compile_mode_is_refused_on_mlx(tmp_path, base_args):
    r = run_cli(["--text", "Hello.", *base_args, "--compile", "max-autotune", "-o", "x.wav"], tmp_path, module=MODULE)
    assert_one_line_error(r, "compile mode 'max-autotune' is a torch option")
