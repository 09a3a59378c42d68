"""silentcipher watermarking: key parsing, weight resolution, embed/detect on random weights, CLI.

Random weights cannot decode anything, so detection with them is only checked to run and return
a key or None; CLI exit codes are pinned by monkeypatching `Watermarker.locate`. Detection audio
with the random network stays under ~0.84 s (less than one copy of the message: no decoding at
all), because from 21 STFT frames on, every decoder run costs seconds. The fast search is
compared with silentcipher's exhaustive `decode_wav(..., phase_shift_decoding=True)` through a
stand-in message decoder (`_ToneDecoder`) that reads a tone-coded watermark: silentcipher's own
framing, voting and search run unchanged around it, in milliseconds per alignment."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from csm.audio import read_audio, write_wav
from csm.errors import CsmError
from csm.watermark import (
    PUBLIC_KEY,
    WATERMARK_ENV,
    WATERMARK_SAMPLE_RATE,
    Detection,
    Watermarker,
    format_key,
    parse_key,
    resolve_watermark_dir,
)
from fakes.watermark import make_random_watermark_dir

RATE = 24_000


def _speech_like(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def wm_dir(tmp_path_factory):
    return make_random_watermark_dir(tmp_path_factory.mktemp("silentcipher"))


@pytest.fixture(scope="module")
def watermarker(wm_dir):
    return Watermarker.load(wm_dir)


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache and no $CSM_WATERMARK_MODEL."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(WATERMARK_ENV, raising=False)
    return home / "hub"


# --- keys ---------------------------------------------------------------------------------------


def test_parse_key():
    assert parse_key("212,211,146,56,201") == PUBLIC_KEY
    assert parse_key(" 1, 2 ,3,4 , 255 ") == (1, 2, 3, 4, 255)
    assert format_key(PUBLIC_KEY) == "212,211,146,56,201"


@pytest.mark.parametrize(
    "text", ["", "1,2,3,4", "1,2,3,4,5,6", "1,2,3,4,256", "1,2,-1,4,5", "a,b,c,d,e", "1,,3,4,5", "1;2;3;4;5"]
)
def test_parse_key_errors(text):
    with pytest.raises(CsmError, match="0..255"):
        parse_key(text)


# --- resolution ---------------------------------------------------------------------------------------


def test_missing_weights_error_names_the_fix(no_hub):
    with pytest.raises(CsmError) as info:
        resolve_watermark_dir(None)
    message = str(info.value)
    assert message.startswith("silentcipher watermark weights not found (")
    assert "huggingface-cli download sony/silentcipher" in message
    assert "--watermark-model DIR" in message and "CSM_WATERMARK_MODEL" in message
    assert "--no-watermark" in message


def test_resolution_order(tmp_path, no_hub, monkeypatch):
    explicit = make_random_watermark_dir(tmp_path / "explicit")
    from_env = make_random_watermark_dir(tmp_path / "env")
    # A Hub cache entry for sony/silentcipher, as snapshot_download leaves it.
    commit = "0" * 40
    repo = no_hub / "models--sony--silentcipher"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    hub = make_random_watermark_dir(repo / "snapshots" / commit, snapshot_layout=True)

    assert resolve_watermark_dir(None) == hub
    monkeypatch.setenv(WATERMARK_ENV, str(from_env))
    assert resolve_watermark_dir(None) == from_env
    assert resolve_watermark_dir(explicit) == explicit
    assert resolve_watermark_dir(str(explicit)) == explicit


def test_snapshot_root_accepted(tmp_path, no_hub, monkeypatch):
    folder = make_random_watermark_dir(tmp_path / "snap", snapshot_layout=True)
    assert resolve_watermark_dir(tmp_path / "snap") == folder
    monkeypatch.setenv(WATERMARK_ENV, str(tmp_path / "snap"))
    assert resolve_watermark_dir(None) == folder


def test_missing_ckpt_is_named(tmp_path, no_hub):
    folder = make_random_watermark_dir(tmp_path / "wm")
    (folder / "dec_m_0.ckpt").unlink()
    with pytest.raises(CsmError, match="missing dec_m_0.ckpt"):
        resolve_watermark_dir(folder)
    with pytest.raises(CsmError, match="missing dec_m_0.ckpt"):
        Watermarker.load(folder)
    (folder / "hparams.yaml").unlink()
    with pytest.raises(CsmError, match="hparams.yaml"):
        resolve_watermark_dir(folder)


def test_nonexistent_dir(tmp_path, no_hub, monkeypatch):
    with pytest.raises(CsmError, match="does not exist"):
        resolve_watermark_dir(tmp_path / "nope")
    monkeypatch.setenv(WATERMARK_ENV, str(tmp_path / "nope"))
    with pytest.raises(CsmError, match="CSM_WATERMARK_MODEL"):
        resolve_watermark_dir(None)


# --- embed / detect ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,seconds", [(24_000, 1.0), (16_000, 0.77)])
def test_embed_keeps_length_dtype_and_changes_audio(watermarker, rate, seconds):
    audio = _speech_like(seconds, rate)
    audio = np.concatenate([audio, audio[:7]])  # a length that does not divide anything
    marked = watermarker.embed(audio, rate)
    assert marked.dtype == np.float32 and marked.shape == audio.shape
    assert np.all(np.isfinite(marked))
    assert not np.array_equal(marked, audio)
    assert not np.shares_memory(marked, audio)


def test_embed_with_custom_key_and_bad_key(watermarker):
    audio = _speech_like(0.5)
    a = watermarker.embed(audio, RATE, key=(1, 2, 3, 4, 5))
    b = watermarker.embed(audio, RATE, key=PUBLIC_KEY)
    assert a.shape == audio.shape and not np.array_equal(a, b)
    with pytest.raises(CsmError):
        watermarker.embed(audio, RATE, key=(1, 2, 3))
    with pytest.raises(CsmError):
        watermarker.embed(audio, RATE, key=(1, 2, 3, 4, 256))
    with pytest.raises(CsmError, match="mono"):
        watermarker.embed(np.stack([audio, audio], axis=1), RATE)


def test_embed_silence_and_empty(watermarker):
    silence = np.zeros(RATE // 2, dtype=np.float32)
    out = watermarker.embed(silence, RATE)
    assert out.shape == silence.shape and out.dtype == np.float32 and not np.any(out)
    assert watermarker.embed(np.zeros(0, dtype=np.float32), RATE).shape == (0,)
    assert watermarker.detect(silence, RATE) is None


def test_detect_and_check_run(watermarker):
    audio = watermarker.embed(_speech_like(0.75), RATE)
    found = watermarker.detect(audio, RATE)
    assert found is None or (isinstance(found, tuple) and len(found) == 5)
    assert isinstance(watermarker.check(audio, RATE), bool)
    assert isinstance(watermarker.check(audio, RATE, key=(1, 2, 3, 4, 5)), bool)


def test_check_compares_decoded_key(watermarker, monkeypatch):
    monkeypatch.setattr(Watermarker, "detect", lambda self, audio, rate: PUBLIC_KEY)
    assert watermarker.check(np.ones(10, np.float32), RATE) is True
    assert watermarker.check(np.ones(10, np.float32), RATE, key=(1, 2, 3, 4, 5)) is False


# --- the fast search against silentcipher's exhaustive one ---------------------------------------------

SR = WATERMARK_SAMPLE_RATE
HOP = 2048
TONES = (700, 1300, 1900, 2500, 3100)  # Hz, one per symbol 0..4


class _ToneDecoder(torch.nn.Module):
    """A stand-in for silentcipher's message decoder: symbol c's score is the magnitude around
    TONES[c], so a clip holding one tone per 2048-sample frame decodes as a watermark, and only
    near the frame grid it was written on (half a hop off, two tones share each window)."""

    def forward(self, magnitude):
        bins = [round(f * 4096 / SR) for f in TONES]
        return torch.stack([magnitude[:, :, b - 4 : b + 5].sum(2) for b in bins], dim=2)


class _ScriptedDecoder(torch.nn.Module):
    """A stand-in that ignores the audio and decodes frame i as symbols[i % len(symbols)]."""

    def __init__(self, symbols):
        super().__init__()
        self.symbols = list(symbols)

    def forward(self, magnitude):
        frames = magnitude.shape[-1]
        chosen = torch.tensor([self.symbols[i % len(self.symbols)] for i in range(frames)])
        return torch.nn.functional.one_hot(chosen, 5).T.float()[None, None]


def _symbols_of(key):
    """The 21 symbols per copy that silentcipher writes for a 5-byte key: 2 bits each, + 1, then 0."""
    bits = "".join(f"{b:08b}" for b in key)
    return [int(bits[i : i + 2], 2) + 1 for i in range(0, len(bits), 2)] + [0]


def _tone_clip(key, seconds, seed=0):
    """A tone-coded "watermark" on silentcipher's frame grid: frame k (centered on sample k * HOP)
    holds the tone of the k-th symbol of the repeated message, under a little noise."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    cycle = _symbols_of(key)
    out = np.zeros(n)
    for k in range(n // HOP + 2):
        a, b = max(0, k * HOP - HOP // 2), min(n, k * HOP + HOP // 2)
        out[a:b] = 0.3 * np.sin(2 * np.pi * TONES[cycle[k % len(cycle)]] * t[a:b])
    return (out + 0.01 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def _exhaustive(watermarker, audio):
    """The verdict of silentcipher's full phase-shift search, read as `detect` used to read it."""
    result = watermarker.model.decode_wav(audio, SR, phase_shift_decoding=True)
    if not result.get("status") or not result.get("messages"):
        return None
    message = result["messages"][0]
    if len(message) != 5 or not all(0 <= int(v) <= 255 for v in message):
        return None
    return tuple(int(v) for v in message)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The search tests run hundreds of small STFTs; with the cores shared, one thread is far faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _noise(n, seed):
    return (0.01 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize(
    "edit,samples",
    [("prepend", 300), ("prepend", 1024), ("crop", 1024), ("crop", 1500), ("crop", 2047), ("noise", 0)],
)
def test_fast_search_matches_exhaustive_on_shifted_clips(watermarker, monkeypatch, edit, samples):
    monkeypatch.setattr(watermarker.model, "dec_m", [_ToneDecoder()])
    key = (1, 2, 3, 4, 5) if samples % 2 else PUBLIC_KEY
    clip = _tone_clip(key, 2.3)
    if edit == "prepend":
        clip = np.concatenate([_noise(samples, samples), clip])
    elif edit == "crop":
        clip = clip[samples:]
    else:
        clip = 10 * _noise(clip.shape[0], 1)
    found = watermarker.locate(clip, SR)
    assert found.key == _exhaustive(watermarker, clip)
    assert found.key == (None if edit == "noise" else key)
    assert found.shift is not None and 0 <= found.shift < HOP
    if (edit, samples) in {("prepend", 1024), ("crop", 1024)}:
        # Half a hop off the grid, two tones share every window: only a shifted decode reads it.
        assert found.shift != 0 and found.agreement == 1.0
    assert watermarker.detect(clip, SR) == found.key
    assert watermarker.check(clip, SR, key) is (found.key == key)


class _CountingToneDecoder(_ToneDecoder):
    """A `_ToneDecoder` that remembers the most frames it was given at once."""

    most_frames = 0

    def forward(self, magnitude):
        self.most_frames = max(self.most_frames, magnitude.shape[-1])
        return super().forward(magnitude)


def test_marked_long_clip_is_read_from_its_opening(watermarker, monkeypatch):
    decoder = _CountingToneDecoder()
    monkeypatch.setattr(watermarker.model, "dec_m", [decoder])
    clip = _tone_clip(PUBLIC_KEY, 6.5)  # six copies of the message
    assert watermarker.locate(clip, SR) == Detection(PUBLIC_KEY, 0, 1.0)
    assert decoder.most_frames < 70  # three copies (63 frames) and the margin for every alignment, not 140
    assert _exhaustive(watermarker, clip) == PUBLIC_KEY


def test_fast_search_too_short_for_every_shift(watermarker, monkeypatch):
    # 37,500 samples make 21 frames (one copy of the message) unshifted, but fewer after
    # silentcipher's largest shift (2040): its search then fails on the whole clip, and so does ours.
    monkeypatch.setattr(watermarker.model, "dec_m", [_ScriptedDecoder(_symbols_of(PUBLIC_KEY))])
    clip = 10 * _noise(39_000, 2)
    assert _exhaustive(watermarker, clip[:37_500]) is None
    assert watermarker.locate(clip[:37_500], SR) == Detection(None, None)
    assert _exhaustive(watermarker, clip) == PUBLIC_KEY
    assert watermarker.locate(clip, SR) == Detection(PUBLIC_KEY, 0, 1.0)


@pytest.mark.parametrize(
    "symbols",
    [
        _symbols_of(PUBLIC_KEY),  # a key
        _symbols_of((0, 255, 7, 128, 64))[5:] + _symbols_of((0, 255, 7, 128, 64))[:5],  # rotated
        [1] * 21,  # no end mark
        [0, 1] * 10 + [0],  # several end marks
        _symbols_of(PUBLIC_KEY) + [3] * 21,  # ties between copies: the smaller symbol wins
    ],
)
def test_key_reading_matches_silentcipher(watermarker, monkeypatch, symbols):
    monkeypatch.setattr(watermarker.model, "dec_m", [_ScriptedDecoder(symbols)])
    clip = _tone_clip(PUBLIC_KEY, 2.0)  # 45 frames: two copies of the message
    result = watermarker.model.decode_wav(clip, SR, phase_shift_decoding=False)
    expected = None
    if result.get("status") and result["messages"]:
        message = result["messages"][0]
        if len(message) == 5 and all(0 <= int(v) <= 255 for v in message):
            expected = tuple(int(v) for v in message)
    found = watermarker.locate(clip, SR)
    assert found.key == expected
    if symbols == _symbols_of(PUBLIC_KEY):
        assert expected == PUBLIC_KEY and found.shift == 0


# --- CLI -------------------------------------------------------------------------------------------------


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.wav"
    write_wav(path, _speech_like(0.5), RATE)
    return path


def _run(args):
    """The installed entry point (one-line errors included), with its output captured."""
    from types import SimpleNamespace

    from csm.cli.watermark import main

    with CliRunner().isolation() as streams:
        stdout, stderr = streams[0], streams[1]
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    return SimpleNamespace(exit_code=code, stdout=out, stderr=err, output=out + err)


def test_cli_check_found_and_not_found(clip, wm_dir, monkeypatch):
    monkeypatch.setattr(Watermarker, "locate", lambda self, audio, rate: Detection(PUBLIC_KEY, 0, 1.0))
    result = _run(["check", clip, "--watermark-model", wm_dir])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "watermark found (key 212,211,146,56,201) at shift 0 samples"

    result = _run(["check", clip, "--watermark-model", wm_dir, "--key", "1, 2, 3, 4, 5"])
    assert result.exit_code == 1
    assert result.stdout.strip() == (
        "no watermark with key 1,2,3,4,5 (found a watermark with key 212,211,146,56,201 at shift 0 samples)"
    )

    monkeypatch.setattr(Watermarker, "locate", lambda self, audio, rate: Detection((1, 2, 3, 4, 5), 1330, 0.9))
    result = _run(["check", clip, "--watermark-model", wm_dir, "--key", "1,2,3,4,5"])
    assert result.exit_code == 0
    assert result.stdout.strip() == "watermark found (key 1,2,3,4,5) at shift 1330 samples"

    for nothing in (Detection(None, 0, 0.5), Detection(None, None)):
        monkeypatch.setattr(Watermarker, "locate", lambda self, audio, rate, nothing=nothing: nothing)
        result = _run(["check", clip, "--watermark-model", wm_dir])
        assert result.exit_code == 1
        assert result.stdout.strip() == "no watermark with key 212,211,146,56,201"


def test_cli_check_real_run(clip, wm_dir):
    result = _run(["check", clip, "--watermark-model", wm_dir])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output  # any other exception would have propagated out of _run


def test_cli_errors_exit_2(tmp_path, clip, wm_dir, no_hub):
    result = _run(["check", tmp_path / "missing.wav", "--watermark-model", wm_dir])
    assert result.exit_code == 2 and result.stderr.startswith("error: audio file not found")
    result = _run(["check", clip, "--key", "1,2,3"])
    assert result.exit_code == 2 and result.stderr.startswith("error: watermark key")
    result = _run(["check", clip])  # no weights anywhere
    assert result.exit_code == 2
    assert result.stderr.startswith("error: silentcipher watermark weights not found")
    assert "Traceback" not in result.output


def test_cli_embed(tmp_path, clip, wm_dir):
    out = tmp_path / "out.wav"
    result = _run(["embed", clip, out, "--watermark-model", wm_dir])
    assert result.exit_code == 0, result.output
    written = read_audio(out, sample_rate=RATE)
    assert written.shape == read_audio(clip, sample_rate=RATE).shape

    before = out.read_bytes()
    result = _run(["embed", clip, out, "--watermark-model", wm_dir])
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == before

    result = _run(["embed", clip, out, "--watermark-model", wm_dir, "--force", "--key", "9,8,7,6,5"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != before
