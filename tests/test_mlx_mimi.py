"""Mimi on MLX (moshi_mlx) against Mimi on torch (moshi): the same weights, from kyutai's file and
from a transformers checkpoint's `codec_model.*`, give the same codes and (nearly) the same audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csm.errors import CheckpointError
from csm_torch import mimi as torch_mimi
from fakes.mimi import make_transformers_codec_state, save_kyutai_mimi_file, write_transformers_checkpoint

pytest.importorskip("moshi_mlx")
from csm_mlx import mimi as mlx_mimi  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """1.1 s of 24 kHz audio (not a whole number of frames): a tone plus noise."""
    rng = np.random.default_rng(0)
    t = np.arange(26_500) / 24_000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def kyutai_file(tmp_path_factory) -> Path:
    return save_kyutai_mimi_file(tmp_path_factory.mktemp("kyutai_mlx") / torch_mimi.MIMI_FILE, seed=3)


def assert_same_codec(torch_codec, mlx_codec, audio):
    codes = torch_codec.encode(audio)
    mlx_codes = mlx_codec.encode(audio)
    assert codes.shape == mlx_codes.shape == (14, 32) and mlx_codes.dtype == np.int64
    assert len(np.unique(codes)) > 32  # real codes, not a constant
    np.testing.assert_array_equal(mlx_codes, codes)
    reference = torch_codec.decode(codes)
    decoded = mlx_codec.decode(codes)
    assert decoded.shape == reference.shape == (14 * 1920,) and decoded.dtype == np.float32
    diff = np.abs(decoded - reference).max()
    assert diff <= 1e-3, diff
    return diff


def test_kyutai_file_gives_torch_codes_and_audio(kyutai_file, audio):
    diff = assert_same_codec(torch_mimi.load_mimi(mimi=kyutai_file), mlx_mimi.load_mimi(mimi=kyutai_file), audio)
    print(f"kyutai file: codes equal, decoded audio max |diff| {diff:.2e}")


def test_transformers_codec_gives_torch_codes_and_audio(tmp_path, audio):
    config, state = make_transformers_codec_state(seed=4)
    model_dir = write_transformers_checkpoint(tmp_path / "tf", config, state)
    diff = assert_same_codec(torch_mimi.load_mimi(model_dir=model_dir), mlx_mimi.load_mimi(model_dir=model_dir), audio)
    print(f"transformers codec_model.*: codes equal, decoded audio max |diff| {diff:.2e}")


def test_stream_decode_equals_batch_decode(kyutai_file, audio):
    codec = mlx_mimi.load_mimi(mimi=kyutai_file)
    # 9 frames, not the clip's 14: MLX's Mimi takes ~0.6 s a frame on the CPU, and blocks of 1, 2
    # and 6 frames cross the same block boundaries
    codes = codec.encode(audio[: 9 * 1920])
    batch = codec.decode(codes)
    chunks, start = [], 0
    with codec.streaming_decoder() as dec:
        for size in (1, 2, 6):
            piece = dec.decode(codes[start : start + size])
            assert piece.shape == (size * 1920,) and piece.dtype == np.float32
            chunks.append(piece)
            start += size
    assert start == len(codes)
    diff = np.abs(np.concatenate(chunks) - batch).max()
    print(f"MLX Mimi: streamed vs batch decode max |diff| {diff:.1e} (max |audio| {np.abs(batch).max():.2f})")
    assert diff <= 1e-5, diff
    with codec.streaming_decoder() as dec:  # a new stream starts from a clean state
        np.testing.assert_allclose(dec.decode(codes[:3]), batch[: 3 * 1920], atol=1e-5, rtol=0)
    np.testing.assert_allclose(codec.decode(codes[:3]), batch[: 3 * 1920], atol=1e-5, rtol=0)


def test_streams_interleave_each_with_its_own_state(kyutai_file, audio):
    codec = mlx_mimi.load_mimi(mimi=kyutai_file)
    # MLX's Mimi runs its transformer a position at a time (and its convolutions slowly on the CPU):
    # keep it short, and encode only those 6 frames' audio
    codes = codec.encode(audio[: 6 * 1920])
    other = codes[::-1].copy()
    expected_a, expected_b = codec.decode(codes), codec.decode(other)
    pieces_a, pieces_b, start = [], [], 0
    with codec.streaming_decoder() as a, codec.streaming_decoder() as b:
        for size in (2, 4):
            pieces_a.append(a.decode(codes[start : start + size]))
            pieces_b.append(b.decode(other[start : start + size]))
            start += size
    np.testing.assert_allclose(np.concatenate(pieces_a), expected_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate(pieces_b), expected_b, atol=1e-5, rtol=0)


def test_wrong_weights_name_the_problem(tmp_path):
    from safetensors.numpy import save_file

    bad = tmp_path / torch_mimi.MIMI_FILE
    save_file({"encoder.model.0.conv.conv.weight": np.zeros((3, 3), dtype=np.float32)}, str(bad))
    with pytest.raises(CheckpointError, match="do not fit kyutai's Mimi"):
        mlx_mimi.load_mimi(mimi=bad)
