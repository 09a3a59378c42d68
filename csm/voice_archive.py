"""A voice profile as one archive file (.tar.gz / .tgz or .zip), to move a voice between machines.

Layout: `voice.json` (the profile; each reference's file is `clips/<name>`), `clips/<name>` (the
clips) and `codes/<name>.npy` (their cached Mimi codes, so the other machine need not encode them).

Reading trusts nothing in the archive: every member must be a regular file under one of those
names (no absolute path, no '..', no link, no device), sizes are capped, each clip's sha256 must be
the profile's, and members are read into memory and returned, never extracted, so nothing can
land outside the store that `VoiceStore.import_` writes them into.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

from csm.errors import CsmError
from csm.files import write_file_atomic

PROFILE_MEMBER = "voice.json"
# clips/ref-01.wav, codes/<clip sha256[:16]>.<codec id>.npy: a flat name, no folders, no dots first
_MEMBER = re.compile(r"^(clips/ref-\d{2}\.[a-z0-9]{1,5}|codes/[0-9a-f]{16}\.mimi-[0-9a-f]{16}\.npy|voice\.json)$")
MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_TOTAL_BYTES = 2 * 1024 * 1024 * 1024
MAX_MEMBERS = 1000


def archive_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    raise CsmError(f"{path}: a voice archive is a .tar.gz, .tgz or .zip file; name it so")


def write_archive(voice, path: Path, force: bool = False) -> Path:
    """Write `voice` (a `csm.voices.Voice` read from a store) and its clips into archive `path`, atomically."""
    from csm.voices import CODES_DIR

    kind = archive_kind(path)
    if path.exists() and not force:
        raise CsmError(f"{path} already exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise CsmError(f"output folder {path.parent} does not exist")
    profile = voice.to_dict()
    members: dict[str, Path] = {}
    refs = []
    for ref in voice.references:
        source = voice.root / ref.file
        if not source.is_file():
            raise CsmError(f"voice {voice.name!r}'s reference clip {source} is missing: it cannot be exported; update "
                           "the voice with its clips again (csm-voice update --reference)")
        member = f"clips/{Path(ref.file).name}"
        members[member] = source
        refs.append({**profile["references"][len(refs)], "file": member})
        codes = (voice.root / ref.file).parent / CODES_DIR
        for cached in sorted(codes.glob(f"{ref.sha256[:16]}.*.npy")) if codes.is_dir() else []:
            members[f"codes/{cached.name}"] = cached
    profile["references"] = refs
    profile_bytes = (json.dumps(profile, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def write(tmp: Path) -> None:
        if kind == "tar":
            with tarfile.open(tmp, "w:gz") as tar:
                info = tarfile.TarInfo(PROFILE_MEMBER)
                info.size = len(profile_bytes)
                tar.addfile(info, io.BytesIO(profile_bytes))
                for member, source in members.items():
                    tar.add(source, arcname=member, recursive=False)
        else:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(PROFILE_MEMBER, profile_bytes)
                for member, source in members.items():
                    zf.write(source, member)

    return write_file_atomic(path, write)


def read_archive(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(the profile's JSON object, {member name: bytes}) from a voice archive, every member checked."""
    kind = archive_kind(path)
    if not path.is_file():
        raise CsmError(f"voice archive not found: {path}")
    bad = f"{path} is not a voice archive csm-voice export wrote"
    try:
        files = _read_tar(path, bad) if kind == "tar" else _read_zip(path, bad)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CsmError(f"{bad}: cannot read it ({exc})") from None
    if PROFILE_MEMBER not in files:
        raise CsmError(f"{bad}: it has no {PROFILE_MEMBER}")
    try:
        profile = json.loads(files[PROFILE_MEMBER].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CsmError(f"{bad}: its {PROFILE_MEMBER} is not valid JSON ({exc})") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("references", []), list):
        raise CsmError(f"{bad}: its {PROFILE_MEMBER} is not a voice profile")
    clips = set()
    for ref in profile.get("references", []):
        member = ref.get("file") if isinstance(ref, dict) else None
        if not isinstance(member, str) or not member.startswith("clips/") or member not in files:
            raise CsmError(f"{bad}: the profile names clip {member!r}, which the archive does not hold")
        if hashlib.sha256(files[member]).hexdigest() != ref.get("sha256"):
            raise CsmError(f"{bad}: clip {member} does not match the sha256 in the profile (damaged?)")
        clips.add(member)
    shas = {ref["sha256"][:16] for ref in profile.get("references", [])}
    extra = sorted(m for m in files if (m.startswith("clips/") and m not in clips)
                   or (m.startswith("codes/") and m[len("codes/"):][:16] not in shas))
    if extra:
        raise CsmError(f"{bad}: it holds files the profile does not name: {', '.join(extra)}")
    return profile, files


def _check_member(name: str, size: int, total: int, count: int, bad: str) -> None:
    if not _MEMBER.match(name):
        raise CsmError(f"{bad}: unexpected member {name!r} (a voice archive holds voice.json, clips/ref-NN.ext "
                       "and codes/*.npy only)")
    if size > MAX_MEMBER_BYTES or total > MAX_TOTAL_BYTES or count > MAX_MEMBERS:
        raise CsmError(f"{bad}: it is too large ({name!r} makes {total} bytes in {count} members)")


def _read_tar(path: Path, bad: str) -> dict[str, bytes]:
    files, total = {}, 0
    with tarfile.open(path, "r:gz") as tar:
        for info in tar:
            if info.isdir() and info.name.rstrip("/") in ("clips", "codes"):
                continue
            if not info.isfile():
                raise CsmError(f"{bad}: member {info.name!r} is not a regular file (links and devices are refused)")
            total += info.size
            _check_member(info.name, info.size, total, len(files) + 1, bad)
            if info.name in files:
                raise CsmError(f"{bad}: member {info.name!r} appears twice")
            files[info.name] = tar.extractfile(info).read()
    return files


def _read_zip(path: Path, bad: str) -> dict[str, bytes]:
    files, total = {}, 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir() and info.filename.rstrip("/") in ("clips", "codes"):
                continue
            mode = info.external_attr >> 16
            if info.is_dir() or (mode and (mode & 0o170000) not in (0, 0o100000)):
                raise CsmError(f"{bad}: member {info.filename!r} is not a regular file (links are refused)")
            total += info.file_size
            _check_member(info.filename, info.file_size, total, len(files) + 1, bad)
            if info.filename in files:
                raise CsmError(f"{bad}: member {info.filename!r} appears twice")
            files[info.filename] = zf.read(info)
    return files
