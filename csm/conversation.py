"""A conversation: turns spoken one after another, each with the turns before it as context.

    conv = csm.Conversation()
    conv.add(1, "Hi! How was the trip?", audio=recorded)       # a given turn (24 kHz float32, or None)
    turn = conv.speak(gen, "It was wonderful, thanks.", speaker=0)
    turn.audio                                                # float32 mono 24 kHz, watermarked

The model takes a fixed number of prompt positions (`check_fits`), so a long conversation does
not fit whole: the context of the next turn is its newest turns, each one whole or not at all,
the oldest dropped first and never a gap between the kept ones (`csm.prompt.newest_that_fit`, the
rule a voice's reference clips are fitted by). A voice of the speaking turn keeps its reference
clips in front of the conversation; the conversation's turns fill the positions the clips leave.

Each turn's audio is encoded with Mimi once: a generated turn keeps the codes the model produced,
a given turn is encoded the first time it joins a context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from csm.audio import MODEL_SAMPLE_RATE, as_samples
from csm.errors import CsmError
from csm.prompt import Segment, newest_that_fit, segment_positions
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, Sampling


@dataclass
class Turn:
    """One turn: who spoke (a speaker id), what was said, and the audio (float32 mono at 24 kHz, or
    None for a turn known by its text only). `codes`: the audio's Mimi codes once known."""

    speaker: int
    text: str
    audio: np.ndarray | None = None
    codes: np.ndarray | None = None
    generated: bool = False

    def segment(self) -> Segment:
        """The turn as a context segment (codes, never audio: its audio is encoded already)."""
        return Segment(self.speaker, self.text, codes=self.codes)


class Conversation:
    """The turns so far, and what the next turn's context is. `voices`: voice profiles (names,
    speaker ids or `csm.voices.Voice`), each speaking for its own speaker id."""

    def __init__(self, turns: Iterable[Turn] = (), voices: Iterable = ()):
        self.turns: list[Turn] = []
        for turn in turns:
            self.add(turn.speaker, turn.text, turn.audio, codes=turn.codes).generated = turn.generated
        self.voices = self._voices_by_speaker(voices)

    @staticmethod
    def _voices_by_speaker(voices: Iterable) -> dict:
        from csm.voices import resolve_voice

        by_speaker = {}
        for given in voices:
            voice = resolve_voice(given)
            if voice.speaker_id in by_speaker:
                raise CsmError(f"voices {by_speaker[voice.speaker_id].name!r} and {voice.name!r} both speak as "
                               f"speaker {voice.speaker_id}: give each speaker one voice")
            by_speaker[voice.speaker_id] = voice
        return by_speaker

    def __len__(self) -> int:
        return len(self.turns)

    def add(self, speaker: int, text: str, audio=None, *, sample_rate: int = MODEL_SAMPLE_RATE,
            codes: np.ndarray | None = None) -> Turn:
        """Append a turn someone else spoke (or that is known by its text only)."""
        if not isinstance(text, str) or not text.strip():
            raise CsmError(f"turn {len(self.turns) + 1} has no text: give the words said in it")
        # Segment checks the speaker, the audio's shape and the codes, and resamples to 24 kHz
        checked = Segment(speaker, text.strip(), audio, sample_rate, codes)
        audio = None if checked.audio is None else as_samples(checked.audio)
        turn = Turn(int(checked.speaker), checked.text, audio, checked.codes)
        self.turns.append(turn)
        return turn

    def reset(self) -> None:
        """Forget every turn (the voices stay)."""
        self.turns.clear()

    def context(self, generator, text: str, speaker: int, max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
                reserved: int = 0) -> list[Segment]:
        """The segments before `text` by `speaker`: the newest turns whose prompt fits the model's
        positions with room for `max_audio_length_ms` of audio (and `reserved` positions, e.g. a
        voice's clips), whole turns only, the oldest dropped first."""
        max_frames = Sampling(max_audio_length_ms=max_audio_length_ms).max_frames
        room = generator.context_room(text, speaker, max_frames) - reserved
        sizes = []
        # encoding every turn would be wasted on the old ones that do not fit: size them newest first
        for turn in reversed(self.turns):
            self._encode(generator, turn)
            sizes.append(segment_positions(generator.tokenizer, turn.segment()))
            if sum(sizes) >= room:
                break
        offset = len(self.turns) - len(sizes)
        kept = newest_that_fit(sizes[::-1], room, contiguous=True)
        return [self.turns[offset + i].segment() for i in kept]

    @staticmethod
    def _encode(generator, turn: Turn) -> None:
        if turn.codes is None and turn.audio is not None and len(turn.audio):
            turn.codes = generator.encode(turn.audio)

    def speak(self, generator, text: str, speaker: int | None = None, *,
              max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS, temperature: float | None = None,
              topk: int | None = None, top_p: float | None = None, seed: int | None = None, watermark: bool = True,
              watermark_key: Sequence[int] | None = None, on_frame: Callable[[int], None] | None = None) -> Turn:
        """Generate the next turn with `generator`, the conversation so far as context, append it
        and return it. `speaker` None: the speaker of the only voice, else 0. With a voice for the
        speaker, its clips and sampling defaults are used. Turn i is seeded with `seed + i`, so a
        seeded conversation is the same every time without every turn drawing the same noise."""
        if speaker is None:
            speaker = next(iter(self.voices)) if len(self.voices) == 1 else 0
        if not isinstance(text, str) or not text.strip():
            raise CsmError("text is empty: give the words to speak")
        text = text.strip()
        voice = self.voices.get(speaker)
        turn_seed = None if seed is None else seed + len(self.turns)
        key = generator.prepare_audio(watermark, watermark_key)
        # the voice's clips first, fitted alone; the conversation gets the positions they leave
        speaker, clips, sampling = generator.voice_turn(voice, text, speaker, [], max_audio_length_ms, temperature,
                                                        topk, top_p, turn_seed)
        reserved = sum(segment_positions(generator.tokenizer, clip) for clip in clips)
        context = clips + self.context(generator, text, speaker, max_audio_length_ms, reserved)
        codes = generator.generate_codes(text, speaker, context, max_audio_length_ms, sampling.temperature,
                                         sampling.topk, sampling.top_p, sampling.seed, on_frame)
        audio = generator.decode(codes)
        if key is not None and len(audio):
            audio = generator.watermark(audio, key)
        turn = Turn(speaker, text, audio, codes, generated=True)
        self.turns.append(turn)
        return turn
