"""Switchboard-1 Release 2 (LDC97S62) with the Mississippi State (MS-State, "ms98") transcripts.

The corpus as published: two-channel 8 kHz mu-law NIST SPHERE recordings, one conversation a
file (`sw02001.sph`, or `sw2001.sph`), anywhere under the input folder; and the MS-State
word-aligned transcripts (a separate download, `swb_ms98_transcriptions/20/2001/...`), one file a
channel, `sw2001A-ms98-a-trans.text` for channel A, each line one utterance:

    sw2001A-ms98-a-0002 0.977625 11.561375 hi um yeah i'd like to talk about how you dress for work

Channel A is the caller, B the callee: one speaker a channel. They become speaker ids 0 (A) and 1
(B) in every conversation, because CSM's speaker ids are roles within a conversation, not people.
Each utterance becomes a turn cut from its own channel; the turns of both channels, ordered by
start time, form one conversation, so every trained turn has the turns before it as context.

Markers become text by `map_words` (the table in docs/training.md); an utterance left without
words (only `[silence]`, `[noise]`, `[vocalized-noise]`) is dropped and counted, not rejected.
What cannot be used (an unreadable recording, a transcript without its recording, a malformed
line) is rejected with its reason; the rest of the corpus is read on.

Uncompressed SPHERE (mu-law, A-law or PCM) is read by libsndfile through soundfile. Files whose
header says they are shorten-compressed (`sample_coding ... ulaw,embedded-shorten-v2.00`), which
libsndfile cannot decode, are read through LDC's `sph2pipe` when it is on PATH.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csm.errors import CsmError
from csm.training.sources import (
    AudioLoader,
    ClipRejected,
    ClipSource,
    Source,
    _existing_dir,
    file_loader,
    too_long_reason,
)

SPEAKERS = {"A": 0, "B": 1}
TRANSCRIPT_SUFFIX = "-ms98-a-trans.text"
_AUDIO_NAME = re.compile(r"sw0?(\d{4,5})\.sph", re.IGNORECASE)
_TRANSCRIPT_NAME = re.compile(r"sw(\d{4,5})([AB])-ms98-a-trans\.text", re.IGNORECASE)
_NUMBER = r"\d+(?:\.\d*)?"
_LINE = re.compile(rf"(\S+)\s+({_NUMBER})\s+({_NUMBER})\s+(\S.*)")
# The MS-State transcripts end an utterance up to a few hundredths of a second past the end of
# the recording (times are rounded); a cut that far out is taken to the last sample instead.
END_SLACK_SECONDS = 0.5

# --- the markers ---

SILENCE = "[silence]"
LAUGHTER = "[laughter]"
# Noises that are not words: background noise, and sounds the speaker makes (breaths, coughs,
# "hmm"-like sounds) that text cannot ask for; the audio keeps them, the text does not name them.
NOISES = ("[noise]", "[vocalized-noise]")
# The beginning and end of an aside (the speaker talking to someone in the room): its words are
# in the recording, so they stay; the markers go.
ASIDES = ("<b_aside>", "<e_aside>")
_LAUGHING_WORD = re.compile(r"(-?)\[laughter-(.+)\](-?)", re.IGNORECASE)  # [laughter-yes]: "yes", laughing
_MISPRONOUNCED = re.compile(r"\[(.+)/(.+)\](-?)")  # [it'n/isn't]: said "it'n", meant "isn't"
_COINAGE = re.compile(r"\{(.+)\}")  # {yuppiedom}: a made-up word
_BRACKETED = re.compile(r"\[[^\[\]]*\]")  # the unspoken part of a partial word: ab[solute]-, -[th]at
_ALTERNATE = re.compile(r"_\d+$")  # them_1: "them" pronounced another way


def map_word(token: str) -> str | None:
    """One MS-State token as text for CSM, or None when it is no word (silence, noise, an aside marker)."""
    lowered = token.lower()
    if lowered in (SILENCE, *NOISES, *ASIDES):
        return None
    if lowered == LAUGHTER:
        return LAUGHTER  # kept: a cue the model can learn to laugh from
    laughing = _LAUGHING_WORD.fullmatch(token)
    if laughing:
        token = "".join(laughing.groups())
    mispronounced = _MISPRONOUNCED.fullmatch(token)
    if mispronounced:
        token = mispronounced.group(1) + mispronounced.group(3)  # the text says what the audio holds
    coinage = _COINAGE.fullmatch(token)
    if coinage:
        token = coinage.group(1)
    if _BRACKETED.fullmatch(token):
        return None  # another bracketed sound ([static], ...): not a word either
    if "[" in token:
        # the part in brackets was not said: it becomes the hyphen that marks the cut-off word
        token = re.sub(r"-{2,}", "-", _BRACKETED.sub("-", token))
    token = _ALTERNATE.sub("", token)
    return token or None


def map_words(words: Iterable[str]) -> str:
    """An utterance's tokens as one line of text; "" when none of them is a word."""
    return " ".join(w for w in (map_word(t) for t in words) if w is not None)


# --- the SPHERE header ---


@dataclass
class Sphere:
    path: Path
    channels: int
    rate: int
    frames: int
    coding: str

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    @property
    def shortened(self) -> bool:
        return "shorten" in self.coding.lower()


def read_sphere(path: Path) -> Sphere:
    """The header of a NIST SPHERE file: an ASCII block ("NIST_1A", its size, then `name -type
    value` lines up to `end_head`). ClipRejected says why it is not a usable one."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
            lines = head.split(b"\n")
            if not head.startswith(b"NIST_1A") or len(lines) < 3:
                raise ClipRejected("not a NIST SPHERE file (it does not begin with NIST_1A)")
            size = int(lines[1].strip() or 0)
            if size > len(head):
                head += f.read(size - len(head))
                lines = head.split(b"\n")
    except OSError as exc:
        raise ClipRejected(f"cannot read the file ({exc.strerror or exc})") from None
    except ValueError:
        raise ClipRejected("damaged SPHERE header: its second line is not the header size") from None
    fields: dict[str, str] = {}
    for line in lines[2:]:
        text = line.decode("ascii", "replace").strip()
        if text == "end_head":
            break
        parts = text.split(None, 2)
        if len(parts) == 3:
            fields[parts[0]] = parts[2]
    else:
        raise ClipRejected("damaged SPHERE header: no end_head")
    try:
        channels, rate = int(fields.get("channel_count", "1")), int(fields["sample_rate"])
        frames = int(fields["sample_count"])
    except (KeyError, ValueError) as exc:
        raise ClipRejected(f"damaged SPHERE header: no usable {exc}") from None
    if channels < 1 or rate <= 0 or frames <= 0:
        raise ClipRejected(f"the SPHERE header gives {channels} channel(s), {rate} Hz and {frames} samples")
    return Sphere(path, channels, rate, frames, fields.get("sample_coding", "pcm"))


def sphere_loader(sphere: Sphere, channel: int, start: float, end: float) -> AudioLoader:
    """Reads `channel` of the recording from `start` to `end` seconds: libsndfile for plain
    SPHERE, sph2pipe for shorten-compressed files."""
    if not sphere.shortened:
        return file_loader(sphere.path, start, end, channel=channel)
    tool = shutil.which("sph2pipe")

    def load(max_seconds: float) -> tuple[np.ndarray, int]:
        import soundfile as sf

        if end - start > max_seconds:
            raise ClipRejected(too_long_reason(end - start, max_seconds, cut=True))
        # -p: 16-bit PCM out; -c: the channel (1 or 2); -t: a cut in seconds; -f wav: a RIFF header
        command = [str(tool), "-f", "wav", "-p", "-c", str(channel + 1), "-t", f"{start:.3f}:{end:.3f}",
                   str(sphere.path)]
        try:
            done = subprocess.run(command, capture_output=True, check=False, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClipRejected(f"sph2pipe could not run ({exc})") from None
        if done.returncode != 0:
            message = done.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit {done.returncode}"]
            raise ClipRejected(f"sph2pipe failed: {message[0][:200]}")
        try:
            samples, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError...
            raise ClipRejected(f"cannot read sph2pipe's output ({exc})") from None
        return samples, rate

    return load


def _check_readable(sphere: Sphere) -> None:
    """Whether the recording can be decoded here at all: said once for the conversation, not once
    for each of its hundreds of turns."""
    if sphere.channels != 2:
        raise ClipRejected(f"{sphere.channels} channel(s): a Switchboard conversation has two (A and B)")
    if sphere.shortened:
        if shutil.which("sph2pipe") is None:
            raise ClipRejected(
                f"shorten-compressed SPHERE (sample_coding {sphere.coding}), which libsndfile cannot decode: "
                "install LDC's sph2pipe so that it is on PATH, or decompress the corpus with it first "
                "(sph2pipe -f sph in.sph out.sph)")
        return
    import soundfile as sf

    try:
        sf.info(str(sphere.path))
    except Exception as exc:  # LibsndfileError and friends
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ClipRejected(f"libsndfile cannot read it ({message[:200]}; sample_coding {sphere.coding})") from None


# --- the corpus ---


def read_switchboard(input_dir: str | Path, transcript_dir: str | Path | None = None) -> Source:
    """Every conversation under `input_dir` with MS-State transcripts under `transcript_dir`
    (default: `input_dir`), as one `Source` of turns, each conversation's turns in time order."""
    input_dir = _existing_dir(input_dir, "Switchboard folder")
    transcript_dir = input_dir if transcript_dir is None else _existing_dir(transcript_dir, "transcript folder")
    source = Source({"kind": "switchboard", "input_dir": str(input_dir.resolve()),
                     "transcript_dir": str(transcript_dir.resolve()), "speakers": dict(SPEAKERS)})
    recordings = _recordings(input_dir, source)
    if not recordings:
        raise CsmError(f"no Switchboard recordings (sw0NNNN.sph) under {input_dir}: give the folder of "
                       "LDC97S62 (--input-dir)")
    transcripts = _transcripts(transcript_dir, source)
    if not transcripts:
        raise CsmError(f"no MS-State transcripts (swNNNNA{TRANSCRIPT_SUFFIX}) under {transcript_dir}: they are a "
                       "separate download (swb_ms98_transcriptions); give their folder with --transcript-dir")
    conversations: dict[str, Any] = {}
    dropped_total = {"silence": 0, "noise": 0}
    for number in sorted(set(recordings) | {n for n, _ in transcripts}, key=int):
        name = f"sw{number}"
        sides = {side: transcripts[number, side] for side in SPEAKERS if (number, side) in transcripts}
        audio = recordings.get(number)
        if audio is None:
            for path in sides.values():
                source.reject(str(path), f"transcript without audio: no sw0{number}.sph or sw{number}.sph under "
                                         f"{input_dir}")
            continue
        if not sides:
            source.reject(str(audio), f"no MS-State transcripts: expected {name}A{TRANSCRIPT_SUFFIX} and "
                                      f"{name}B{TRANSCRIPT_SUFFIX} under {transcript_dir}")
            continue
        try:
            sphere = read_sphere(audio)
            _check_readable(sphere)
        except ClipRejected as exc:
            source.reject(str(audio), str(exc))
            continue
        entry, turns = _conversation(name, sphere, sides, source)
        for kind, count in entry.pop("dropped").items():
            dropped_total[kind] += count
        entry["audio"] = audio.relative_to(input_dir).as_posix()
        conversations[name] = entry
        source.clips += sorted(turns, key=lambda t: (t.cut[0], t.cut[1], t.speaker))
    source.description["conversations"] = conversations
    source.description["dropped_utterances"] = dropped_total
    return source


def _conversation(name: str, sphere: Sphere, sides: dict[str, Path],
                  source: Source) -> tuple[dict[str, Any], list[ClipSource]]:
    """A conversation's turns (both channels, unordered) and what the manifest says of it."""
    entry: dict[str, Any] = {"seconds": round(sphere.seconds, 3), "channels": {}, "dropped": {"silence": 0, "noise": 0}}
    turns: list[ClipSource] = []
    for side in SPEAKERS:
        if side not in sides:
            source.reject(f"{name}{side}", f"no transcript for channel {side}: expected "
                                           f"{name}{side}{TRANSCRIPT_SUFFIX}; the conversation is kept without it")
            continue
        channel = {"speaker": SPEAKERS[side], "transcript": sides[side].name, "utterances": 0, "turns": 0,
                   "dropped": {"silence": 0, "noise": 0}}
        for turn_or_drop in _utterances(name, side, sides[side], sphere, source):
            channel["utterances"] += 1
            if isinstance(turn_or_drop, str):
                channel["dropped"][turn_or_drop] += 1
                entry["dropped"][turn_or_drop] += 1
            else:
                channel["turns"] += 1
                turns.append(turn_or_drop)
        entry["channels"][side] = channel
    return entry, turns


def _utterances(name: str, side: str, path: Path, sphere: Sphere, source: Source):
    """Each usable line of a channel's transcript: a ClipSource, or the kind of a dropped one
    ("silence" or "noise"). Malformed lines are rejected here."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        source.reject(str(path), f"cannot read it as UTF-8 text ({exc})")
        return
    prefix = f"{name}{side}-ms98-a-"
    channel = 0 if side == "A" else 1
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label = f"{path.name} line {number}"
        match = _LINE.fullmatch(line.strip())
        if match is None:
            source.reject(label, "malformed: expected `<utterance id> <start s> <end s> <words>`")
            continue
        utterance, start, end, words = match.group(1), float(match.group(2)), float(match.group(3)), match.group(4)
        if not utterance.lower().startswith(prefix.lower()):
            source.reject(label, f"the utterance id {utterance} does not belong to this file (expected {prefix}NNNN)")
            continue
        if utterance in seen:
            source.reject(label, f"the utterance id {utterance} appears twice")
            continue
        seen.add(utterance)
        if end <= start:
            source.reject(label, f"the end ({end:g} s) is not after the start ({start:g} s)")
            continue
        if start >= sphere.seconds:
            source.reject(label, f"starts at {start:g} s, after the end of the recording ({sphere.seconds:.2f} s)")
            continue
        if sphere.seconds < end <= sphere.seconds + END_SLACK_SECONDS:
            end = sphere.seconds
        tokens = words.split()
        text = map_words(tokens)
        if not text:
            yield "silence" if all(t.lower() == SILENCE for t in tokens) else "noise"
            continue
        yield ClipSource(utterance, label, text, sphere_loader(sphere, channel, start, end),
                         speaker=SPEAKERS[side], conversation=name, cut=(start, end))


def _recordings(folder: Path, source: Source) -> dict[str, Path]:
    """The conversation number of each `sw0NNNN.sph` (or `swNNNN.sph`) under `folder`."""
    found: dict[str, Path] = {}
    for path in sorted(_files(folder, "*.sph")):
        match = _AUDIO_NAME.fullmatch(path.name)
        if match is None:
            continue  # not a conversation (LDC ships no other .sph files; a user's own files are skipped)
        number = str(int(match.group(1)))
        if number in found:
            source.reject(str(path), f"a second recording of conversation {number} (the first: {found[number]})")
            continue
        found[number] = path
    return found


def _transcripts(folder: Path, source: Source) -> dict[tuple[str, str], Path]:
    """(conversation number, side) of each MS-State transcript under `folder`."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(_files(folder, f"*{TRANSCRIPT_SUFFIX}")):
        match = _TRANSCRIPT_NAME.fullmatch(path.name)
        if match is None:
            source.reject(str(path), f"not named like an MS-State transcript (swNNNNA{TRANSCRIPT_SUFFIX})")
            continue
        key = (str(int(match.group(1))), match.group(2).upper())
        if key in found:
            source.reject(str(path), f"a second transcript of channel {key[1]} of sw{key[0]} (the first: {found[key]})")
            continue
        found[key] = path
    return found


def _files(folder: Path, pattern: str) -> list[Path]:
    return [p for p in folder.rglob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]

