"""The text template and the prompt frames: a turn's text is `[speaker]text` between
<|begin_of_text|> and <|end_of_text|>; a context segment is its text frames, then its audio frames
and one all-zero end-of-audio frame; the turn to speak comes last, as text frames only."""

import numpy as np
import pytest

from csm.errors import CsmError
from csm.prompt import Frames, Segment, audio_frames, build_prompt, text_frames
from csm.text import BOS, EOS, TextTokenizer, load_tokenizer
from fakes.csm_models import write_tokenizer

NUM_CODEBOOKS = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return TextTokenizer.from_file(write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_fake_tokenizer_adds_bos_itself_like_the_real_one(tokenizer):
    # otherwise the single-BOS test below would prove nothing
    assert tokenizer._tok.encode("hi").ids[0] == tokenizer.bos_id


def test_encode_turn_template(tokenizer):
    ids = tokenizer.encode_turn("hi", 3)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert bos == tokenizer._tok.token_to_id(BOS) and eos == tokenizer._tok.token_to_id(EOS) and bos != eos
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[-1] == eos and ids.count(eos) == 1
    assert tokenizer.decode(ids[1:-1]) == "[3]hi"  # no space after ']'
    assert tokenizer.decode(ids) == f"{BOS}[3]hi{EOS}"
    assert tokenizer.encode_turn("hi", 12)[1:-1] != ids[1:-1]


def test_load_tokenizer_from_model_folder(tmp_path):
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode_turn("ok", 0)[1:-1]) == "[0]ok"
    with pytest.raises(CsmError, match="tokenizer not found"):
        load_tokenizer(None, str(tmp_path / "missing.json"))


def _assert_text_frames(tokens, mask, ids):
    n = len(ids)
    assert tokens.shape == mask.shape == (n, NUM_CODEBOOKS + 1)
    np.testing.assert_array_equal(tokens[:, -1], ids)
    assert not tokens[:, :-1].any()
    assert mask[:, -1].all() and not mask[:, :-1].any()


def _assert_audio_frames(tokens, mask, codes):
    np.testing.assert_array_equal(tokens[:, :-1], codes)
    assert not tokens[:, -1].any()
    assert mask[:, :-1].all() and not mask[:, -1].any()


def test_prompt_with_audio_context(tokenizer):
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 2048, size=(5, NUM_CODEBOOKS))
    ctx = Segment(1, "first turn")
    prompt = build_prompt(tokenizer, "second turn", 2, [(ctx, codes)], NUM_CODEBOOKS)
    ctx_ids, new_ids = tokenizer.encode_turn("first turn", 1), tokenizer.encode_turn("second turn", 2)
    a, b = len(ctx_ids), len(ctx_ids) + 5
    assert len(prompt) == a + 5 + 1 + len(new_ids)
    assert prompt.tokens.dtype == np.int64 and prompt.mask.dtype == bool
    _assert_text_frames(prompt.tokens[:a], prompt.mask[:a], ctx_ids)
    _assert_audio_frames(prompt.tokens[a:b], prompt.mask[a:b], codes)
    # the all-zero end-of-audio frame, masked as audio
    assert not prompt.tokens[b].any()
    assert prompt.mask[b, :-1].all() and not prompt.mask[b, -1]
    _assert_text_frames(prompt.tokens[b + 1:], prompt.mask[b + 1:], new_ids)


def test_prompt_with_text_only_context(tokenizer):
    ctx = [(Segment(0, "no audio here"), None), (Segment(4, "nor here"), None)]
    prompt = build_prompt(tokenizer, "now speak", 0, ctx, NUM_CODEBOOKS)
    ids = [*tokenizer.encode_turn("no audio here", 0), *tokenizer.encode_turn("nor here", 4),
           *tokenizer.encode_turn("now speak", 0)]
    _assert_text_frames(prompt.tokens, prompt.mask, ids)


def test_prompt_without_context_is_the_turn_text(tokenizer):
    prompt = build_prompt(tokenizer, "just this", 7, [], NUM_CODEBOOKS)
    _assert_text_frames(prompt.tokens, prompt.mask, tokenizer.encode_turn("just this", 7))


def test_frame_helpers():
    t = text_frames([5, 6], NUM_CODEBOOKS)
    a = audio_frames(np.ones((2, NUM_CODEBOOKS)), NUM_CODEBOOKS)
    assert len(a) == 3 and not a.tokens[-1].any()
    both = Frames.concat([t, a])
    assert len(both) == 5 and both.tokens.shape == (5, 33)
    with pytest.raises(CsmError, match=r"\[frames, 32\]"):
        audio_frames(np.ones((2, 8)), NUM_CODEBOOKS)
    with pytest.raises(CsmError, match=r"\[frames, 32\]"):
        audio_frames(np.ones(32), NUM_CODEBOOKS)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_is_an_error(tokenizer, text):
    with pytest.raises(CsmError, match="empty"):
        build_prompt(tokenizer, text, 0, [], NUM_CODEBOOKS)


def test_stereo_audio_is_an_error():
    with pytest.raises(CsmError, match="mono"):
        Segment(0, "hi", audio=np.zeros((10, 2)))


def test_mono_audio_is_kept_as_float32():
    seg = Segment(0, "hi", audio=np.zeros(10, dtype=np.float64))
    assert seg.audio.dtype == np.float32 and seg.audio.shape == (10,)


@pytest.mark.parametrize("speaker", [-1, 1.5, "0", None])
def test_bad_speaker_is_an_error(speaker):
    with pytest.raises(CsmError, match="speaker"):
        Segment(speaker, "hi")


def test_numpy_integer_speaker_is_accepted():
    assert Segment(np.int64(2), "hi").speaker == 2


def test_audio_at_another_rate_is_resampled_to_24k():
    seg = Segment(speaker=0, text="hi", audio=np.zeros(16_000, dtype=np.float64), sample_rate=16_000)
    assert seg.audio.dtype == np.float32 and seg.audio.shape == (24_000,) and seg.sample_rate == 24_000
