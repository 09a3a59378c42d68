"""A small conversational corpus made on the spot, without any download: scripted two-speaker
dialogues spoken by two espeak-ng voices, written as 24 kHz WAV files with the JSONL manifest
that `csm-finetune prepare` reads as conversations.

    from csm.training.dialogues import write_dialogues
    corpus = write_dialogues("dialogues")          # dialogues/dialogues.jsonl + dialogues/<name>/turn-NN.wav
    # csm-finetune prepare --data dialogues/dialogues.jsonl --output-dir prepared --validation-split 0.2

It is meant for trying the training pipeline end to end (`run_experiment.sh`), not for a voice
anyone wants: espeak-ng is a formant synthesiser, so the "speech" is robotic but real, aligned
with its text, and the two speakers differ clearly in pitch and timbre.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm.errors import CsmError

MANIFEST = "dialogues.jsonl"
# Speaker 0 and speaker 1: a male and a female variant of espeak-ng's American English voice.
VOICES = ("en-us+m3", "en-us+f2")
# espeak-ng pads each clip with silence; keep this much (seconds) either side of the speech
PAD_S = 0.15
SILENCE = 1e-3  # a sample quieter than this (-60 dBFS) is silence, as the preparer's own check

INSTALL_HINT = ("install espeak-ng: `sudo apt-get install espeak-ng` (Debian, Ubuntu), `brew install espeak-ng` "
                "(macOS), or on Windows the espeak-ng .msi installer from "
                "https://github.com/espeak-ng/espeak-ng/releases (then open a new terminal)")

# Original scripted dialogues: (name, turns); speakers alternate, speaker 0 first.
DIALOGUES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("coffee", (
        "Morning! Do you want a coffee? I'm about to make a pot.",
        "Yes, please. Strong, with a little milk.",
        "Coming right up. Did you sleep well?",
        "Not really, the neighbours had a party until two.",
        "Then you need this more than I do.",
    )),
    ("weather", (
        "Have you looked outside? It's pouring again.",
        "I know, and I left my umbrella at the office.",
        "You can borrow mine, I have a spare one in the hall.",
        "Thanks, I'll bring it back tomorrow.",
    )),
    ("bus", (
        "Excuse me, does this bus go to the train station?",
        "It does, but it takes the long way round.",
        "How long would that be, roughly?",
        "About twenty minutes, if the traffic is kind.",
        "That's fine, I have plenty of time. Thank you.",
        "You're welcome. Get off after the big bridge.",
    )),
    ("dinner", (
        "What should we cook tonight?",
        "How about pasta with tomatoes and fresh basil?",
        "Good idea. Do we still have garlic?",
        "There are two cloves left, that should be enough.",
        "Perfect. I'll put the water on.",
    )),
    ("garden", (
        "The tomatoes are finally turning red.",
        "Already? I thought they needed another week.",
        "The sunny days did the trick. Want to pick some?",
        "Sure, let me find a basket first.",
    )),
    ("library", (
        "Hi, I'd like to return these two books.",
        "Thank you. One of them is three days late, I'm afraid.",
        "Oh no, I completely forgot. Is there a fee?",
        "Just fifty cents. You can pay it next time.",
        "That's kind of you. I'll remember this time.",
    )),
    ("weekend", (
        "Any plans for the weekend?",
        "We're driving to the coast on Saturday.",
        "Lovely. Are you staying the night?",
        "Yes, in a small guest house near the harbour.",
        "Bring me back some postcards!",
        "I will, and maybe some salt water taffy.",
    )),
    ("phone", (
        "My phone keeps switching itself off.",
        "Maybe the battery is getting old.",
        "It's only two years old, though.",
        "Try a different charger before you buy a new one.",
    )),
    ("bakery", (
        "Good afternoon. What can I get you?",
        "A loaf of rye bread and two cinnamon rolls, please.",
        "Would you like the bread sliced?",
        "Yes, thin slices if possible.",
        "Of course. That comes to six dollars.",
    )),
    ("movie", (
        "Did you finish the film last night?",
        "I fell asleep twenty minutes before the end.",
        "You missed the best part! Should I tell you what happens?",
        "No, don't spoil it. I'll watch the ending tonight.",
        "All right, but call me when you've seen it.",
    )),
)


@dataclass
class DialogueCorpus:
    """What `write_dialogues` wrote: the folder, its manifest, and the number of dialogues,
    turns and seconds of audio."""

    folder: Path
    manifest: Path
    dialogues: int
    turns: int
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.dialogues} dialogues, {self.turns} turns, {self.seconds:.0f} s of speech into "
                f"{self.folder} (manifest {self.manifest})")


def find_espeak() -> str:
    """The espeak-ng program, or a CsmError saying how to install it. On Windows its installer
    does not put it on PATH, so its default install folder is looked in too."""
    found = shutil.which("espeak-ng")
    if found is None and sys.platform == "win32":
        for root in (os.environ.get("ProgramFiles"), os.environ.get("ProgramFiles(x86)")):
            candidate = Path(root or "C:\\Program Files") / "eSpeak NG" / "espeak-ng.exe"
            if candidate.is_file():
                found = str(candidate)
                break
    if found is None:
        raise CsmError(f"espeak-ng not found, which speaks the dialogues: {INSTALL_HINT}")
    return found


def speak(text: str, voice: str, *, pitch: int | None = None) -> tuple[np.ndarray, int]:
    """espeak-ng saying `text` in `voice` (an espeak-ng voice name such as `en-us+f2`; `pitch`
    0-99, espeak's default 50): (float32 mono samples, espeak's sample rate)."""
    import soundfile as sf

    espeak = find_espeak()
    pitch_args = [] if pitch is None else ["-p", str(pitch)]
    # espeak-ng's --stdout WAV header carries no length, so it writes a real file that is read back
    fd, tmp = tempfile.mkstemp(prefix="csm-espeak-", suffix=".wav")
    os.close(fd)
    try:
        done = subprocess.run([espeak, "-v", voice, *pitch_args, "-w", tmp, text], capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise CsmError(f"espeak-ng could not speak with voice {voice!r} ({reason}); `espeak-ng --voices=en` "
                           "lists the voices, and a variant is added with +, e.g. en-us+f2")
        samples, rate = sf.read(tmp, dtype="float32")
    finally:
        Path(tmp).unlink(missing_ok=True)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return samples, rate


def trim_silence(samples: np.ndarray, rate: int, pad_s: float = PAD_S) -> np.ndarray:
    """`samples` with the silence before and after the speech cut to `pad_s` seconds."""
    loud = np.flatnonzero(np.abs(samples) > SILENCE)
    if not len(loud):
        return samples
    pad = round(pad_s * rate)
    return samples[max(loud[0] - pad, 0):loud[-1] + 1 + pad]


def write_dialogues(output_dir: str | os.PathLike, *, count: int | None = None, voices: tuple[str, str] = VOICES,
                    force: bool = False, dialogues=DIALOGUES, sample_rate: int = 24_000) -> DialogueCorpus:
    """Speak `dialogues` (the first `count` of them, all by default; speaker 0 in voices[0], speaker
    1 in voices[1], turns alternating) into `output_dir`: `<name>/turn-NN.wav` (mono,
    `sample_rate`, 16-bit) and `dialogues.jsonl`, one line per turn with `conversation`,
    `speaker`, `text` and `audio`. The folder is built aside and put in place whole. An existing
    non-empty folder is refused, except an earlier corpus with `force` (then replaced); a folder
    of other files is never replaced."""
    import soundfile as sf

    from csm.audio import resample
    from csm.files import folder_atomic

    out = Path(output_dir)
    if len(voices) != 2 or not all(isinstance(v, str) and v.strip() for v in voices):
        raise CsmError(f"give two espeak-ng voices, one per speaker (e.g. {','.join(VOICES)}), got {voices!r}")
    if voices[0] == voices[1]:
        raise CsmError(f"the two speakers need two different voices, got {voices[0]!r} twice")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(dialogues):
            raise CsmError(f"the number of dialogues must be between 1 and {len(dialogues)}, got {count!r}")
        dialogues = dialogues[:count]
    _check_free(out, force)
    find_espeak()  # before the folder is started
    turns, seconds = 0, 0.0
    with folder_atomic(out) as tmp:
        lines = []
        for name, script in dialogues:
            (tmp / name).mkdir()
            for i, text in enumerate(script):
                speaker = i % 2
                samples, rate = speak(text, voices[speaker])
                samples = resample(trim_silence(samples, rate), rate, sample_rate)
                audio = f"{name}/turn-{i + 1:02d}.wav"
                sf.write(str(tmp / audio), samples, sample_rate, subtype="PCM_16")
                lines.append({"conversation": name, "speaker": speaker, "text": text, "audio": audio})
                turns += 1
                seconds += len(samples) / sample_rate
        (tmp / MANIFEST).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return DialogueCorpus(out, out / MANIFEST, len(dialogues), turns, seconds)


def _check_free(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CsmError(f"{out} is a file: give a folder for the dialogues")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise CsmError(f"{out} already holds files that are not a dialogue corpus: choose another folder "
                       "(--force replaces only a corpus written before)")
    if not force:
        raise CsmError(f"{out} already holds a dialogue corpus: use it as it is, or pass --force to write it again")
