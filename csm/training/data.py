"""Preparing fine-tuning data: recordings and transcripts in, Mimi codes and examples out, once.

`prepare_dataset` reads any input `csm.training.sources` knows, brings every clip to the model's
24 kHz mono float32 (optionally to -23 LUFS), refuses clips the model cannot learn from (with the
reason, in the manifest), encodes the rest with Mimi and writes a prepared folder:

    manifest.json    what is in it: source, codec identity, hours, speakers, splits, rejected clips
    examples.jsonl   one stored example per line: a single clip, or a whole conversation
    codes/index.json the codes cache: {key: [shard, offset, frames]}
    codes/shard-00000.npy  int16 [frames, 32] Mimi codes, read memory-mapped

Codes are the expensive part, so they are cached by content: a clip's key is the sha256 of its
24 kHz samples and of the codec's identity (the codes Mimi gives for a fixed probe signal, so a
different Mimi never reuses another's codes). Preparing again into the same folder (after adding
clips, or changing splits) encodes only what it has not encoded before.

`PreparedDataset` opens such a folder and turns its stored examples into `Example`s for a given
`train_on`: a conversation becomes one example per trained turn, that turn last, its
predecessors as untrained context.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from csm.audio import resample, to_mono
from csm.errors import CsmError, read_json
from csm.mimi_files import CODEBOOK_SIZE, FRAME_SIZE, NUM_CODEBOOKS, SAMPLE_RATE
from csm.training.examples import Example, Turn, turn_length
from csm.training.sources import (
    ClipRejected,
    ClipSource,
    Source,
    assign_speaker_ids,
    clean_text,
    open_source,
    too_long_reason,
)

DATASET_VERSION = 1
MANIFEST = "manifest.json"
EXAMPLES = "examples.jsonl"
CODES = "codes"
INDEX = "index.json"
SPLITS = ("train", "validation", "test")
TRAIN_ON = ("last", "speaker", "all")
MIN_SECONDS = 0.25  # shorter clips hold barely a word: 3 frames of audio
SILENCE_PEAK = 1e-3  # a clip whose loudest sample is below this (-60 dBFS) holds no speech
TARGET_LUFS = -23.0  # EBU R128's programme loudness
# Frames per codes shard: 64 Ki frames = 4 MiB, about 87 minutes of audio. Shards are written as
# they fill, so an interrupted preparation keeps what it has encoded.
SHARD_FRAMES = 1 << 16

Progress = Callable[[int, int, str], None]


# --- the public entry points ---


def prepare_dataset(data: str | Path | None = None, output_dir: str | Path | None = None, *,
                    audio_dir: str | Path | None = None, transcript_dir: str | Path | None = None,
                    model_path: str | Path = "unsloth/csm-1b", speaker_id: int = 0, text_column: str = "text",
                    audio_column: str = "audio", speaker_column: str | None = None, hf_split: str = "train",
                    validation_split: float = 0.1, test_split: float = 0.0, seed: int = 0,
                    normalize_loudness: bool = False, max_clip_seconds: float = 30.0, backend: str = "auto",
                    device: str | None = None, force: bool = False, data_format: str = "auto",
                    progress: Progress | None = None) -> PreparedDataset:
    """Prepare `data` (or `audio_dir` + `transcript_dir`) into `output_dir` and open it.

    `data` that is already a prepared folder is opened as it is. `output_dir` must be new, empty,
    or a prepared folder (whose cached codes are reused); any other folder needs `force`.
    `data_format` names an input the formats cannot tell apart by looking ("switchboard": the
    LDC97S62 corpus; see `csm.training.sources.open_source`).
    `progress(done, total, what)` is called as clips are done; nothing is printed."""
    if data is not None and is_prepared(Path(data)):
        return PreparedDataset.open(data)
    _check_settings(output_dir, speaker_id, validation_split, test_split, max_clip_seconds)
    output_dir = Path(output_dir).expanduser()
    check_output_dir(output_dir, force)
    source = open_source(data, audio_dir, transcript_dir, text_column=text_column, audio_column=audio_column,
                         speaker_column=speaker_column, hf_split=hf_split, data_format=data_format)
    model = _ModelParts(model_path, backend, device)
    store = CodeStore(output_dir / CODES)  # creates the folders when it writes the first codes
    settings = dict(normalize_loudness=normalize_loudness, max_clip_seconds=max_clip_seconds)
    turns = _prepare_turns(source, speaker_id, model, store, settings, progress)
    if not turns:
        raise CsmError(f"no usable clips in {_describe(source)}: {_first_reasons(source.rejected)}")
    units = _group_units(turns)
    assign_splits(units, seed, validation_split, test_split)
    manifest = {
        "csm_dataset": DATASET_VERSION,
        "source": source.description,
        "codec": model.identity,
        "sample_rate": SAMPLE_RATE,
        "max_positions": model.max_positions,
        "hours": round(sum(t.seconds for t in turns) / 3600, 6),
        "clips": len(turns),
        "speakers": _speaker_counts(turns),
        "speaker_names": source.speaker_names,
        "splits": {split: sum(u.split == split for u in units) for split in SPLITS},
        "settings": {"model_path": str(model_path), "speaker_id": speaker_id, "seed": seed,
                     "validation_split": validation_split, "test_split": test_split, **settings},
        "rejected": source.rejected,
    }
    # the manifest last: it is what makes a folder a prepared dataset, so a first preparation
    # stopped halfway never looks finished
    lines = "".join(json.dumps(u.to_json(), ensure_ascii=False) + "\n" for u in units)
    write_atomically(output_dir / EXAMPLES, lambda f: f.write(lines.encode()))
    write_atomically(output_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return PreparedDataset.open(output_dir)


def resolve_training_data(config, work_dir: str | Path, progress: Progress | None = None) -> PreparedDataset:
    """A run's training data (`csm.training.config.TrainConfig`): `config.data` itself when it is
    a prepared folder, else `config.data` (or its audio and transcript folders) prepared into
    `work_dir`, reusing the codes a previous run cached there."""
    if config.data is not None and is_prepared(Path(config.data)):
        return PreparedDataset.open(config.data)
    return prepare_dataset(config.data, work_dir, audio_dir=config.audio_dir, transcript_dir=config.transcript_dir,
                           model_path=config.model_path, speaker_id=config.speaker_id,
                           validation_split=config.validation_split, seed=config.seed,
                           normalize_loudness=config.normalize_loudness, max_clip_seconds=config.max_clip_seconds,
                           backend=config.backend, device=config.device, progress=progress)


def is_prepared(path: Path) -> bool:
    """Whether `path` is a prepared folder (of any version: `PreparedDataset.open` checks that)."""
    manifest = Path(path).expanduser() / MANIFEST
    if not manifest.is_file():
        return False
    try:
        content = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "csm_dataset" in content


def check_output_dir(path: Path, force: bool) -> None:
    """`path` may be new, empty, or ours (a prepared folder, or one whose preparation stopped
    after caching codes); anything else holds someone's files and needs `force`."""
    if path.exists() and not path.is_dir():
        raise CsmError(f"output folder {path} is a file; choose a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if is_prepared(path):
        version = read_json(path / MANIFEST, "dataset manifest").get("csm_dataset")
        if not isinstance(version, int) or version > DATASET_VERSION:
            raise CsmError(f"{path} holds a dataset prepared by a newer csm (format {version}); upgrade csm, "
                           "or prepare into another folder")
        return
    if (path / CODES / INDEX).is_file() or force:
        return
    raise CsmError(f"output folder {path} is not empty and is not a prepared dataset; choose a new or empty "
                   "folder, or pass force (--force) to write into it")


# --- the settings and the model's parts ---


def _check_settings(output_dir, speaker_id, validation_split, test_split, max_clip_seconds) -> None:
    if output_dir is None:
        raise CsmError("no output folder given: pass output_dir (--output-dir)")
    if isinstance(speaker_id, bool) or not isinstance(speaker_id, int) or speaker_id < 0:
        raise CsmError(f"speaker_id must be an integer 0 or more, got {speaker_id!r}")
    for name, value in (("validation_split", validation_split), ("test_split", test_split)):
        if not 0 <= value < 1:
            raise CsmError(f"{name} must be in [0, 1), got {value}")
    if validation_split + test_split >= 1:
        raise CsmError(f"validation_split + test_split ({validation_split + test_split:g}) leave nothing to train on; "
                       "keep their sum below 1")
    if not max_clip_seconds > 0:
        raise CsmError(f"max_clip_seconds must be positive, got {max_clip_seconds}")


class _ModelParts:
    """What preparation needs of the model: its tokenizer and position budget (read at once,
    cheap) and its Mimi codec with the codec's identity (loaded at the first clip to encode)."""

    def __init__(self, model_path, backend: str, device: str | None):
        from csm.checkpoint import open_checkpoint
        from csm.hub import resolve_model
        from csm.text import load_tokenizer

        checkpoint = open_checkpoint(resolve_model(model_path))
        self.root = checkpoint.root
        self.max_positions = checkpoint.config.backbone.max_seq_len
        self.tokenizer = load_tokenizer(self.root)
        self.backend, self.device = backend, device

    @functools.cached_property
    def codec(self):
        return load_codec(self.backend, self.root, self.device)

    @functools.cached_property
    def identity(self) -> str:
        return codec_identity(self.codec)


# --- Mimi ---


def load_codec(backend: str, model_dir: Path, device: str | None = None):
    """Only the model's Mimi codec (`csm.mimi_codec.MimiCodecBase`) on the chosen backend: codes
    need no language model. `device` is torch's (MLX runs on its default device)."""
    from csm.backends import select_backend

    name = select_backend(backend)
    if name == "mlx":
        try:
            from csm_mlx.mimi import load_mimi as load_mlx_mimi
        except ImportError as exc:
            raise CsmError(f"the mlx backend needs packages that are not installed ({exc}); "
                           "install them with `pip install 'csm-speech[mlx]'`") from None
        return load_mlx_mimi(model_dir)
    from csm_torch.loading import pick_device
    from csm_torch.mimi import load_mimi

    return load_mimi(model_dir, None, pick_device(device))


def encode_clip(codec, samples: np.ndarray) -> np.ndarray:
    """24 kHz mono float32 samples -> Mimi codes [frames, 32]."""
    return codec.encode(samples)


def probe_signal() -> np.ndarray:
    """2 s of a fixed signal (a rising chirp over two steady tones) in closed form: the same
    samples on every machine, whatever numpy's random generators do."""
    t = np.arange(2 * SAMPLE_RATE, dtype=np.float64) / SAMPLE_RATE
    chirp = np.sin(2 * np.pi * (80 * t + 900 * t * t))
    tones = np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 3150 * t)
    return (0.3 * chirp + 0.2 * tones).astype(np.float32)


def codec_identity(codec) -> str:
    """sha256 of the codes `codec` gives for `probe_signal`: two codecs that code it alike share
    cached codes; a different Mimi never reuses another's (nor does the same Mimi on a device
    whose arithmetic gives other codes: codes from different devices are never mixed)."""
    codes = np.asarray(encode_clip(codec, probe_signal()), dtype="<i8")
    return hashlib.sha256(f"mimi {codes.shape}:".encode() + codes.tobytes()).hexdigest()


def clip_key(samples: np.ndarray, identity: str) -> str:
    """The codes cache key of a clip: its samples and the codec that encodes them."""
    digest = hashlib.sha256(identity.encode() + b"\0")
    digest.update(np.ascontiguousarray(samples, dtype="<f4").tobytes())
    return digest.hexdigest()


# --- one clip ---


def load_clip(clip: ClipSource, max_seconds: float, normalize: bool) -> np.ndarray:
    """The clip's samples at 24 kHz mono float32, loudness-normalised when asked; ClipRejected
    says why the model cannot learn from it."""
    samples, rate = clip.load(max_seconds)
    samples = resample(to_mono(samples), rate, SAMPLE_RATE)
    seconds = len(samples) / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise ClipRejected(f"too short: {seconds:.2f} s (at least {MIN_SECONDS} s)")
    if seconds > max_seconds:
        raise ClipRejected(too_long_reason(seconds, max_seconds, cut=clip.cut is not None))
    peak = float(np.max(np.abs(samples)))
    if not np.isfinite(peak):
        raise ClipRejected("the audio holds NaN or infinite samples")
    if peak < SILENCE_PEAK:
        raise ClipRejected(f"silent: its loudest sample is {peak:.1e} (below {SILENCE_PEAK:g})")
    return normalize_loudness(samples) if normalize else samples


def normalize_loudness(samples: np.ndarray, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """24 kHz samples brought to `target_lufs` integrated loudness (ITU-R BS.1770), then scaled
    down if that would clip: a sample past full scale would be cut off by any WAV writer."""
    meter = _loudness_meter()
    block = int(0.4 * SAMPLE_RATE)  # the meter's gating block: a shorter clip is measured repeated
    measured = samples if len(samples) >= block else np.tile(samples, math.ceil(block / len(samples)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns about clipping, which is handled below
        loudness = meter.integrated_loudness(measured.astype(np.float64))
    if not np.isfinite(loudness):  # all blocks gated out: too quiet to measure, leave it
        return samples
    out = samples * np.float32(10 ** ((target_lufs - loudness) / 20))
    peak = float(np.max(np.abs(out)))
    if peak > 1:
        out = out / np.float32(peak)
    return out.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=1)
def _loudness_meter():
    try:
        import pyloudnorm
    except ImportError:
        raise CsmError("loudness normalisation needs pyloudnorm: pip install 'csm-speech[train]'") from None
    return pyloudnorm.Meter(SAMPLE_RATE)


# --- the whole source ---


@dataclass
class PreparedTurn:
    id: str
    speaker: int
    text: str
    key: str
    frames: int
    positions: int  # text tokens + audio frames + the EOS frame
    seconds: float
    train: bool
    conversation: str | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "speaker": self.speaker, "text": self.text, "key": self.key, "frames": self.frames,
                "positions": self.positions, "train": self.train}


def _prepare_turns(source: Source, default_speaker: int, model: _ModelParts, store: CodeStore,
                   settings: dict[str, Any], progress: Progress | None) -> list[PreparedTurn]:
    """Every clip read, checked and encoded (or found in the cache); rejected ones go to
    `source.rejected` with their reason."""
    clips = assign_speaker_ids(source, default_speaker)
    turns = []
    for done, (clip, speaker) in enumerate(clips):
        if progress is not None:
            progress(done, len(clips), "clips")
        try:
            turns.append(_prepare_turn(clip, speaker, model, store, settings))
        except ClipRejected as exc:
            source.reject(clip.label, str(exc))
    store.flush()
    if progress is not None:
        progress(len(clips), len(clips), "clips")
    return turns


def _prepare_turn(clip: ClipSource, speaker: int, model: _ModelParts, store: CodeStore,
                  settings: dict[str, Any]) -> PreparedTurn:
    text = clean_text(clip.text)
    if not text:
        raise ClipRejected("empty transcript")
    samples = load_clip(clip, settings["max_clip_seconds"], settings["normalize_loudness"])
    frames = math.ceil(len(samples) / FRAME_SIZE)
    # measured before encoding: a clip the model cannot hold costs no Mimi time
    positions = turn_length(model.tokenizer, Turn(speaker, text, np.empty((frames, 0), np.int16)))
    if positions > model.max_positions:
        raise ClipRejected(f"needs {positions} positions (text and {len(samples) / SAMPLE_RATE:.1f} s of audio), "
                           f"more than the model's {model.max_positions}: split it into shorter clips")
    key = clip_key(samples, model.identity)
    if key not in store:
        store.add(key, encode_clip(model.codec, samples))
    encoded = store.frames(key)  # the codec's own count (ceil(samples / 1920) for Mimi)
    return PreparedTurn(clip.id, speaker, text, key, encoded, positions - frames + encoded,
                        len(samples) / SAMPLE_RATE, clip.train, clip.conversation)


def _describe(source: Source) -> str:
    described = source.description
    return (described.get("path") or described.get("audio_dir") or described.get("input_dir") or described.get("name")
            or "the data")


def _first_reasons(rejected: list[dict[str, str]], count: int = 3) -> str:
    reasons = "; ".join(f"{r['file']}: {r['reason']}" for r in rejected[:count])
    more = len(rejected) - count
    return reasons + (f" (and {more} more)" if more > 0 else "")


def _speaker_counts(turns: list[PreparedTurn]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for turn in turns:
        counts[turn.speaker] = counts.get(turn.speaker, 0) + 1
    return {str(speaker): counts[speaker] for speaker in sorted(counts)}


# --- stored examples and splits ---


@dataclass
class StoredExample:
    """One line of examples.jsonl: a single clip, or a whole conversation (its turns in order)."""

    id: str
    turns: list[PreparedTurn]
    split: str = "train"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "split": self.split, "turns": [t.to_json() for t in self.turns]}


def _group_units(turns: list[PreparedTurn]) -> list[StoredExample]:
    """Single clips stay single; turns sharing a conversation id become one conversation, in the
    order the input gave them, placed where its first turn was."""
    units: list[StoredExample] = []
    conversations: dict[str, StoredExample] = {}
    for turn in turns:
        if turn.conversation is None:
            units.append(StoredExample(turn.id, [turn]))
        elif turn.conversation in conversations:
            conversations[turn.conversation].turns.append(turn)
        else:
            conversations[turn.conversation] = StoredExample(f"conversation:{turn.conversation}", [turn])
            units.append(conversations[turn.conversation])
    return units


def split_fraction(seed: int, unit_id: str) -> float:
    """A number in [0, 1) fixed by (seed, id) alone: adding or removing examples moves no other."""
    digest = hashlib.sha256(f"{seed}\0{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(units: list[StoredExample], seed: int, validation: float, test: float) -> None:
    """Each stored example (a conversation as a whole) to train, validation or test by its
    `split_fraction`. Training always keeps one when there are two or more (the held-out example
    nearest to train goes back), and a requested held-out split that drew nothing gets the train
    example nearest to it, as long as training keeps one."""
    fractions = {u.id: split_fraction(seed, u.id) for u in units}
    for unit in units:
        fraction = fractions[unit.id]
        unit.split = "validation" if fraction < validation else "test" if fraction < validation + test else "train"
    if len(units) >= 2 and not any(u.split == "train" for u in units):
        max(units, key=lambda u: fractions[u.id]).split = "train"
    for split, share in (("validation", validation), ("test", test)):
        train = [u for u in units if u.split == "train"]
        if share > 0 and len(train) >= 2 and not any(u.split == split for u in units):
            min(train, key=lambda u: fractions[u.id]).split = split


# --- the codes cache ---


class CodeStore:
    """codes/: int16 [frames, 32] shards and index.json {key: [shard, offset, frames]}. New codes
    collect in memory and are written as a new shard (never into an existing one) when
    `SHARD_FRAMES` have collected, and at `flush`; the index is rewritten after each shard."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = read_index(folder)
        self._pending: dict[str, np.ndarray] = {}
        self._pending_frames = 0
        self._shards: dict[int, np.ndarray] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._pending

    def frames(self, key: str) -> int:
        return len(self._pending[key]) if key in self._pending else self.index[key][2]

    def add(self, key: str, codes: np.ndarray) -> None:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS or codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
            raise CsmError(f"the codec returned codes of shape {codes.shape} in [{codes.min()}, {codes.max()}]; "
                           f"expected [frames, {NUM_CODEBOOKS}] in [0, {CODEBOOK_SIZE}): is it kyutai's Mimi?")
        self._pending[key] = codes.astype(np.int16)
        self._pending_frames += len(codes)
        if self._pending_frames >= SHARD_FRAMES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        number = self._next_shard()
        shard = np.concatenate(list(self._pending.values()))
        write_atomically(self.folder / shard_name(number), lambda f: np.save(f, shard))
        offset = 0
        for key, codes in self._pending.items():
            self.index[key] = [number, offset, len(codes)]
            offset += len(codes)
        write_atomically(self.folder / INDEX, lambda f: f.write(json.dumps(self.index).encode()))
        self._pending, self._pending_frames = {}, 0

    def _next_shard(self) -> int:
        # past every shard on disk, indexed or not: a run stopped between writing a shard and
        # its index leaves one behind, and shards are never overwritten
        on_disk = [int(p.stem.split("-")[1]) for p in self.folder.glob("shard-*.npy") if p.stem.split("-")[1].isdigit()]
        return max([-1, *on_disk, *(entry[0] for entry in self.index.values())]) + 1

    def codes(self, key: str) -> np.ndarray:
        """The key's codes [frames, 32] (int16): a view of the memory-mapped shard."""
        if key in self._pending:
            return self._pending[key]
        try:
            number, offset, frames = self.index[key]
        except KeyError:
            raise CsmError(f"codes {key[:12]}... are missing from {self.folder / INDEX}; "
                           "prepare the data again") from None
        if number not in self._shards:
            path = self.folder / shard_name(number)
            try:
                self._shards[number] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CsmError(f"cannot read the codes shard {path} ({exc}); prepare the data again") from None
        return self._shards[number][offset:offset + frames]


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npy"


def read_index(folder: Path) -> dict[str, list[int]]:
    path = folder / INDEX
    if not path.is_file():
        return {}
    index = read_json(path, "codes index")
    if not isinstance(index, dict) or not all(
            isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) for x in v) for v in index.values()):
        raise CsmError(f"{path} is damaged; delete the {folder} folder to encode the codes again")
    return index


def write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a temporary file in its folder and a rename: a reader (or a run
    interrupted halfway) never sees half a file. The file gets the permissions the user's umask
    gives (tempfile.mkstemp would make it private)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- reading a prepared folder ---


class PreparedDataset:
    """A prepared folder: its manifest, its stored examples, and its codes (memory-mapped)."""

    def __init__(self, root: Path, manifest: dict[str, Any], stored: list[dict[str, Any]]):
        self.root = root
        self.manifest = manifest
        self._stored = stored
        self._codes = CodeStore(root / CODES)

    @classmethod
    def open(cls, path: str | Path) -> PreparedDataset:
        root = Path(path).expanduser()
        if not (root / MANIFEST).is_file():
            raise CsmError(f"{root} is not a prepared dataset (no {MANIFEST}); prepare one with "
                           "`csm-finetune prepare --data ... --output-dir ...`")
        manifest = read_json(root / MANIFEST, "dataset manifest")
        version = manifest.get("csm_dataset") if isinstance(manifest, dict) else None
        if version is None:
            raise CsmError(f"{root / MANIFEST} is not a prepared dataset's manifest (no csm_dataset)")
        if not isinstance(version, int) or version > DATASET_VERSION:
            raise CsmError(f"{root} was prepared by a newer csm (dataset format {version}, this csm reads "
                           f"{DATASET_VERSION}); upgrade csm")
        try:
            lines = (root / EXAMPLES).read_text(encoding="utf-8").splitlines()
            stored = [json.loads(line) for line in lines if line.strip()]
        except FileNotFoundError:
            raise CsmError(f"{root} lacks {EXAMPLES}: its preparation did not finish; prepare it again") from None
        except (OSError, ValueError) as exc:
            raise CsmError(f"{root / EXAMPLES} is damaged ({exc}); prepare the data again") from None
        return cls(root, manifest, stored)

    def stored_examples(self, split: str | None = None) -> list[dict[str, Any]]:
        """examples.jsonl's lines (a clip or a whole conversation each), of one split or all."""
        if split is not None and split not in SPLITS:
            raise CsmError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        return [s for s in self._stored if split is None or s["split"] == split]

    def codes(self, key: str) -> np.ndarray:
        return self._codes.codes(key)

    def examples(self, split: str | None = "train", train_on: str = "last",
                 speaker_id: int | None = None) -> list[Example]:
        """The `Example`s of `split` (None: all) for `train_on`:

        - "last": every trainable turn is the trained last turn of one example, its conversation's
          earlier turns before it as context;
        - "speaker": the same for `speaker_id`'s turns only (default: the prepared speaker_id);
        - "all": a conversation's trainable turns all trained, in consecutive runs of turns that
          fit the model's positions together.

        A turn a JSONL manifest marked `"train": false` is only ever context."""
        if train_on not in TRAIN_ON:
            raise CsmError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        if speaker_id is None:
            speaker_id = self.manifest.get("settings", {}).get("speaker_id", 0)
        examples = []
        for stored in self.stored_examples(split):
            turns = stored["turns"]
            if train_on == "all":
                examples += self._all_turns_trained(stored["id"], turns)
                continue
            for i, turn in enumerate(turns):
                if not turn["train"] or (train_on == "speaker" and turn["speaker"] != speaker_id):
                    continue
                example_id = stored["id"] if len(turns) == 1 else f"{stored['id']}/{i}"
                context = [self._turn(t, train=False) for t in turns[:i]]
                examples.append(Example(example_id, [*context, self._turn(turn, train=True)]))
        return examples

    def _all_turns_trained(self, stored_id: str, turns: list[dict[str, Any]]) -> list[Example]:
        budget = self.manifest.get("max_positions", 2048)
        runs: list[list[int]] = [[]]
        used = 0
        for i, turn in enumerate(turns):
            if runs[-1] and used + turn["positions"] > budget:
                runs.append([])
                used = 0
            runs[-1].append(i)
            used += turn["positions"]
        examples = []
        for run in runs:
            if any(turns[i]["train"] for i in run):
                example_id = stored_id if len(runs) == 1 else f"{stored_id}/{run[0]}-{run[-1]}"
                examples.append(Example(example_id, [self._turn(turns[i], turns[i]["train"]) for i in run]))
        return examples

    def _turn(self, turn: dict[str, Any], train: bool) -> Turn:
        return Turn(turn["speaker"], turn["text"], self.codes(turn["key"]), train=train)

    def summary(self) -> str:
        """A few lines for people: size, speakers, splits, and what was rejected."""
        m = self.manifest
        hours = m.get("hours", 0.0)
        speakers = m.get("speakers", {})
        names = {str(v): k for k, v in m.get("speaker_names", {}).items()}
        per_speaker = ", ".join(f"{s}{' (' + names[s] + ')' if s in names else ''}: {n}" for s, n in speakers.items())
        splits = m.get("splits", {})
        lines = [
            f"prepared dataset {self.root}",
            f"  {m.get('clips', 0)} clips, {_duration(hours)} of audio",
            f"  {len(speakers)} speaker(s), clips each: {per_speaker}",
            "  examples: " + ", ".join(f"{splits.get(s, 0)} {s}" for s in SPLITS),
        ]
        rejected = m.get("rejected", [])
        lines.append(f"  {len(rejected)} rejected" + (f" (all listed in {MANIFEST}):" if rejected else ""))
        lines += [f"    {r['file']}: {r['reason']}" for r in rejected[:5]]
        if len(rejected) > 5:
            lines.append(f"    ... and {len(rejected) - 5} more")
        return "\n".join(lines)


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:.2f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"
