"""Switchboard-1 (LDC97S62) with MS-State transcripts (csm.training.switchboard, `prepare --format switchboard`).

A synthetic corpus in the real file formats, written here: two-channel 8 kHz mu-law NIST SPHERE
files (the 1024-byte ASCII header written by hand, the samples mu-law coded by libsndfile) laid
out as LDC ships them, and MS-State transcripts in their own tree, as they are downloaded. Each
channel holds a tone of its own pitch, so a turn cut from the wrong channel gives other codes.
The corpus is prepared once for the module (a few seconds of audio), with the tiny model and a
random Mimi on the CPU.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from csm.errors import CsmError
from csm.training import data as data_module
from csm.training.data import PreparedDataset, prepare_dataset
from csm.training.switchboard import map_words

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RATE = 8000
PITCH = {"A": 220.0, "B": 330.0}

TRANSCRIPTS = {
    ("2001", "A"): """\
sw2001A-ms98-a-0001 0.000000 0.500000 [silence]
sw2001A-ms98-a-0002 0.500000 1.600000 hi [laughter] um th[e]- -[th]at <b_aside> [laughter-yes] <e_aside>
sw2001A-ms98-a-0003 1.600000 2.000000 [noise]
sw2001A-ms98-a-0004 2.700000 3.600000 {yuppiedom} them_1 [it'n/isn't]
sw2001A-ms98-a-0005 3.600000 4.000000 [silence]
""",
    ("2001", "B"): """\
sw2001B-ms98-a-0001 0.000000 1.200000 [silence]
sw2001B-ms98-a-0002 1.200000 2.600000 uh-huh [vocalized-noise] right
sw2001B-ms98-a-0003 2.600000 3.000000 [vocalized-noise] [noise]
sw2001B-ms98-a-0004 3.000000 4.000000 [laughter]
sw2001B-ms98-a-0005 4.0 four
""",
    ("2002", "A"): "sw2002A-ms98-a-0001 0.200000 1.000000 okay\n",  # and no transcript of channel B
    ("2003", "A"): "sw2003A-ms98-a-0001 0.200000 1.000000 nobody recorded me\n",  # no sw02003.sph
    ("2004", "A"): "sw2004A-ms98-a-0001 0.200000 1.000000 my audio is broken\n",
    ("2005", "A"): "sw2005A-ms98-a-0001 0.200000 1.000000 my audio is compressed\n",
}


def tones(seconds: float) -> np.ndarray:
    """[samples, 2]: channel A and channel B, each its own voiced-looking tone."""
    t = np.arange(round(seconds * RATE)) / RATE
    channels = [sum(np.sin(2 * np.pi * PITCH[side] * k * t) / k for k in (1, 2, 3)) * (0.6 + 0.4 * np.sin(6 * t))
                for side in "AB"]
    return (0.3 * np.stack(channels, axis=1) / 1.9).astype(np.float32)


def write_sphere(path: Path, samples: np.ndarray, coding: str = "ulaw") -> Path:
    """A NIST SPHERE file as LDC97S62 ships them: the ASCII header padded to 1024 bytes, then
    interleaved 8-bit mu-law samples."""
    import soundfile as sf

    body = io.BytesIO()
    sf.write(body, samples, RATE, format="RAW", subtype="ULAW")
    header = (f"NIST_1A\n   1024\ndatabase_id -s7 swb1_d1\nchannel_count -i {samples.shape[1]}\n"
              f"sample_count -i {len(samples)}\nsample_rate -i {RATE}\nsample_n_bytes -i 1\n"
              f"sample_byte_format -s1 1\nsample_coding -s{len(coding)} {coding}\nend_head\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode().ljust(1024, b" ") + body.getvalue())
    return path


def write_corpus(root: Path) -> SimpleNamespace:
    audio = root / "LDC97S62"
    write_sphere(audio / "swb1_d1" / "data" / "sw02001.sph", tones(4.0))
    write_sphere(audio / "swb1_d1" / "data" / "sw02002.sph", tones(2.0))
    (audio / "swb1_d2" / "data").mkdir(parents=True)
    (audio / "swb1_d2" / "data" / "sw02004.sph").write_bytes(b"NIST_1A\n   1024\nchannel_count -i 2\n")
    write_sphere(audio / "swb1_d2" / "data" / "sw02005.sph", tones(2.0), coding="ulaw,embedded-shorten-v2.00")
    texts = root / "swb_ms98_transcriptions"
    for (number, side), lines in TRANSCRIPTS.items():
        path = texts / number[:2] / number / f"sw{number}{side}-ms98-a-trans.text"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(lines)
    return SimpleNamespace(audio=audio, transcripts=texts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("switchboard"))


@pytest.fixture(scope="module")
def codec(tiny_model_dir, torch_single_thread):
    return data_module.load_codec("torch", tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def prepared(corpus, codec, tiny_model_dir, tmp_path_factory):
    """The corpus prepared once, sph2pipe out of reach (an empty PATH)."""
    empty = tmp_path_factory.mktemp("no_tools")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "load_codec", lambda *args, **kwargs: codec)
        patch.setenv("PATH", str(empty))
        return prepare_dataset(corpus.audio, tmp_path_factory.mktemp("out") / "switchboard",
                               transcript_dir=corpus.transcripts, data_format="switchboard",
                               model_path=tiny_model_dir, validation_split=0.5, seed=2)


def conversation(dataset: PreparedDataset, name: str) -> dict:
    (stored,) = [s for s in dataset.stored_examples(None) if s["id"] == f"conversation:{name}"]
    return stored


# --- the markers ---


@pytest.mark.parametrize(("words", "text"), [
    ("[silence]", ""),
    ("[noise] [vocalized-noise]", ""),
    ("[laughter]", "[laughter]"),
    ("oh [laughter] okay", "oh [laughter] okay"),
    ("[laughter-yes] [laughter-ab[solute]-]", "yes ab-"),
    ("th[e]- -[th]at ab[solute] [bu-]because", "th- -at ab- -because"),
    ("[it'n/isn't] [lem[guini]-/linguini]", "it'n lem-"),
    ("{yuppiedom} them_1", "yuppiedom them"),
    ("<b_aside> hang on honey <e_aside> where was i", "hang on honey where was i"),
    ("uh-huh um-hum i'd", "uh-huh um-hum i'd"),
])
def test_markers_become_text(words, text):
    assert map_words(words.split()) == text


# --- the corpus ---


def test_turns_of_both_channels_in_time_order(prepared):
    stored = conversation(prepared, "sw2001")
    turns = stored["turns"]
    assert [t["id"] for t in turns] == ["sw2001A-ms98-a-0002", "sw2001B-ms98-a-0002", "sw2001A-ms98-a-0004",
                                         "sw2001B-ms98-a-0004"]
    assert [t["speaker"] for t in turns] == [0, 1, 0, 1]
    assert [t["text"] for t in turns] == ["hi [laughter] um th- -at yes", "uh-huh right", "yuppiedom them it'n",
                                          "[laughter]"]
    # each turn is its own cut: 1.1 s, 1.4 s, 0.9 s and 1.0 s at 24 kHz, 1920 samples a frame
    assert [t["frames"] for t in turns] == [14, 18, 12, 13]
    assert [t["text"] for t in conversation(prepared, "sw2002")["turns"]] == ["okay"]
    # a conversation is one example per turn, its earlier turns (both speakers) as context
    examples = {e.id: e for e in prepared.examples(None)}
    last = examples["conversation:sw2001/3"]
    assert [t.speaker for t in last.turns] == [0, 1, 0, 1] and [t.train for t in last.turns] == [False] * 3 + [True]


def test_each_turn_is_cut_from_its_own_channel_and_resampled(prepared, corpus, codec):
    import soundfile as sf

    from csm.audio import resample

    decoded, rate = sf.read(str(corpus.audio / "swb1_d1" / "data" / "sw02001.sph"), dtype="float32")
    assert rate == RATE and decoded.shape == (4 * RATE, 2)
    examples = {e.id: e for e in prepared.examples(None)}
    for index, channel, start, end in ((0, 0, 0.5, 1.6), (1, 1, 1.2, 2.6)):
        cut = decoded[round(start * RATE):round(end * RATE), channel]
        expected = codec.encode(resample(cut, RATE, 24_000))
        np.testing.assert_array_equal(examples[f"conversation:sw2001/{index}"].turns[-1].codes, expected)


def test_metadata_and_dropped_utterances(prepared, corpus):
    manifest = prepared.manifest
    source = manifest["source"]
    assert source["kind"] == "switchboard" and source["speakers"] == {"A": 0, "B": 1}
    assert source["transcript_dir"] == str(corpus.transcripts.resolve())
    assert sorted(source["conversations"]) == ["sw2001", "sw2002"]
    sw2001 = source["conversations"]["sw2001"]
    assert sw2001["audio"] == "swb1_d1/data/sw02001.sph" and sw2001["seconds"] == 4.0
    assert sw2001["channels"]["A"] == {"speaker": 0, "transcript": "sw2001A-ms98-a-trans.text", "utterances": 5,
                                       "turns": 2, "dropped": {"silence": 2, "noise": 1}}
    assert sw2001["channels"]["B"]["dropped"] == {"silence": 1, "noise": 1}
    assert source["dropped_utterances"] == {"silence": 3, "noise": 2}
    assert manifest["clips"] == 5 and manifest["speakers"] == {"0": 3, "1": 2}


def test_bad_files_are_rejections_not_fatal(prepared):
    reasons = {Path(r["file"]).name: r["reason"] for r in prepared.manifest["rejected"]}
    assert "malformed" in reasons["sw2001B-ms98-a-trans.text line 5"]
    assert "transcript without audio" in reasons["sw2003A-ms98-a-trans.text"]
    assert "SPHERE" in reasons["sw02004.sph"]
    assert "shorten" in reasons["sw02005.sph"] and "sph2pipe" in reasons["sw02005.sph"]
    assert "no transcript for channel B" in reasons["sw2002B"]
    assert len(reasons) == 5


def test_splits_keep_conversations_whole(prepared):
    stored = prepared.stored_examples(None)
    assert sorted(s["id"] for s in stored) == ["conversation:sw2001", "conversation:sw2002"]
    assert sorted(s["split"] for s in stored) == ["train", "validation"]
    for split in ("train", "validation"):
        (only,) = prepared.stored_examples(split)
        assert {e.id.rsplit("/", 1)[0] for e in prepared.examples(split)} == {only["id"]}


# --- errors and the command ---


def test_missing_pieces_are_errors(tmp_path, tiny_model_dir, corpus, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CsmError, match="no Switchboard recordings"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", data_format="switchboard", model_path=tiny_model_dir)
    with pytest.raises(CsmError, match="--transcript-dir"):
        prepare_dataset(corpus.audio, tmp_path / "out", data_format="switchboard", model_path=tiny_model_dir)
    with pytest.raises(CsmError, match="unknown data format"):
        prepare_dataset(corpus.audio, tmp_path / "out", data_format="fisher", model_path=tiny_model_dir)
    # nothing usable: the error names the folder and the first reasons
    write_sphere(tmp_path / "compressed" / "sw02005.sph", tones(1.0), coding="ulaw,embedded-shorten-v2.00")
    (tmp_path / "compressed" / "sw2005A-ms98-a-trans.text").write_text("sw2005A-ms98-a-0001 0.2 0.8 hello\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CsmError, match=r"no usable clips in .*compressed: .*sw02005\.sph: shorten.*sph2pipe"):
        prepare_dataset(tmp_path / "compressed", tmp_path / "out", data_format="switchboard",
                        model_path=tiny_model_dir)


def test_cli_format_switchboard(tmp_path, tiny_model_dir, corpus, monkeypatch):
    from test_training_data import _run_cli

    result = _run_cli(["--format", "switchboard", "--input-dir", corpus.audio, "--output-dir", tmp_path / "out",
                       "--model-path", tiny_model_dir])
    stderr = result.stderr
    assert result.exit_code == 2 and stderr.startswith("error: ") and "--transcript-dir" in stderr
    assert stderr.count("\n") == 1
    result = _run_cli(["--format", "fisher", "--input-dir", corpus.audio, "--output-dir", tmp_path / "out"])
    assert result.exit_code == 2 and "fisher" in result.stderr


FAKE_SPH2PIPE = """#!{python}
# Stands in for LDC's sph2pipe (`sph2pipe -f wav -p -c 1|2 -t bsec:esec infile`, WAV on stdout),
# for a test file whose header says shorten but whose samples are plain mu-law.
import io, sys
import soundfile as sf
args = sys.argv[1:]
assert args[:3] == ["-f", "wav", "-p"] and args[3] == "-c" and args[5] == "-t", args
channel, (start, end), path = int(args[4]) - 1, map(float, args[6].split(":")), args[7]
with open(path, "rb") as f:
    f.seek(1024)
    samples, _ = sf.read(io.BytesIO(f.read()), format="RAW", subtype="ULAW", samplerate=8000, channels=2)
out = io.BytesIO()
sf.write(out, samples[round(start * 8000):round(end * 8000), channel], 8000, format="WAV", subtype="PCM_16")
sys.stdout.buffer.write(out.getvalue())
"""


def test_shorten_files_are_read_through_sph2pipe(tmp_path, tiny_model_dir, codec, monkeypatch):
    import sys

    import soundfile as sf

    from csm.audio import resample

    samples = tones(2.0)
    write_sphere(tmp_path / "swb" / "sw02005.sph", samples, coding="ulaw,embedded-shorten-v2.00")
    (tmp_path / "swb" / "sw2005B-ms98-a-trans.text").write_text("sw2005B-ms98-a-0001 0.25 1.25 compressed me\n")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "sph2pipe").write_text(FAKE_SPH2PIPE.format(python=sys.executable))
    (tools / "sph2pipe").chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setattr(data_module, "load_codec", lambda *args, **kwargs: codec)
    dataset = prepare_dataset(tmp_path / "swb", tmp_path / "out", data_format="switchboard",
                              model_path=tiny_model_dir, validation_split=0.0)
    assert dataset.manifest["rejected"] == [
        {"file": "sw2005A", "reason": "no transcript for channel A: expected sw2005A-ms98-a-trans.text; the "
                                      "conversation is kept without it"}]
    (example,) = dataset.examples(None)
    (turn,) = example.turns
    assert turn.speaker == 1 and turn.text == "compressed me"
    # channel B, 0.25-1.25 s, as the 16-bit PCM sph2pipe gives, at 24 kHz
    decoded, _ = sf.read(str(write_sphere(tmp_path / "plain.sph", samples)))
    pcm = io.BytesIO()
    sf.write(pcm, decoded[2000:10000, 1], RATE, format="WAV", subtype="PCM_16")
    expected = codec.encode(resample(sf.read(io.BytesIO(pcm.getvalue()), dtype="float32")[0], RATE, 24_000))
    np.testing.assert_array_equal(turn.codes, expected)
