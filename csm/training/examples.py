"""A training example: a conversation of turns, some of them trained, as the backbone's frames.

An example is turns in order. Each turn is its text frames, its audio frames (Mimi codes) and one
all-zero end-of-speech (EOS) frame, exactly as a prompt is built for generation (`csm.prompt`).
The loss covers the audio frames of the trained turns, their EOS frames included: that is what
teaches the model to stop. Untrained turns are context (text and audio), as at generation.

The whole example must fit the model's positions. Context turns are dropped oldest first, whole,
until it fits; a trained turn is never cut (a cut turn would lose its EOS frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from csm.errors import CsmError
from csm.prompt import Frames, audio_frames, text_frames
from csm.text import TextTokenizer


@dataclass
class Turn:
    speaker: int
    text: str
    codes: np.ndarray  # [frames, 32] Mimi codes (a memory-mapped view, or an array)
    train: bool = True  # whether the loss covers this turn's audio


@dataclass
class Example:
    id: str
    turns: list[Turn] = field(default_factory=list)

    @property
    def num_trained_frames(self) -> int:
        """Audio frames the loss covers, EOS frames included."""
        return sum(len(t.codes) + 1 for t in self.turns if t.train)


@dataclass
class TrainingFrames:
    """One example's frames: tokens and mask [T, 33], and `trained` [T]: positions holding a
    trained audio frame (the EOS frames included). Position t's backbone state predicts frame
    t + 1's codebook 0, so the first audio frame of a turn is predicted from its text's last row."""

    tokens: np.ndarray
    mask: np.ndarray
    trained: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def turn_length(tokenizer: TextTokenizer, turn: Turn) -> int:
    """Positions a turn takes: its text tokens, its audio frames and the EOS frame."""
    return len(tokenizer.encode_turn(turn.text, turn.speaker)) + len(turn.codes) + 1


def build_training_frames(tokenizer: TextTokenizer, example: Example, num_codebooks: int, max_positions: int,
                          context_turns: int | None = None) -> TrainingFrames:
    """The example as frames, earlier context turns dropped (oldest first, whole) to fit
    `max_positions` and at most `context_turns` untrained turns before the first trained one
    kept. Raises when the trained turns alone do not fit."""
    turns = list(example.turns)
    first_trained = next((i for i, t in enumerate(turns) if t.train), None)
    if first_trained is None:
        raise CsmError(f"example {example.id!r} has no trained turn")
    lengths = [turn_length(tokenizer, t) for t in turns]
    start = 0
    if context_turns is not None:
        start = max(0, first_trained - context_turns)
    while sum(lengths[start:]) > max_positions and start < first_trained:
        start += 1
    if sum(lengths[start:]) > max_positions:
        raise CsmError(
            f"example {example.id!r} needs {sum(lengths[start:])} positions without its context, more than the "
            f"model's {max_positions}: split its audio into shorter turns")
    parts, trained = [], []
    for turn in turns[start:]:
        text = text_frames(tokenizer.encode_turn(turn.text, turn.speaker), num_codebooks)
        audio = audio_frames(np.asarray(turn.codes), num_codebooks)
        parts += [text, audio]
        trained += [np.zeros(len(text), dtype=bool), np.full(len(audio), turn.train, dtype=bool)]
    frames = Frames.concat(parts)
    return TrainingFrames(frames.tokens, frames.mask, np.concatenate(trained))
