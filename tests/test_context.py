"""Conversation context with audio: Mimi round trip into prompt frames (each context turn is its
text frames, then its audio frames, then one all-zero end-of-audio frame)."""

import numpy as np
import pytest

import csm
from csm.audio import MODEL_SAMPLE_RATE

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return csm.load(str(tiny_model_dir), device="cpu", dtype="float32")


def _voice(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * MODEL_SAMPLE_RATE)) / MODEL_SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


def test_codec_loads_lazily(tiny_model_dir):
    g = csm.load(str(tiny_model_dir), device="cpu", dtype="float32")
    g.generate_codes("no audio needed", topk=1, max_audio_length_ms=160)
    assert not g._backend.codec_loaded  # text-only generation never touched Mimi


def test_context_frames_follow_the_spec(gen):
    audio = _voice(0.5)
    codes = gen.codec.encode(audio)
    assert codes.shape == (7, 32)  # 12000 samples -> 6.25 frames, padded to 7

    ctx = [csm.Segment(speaker=1, text="hi", audio=audio)]
    prompt = gen.prompt("hello", speaker=0, context=ctx)
    n_ctx_text = len(gen.tokenizer.encode_turn("hi", 1))
    n_new_text = len(gen.tokenizer.encode_turn("hello", 0))
    assert len(prompt) == n_ctx_text + len(codes) + 1 + n_new_text

    audio_rows = slice(n_ctx_text, n_ctx_text + len(codes))
    np.testing.assert_array_equal(prompt.tokens[audio_rows, :32], codes)
    assert prompt.mask[audio_rows, :32].all() and not prompt.mask[audio_rows, 32].any()
    eos = n_ctx_text + len(codes)  # the trailing end-of-audio frame: all zero, audio columns active
    assert not prompt.tokens[eos].any()
    assert prompt.mask[eos, :32].all() and not prompt.mask[eos, 32]
    assert prompt.mask[-n_new_text:, 32].all() and not prompt.mask[-n_new_text:, :32].any()


def test_context_audio_changes_the_generation(gen):
    plain = gen.generate_codes("hello", topk=1, max_audio_length_ms=400)
    ctx = [csm.Segment(speaker=1, text="hi", audio=_voice(0.5))]
    with_ctx = gen.generate_codes("hello", context=ctx, topk=1, max_audio_length_ms=400)
    again = gen.generate_codes("hello", context=ctx, topk=1, max_audio_length_ms=400)
    assert with_ctx.shape == (5, 32) and not np.array_equal(plain, with_ctx)
    np.testing.assert_array_equal(with_ctx, again)


def test_decode_length_matches_frames(gen):
    codes = gen.generate_codes("hello", topk=1, max_audio_length_ms=240)
    audio = gen.decode(codes)
    assert audio.dtype == np.float32 and audio.shape == (len(codes) * 1920,)
    assert len(gen.decode(np.zeros((0, 32), dtype=np.int64))) == 0


def test_context_too_long_is_a_clear_error(gen):
    with pytest.raises(csm.CsmError, match="does not fit the model's 256 positions"):
        gen.generate_codes("word " * 60, topk=1, max_audio_length_ms=10_000)


def test_generate_watermarks(gen, watermark_dir, monkeypatch):
    g = csm.load(str(gen._backend.model_dir), device="cpu", dtype="float32", watermark_model=str(watermark_dir))
    calls = []
    from csm.watermark import PUBLIC_KEY, Watermarker

    original = Watermarker.embed

    def spy(self, audio, sample_rate, key=PUBLIC_KEY):
        calls.append(tuple(key))
        return original(self, audio, sample_rate, key)

    monkeypatch.setattr(Watermarker, "embed", spy)
    marked = g.generate("hello", topk=1, max_audio_length_ms=240, seed=0)
    plain = g.decode(g.generate_codes("hello", topk=1, max_audio_length_ms=240))
    assert calls == [PUBLIC_KEY] and marked.shape == plain.shape and not np.array_equal(marked, plain)
    g.generate("hello", topk=1, max_audio_length_ms=240, watermark_key=(1, 2, 3, 4, 5))
    assert calls[-1] == (1, 2, 3, 4, 5)


def test_decode_rejects_spare_ids(gen):
    codes = np.zeros((3, 32), dtype=np.int64)
    codes[1, 4] = 2049
    with pytest.raises(csm.CsmError, match="frame 1, codebook 4 holds code 2049"):
        gen.decode(codes)
