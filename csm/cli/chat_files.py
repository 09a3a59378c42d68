"""What `csm chat` reads and writes: the conversations of `--mode batch`, the built-in example of
`--mode test`, and a conversation's turns as WAV files with a transcript.

The batch input is a JSON list of conversations:

    [
      {"name": "greeting",                      # optional: the output folder's name
       "turns": [
         {"speaker": 1, "text": "Hi! How was the trip?", "audio": "hi.wav"},   # given: joins the context
         {"speaker": 0, "text": "It was wonderful, thanks."}                   # no audio: generated
       ]}
    ]

Audio paths are relative to the JSON file. Every generated turn becomes `turn-NN.wav` (NN: its
place in the conversation) and each conversation gets `transcript.json` (the same shape, with the
audio of every turn) and `transcript.txt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm.errors import CsmError, read_json

TRANSCRIPT_JSON = "transcript.json"
TRANSCRIPT_TXT = "transcript.txt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TURN_KEYS = {"speaker", "text", "audio"}
_SHAPE = '[{"name": "...", "turns": [{"speaker": 0, "text": "...", "audio": "optional.wav"}]}]'

# Two speakers: a short exchange whose later turns lean on the earlier ones (`--mode test`).
EXAMPLE_TURNS = [
    (0, "Hey, did you manage to get tickets for the concert on Saturday?"),
    (1, "I did! Two seats near the front, though it took me an hour in the queue."),
    (0, "An hour? That's dedication. What do I owe you?"),
    (1, "Just buy the first round afterwards and we're even."),
]


@dataclass
class ScriptTurn:
    """A turn of a conversation to run: given (with its audio, 24 kHz float32) or to generate."""

    speaker: int
    text: str
    audio_file: Path | None = None
    audio: np.ndarray | None = None


@dataclass
class Script:
    name: str
    turns: list[ScriptTurn]

    @property
    def to_generate(self) -> list[int]:
        return [i for i, t in enumerate(self.turns) if t.audio_file is None]


def example_script() -> Script:
    return Script("example", [ScriptTurn(s, t) for s, t in EXAMPLE_TURNS])


def turn_file(index: int) -> str:
    return f"turn-{index + 1:02d}.wav"


def read_scripts(path: Path) -> list[Script]:
    """The conversations in a batch file, every field checked and every given audio file read."""
    from csm.audio import read_audio

    data = read_json(path, "conversations file")
    if not isinstance(data, list) or not data:
        raise CsmError(f"conversations file {path} must hold a non-empty list of conversations: {_SHAPE}")
    scripts, names = [], set()
    for c, item in enumerate(data):
        where = f"{path}: conversation {c + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("turns"), list) or not item["turns"]:
            raise CsmError(f'{where} must be an object with a non-empty "turns" list: {_SHAPE}')
        unknown = sorted(set(item) - {"name", "turns"})
        if unknown:
            raise CsmError(f'{where} has unknown keys {unknown}; a conversation has "name" and "turns"')
        name = item.get("name", f"conversation-{c + 1:02d}")
        if not isinstance(name, str) or not _NAME.match(name) or name in names:
            raise CsmError(f"{where}: name {name!r} must be unique and a plain folder name (letters, digits, "
                           "'.', '_', '-'; at most 64)")
        names.add(name)
        turns = [_read_turn(t, f"{where}, turn {i + 1}", path.parent) for i, t in enumerate(item["turns"])]
        script = Script(name, turns)
        if not script.to_generate:
            raise CsmError(f"{where} has no turn to generate: leave out the audio of the turns to speak")
        for turn in turns:
            if turn.audio_file is not None:
                turn.audio = read_audio(turn.audio_file)
        scripts.append(script)
    return scripts


def _read_turn(item, where: str, folder: Path) -> ScriptTurn:
    if not isinstance(item, dict):
        raise CsmError(f'{where} must be an object {{"speaker": 0, "text": "...", "audio": "optional.wav"}}')
    unknown = sorted(set(item) - _TURN_KEYS)
    if unknown:
        raise CsmError(f'{where} has unknown keys {unknown}; a turn has "speaker", "text" and "audio"')
    speaker = item.get("speaker")
    if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
        raise CsmError(f"{where}: speaker must be a non-negative integer (0, 1, ...), got {speaker!r}")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CsmError(f"{where}: text must be the words said in the turn, got {text!r}")
    audio = item.get("audio")
    if audio is not None and (not isinstance(audio, str) or not audio.strip()):
        raise CsmError(f"{where}: audio must be an audio file's path (relative to the JSON file), got {audio!r}")
    return ScriptTurn(speaker, text.strip(), None if audio is None else folder / audio)


def planned_files(script: Script, folder: Path) -> list[Path]:
    """Every file running `script` into `folder` writes."""
    return [folder / turn_file(i) for i in script.to_generate] + [folder / TRANSCRIPT_JSON, folder / TRANSCRIPT_TXT]


def check_free(paths: list[Path], force: bool) -> None:
    """Refuse, before anything is generated, to overwrite a file without --force."""
    taken = [p for p in paths if p.exists()]
    if taken and not force:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise CsmError(f"{taken[0]}{more} already exist; pass --force to overwrite, or choose another --output-dir")
    for path in paths:
        if path.is_dir():
            raise CsmError(f"{path} is a folder, not a file: choose another --output-dir")
        if path.parent.exists() and not path.parent.is_dir():
            raise CsmError(f"{path.parent} is a file, not a folder: choose another --output-dir")


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CsmError(f"cannot create the output folder {folder} ({exc.strerror}): choose another --output-dir") \
            from None


def write_transcript(folder: Path, name: str, turns: list[tuple[int, str, str | None]], force: bool) -> None:
    """`transcript.json` (the batch input shape: it can be read back) and `transcript.txt`.
    `turns`: (speaker, text, audio file or None)."""
    from csm.files import write_bytes_atomic, write_json_atomic

    for path in (folder / TRANSCRIPT_JSON, folder / TRANSCRIPT_TXT):
        if path.exists() and not force:
            raise CsmError(f"{path} already exists; pass --force to overwrite it")
    items = [{"speaker": s, "text": t, **({"audio": a} if a else {})} for s, t, a in turns]
    write_json_atomic(folder / TRANSCRIPT_JSON, [{"name": name, "turns": items}])
    text = "".join(f"[{s}] {t}" + (f"  ({a})" if a else "") + "\n" for s, t, a in turns)
    write_bytes_atomic(folder / TRANSCRIPT_TXT, text.encode("utf-8"))
