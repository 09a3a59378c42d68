"""Long text: split at sentence ends into turns (csm.sentences), spoken one after another with the
previous turns as context (csm.longform.LongSpeech)."""

import numpy as np
import pytest

import csm
from csm.errors import CsmError
from csm.longform import LongSpeech
from csm.sentences import split_sentences, split_turns

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_sentences_end_at_end_marks_not_at_abbreviations():
    text = 'Dr. Smith went home. He said "Hi!" Then e.g. this one.\n\nNo. 5 is here... Really? Yes'
    assert split_sentences(text) == ["Dr. Smith went home.", 'He said "Hi!"', "Then e.g. this one.",
                                     "No. 5 is here...", "Really?", "Yes"]
    assert split_sentences("  \n ") == []


def test_turns_pack_whole_sentences_and_cut_only_an_overlong_one():
    text = ("One. Two is here. Three! A long sentence follows; it goes on, and on, and on for a while without "
            "an end mark anywhere at all, Supercalifragilisticexpialidociousness")
    turns = split_turns(text, max_chars=40)
    assert turns[:2] == ["One. Two is here. Three!", "A long sentence follows; it goes on,"]
    assert all(len(t) <= 40 for t in turns)
    assert " ".join(turns) == text  # nothing lost, nothing added
    assert split_turns("x" * 100, max_chars=30) == ["x" * 30] * 3 + ["x" * 10]
    with pytest.raises(CsmError, match="max_chars"):
        split_turns("Hi.", max_chars=0)


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return csm.load(tiny_model_dir, device="cpu", dtype="float32")


def test_each_turn_hears_the_previous_ones(gen):
    turns, args = ["Hello there.", "How are you?"], dict(topk=1, max_audio_length_ms=320)
    with gen.engine(max_batch_size=2) as engine:
        speech = LongSpeech(engine, turns, speaker=1, watermark=False, first_chunk_frames=4, chunk_frames=4, **args)
        audio = np.concatenate(list(speech))
    first = gen.generate_codes(turns[0], 1, **args)
    second = gen.generate_codes(turns[1], 1, context=[csm.Segment(1, turns[0], codes=first)], **args)
    expected = np.concatenate([gen.decode(first), gen.decode(second)])
    assert speech.frames == len(first) + len(second) and speech.finish_reason == "max_length"
    np.testing.assert_allclose(audio, expected, atol=1e-5, rtol=0)


def test_every_turn_is_checked_before_any_audio_and_cancel_stops(gen):
    with gen.engine(max_batch_size=1) as engine:
        with pytest.raises(CsmError, match="does not fit"):
            LongSpeech(engine, ["Fine.", "x" * 300], watermark=False, max_audio_length_ms=320)
        assert engine.waiting == 0 and engine.active == 0  # nothing was queued
        speech = LongSpeech(engine, ["One.", "Two."], watermark=False, max_audio_length_ms=320)
        speech.start()
        speech.cancel()
        assert list(speech) == [] and speech.finish_reason == "cancelled"
