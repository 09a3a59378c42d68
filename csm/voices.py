"""Voice profiles: a named speaker (id, description, reference clips, model, sampling defaults)
kept in the user's data folder and used by name (`gen.generate(text, voice="Ada")`).

The store is one folder: `voices.json` ({"schema": 1, "voices": [...]}) and `clips/<voice id>/`
with copies of the reference clips and their cached Mimi codes. Only csm writes there: a user's
file is copied in, never referenced, so moving or editing it later changes nothing. The folder is
`$CSM_HOME/voices`, or `voices` in the platform's user data folder (platformdirs).

A read never rewrites `voices.json`: a corrupt one stays as it is and every command says which
file it is. Writes are atomic (temp file + os.replace) and taken under a lock file, so two
processes that edit the store at once do not lose each other's change.

Importing this module imports neither torch nor MLX (the CLI lists voices without them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from csm.errors import CsmError
from csm.files import write_bytes_atomic, write_json_atomic

SCHEMA = 1
STORE_FILE = "voices.json"
CLIPS_DIR = "clips"
CODES_DIR = "codes"  # inside a voice's clip folder
HOME_ENV = "CSM_HOME"
MAX_NAME_LENGTH = 64
# what a profile may say about a voice beyond its name and id, all free text
DESCRIPTIVE_FIELDS = ("description", "gender", "age_range", "accent", "language")
SAMPLING_FIELDS = ("temperature", "topk", "top_p")
# the fields `VoiceStore.update` changes (`references` replaces every clip)
UPDATABLE_FIELDS = ("name", "speaker_id", *DESCRIPTIVE_FIELDS, "model", "adapter", *SAMPLING_FIELDS, "references")
_AUDIO_SUFFIX = re.compile(r"^\.[a-z0-9]{1,5}$")


def default_root() -> Path:
    """Where the voice store lives: $CSM_HOME/voices, else the user data folder's csm/voices."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser() / "voices"
    import platformdirs

    return Path(platformdirs.user_data_dir("csm")) / "voices"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def check_name(name) -> str:
    """A voice name is a name, never a path: printable, no slashes, no '..', not a bare number
    (a number means a speaker id), at most 64 characters."""
    if not isinstance(name, str) or not name.strip():
        raise CsmError("a voice name must be a non-empty string, e.g. 'Ada'")
    name = name.strip()
    if "/" in name or "\\" in name or ".." in name:
        raise CsmError(f"voice name {name!r} looks like a path: a name has no '/', '\\' or '..'")
    if any(not ch.isprintable() for ch in name):
        raise CsmError(f"voice name {name!r} holds control characters: use printable ones only")
    if name.isdigit():
        raise CsmError(f"voice name {name!r} is a number, which means a speaker id: give the voice a word as name")
    if len(name) > MAX_NAME_LENGTH:
        raise CsmError(f"voice name {name[:20]!r}... is {len(name)} characters long: keep it to {MAX_NAME_LENGTH}")
    return name


def check_speaker_id(speaker_id) -> int:
    if isinstance(speaker_id, str) and speaker_id.strip().isdigit():
        speaker_id = int(speaker_id)
    if isinstance(speaker_id, bool) or not isinstance(speaker_id, (int, np.integer)) or speaker_id < 0:
        raise CsmError(f"a voice's speaker id must be a non-negative integer, got {speaker_id!r}")
    return int(speaker_id)


def check_sampling(temperature=None, topk=None, top_p=None) -> None:
    """Sampling defaults are validated as `csm.sampling.Sampling` validates a request's."""
    from csm.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_TOPK, Sampling

    Sampling(DEFAULT_TEMPERATURE if temperature is None else temperature, DEFAULT_TOPK if topk is None else topk,
             DEFAULT_TOP_P if top_p is None else top_p)


def _optional_text(value, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise CsmError(f"a voice's {what} must be text, got {value!r}")
    return value.strip() or None


def model_location(value, what: str) -> str | None:
    """A model or adapter as a profile keeps it: a local path made absolute (the profile is used from
    any folder), a Hub repo id as given."""
    value = _optional_text(None if value is None else str(value), what)
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Reference:
    """One reference clip: `file` relative to the store (clips/<voice id>/<name>), what is said in
    it, its length, and its sha256 (the key of its cached codes, and a check on import)."""

    file: str
    transcript: str
    duration_s: float
    sha256: str

    @staticmethod
    def from_dict(data, where: str) -> Reference:
        if not isinstance(data, dict):
            raise CsmError(f"{where}: a reference must be an object, got {data!r}")
        try:
            ref = Reference(file=data["file"], transcript=data["transcript"], duration_s=float(data["duration_s"]),
                            sha256=data["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CsmError(f"{where}: a reference needs file, transcript, duration_s and sha256 ({exc!r})") from None
        if not all(isinstance(v, str) for v in (ref.file, ref.transcript, ref.sha256)):
            raise CsmError(f"{where}: a reference's file, transcript and sha256 must be text")
        return ref

    def codes_file(self, codec_identity: str) -> str:
        """Where this clip's codes from the Mimi named `codec_identity` are cached (store-relative)."""
        folder = Path(self.file).parent
        return (folder / CODES_DIR / f"{self.sha256[:16]}.{codec_identity}.npy").as_posix()


@dataclass
class Voice:
    """A voice profile. `model`: the base model (a path or Hub id) it speaks with, None for the
    default; `adapter`: a LoRA adapter folder (or a fine-tuned model's path in `model`).
    `temperature`, `topk`, `top_p`: its sampling defaults, None for csm's."""

    name: str
    speaker_id: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    description: str | None = None
    gender: str | None = None
    age_range: str | None = None
    accent: str | None = None
    language: str | None = None
    references: list[Reference] = field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    temperature: float | None = None
    topk: int | None = None
    top_p: float | None = None
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    # the store the profile was read from (its clips are there); not part of the profile
    root: Path | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("root")
        return data

    @staticmethod
    def from_dict(data, where: str) -> Voice:
        """A profile from its JSON object, checked field by field (`where` names the file in errors)."""
        if not isinstance(data, dict):
            raise CsmError(f"{where}: a voice must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(Voice)} - {"root"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CsmError(f"{where}: voice {data.get('name')!r} has unknown fields {unknown}")
        for required in ("name", "speaker_id", "id", "created", "updated"):
            if required not in data:
                raise CsmError(f"{where}: a voice lacks {required!r}")
        try:
            voice = Voice(**{**data, "references": []})
            voice.name = check_name(voice.name)
            voice.speaker_id = check_speaker_id(voice.speaker_id)
            for name in (*DESCRIPTIVE_FIELDS, "model", "adapter"):
                setattr(voice, name, _optional_text(getattr(voice, name), name))
            check_sampling(voice.temperature, voice.topk, voice.top_p)
        except CsmError as exc:
            raise CsmError(f"{where}: {exc}") from None
        if not isinstance(voice.id, str) or not re.fullmatch(r"[0-9a-f]{12}", voice.id):
            raise CsmError(f"{where}: voice {voice.name!r} has a malformed id {voice.id!r}")
        refs = data.get("references") or []
        if not isinstance(refs, list):
            raise CsmError(f"{where}: voice {voice.name!r}'s references must be a list")
        voice.references = [Reference.from_dict(r, where) for r in refs]
        return voice

    @property
    def model_key(self) -> tuple[str, str | None]:
        """What 'the same model' means for speaker ids: the base model and adapter."""
        from csm.hub import DEFAULT_MODEL

        return (self.model or DEFAULT_MODEL, self.adapter)

    @property
    def clip_folder(self) -> str:
        return f"{CLIPS_DIR}/{self.id}"

    def sampling_defaults(self) -> dict:
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}


class VoiceStore:
    """The voice profiles in folder `root` (default: `default_root()`)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    @property
    def file(self) -> Path:
        return self.root / STORE_FILE

    # --- reading ------------------------------------------------------------------------------
    def list(self) -> list[Voice]:
        """Every profile, in the order they were created. A missing store is an empty one."""
        if not self.file.exists():
            return []
        fix = "fix it or move it away (csm never rewrites a store it cannot read)"
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CsmError(f"the voice store {self.file} cannot be read ({exc}); {fix}") from None
        if not isinstance(data, dict) or not isinstance(data.get("voices"), list):
            raise CsmError(f'the voice store {self.file} is not {{"schema": {SCHEMA}, "voices": [...]}}; {fix}')
        if data.get("schema") != SCHEMA:
            raise CsmError(f"the voice store {self.file} has schema {data.get('schema')!r}; this csm reads schema "
                           f"{SCHEMA}: upgrade csm, or {fix}")
        voices = [Voice.from_dict(v, f"the voice store {self.file}") for v in data["voices"]]
        for voice in voices:
            voice.root = self.root
        return voices

    def names(self) -> list[str]:
        return [v.name for v in self.list()]

    def get(self, name_or_id) -> Voice:
        """The voice named `name_or_id`, or the one with that speaker id (an int, or a string of digits)."""
        return self._find(self.list(), name_or_id)

    def _find(self, voices: list[Voice], name_or_id) -> Voice:
        if isinstance(name_or_id, Voice):
            name_or_id = name_or_id.name
        if isinstance(name_or_id, (int, np.integer)) and not isinstance(name_or_id, bool) or (
                isinstance(name_or_id, str) and name_or_id.strip().isdigit()):
            speaker = int(name_or_id)
            found = [v for v in voices if v.speaker_id == speaker]
            if len(found) > 1:
                raise CsmError(f"speaker id {speaker} is used by several voices ({', '.join(v.name for v in found)}) "
                               "for different models: use the voice's name")
            what = f"speaker id {speaker}"
        else:
            if not isinstance(name_or_id, str) or not name_or_id.strip():
                raise CsmError(f"give a voice's name or speaker id, got {name_or_id!r}")
            found = [v for v in voices if v.name == name_or_id.strip()]
            what = repr(name_or_id)
        if not found:
            known = ", ".join(v.name for v in voices) or "none yet (create one with `csm-voice create`)"
            raise CsmError(f"no voice {what} in {self.file}; known voices: {known}")
        return found[0]

    # --- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _editing(self) -> Iterator[list[Voice]]:
        """The profiles to change in place; written back atomically when the block ends without error."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / ".lock"):
            voices = self.list()
            yield voices
            self._check_unique(voices)
            write_json_atomic(self.file, {"schema": SCHEMA, "voices": [v.to_dict() for v in voices]})

    @staticmethod
    def _check_unique(voices: list[Voice]) -> None:
        names, speakers = {}, {}
        for voice in voices:
            if voice.name in names:
                raise CsmError(f"a voice named {voice.name!r} exists already: choose another name "
                               "(or update or delete that one)")
            names[voice.name] = voice
            key = (voice.speaker_id, voice.model_key)
            if key in speakers:
                raise CsmError(f"voice {speakers[key].name!r} has speaker id {voice.speaker_id} on the same model "
                               f"already: give {voice.name!r} another speaker id")
            speakers[key] = voice

    def create(self, name: str, speaker_id: int, description: str | None = None, *,
               references: Sequence[tuple[str | os.PathLike, str]] = (), gender: str | None = None,
               age_range: str | None = None, accent: str | None = None, language: str | None = None,
               model: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
               temperature: float | None = None, topk: int | None = None, top_p: float | None = None) -> Voice:
        """A new profile; `references`: (audio file, its transcript) pairs, copied into the store."""
        voice = Voice(name=check_name(name), speaker_id=check_speaker_id(speaker_id))
        self._apply(voice, dict(description=description, gender=gender, age_range=age_range, accent=accent,
                                language=language, model=model, adapter=adapter, temperature=temperature, topk=topk,
                                top_p=top_p))
        with self._editing() as voices, self._new_clips(voice, references) as refs:
            voice.references = refs
            voices.append(voice)
            self._check_unique(voices)  # before the clips move in
        voice.root = self.root
        return voice

    def update(self, name_or_id, **changes) -> Voice:
        """Change the fields given (`UPDATABLE_FIELDS`; None clears an optional one). `references`
        replaces every clip with the (audio file, transcript) pairs given."""
        unknown = sorted(set(changes) - set(UPDATABLE_FIELDS))
        if unknown:
            raise CsmError(f"cannot update {', '.join(unknown)}; a voice's fields are {', '.join(UPDATABLE_FIELDS)}")
        with self._editing() as voices:
            voice = self._find(voices, name_or_id)
            if "name" in changes:
                voice.name = check_name(changes.pop("name"))
            if "speaker_id" in changes:
                voice.speaker_id = check_speaker_id(changes.pop("speaker_id"))
            new_refs = changes.pop("references", None)
            self._apply(voice, changes)
            voice.updated = now_iso()
            self._check_unique(voices)
            if new_refs is None:
                return voice
            with self._new_clips(voice, new_refs, replace=True) as refs:
                voice.references = refs
        return voice

    def delete(self, name_or_id) -> Voice:
        """Remove a profile and its clips."""
        with self._editing() as voices:
            voice = self._find(voices, name_or_id)
            voices.remove(voice)
        shutil.rmtree(self.root / voice.clip_folder, ignore_errors=True)
        return voice

    def export(self, name_or_id, archive_path: str | os.PathLike, force: bool = False) -> Path:
        """One .tar.gz (or .tgz) or .zip archive with the profile and its clips (`csm.voice_archive`)."""
        from csm.voice_archive import write_archive

        return write_archive(self.get(name_or_id), Path(archive_path), force=force)

    def import_(self, archive_path: str | os.PathLike, rename: str | None = None,
                speaker_id: int | None = None) -> Voice:
        """Add the voice in an archive `export` wrote, under its name or `rename`, with its speaker id or
        `speaker_id`; the archive is checked first and nothing is written outside the store."""
        from csm.voice_archive import read_archive

        profile, files = read_archive(Path(archive_path))
        voice = Voice.from_dict({**profile, "id": uuid.uuid4().hex[:12]}, f"the archive {archive_path}")
        if rename is not None:
            voice.name = check_name(rename)
        if speaker_id is not None:
            voice.speaker_id = check_speaker_id(speaker_id)
        voice.updated = now_iso()
        with self._editing() as voices:
            voices.append(voice)
            self._check_unique(voices)
            staging = self._staging()
            try:
                refs = []
                for ref in voice.references:
                    member = Path(ref.file).name
                    write_bytes_atomic(staging / member, files[f"{CLIPS_DIR}/{member}"])
                    refs.append(Reference(f"{voice.clip_folder}/{member}", ref.transcript, ref.duration_s, ref.sha256))
                for member, data in files.items():
                    if member.startswith(f"{CODES_DIR}/"):
                        write_bytes_atomic(staging / CODES_DIR / Path(member).name, data)
                voice.references = refs
                os.replace(staging, self.root / voice.clip_folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        voice.root = self.root
        return voice

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _apply(voice: Voice, changes: dict) -> None:
        for name in DESCRIPTIVE_FIELDS:
            if name in changes:
                setattr(voice, name, _optional_text(changes[name], name.replace("_", " ")))
        for name in ("model", "adapter"):
            if name in changes:
                setattr(voice, name, model_location(changes[name], name))
        sampling = {name: changes.get(name, getattr(voice, name)) for name in SAMPLING_FIELDS}
        check_sampling(**sampling)
        for name, value in sampling.items():
            setattr(voice, name, value)

    def _staging(self) -> Path:
        (self.root / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root / CLIPS_DIR))

    @contextlib.contextmanager
    def _new_clips(self, voice: Voice, references, replace: bool = False) -> Iterator[list[Reference]]:
        """Copy the reference clips into a staging folder; yields their References; when the block
        ends without error the folder becomes the voice's clip folder (the old one replaced)."""
        checked = [_check_reference(item, i) for i, item in enumerate(references)]
        staging = self._staging()
        try:
            refs = []
            for i, (source, transcript) in enumerate(checked):
                duration = _clip_duration(source)
                suffix = source.suffix.lower() if _AUDIO_SUFFIX.match(source.suffix.lower()) else ".audio"
                member = f"ref-{i + 1:02d}{suffix}"
                shutil.copyfile(source, staging / member)
                refs.append(Reference(f"{voice.clip_folder}/{member}", transcript, duration,
                                      sha256_of(staging / member)))
            yield refs
            target = self.root / voice.clip_folder
            if replace and target.exists():
                codes = target / CODES_DIR
                if codes.is_dir():  # cached codes are keyed by the clip's sha256: still right for the same clip
                    shutil.copytree(codes, staging / CODES_DIR, dirs_exist_ok=True)
                old = target.with_name(f".old-{voice.id}")
                os.replace(target, old)
                os.replace(staging, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _check_reference(item, index: int) -> tuple[Path, str]:
    try:
        source, transcript = item
    except (TypeError, ValueError):
        raise CsmError(f"reference {index + 1} must be (audio file, transcript), got {item!r}") from None
    source = Path(source).expanduser()
    if not source.is_file():
        raise CsmError(f"reference clip not found: {source}")
    if not isinstance(transcript, str) or not transcript.strip():
        raise CsmError(f"reference clip {source} needs its transcript: the words said in it")
    return source, transcript.strip()


def _clip_duration(path: Path) -> float:
    """Seconds of audio in a clip; reading it also proves the clip is audio csm can use."""
    from csm.audio import MODEL_SAMPLE_RATE, read_audio

    return round(len(read_audio(path)) / MODEL_SAMPLE_RATE, 3)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` between processes, where the platform has flock."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer at a time is the user's to keep
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- using a voice ----------------------------------------------------------------------------

def resolve_voice(voice) -> Voice:
    """A Voice as given, or the one the default store has under that name or speaker id."""
    return voice if isinstance(voice, Voice) else VoiceStore().get(voice)


def reference_codes(voice: Voice, encode: Callable[[np.ndarray], np.ndarray], codec_identity: str) -> list[np.ndarray]:
    """The Mimi codes [frames, 32] of each reference clip, in order: read from the cache when this
    codec encoded the clip before, else encoded with `encode` once and cached (atomically)."""
    from csm.audio import read_audio
    from csm.prompt import check_segment_codes

    if voice.root is None:
        raise CsmError(f"voice {voice.name!r} was not read from a store: get it with csm.voices.VoiceStore().get")
    all_codes = []
    for ref in voice.references:
        cache = voice.root / ref.codes_file(codec_identity)
        codes = None
        if cache.is_file():
            try:
                codes = check_segment_codes(np.load(cache, allow_pickle=False))
            except (OSError, ValueError, CsmError):
                codes = None  # a damaged cache is encoded again and rewritten
        if codes is None:
            clip = voice.root / ref.file
            if not clip.is_file():
                raise CsmError(f"voice {voice.name!r}'s reference clip {clip} is missing: update the voice with "
                               "its clips again (csm-voice update --reference), or delete it")
            codes = check_segment_codes(encode(read_audio(clip)))
            _save_codes(cache, codes)
        all_codes.append(codes)
    return all_codes


def _save_codes(path: Path, codes: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, codes.astype(np.int16), allow_pickle=False)  # codes < 2048: int16 holds them
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError:
        pass  # a read-only store still works: the clip is encoded again next time
