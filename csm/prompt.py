"""Conversation -> the backbone's 33-column frames (numpy; the same for every backend).

A position is a frame of 32 audio codebook columns then 1 text column, with a boolean mask
saying which columns count. A segment is its text frames (template in `csm.text`), then its
audio frames, then one all-zero end-of-audio frame. The prompt is the context segments in order,
then the text frames of the turn to generate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csm.audio import MODEL_SAMPLE_RATE, as_samples, resample
from csm.errors import CsmError
from csm.text import TextTokenizer


@dataclass
class Segment:
    """One turn of a conversation. `audio`: mono samples, or None for text only. A numpy array
    (or list) is stored as float32 numpy; a 1-D torch tensor (Sesame's Segment; any device, any
    float dtype) is kept as given, so Sesame's code can `torch.cat` the segments' audio; the
    backends read either through `csm.audio.as_samples`. Audio at another `sample_rate` than
    Mimi's 24 kHz is resampled here, once (a tensor stays a tensor of its dtype and device).
    `codes`: the audio's Mimi codes [frames, 32] when they are known already (a voice's cached
    codes): the prompt then takes them as they are and `audio` is not encoded, nor needed."""

    speaker: int
    text: str
    audio: np.ndarray | None = None  # or a 1-D torch tensor, kept as given
    sample_rate: int = MODEL_SAMPLE_RATE
    codes: np.ndarray | None = None

    def __post_init__(self):
        if not isinstance(self.speaker, (int, np.integer)) or self.speaker < 0:
            raise CsmError(f"speaker must be a non-negative integer, got {self.speaker!r}")
        if self.codes is not None:
            self.codes = check_segment_codes(self.codes)
        if self.audio is not None:
            audio = as_samples(self.audio)
            if audio.ndim != 1:
                raise CsmError(
                    f"segment audio must be mono (1-D), got shape {audio.shape}; average the channels "
                    "(csm.audio.to_mono) or load it with csm.audio.read_audio"
                )
            if hasattr(self.audio, "detach"):  # a tensor stays a tensor: Sesame's code torch.cat's seg.audio
                if self.sample_rate != MODEL_SAMPLE_RATE:
                    self.audio = self.audio.new_tensor(resample(audio, self.sample_rate, MODEL_SAMPLE_RATE))
            else:
                self.audio = resample(audio, self.sample_rate, MODEL_SAMPLE_RATE)
            self.sample_rate = MODEL_SAMPLE_RATE


def check_segment_codes(codes) -> np.ndarray:
    """Pre-encoded segment codes as int64 [frames, 32] with every code a Mimi code, else a CsmError."""
    from csm.mimi_files import CODEBOOK_SIZE, NUM_CODEBOOKS

    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS or not np.issubdtype(codes.dtype, np.integer):
        raise CsmError(f"segment codes must be integer Mimi codes [frames, {NUM_CODEBOOKS}], got {codes.dtype} "
                       f"{codes.shape}; give the audio instead and let the model encode it")
    if codes.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise CsmError(f"segment codes must lie in 0..{CODEBOOK_SIZE - 1}, got {codes.min()}..{codes.max()}: "
                       "they are not Mimi codes")
    return codes.astype(np.int64, copy=False)


@dataclass
class Frames:
    tokens: np.ndarray  # [T, 33] int64
    mask: np.ndarray  # [T, 33] bool

    @staticmethod
    def concat(parts: list[Frames]) -> Frames:
        return Frames(np.concatenate([p.tokens for p in parts]), np.concatenate([p.mask for p in parts]))

    def __len__(self) -> int:
        return len(self.tokens)


def text_frames(ids: list[int], num_codebooks: int) -> Frames:
    tokens = np.zeros((len(ids), num_codebooks + 1), dtype=np.int64)
    mask = np.zeros_like(tokens, dtype=bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return Frames(tokens, mask)


def audio_frames(codes: np.ndarray, num_codebooks: int) -> Frames:
    """codes [T, num_codebooks] -> T frames plus the all-zero end-of-audio frame."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != num_codebooks:
        raise CsmError(f"audio codes must be [frames, {num_codebooks}], got {codes.shape}")
    tokens = np.zeros((len(codes) + 1, num_codebooks + 1), dtype=np.int64)
    tokens[:-1, :-1] = codes
    mask = np.zeros_like(tokens, dtype=bool)
    mask[:, :-1] = True
    return Frames(tokens, mask)


def build_prompt(
    tokenizer: TextTokenizer,
    text: str,
    speaker: int,
    context: list[tuple[Segment, np.ndarray | None]],
    num_codebooks: int,
) -> Frames:
    """context: (segment, its Mimi codes [T, 32] or None when it has no audio), in order."""
    if not text or not text.strip():
        raise CsmError("text is empty: give the words to speak")
    parts = []
    for segment, codes in context:
        parts.append(text_frames(tokenizer.encode_turn(segment.text, segment.speaker), num_codebooks))
        if codes is not None:
            parts.append(audio_frames(codes, num_codebooks))
    parts.append(text_frames(tokenizer.encode_turn(text, speaker), num_codebooks))
    return Frames.concat(parts)


def segment_positions(tokenizer: TextTokenizer, segment: Segment) -> int:
    """The prompt positions `segment` takes: its text frames, then its audio frames and the
    end-of-audio frame when it has audio. Its audio must be encoded already (`codes`)."""
    if segment.audio is not None and segment.codes is None:
        raise CsmError("a segment's size needs its Mimi codes: encode its audio first (Generator.encode)")
    audio = 0 if segment.codes is None else len(segment.codes) + 1
    return len(tokenizer.encode_turn(segment.text, segment.speaker)) + audio


def newest_that_fit(sizes: list[int], room: int, *, contiguous: bool) -> list[int]:
    """Which of the items with these sizes (oldest first) to keep in `room` positions: the newest
    first, each one whole or not at all, the kept total below `room` (check_fits' strict limit).
    `contiguous`: stop at the first item that does not fit (a conversation keeps its newest turns
    without a gap); otherwise skip it and try older, smaller ones (a voice's reference clips).
    Returns the kept items' indices in their original order."""
    kept, used = [], 0
    for i in reversed(range(len(sizes))):
        if used + sizes[i] < room:
            kept.append(i)
            used += sizes[i]
        elif contiguous:
            break
    return kept[::-1]


def check_fits(prompt_len: int, max_frames: int, max_seq_len: int) -> None:
    """Sesame's limit: the prompt must be shorter than the positions left after the longest
    generation (`prompt + max_frames < max_seq_len`)."""
    if prompt_len + max_frames >= max_seq_len:
        raise CsmError(
            f"the prompt ({prompt_len} positions, context included) plus up to {max_frames} audio frames does not fit "
            f"the model's {max_seq_len} positions; shorten the context or lower the max audio length"
        )
