"""Fine-tuning data preparation (csm.training.data, csm.training.sources, csm-finetune prepare).

Tiny clips (0.5-2 s) written at assorted rates and channel counts, the tiny model's tokenizer
(byte-level: one token per byte, 256 positions) and a random full-size Mimi on the CPU. Mimi is
loaded once for the module and handed to every preparation (`codec` fixture); the CLI test loads
it the real way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from csm.errors import CsmError
from csm.training import data as data_module
from csm.training.data import (
    PreparedDataset,
    StoredExample,
    assign_splits,
    is_prepared,
    normalize_loudness,
    prepare_dataset,
    probe_signal,
    resolve_training_data,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RATE = 24_000
FRAME = 1920


def frames_of(seconds: float) -> int:
    return math.ceil(round(seconds * RATE) / FRAME)


def tone(seconds: float, rate: int, channels: int = 1, amplitude: float = 0.3, freq: float = 220.0) -> np.ndarray:
    """A voiced-looking signal: a tone with a few harmonics and a slow tremolo."""
    t = np.arange(round(seconds * rate)) / rate
    mono = sum(np.sin(2 * np.pi * freq * k * t) / k for k in (1, 2, 3)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    mono = (amplitude * mono / np.max(np.abs(mono))).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def write_audio(path: Path, seconds: float, rate: int = 24_000, channels: int = 1, **kwargs) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, rate, channels, **kwargs), rate)
    return path


def write_pair(folder: Path, stem: str, text: str, seconds: float = 0.5, rate: int = 24_000, channels: int = 1,
               suffix: str = ".wav", **kwargs) -> Path:
    write_audio(folder / f"{stem}{suffix}", seconds, rate, channels, **kwargs)
    (folder / f"{stem}.txt").write_text(text)
    return folder / f"{stem}{suffix}"


@pytest.fixture(scope="module")
def shared_codec(tiny_model_dir, torch_single_thread):
    return data_module.load_codec("torch", tiny_model_dir, "cpu")


@pytest.fixture
def codec(monkeypatch, shared_codec):
    """Every preparation gets the module's Mimi; `codec.clips` counts the clips it encodes (the
    identity probe is not a clip)."""
    counter = SimpleNamespace(clips=0)
    encode = data_module.encode_clip

    def counting_encode(codec, samples):
        if len(samples) != len(probe_signal()):
            counter.clips += 1
        return encode(codec, samples)

    monkeypatch.setattr(data_module, "load_codec", lambda *args, **kwargs: shared_codec)
    monkeypatch.setattr(data_module, "encode_clip", counting_encode)
    return counter


@pytest.fixture
def prepare(tiny_model_dir, tmp_path, codec):
    """prepare_dataset with the tiny model, no validation split and a fresh output folder unless given."""
    count = iter(range(1000))

    def run(data=None, **kwargs):
        kwargs.setdefault("output_dir", tmp_path / f"prepared{next(count)}")
        kwargs.setdefault("model_path", tiny_model_dir)
        kwargs.setdefault("validation_split", 0.0)
        return prepare_dataset(data, **kwargs)

    return run


def by_id(examples):
    return {e.id: e for e in examples}


def reasons(dataset) -> dict[str, str]:
    return {Path(r["file"]).name: r["reason"] for r in dataset.manifest["rejected"]}


# --- each input format ---


def test_folder_of_pairs_resampled_to_24k_mono(prepare, tmp_path, shared_codec):
    folder = tmp_path / "voice"
    write_pair(folder, "a", "Hello there.\n", seconds=1.0, rate=16_000, channels=2)
    write_pair(folder, "b", "  Second   clip,\nwrapped. ", seconds=0.5, rate=44_100, suffix=".flac")
    write_pair(folder, "c", "Third.", seconds=0.8, rate=24_000, suffix=".ogg")
    write_audio(folder / "d.wav", 0.5)  # no transcript
    dataset = prepare(folder, speaker_id=3)
    examples = by_id(dataset.examples(None))
    assert sorted(examples) == ["a", "b", "c"]
    assert [t.text for t in examples["b"].turns] == ["Second clip, wrapped."]
    for name, seconds in (("a", 1.0), ("b", 0.5), ("c", 0.8)):
        (turn,) = examples[name].turns
        assert turn.speaker == 3 and turn.train
        assert turn.codes.shape == (frames_of(seconds), 32)  # the frame count follows the duration: resampled
        assert isinstance(turn.codes, np.memmap) and turn.codes.dtype == np.int16
    # the codes are Mimi's for the 24 kHz mono mixdown of the file
    from csm.audio import read_audio

    expected = shared_codec.encode(read_audio(folder / "a.wav"))
    np.testing.assert_array_equal(examples["a"].turns[0].codes, expected)
    assert "no transcript" in reasons(dataset)["d.wav"]
    manifest = dataset.manifest
    assert manifest["csm_dataset"] == 1 and manifest["clips"] == 3 and manifest["speakers"] == {"3": 3}
    assert manifest["sample_rate"] == 24_000 and manifest["source"]["kind"] == "folder"
    assert manifest["hours"] == pytest.approx(2.3 / 3600, rel=1e-3)


def test_audio_dir_and_transcript_dir_with_subfolders(prepare, tmp_path):
    audio, texts = tmp_path / "audio", tmp_path / "texts"
    write_audio(audio / "day1" / "x.wav", 0.5, rate=22_050)
    write_audio(audio / "y.wav", 0.6)
    (texts / "day1").mkdir(parents=True)
    (texts / "day1" / "x.txt").write_text("From a subfolder.")
    (texts / "y.txt").write_text("Top level.")
    calls = []
    dataset = prepare(audio_dir=audio, transcript_dir=texts, progress=lambda *call: calls.append(call))
    assert calls[0] == (0, 2, "clips") and calls[-1] == (2, 2, "clips")
    examples = by_id(dataset.examples(None))
    assert sorted(examples) == ["day1/x", "y"]
    assert examples["day1/x"].turns[0].text == "From a subfolder."
    assert len(examples["y"].turns[0].codes) == frames_of(0.6)


def test_ljspeech_metadata(prepare, tmp_path):
    root = tmp_path / "lj"
    write_audio(root / "wavs" / "LJ001.wav", 0.5, rate=22_050)
    write_audio(root / "LJ002.wav", 0.7, rate=22_050)
    (root / "metadata.csv").write_text(
        "LJ001|Dr. Smith paid $5.|Doctor Smith paid five dollars.\n"
        "LJ002|Plain text only\n"
        "LJ003|No audio for this one\n"
        "a line without the separator\n")
    dataset = prepare(root)
    examples = by_id(dataset.examples(None))
    assert examples["LJ001"].turns[0].text == "Doctor Smith paid five dollars."
    assert examples["LJ002"].turns[0].text == "Plain text only"
    assert len(examples["LJ002"].turns[0].codes) == frames_of(0.7)
    rejected = reasons(dataset)
    assert "wavs/LJ003.wav" in rejected["metadata.csv line 3"]
    assert "id|text" in rejected["metadata.csv line 4"]
    assert prepare(root / "metadata.csv").manifest["clips"] == 2  # the file itself works too


def test_jsonl_speakers_cuts_and_conversations(prepare, tmp_path):
    root = tmp_path / "talk"
    write_audio(root / "long.wav", 3.0, rate=16_000)
    write_audio(root / "solo.wav", 0.5)
    rows = [
        {"audio": "solo.wav", "text": "Alone.", "speaker": 2},
        {"audio": "long.wav", "text": "First turn.", "speaker_id": 0, "conversation": "c1", "start": 0.0, "end": 1.0},
        {"audio": "long.wav", "text": "Second turn.", "speaker": 1, "conversation": "c1", "start": 1.0, "end": 1.5},
        {"audio": "long.wav", "text": "Third turn.", "speaker_id": "0", "conversation": "c1", "start": 1.5},
        {"audio": "long.wav", "text": "Past the end.", "start": 2.5, "end": 4.0},
        {"audio": "long.wav", "text": "Disagreeing keys.", "speaker": 1, "speaker_id": 2},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    dataset = prepare(manifest)
    assert dataset.manifest["speakers"] == {"0": 2, "1": 1, "2": 1}  # speaker and speaker_id both read
    assert dataset.manifest["splits"]["train"] == 2  # the clip, and the conversation as one
    examples = by_id(dataset.examples(None))  # train_on="last": each turn trained last once
    assert sorted(examples) == ["conversation:c1/0", "conversation:c1/1", "conversation:c1/2", "solo.wav"]
    third = examples["conversation:c1/2"]
    assert [(t.speaker, t.text, t.train) for t in third.turns] == [
        (0, "First turn.", False), (1, "Second turn.", False), (0, "Third turn.", True)]
    assert [len(t.codes) for t in third.turns] == [frames_of(1.0), frames_of(0.5), frames_of(1.5)]  # cuts
    assert examples["solo.wav"].turns[0].speaker == 2
    rejected = reasons(dataset)
    assert "past the end" in rejected["manifest.jsonl line 5 (long.wav)"]
    assert "disagree" in rejected["manifest.jsonl line 6"]
    assert "not valid JSON" in rejected["manifest.jsonl line 7"]
    # train_on="speaker": only speaker 0's turns are trained, with their context
    speaker0 = by_id(dataset.examples(None, train_on="speaker", speaker_id=0))
    assert sorted(speaker0) == ["conversation:c1/0", "conversation:c1/2"]
    assert [t.train for t in speaker0["conversation:c1/2"].turns] == [False, False, True]
    # train_on="all": one example, every turn trained
    (whole,) = [e for e in dataset.examples(None, train_on="all") if e.id.startswith("conversation")]
    assert [t.train for t in whole.turns] == [True, True, True]


def test_jsonl_cut_longer_than_the_limit(prepare, tmp_path):
    write_audio(tmp_path / "long.wav", 2.0)
    rows = [{"audio": "long.wav", "text": "ok", "start": 0.0, "end": 0.5},
            {"audio": "long.wav", "text": "too long", "start": 0.0, "end": 1.5}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = prepare(tmp_path / "m.jsonl", max_clip_seconds=1.0)
    assert dataset.manifest["clips"] == 1
    assert "give shorter start/end times" in reasons(dataset)["m.jsonl line 2 (long.wav)"]


def test_hugging_face_dataset_folder(prepare, tmp_path):
    datasets = pytest.importorskip("datasets")
    write_audio(tmp_path / "files" / "p.wav", 0.6, rate=16_000)
    arrays = datasets.Dataset.from_dict({
        "audio": [{"array": tone(0.5, 16_000).tolist(), "sampling_rate": 16_000},
                  {"array": tone(1.0, 8_000).tolist(), "sampling_rate": 8_000}],
        "sentence": ["From an array.", "Another array."],
        "who": ["p225", "p226"],
    })
    arrays.save_to_disk(str(tmp_path / "arrays"))
    dataset = prepare(tmp_path / "arrays", text_column="sentence", speaker_column="who")
    examples = by_id(dataset.examples(None))
    assert [examples["row-0"].turns[0].text, len(examples["row-1"].turns[0].codes)] == ["From an array.", 13]
    assert dataset.manifest["speaker_names"] == {"p225": 1, "p226": 2}  # after the default speaker 0
    assert {e.turns[0].speaker for e in examples.values()} == {1, 2}
    # paths, in a DatasetDict
    paths = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"audio": [str(tmp_path / "files" / "p.wav")], "text": ["From a path."]})})
    paths.save_to_disk(str(tmp_path / "paths"))
    (example,) = prepare(tmp_path / "paths").examples(None)
    assert len(example.turns[0].codes) == frames_of(0.6)
    with pytest.raises(CsmError, match="no column 'transcript'.*text_column"):
        prepare(tmp_path / "paths", text_column="transcript")
    with pytest.raises(CsmError, match="no split 'dev'"):
        prepare(tmp_path / "paths", hf_split="dev")


# --- the cache, the splits, loudness ---


def test_codes_are_cached_and_reused(prepare, tmp_path, codec):
    folder = tmp_path / "voice"
    for i in range(3):
        write_pair(folder, f"clip{i}", f"Clip number {i}.", seconds=0.5 + 0.1 * i, freq=200 + 50 * i)
    out = tmp_path / "out"
    first = prepare(folder, output_dir=out, validation_split=0.3)
    assert codec.clips == 3
    assert (out / "codes" / "shard-00000.npy").is_file()
    index = json.loads((out / "codes" / "index.json").read_text())
    assert sorted(v[2] for v in index.values()) == [frames_of(0.5), frames_of(0.6), frames_of(0.7)]
    again = prepare(folder, output_dir=out, validation_split=0.3)
    assert codec.clips == 3  # nothing encoded again
    assert again.manifest == first.manifest
    write_pair(folder, "clip3", "A new one.", seconds=0.9)
    grown = prepare(folder, output_dir=out, validation_split=0.3)
    assert codec.clips == 4  # only the new clip
    assert sorted(p.name for p in (out / "codes").glob("*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    splits = {s["id"]: s["split"] for s in first.stored_examples()}
    assert {s["id"]: s["split"] for s in grown.stored_examples() if s["id"] in splits} == splits
    for example in grown.examples(None):
        assert len(example.turns[0].codes) > 0
    # a different codec identity means different keys: everything is encoded anew
    data_module_identity = data_module.codec_identity
    try:
        data_module.codec_identity = lambda codec: "another codec"
        prepare(folder, output_dir=out, validation_split=0.3)
    finally:
        data_module.codec_identity = data_module_identity
    assert codec.clips == 8


def _units(ids, conversation_turns=1):
    return [StoredExample(i, [object()] * conversation_turns) for i in ids]


def test_splits_are_deterministic_and_stable():
    units = _units([f"clip{i}" for i in range(200)])
    assign_splits(units, seed=7, validation=0.1, test=0.1)
    splits = {u.id: u.split for u in units}
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "validation", "test")}
    assert 120 < counts["train"] < 190 and counts["validation"] > 5 and counts["test"] > 5
    again = _units([f"clip{i}" for i in range(200)][::-1] + ["new1", "new2"])  # another order, more clips
    assign_splits(again, seed=7, validation=0.1, test=0.1)
    assert {u.id: u.split for u in again if u.id in splits} == splits
    other_seed = _units([f"clip{i}" for i in range(200)])
    assign_splits(other_seed, seed=8, validation=0.1, test=0.1)
    assert {u.id: u.split for u in other_seed} != splits
    # two examples and a validation share: validation gets one
    two = _units(["a", "b"])
    assign_splits(two, seed=0, validation=0.01, test=0.0)
    assert sorted(u.split for u in two) == ["train", "validation"]
    # two examples that both draw validation: training keeps one (the seeds where that happens)
    for seed in range(20):
        both = _units(["a", "b"])
        assign_splits(both, seed=seed, validation=0.9, test=0.0)
        assert sorted(u.split for u in both) == ["train", "validation"]
    one = _units(["a"])
    assign_splits(one, seed=0, validation=0.5, test=0.0)
    assert one[0].split in ("train", "validation")


def test_a_conversation_stays_in_one_split(prepare, tmp_path):
    write_audio(tmp_path / "talk.wav", 2.0)
    rows = [{"audio": "talk.wav", "text": f"turn {k}", "speaker": k % 2, "conversation": f"c{c}",
             "start": 0.5 * k, "end": 0.5 * k + 0.5} for c in range(3) for k in range(4)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = prepare(tmp_path / "m.jsonl", validation_split=0.3)
    stored = dataset.stored_examples()
    assert len(stored) == 3 and all(len(s["turns"]) == 4 for s in stored)
    assert dataset.manifest["splits"]["validation"] >= 1
    for split in ("train", "validation"):
        conversations = {e.id.split("/")[0] for e in dataset.examples(split)}
        assert conversations == {s["id"] for s in dataset.stored_examples(split)}
    assert len(dataset.examples("train")) + len(dataset.examples("validation")) == 12


def test_loudness_normalisation():
    import pyloudnorm

    meter = pyloudnorm.Meter(RATE)
    quiet = tone(1.0, RATE, amplitude=0.01)
    assert meter.integrated_loudness(quiet.astype(np.float64)) < -40
    louder = normalize_loudness(quiet)
    assert meter.integrated_loudness(louder.astype(np.float64)) == pytest.approx(-23.0, abs=0.1)
    short = normalize_loudness(tone(0.3, RATE, amplitude=0.01))  # shorter than the meter's 0.4 s block
    assert np.max(np.abs(short)) > 0.05
    assert np.max(np.abs(normalize_loudness(tone(1.0, RATE, amplitude=0.9), target_lufs=0.0))) <= 1.0


def test_normalised_clips_get_other_codes(prepare, tmp_path):
    write_pair(tmp_path / "v", "quiet", "Quiet.", seconds=0.5, amplitude=0.01)
    plain = prepare(tmp_path / "v")
    normalised = prepare(tmp_path / "v", normalize_loudness=True)
    (a,), (b,) = plain.stored_examples(), normalised.stored_examples()
    assert a["turns"][0]["key"] != b["turns"][0]["key"]
    assert normalised.manifest["settings"]["normalize_loudness"] is True


# --- bad input ---


def test_rejected_clips_say_why(prepare, tmp_path):
    folder = tmp_path / "mixed"
    write_pair(folder, "good", "Fine.", seconds=0.5)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav file")
    (folder / "broken.txt").write_text("Broken.")
    write_pair(folder, "empty", "   \n", seconds=0.5)
    write_pair(folder, "silent", "Silence.", seconds=0.5, amplitude=1e-5)
    write_pair(folder, "short", "Short.", seconds=0.1)
    write_pair(folder, "long", "Long.", seconds=2.0)
    write_pair(folder, "wordy", "word " * 60, seconds=0.5)  # 300 bytes of text: past the tiny model's 256
    dataset = prepare(folder, max_clip_seconds=1.5)
    assert [e.id for e in dataset.examples(None)] == ["good"]
    why = reasons(dataset)
    assert "cannot read audio" in why["broken.wav"]
    assert why["empty.wav"] == "empty transcript"
    assert why["silent.wav"].startswith("silent")
    assert why["short.wav"].startswith("too short")
    assert "split it, or give start/end times in a JSONL manifest" in why["long.wav"]
    assert "more than the model's 256" in why["wordy.wav"]
    assert "6 rejected" in dataset.summary() and "good" not in dataset.summary()


def test_nothing_usable_lists_the_reasons(prepare, tmp_path):
    write_pair(tmp_path / "bad", "a", "", seconds=0.5)
    write_pair(tmp_path / "bad", "b", "B.", seconds=0.1)
    with pytest.raises(CsmError, match=r"no usable clips in .*a.wav: empty transcript; .*b.wav: too short"):
        prepare(tmp_path / "bad", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_audio_or_transcripts_name_the_folder(prepare, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CsmError, match=f"no audio files .* in {tmp_path / 'empty'}"):
        prepare(tmp_path / "empty")
    write_audio(tmp_path / "untranscribed" / "a.wav", 0.5)
    with pytest.raises(CsmError, match=f"no transcripts in {tmp_path / 'untranscribed'}.*a.txt"):
        prepare(tmp_path / "untranscribed")
    with pytest.raises(CsmError, match="training data not found"):
        prepare(tmp_path / "nowhere")
    with pytest.raises(CsmError, match="either data or audio_dir"):
        prepare(tmp_path / "empty", audio_dir=tmp_path / "empty")
    with pytest.raises(CsmError, match="no training data given"):
        prepare()
    with pytest.raises(CsmError, match="validation_split"):
        prepare(tmp_path / "empty", validation_split=1.0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CsmError, match="is empty"):
        prepare(tmp_path / "empty.jsonl")


def test_output_folder_of_someone_else_needs_force(prepare, tmp_path):
    write_pair(tmp_path / "v", "a", "A.", seconds=0.5)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(CsmError, match="not empty and is not a prepared dataset.*--force"):
        prepare(tmp_path / "v", output_dir=taken)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    prepare(tmp_path / "v", output_dir=taken, force=True)
    assert (taken / "notes.txt").read_text() == "mine" and is_prepared(taken)


def test_prepared_folder_round_trip(prepare, tmp_path):
    write_pair(tmp_path / "v", "a", "A.", seconds=0.5)
    write_pair(tmp_path / "v", "b", "B.", seconds=0.6)
    made = prepare(tmp_path / "v", output_dir=tmp_path / "out", validation_split=0.5)
    opened = PreparedDataset.open(tmp_path / "out")
    assert opened.manifest == made.manifest and opened.root == tmp_path / "out"
    assert {len(opened.examples("train")), len(opened.examples("validation"))} == {1}
    assert prepare(tmp_path / "out", output_dir=None).manifest == made.manifest  # returned as it is
    summary = opened.summary()
    assert "2 clips" in summary and "1 train, 1 validation, 0 test" in summary
    with pytest.raises(CsmError, match="unknown split"):
        opened.examples("dev")
    with pytest.raises(CsmError, match="not a prepared dataset"):
        PreparedDataset.open(tmp_path / "v")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({**manifest, "csm_dataset": 2}))
    with pytest.raises(CsmError, match="newer csm"):
        PreparedDataset.open(tmp_path / "out")


def test_resolve_training_data(tiny_model_dir, tmp_path, codec):
    from csm.training.config import TrainConfig

    write_pair(tmp_path / "v", "a", "A.", seconds=0.5)
    write_pair(tmp_path / "v", "b", "B.", seconds=0.6)
    config = TrainConfig(model_path=str(tiny_model_dir), audio_dir=str(tmp_path / "v"), speaker_id=4,
                         validation_split=0.5)
    prepared = resolve_training_data(config, tmp_path / "work")
    assert prepared.root == tmp_path / "work" and prepared.manifest["speakers"] == {"4": 2}
    assert codec.clips == 2
    assert resolve_training_data(config, tmp_path / "work").manifest == prepared.manifest
    assert codec.clips == 2  # the work folder's cache
    from_prepared = resolve_training_data(config.replace(data=str(tmp_path / "work"), audio_dir=None), tmp_path / "x")
    assert from_prepared.root == tmp_path / "work" and not (tmp_path / "x").exists()


# --- the command ---


def _run_cli(args):
    """The command as its entry point runs it (one-line errors), output captured."""
    from click.testing import CliRunner

    from csm.cli.finetune_data import main

    with CliRunner().isolation() as (stdout, stderr, *_):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        return SimpleNamespace(exit_code=code, stdout=stdout.getvalue().decode(), stderr=stderr.getvalue().decode())


def test_cli_prepares_and_reports(tiny_model_dir, tmp_path):
    write_pair(tmp_path / "v", "a", "Hello.", seconds=0.5, rate=16_000)
    write_pair(tmp_path / "v", "b", "", seconds=0.5)
    result = _run_cli(["--data", tmp_path / "v", "--output-dir", tmp_path / "out", "--model-path", tiny_model_dir,
                       "--speaker-id", "2", "--validation-split", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "1 clips" in result.stdout and "1 rejected" in result.stdout and "empty transcript" in result.stdout
    assert PreparedDataset.open(tmp_path / "out").manifest["speakers"] == {"2": 1}


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    from csm.cli.common import EXIT_USAGE

    (tmp_path / "empty").mkdir()
    for args in (["--data", tmp_path / "empty"],
                 ["--data", tmp_path / "empty", "--validation-split", "2"]):
        result = _run_cli([*args, "--output-dir", tmp_path / "out", "--model-path", tiny_model_dir])
        assert result.exit_code == EXIT_USAGE
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr
    result = _run_cli(["--data", tmp_path / "empty"])
    assert result.exit_code == EXIT_USAGE and "--output-dir" in result.stderr
