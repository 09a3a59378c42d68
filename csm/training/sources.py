"""The readers of fine-tuning data: every input format becomes one list of `ClipSource`s.

A clip source is what one recording (or one cut of a long recording) is before any audio is read:
its id, transcript, speaker label, conversation, and a function that reads its samples. Reading
the audio is left to the preparation (`csm.training.data`), one clip at a time, so an hour of
recordings is never in memory at once.

Formats (`open_source` detects which from what it is given):
- a folder of recordings and a folder of `<same name>.txt` transcripts (or one folder holding both);
- an LJSpeech-style `metadata.csv` (`id|text` or `id|text|normalized_text`, audio in `wavs/<id>.wav`);
- a JSONL manifest: one object per line with `audio`, `text`, `speaker` or `speaker_id`, and
  optionally `conversation`, `start`/`end` (seconds), `train` (false: context only) and `id`;
- a Hugging Face `datasets` dataset (a `save_to_disk` folder or a Hub name);
- named formats, never guessed (`data_format`): "switchboard", the Switchboard-1 corpus with its
  MS-State transcripts (`csm.training.switchboard`).

What cannot become a clip (a line that is not JSON, a recording without a transcript) is rejected
here with a reason; a whole input without recordings or without transcripts is a CsmError.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csm.errors import CsmError

# Suffixes of the audio files the folder readers pick up: what libsndfile (soundfile) decodes.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64")
TRANSCRIPT_SUFFIX = ".txt"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
LJSPEECH_FILE = "metadata.csv"
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write: a folder holding one is a dataset.
HF_DISK_MARKERS = ("dataset_dict.json", "state.json")
# Input formats named by `data_format`; "auto" tells the formats above apart by what they hold.
DATA_FORMATS = ("auto", "switchboard")

# Reads a clip's samples: (samples [N] or [N, channels], sample rate). `max_seconds` lets a file
# reader refuse a recording from its header, before decoding an hour of audio to find it too long.
AudioLoader = Callable[[float], tuple[np.ndarray, int]]


@dataclass
class ClipSource:
    id: str  # stable across runs: it seeds the split, so adding a clip never moves another
    label: str  # what a rejection names: a file path, "metadata.csv line 3", "dataset row 5"
    text: str
    load: AudioLoader
    speaker: Any = None  # as the input spells it (an int, "3", or a name); None: the default speaker
    conversation: str | None = None  # turns with one conversation id form one conversation, in order
    train: bool = True  # False: this turn is only ever context
    cut: tuple[float | None, float | None] | None = None  # (start, end) seconds, when given


@dataclass
class Source:
    """What was read: a description for the manifest, the clips, and what was rejected already."""

    description: dict[str, Any]
    clips: list[ClipSource] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    speaker_names: dict[str, int] = field(default_factory=dict)  # label -> id, for non-numeric labels

    def reject(self, label: str, reason: str) -> None:
        self.rejected.append({"file": label, "reason": reason})


class ClipRejected(CsmError):
    """One clip cannot be used; the message is the reason recorded in the manifest."""


def too_long_reason(seconds: float, max_seconds: float, cut: bool) -> str:
    if cut:
        return (f"the cut is {seconds:.1f} s long, more than max_clip_seconds ({max_seconds:g} s): "
                "give shorter start/end times")
    return (f"{seconds:.1f} s long, more than max_clip_seconds ({max_seconds:g} s): split it, or give "
            "start/end times in a JSONL manifest")


# --- reading audio ---


def file_loader(path: Path, start: float | None = None, end: float | None = None,
                channel: int | None = None) -> AudioLoader:
    """A loader reading `path` (only the frames between `start` and `end` seconds, when given;
    only `channel`, counted from 0, when given: a two-channel telephone call holds one speaker a
    channel, which a mixdown would put on top of each other)."""

    def load(max_seconds: float) -> tuple[np.ndarray, int]:
        import soundfile as sf

        if not path.is_file():
            raise ClipRejected(f"audio file not found: {path}")
        try:
            with sf.SoundFile(str(path)) as f:
                rate, total = f.samplerate, f.frames
                if total == 0:
                    raise ClipRejected("the audio file holds no samples")
                if channel is not None and channel >= f.channels:
                    raise ClipRejected(f"the recording has {f.channels} channel(s), so no channel {channel + 1}")
                first = 0 if start is None else round(start * rate)
                last = total if end is None else round(end * rate)
                if first >= total or last > total + 1:  # +1: `end` rounded up to the next sample
                    raise ClipRejected(f"the cut {cut_text(start, end)} s goes past the end of the recording "
                                       f"({total / rate:.2f} s)")
                last = min(last, total)
                seconds = (last - first) / rate
                if seconds > max_seconds:
                    raise ClipRejected(too_long_reason(seconds, max_seconds, cut=start is not None or end is not None))
                if first:
                    f.seek(first)
                data = f.read(last - first, dtype="float32", always_2d=True)
                if channel is not None:
                    data = data[:, channel:channel + 1]
        except ClipRejected:
            raise
        except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
            raise ClipRejected(f"cannot read audio ({_first_line(exc)})") from None
        return data, rate

    return load


def array_loader(array: Any, rate: Any) -> AudioLoader:
    """A loader over samples already in memory (a Hugging Face row's decoded audio)."""

    def load(max_seconds: float) -> tuple[np.ndarray, int]:
        try:
            samples, sample_rate = np.asarray(array, dtype=np.float32), int(rate)
        except (TypeError, ValueError) as exc:
            raise ClipRejected(f"the audio is not an array of samples with a sample rate ({exc})") from None
        if sample_rate <= 0:
            raise ClipRejected(f"sampling_rate {rate!r} is not a positive number")
        # datasets keeps multi-channel audio as [channels, samples]; csm.audio wants [samples, channels]
        if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
            samples = samples.T
        return samples, sample_rate

    return load


def bytes_loader(data: bytes) -> AudioLoader:
    """A loader over an encoded file held in memory (datasets' undecoded Audio value)."""

    def load(max_seconds: float) -> tuple[np.ndarray, int]:
        import soundfile as sf

        try:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:
            raise ClipRejected(f"cannot read audio ({_first_line(exc)})") from None
        return samples, rate

    return load


def cut_text(start: float | None, end: float | None) -> str:
    """"1.5-3" for a cut from 1.5 s to 3 s; "1.5-" when it runs to the end of the recording."""
    return f"{start or 0:g}-{'' if end is None else f'{end:g}'}"


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# --- which reader ---


def open_source(data: str | Path | None, audio_dir: str | Path | None = None, transcript_dir: str | Path | None = None,
                *, text_column: str = "text", audio_column: str = "audio", speaker_column: str | None = None,
                hf_split: str = "train", data_format: str = "auto") -> Source:
    """The clips of whatever was given: `data` (a folder, metadata.csv, a .jsonl manifest or a
    dataset) or `audio_dir` with `transcript_dir` (default: transcripts beside the audio).
    `data_format` "switchboard": `data` (or `audio_dir`) is the LDC97S62 folder, `transcript_dir`
    the MS-State transcripts' (default: the same folder)."""
    if data_format not in DATA_FORMATS:
        raise CsmError(f"unknown data format {data_format!r}; choose from {', '.join(DATA_FORMATS)}")
    if data_format == "switchboard":
        from csm.training.switchboard import read_switchboard

        if data is not None and audio_dir is not None:
            raise CsmError("give the Switchboard folder once: as data (--input-dir) or as audio_dir, not both")
        folder = data if data is not None else audio_dir
        if folder is None:
            raise CsmError("the switchboard format needs the corpus folder: pass data (--input-dir) with the "
                           "LDC97S62 recordings")
        return read_switchboard(folder, transcript_dir)
    if data is not None and (audio_dir is not None or transcript_dir is not None):
        raise CsmError("give either data or audio_dir (with transcript_dir), not both")
    if data is None:
        if audio_dir is None:
            if transcript_dir is not None:
                raise CsmError("transcript_dir needs audio_dir: pass the folder of recordings too")
            raise CsmError("no training data given: pass data (a folder, metadata.csv, a .jsonl manifest or a "
                           "dataset) or audio_dir and transcript_dir")
        audio_dir = _existing_dir(audio_dir, "audio folder")
        transcripts = _existing_dir(transcript_dir, "transcript folder") if transcript_dir is not None else audio_dir
        return read_folders(audio_dir, transcripts)
    path = Path(data).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_DISK_MARKERS):
            return read_hf_dataset(str(path), text_column, audio_column, speaker_column, hf_split)
        if (path / LJSPEECH_FILE).is_file():
            return read_ljspeech(path / LJSPEECH_FILE)
        return read_folders(path, path)
    if path.is_file():
        if path.suffix.lower() in JSONL_SUFFIXES:
            return read_jsonl(path)
        if path.suffix.lower() == ".csv":
            return read_ljspeech(path)
        raise CsmError(f"cannot tell what {path} holds: give a folder of audio and .txt files, an LJSpeech "
                       "metadata.csv, a .jsonl manifest, or a Hugging Face dataset")
    name = str(data)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/")):
        return read_hf_dataset(name, text_column, audio_column, speaker_column, hf_split)
    raise CsmError(f"training data not found: {data} is neither a file, a folder nor a Hugging Face dataset name")


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CsmError(f"{what} not found: {path}")
    return path


def clean_text(text: str) -> str:
    """One line, single spaces: transcripts wrap lines and end with newlines."""
    return " ".join(text.split())


# --- folders of recordings and transcripts ---


def read_folders(audio_dir: Path, transcript_dir: Path) -> Source:
    """Every recording under `audio_dir` (subfolders included) with the `.txt` of the same
    relative path under `transcript_dir`. The id is that relative path without its suffix."""
    recordings = sorted(p for p in audio_dir.rglob("*")
                        if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(audio_dir).parts))
    if not recordings:
        raise CsmError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {audio_dir}")
    source = Source({"kind": "folder", "audio_dir": str(audio_dir.resolve()),
                     "transcript_dir": str(transcript_dir.resolve())})
    found_any = False
    seen: set[str] = set()
    for audio in recordings:
        relative = audio.relative_to(audio_dir).with_suffix("")
        clip_id = relative.as_posix()
        transcript = transcript_dir / relative.with_suffix(TRANSCRIPT_SUFFIX)
        if clip_id in seen:
            source.reject(str(audio), f"another recording is also named {clip_id} (one transcript cannot serve both)")
            continue
        seen.add(clip_id)
        if not transcript.is_file():
            source.reject(str(audio), f"no transcript: expected {transcript}")
            continue
        found_any = True
        try:
            text = transcript.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            source.reject(str(audio), f"cannot read the transcript {transcript} as UTF-8 text ({exc})")
            continue
        source.clips.append(ClipSource(clip_id, str(audio), text, file_loader(audio)))
    if not found_any:
        raise CsmError(f"no transcripts in {transcript_dir}: each recording needs a .txt file of the same name "
                       f"(e.g. {recordings[0].stem}{TRANSCRIPT_SUFFIX})")
    return source


def _text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CsmError(f"cannot read {path} as UTF-8 text ({exc})") from None


# --- LJSpeech ---


def read_ljspeech(csv_path: Path) -> Source:
    """`id|text` or `id|text|normalized_text` lines (the normalized text wins when present);
    the audio is `wavs/<id>.wav` next to the file, or `<id>.wav`."""
    root = csv_path.parent
    source = Source({"kind": "ljspeech", "path": str(csv_path.resolve())})
    lines = _text_lines(csv_path)
    rows = 0
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label = f"{csv_path.name} line {number}"
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip():
            source.reject(label, "expected id|text or id|text|normalized_text")
            continue
        rows += 1
        clip_id = parts[0].strip()
        text = parts[2] if len(parts) >= 3 and parts[2].strip() else parts[1]
        name = clip_id if Path(clip_id).suffix.lower() in AUDIO_SUFFIXES else f"{clip_id}.wav"
        audio = next((p for p in (root / "wavs" / name, root / name) if p.is_file()), None)
        if clip_id in seen:
            source.reject(label, f"id {clip_id} appears twice")
        elif audio is None:
            source.reject(label, f"no audio: expected wavs/{name} or {name} next to {csv_path.name}")
        else:
            seen.add(clip_id)
            source.clips.append(ClipSource(clip_id, str(audio), text, file_loader(audio)))
    if rows == 0:
        raise CsmError(f"no transcripts in {csv_path}: expected id|text lines")
    if not source.clips:
        raise CsmError(f"no audio for the lines of {csv_path}: expected wavs/<id>.wav or <id>.wav in {root}")
    return source


# --- JSONL manifests ---


def read_jsonl(path: Path) -> Source:
    """One object per line: `audio` (relative to the manifest), `text`, `speaker` or `speaker_id`,
    and optionally `conversation`, `start`/`end` seconds, `train` and `id`. Other keys are ignored."""
    root = path.parent
    source = Source({"kind": "jsonl", "path": str(path.resolve())})
    lines = _text_lines(path)
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label = f"{path.name} line {number}"
        try:
            clip = _jsonl_clip(line, root)
        except ClipRejected as exc:
            source.reject(label, str(exc))
            continue
        if clip.id in seen:
            source.reject(label, f"id {clip.id} appears twice (give each line a unique `id`)")
            continue
        seen.add(clip.id)
        clip.label = f"{label} ({clip.label})"
        source.clips.append(clip)
    if not source.clips:
        if not source.rejected:
            raise CsmError(f"{path} is empty: expected one JSON object per line with audio and text")
        raise CsmError(f"no usable line in {path}: " + "; ".join(
            f"{r['file']}: {r['reason']}" for r in source.rejected[:3]))
    return source


def _jsonl_clip(line: str, root: Path) -> ClipSource:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ClipRejected(f"not valid JSON ({exc})") from None
    if not isinstance(row, dict):
        raise ClipRejected("expected a JSON object")
    audio, text = row.get("audio"), row.get("text")
    if not isinstance(audio, str) or not audio:
        raise ClipRejected("no `audio` (the path of the recording, relative to the manifest)")
    if not isinstance(text, str):
        raise ClipRejected("no `text` (the transcript)")
    # Both spellings are read: reading only one would silently train every speaker as the default.
    speaker = row.get("speaker", row.get("speaker_id"))
    if "speaker" in row and "speaker_id" in row and row["speaker"] != row["speaker_id"]:
        raise ClipRejected(f"speaker {row['speaker']!r} and speaker_id {row['speaker_id']!r} disagree")
    start, end = _seconds(row, "start"), _seconds(row, "end")
    if start is not None and end is not None and end <= start:
        raise ClipRejected(f"end ({end:g} s) is not after start ({start:g} s)")
    train = row.get("train", True)
    if not isinstance(train, bool):
        raise ClipRejected(f"`train` must be true or false, got {train!r}")
    conversation = row.get("conversation")
    if conversation is not None and not isinstance(conversation, (str, int)):
        raise ClipRejected(f"`conversation` must be a string or a number, got {conversation!r}")
    file = root / audio
    cut = (start, end) if start is not None or end is not None else None
    clip_id = row.get("id")
    if clip_id is None:  # the recording (and cut, and conversation): stable when lines are added
        clip_id = audio if cut is None else f"{audio}@{cut_text(start, end)}"
        clip_id = clip_id if conversation is None else f"{conversation}/{clip_id}"
    return ClipSource(str(clip_id), audio, text, file_loader(file, start, end), speaker=speaker,
                      conversation=None if conversation is None else str(conversation), train=train, cut=cut)


def _seconds(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ClipRejected(f"`{key}` must be a number of seconds, 0 or more, got {value!r}")
    return float(value)


# --- Hugging Face datasets ---


def read_hf_dataset(name: str, text_column: str, audio_column: str, speaker_column: str | None,
                    split: str) -> Source:
    """A `save_to_disk` folder or a Hub dataset name. Audio values may be {"array",
    "sampling_rate"} dicts, datasets' Audio values (read undecoded, by soundfile) or paths."""
    try:
        import datasets
    except ImportError:
        raise CsmError("reading a Hugging Face dataset needs the datasets package: "
                       "pip install 'csm-speech[train]'") from None
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            dataset = datasets.load_from_disk(str(local))
        else:
            dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types: missing files, network, bad names
        raise CsmError(f"cannot load the dataset {name} ({type(exc).__name__}: {_first_line(exc)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise CsmError(f"the dataset {name} has no split {split!r}; its splits: {', '.join(dataset)}")
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise CsmError(f"{name} is a streaming or unknown kind of dataset ({type(dataset).__name__})")
    columns = dataset.column_names
    named = ((text_column, "text_column"), (audio_column, "audio_column"), (speaker_column, "speaker_column"))
    for column, flag in named:
        if column is not None and column not in columns:
            raise CsmError(f"the dataset {name} has no column {column!r} (its columns: {', '.join(columns)}); "
                           f"name the right one with {flag}")
    if isinstance(dataset.features.get(audio_column), datasets.Audio):
        # Decoding needs optional packages (torchcodec); soundfile reads the undecoded bytes here.
        dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    source = Source({"kind": "huggingface", "name": str(local.resolve()) if local.is_dir() else name, "split": split})
    if len(dataset) == 0:
        raise CsmError(f"the dataset {name} has no rows")
    texts = list(dataset[text_column])
    speakers = list(dataset[speaker_column]) if speaker_column else [None] * len(texts)
    ids = list(dataset["id"]) if "id" in columns and "id" not in (text_column, audio_column) else None
    audio_rows = dataset.select_columns([audio_column])
    root = local if local.is_dir() else Path.cwd()
    seen: set[str] = set()
    for row, (text, speaker) in enumerate(zip(texts, speakers, strict=True)):
        label = f"dataset row {row}"
        clip_id = str(ids[row]) if ids is not None else f"row-{row}"
        if clip_id in seen:
            source.reject(label, f"id {clip_id} appears twice")
            continue
        seen.add(clip_id)
        if not isinstance(text, str):
            source.reject(label, f"the {text_column!r} value is not a text ({type(text).__name__})")
            continue
        loader = _hf_row_loader(audio_rows, row, audio_column, root)
        source.clips.append(ClipSource(clip_id, label, text, loader, speaker=speaker))
    return source


def _hf_row_loader(rows, index: int, column: str, root: Path) -> AudioLoader:
    """Reads row `index`'s audio when the clip is prepared (not while listing the rows)."""

    def load(max_seconds: float) -> tuple[np.ndarray, int]:
        value = rows[index][column]
        if isinstance(value, str):
            return file_loader(root / value)(max_seconds)
        if isinstance(value, dict):
            if value.get("array") is not None:
                return array_loader(value["array"], value.get("sampling_rate"))(max_seconds)
            if value.get("bytes"):
                return bytes_loader(value["bytes"])(max_seconds)
            if value.get("path"):
                return file_loader(root / value["path"])(max_seconds)
        raise ClipRejected(f"the {column!r} value is not audio: expected a path, or a dict with array and "
                           f"sampling_rate (got {type(value).__name__})")

    return load


# --- speakers ---


def assign_speaker_ids(source: Source, default: int) -> list[tuple[ClipSource, int]]:
    """Each clip with its integer speaker id. Labels that are integers (or integer strings) are
    the ids; other labels (names such as "p225") get the ids after the largest integer one, in
    sorted order, recorded in `source.speaker_names`. A clip without a label is `default`."""
    numeric: set[int] = set()
    names: set[str] = set()
    parsed: list[tuple[ClipSource, int | str | None]] = []
    for clip in source.clips:
        label = clip.speaker
        if label is None:
            parsed.append((clip, None))
        elif isinstance(label, bool) or isinstance(label, float) and not label.is_integer():
            source.reject(clip.label, f"speaker {label!r} is not a speaker id (an integer 0 or more, or a name)")
        elif isinstance(label, (int, float)) or isinstance(label, str) and label.strip().lstrip("-").isdigit():
            value = int(label)
            if value < 0:
                source.reject(clip.label, f"speaker {label!r} is negative: speaker ids are 0 or more")
                continue
            numeric.add(value)
            parsed.append((clip, value))
        else:
            names.add(str(label))
            parsed.append((clip, str(label)))
    first_free = max([default, *numeric]) + 1
    source.speaker_names = {name: first_free + i for i, name in enumerate(sorted(names))}
    out = []
    for clip, label in parsed:
        if label is None:
            out.append((clip, default))
        elif isinstance(label, int):
            out.append((clip, label))
        else:
            out.append((clip, source.speaker_names[label]))
    return out
