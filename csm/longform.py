"""Long text spoken as one stream of audio: turns (`csm.sentences.split_turns`) submitted to an
engine one after another, each with the previous turns, their text and the codes just made, as
context, so a paragraph keeps one voice.

    with gen.engine() as engine:
        speech = LongSpeech(engine, split_turns(text), voice="Ada", seed=1)
        speech.start()            # the first turn joins the queue now (EngineFull if it is full)
        for chunk in speech: ...  # float32 24 kHz audio, every turn's, in order

Every turn is checked when the LongSpeech is made (its prompt fits the model with the base
context and the voice), so a bad input fails before any audio. A later turn needs the codes of
the one before it, so it is submitted when that one ends; when the queue is full then, it waits
for room rather than fail a stream that has started. Previous turns that would not fit a turn's
prompt are left out, the oldest first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np

from csm.engine import CANCELLED, Engine, EngineFull, Request
from csm.errors import CsmError
from csm.prompt import Frames, Segment, check_fits
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, Sampling
from csm.streaming import DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, plan_chunks

DEFAULT_CONTEXT_TURNS = 2  # previous turns a turn hears: enough to hold the voice, little prompt
_RETRY_S = 0.05  # how often a later turn retries a full queue


class LongSpeech:
    """Turns spoken in order on `engine` as one stream (see the module). Iterate it once for audio;
    `cancel()` from any thread ends it at the engine's next check point."""

    def __init__(self, engine: Engine, turns: Sequence[str], speaker: int | None = None,
                 context: Sequence[Segment] = (), *, voice=None,
                 max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS, temperature: float | None = None,
                 topk: int | None = None, top_p: float | None = None, seed: int | None = None,
                 first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                 watermark: bool = True, watermark_key: Sequence[int] | None = None,
                 context_turns: int = DEFAULT_CONTEXT_TURNS):
        turns = list(turns)
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise CsmError("give at least one turn of text, and no empty turn (csm.sentences.split_turns makes them)")
        if isinstance(context_turns, bool) or not isinstance(context_turns, int) or context_turns < 0:
            raise CsmError(f"context_turns must be a whole number >= 0, got {context_turns!r}")
        gen = engine.generator
        if voice is not None:
            from csm.voices import resolve_voice

            voice = resolve_voice(voice)  # the store is read once for every turn
        self.engine = engine
        self.turns = turns
        self.frames = 0  # frames spoken so far, every turn's
        self.finish_reason: str | None = None
        self._speaker, self._voice, self._seed = speaker, voice, seed
        self._sampling_args = (max_audio_length_ms, temperature, topk, top_p)
        self._context_turns = context_turns
        self._plan = plan_chunks(first_chunk_frames, chunk_frames, watermark)
        self._key = gen.prepare_audio(watermark, watermark_key)
        self._context = [self._encoded(seg, i) for i, seg in enumerate(context)]
        self._cancelled = threading.Event()
        self._request: Request | None = None
        self._iterated = False
        self._lock = threading.Lock()
        self._first = self._turn(0, [])
        for i in range(1, len(turns)):
            self._turn(i, [])  # fails now, not midway through the stream

    def _encoded(self, segment: Segment, index: int) -> Segment:
        """A context segment with its audio encoded once, rather than once per turn."""
        if not isinstance(segment, Segment):
            raise CsmError(f"context item {index + 1} must be a csm.Segment, got {type(segment).__name__}")
        if segment.codes is None and segment.audio is not None:
            return Segment(segment.speaker, segment.text, codes=self.engine.generator.encode(segment.audio))
        return segment

    def _turn(self, i: int, previous: list[Segment]) -> tuple[Frames, Sampling, int]:
        """(prompt, sampling, speaker) of turn i after the `previous` turns, dropping the oldest of
        them while the prompt does not fit."""
        gen = self.engine.generator
        seed = None if self._seed is None else self._seed + i
        while True:
            speaker, context, sampling = gen.voice_turn(self._voice, self.turns[i], self._speaker,
                                                        self._context + previous, *self._sampling_args, seed)
            prompt = gen.prompt(self.turns[i], speaker, context)
            fits = len(prompt) + sampling.max_frames < gen.config.backbone.max_seq_len
            if fits or not previous:
                break
            previous = previous[1:]
        check_fits(len(prompt), sampling.max_frames, gen.config.backbone.max_seq_len)
        return prompt, sampling, speaker

    def start(self) -> Request:
        """Queue the first turn now (raises `EngineFull` when the engine's queue is full)."""
        with self._lock:
            if self._request is None:
                prompt, sampling, _ = self._first
                self._request = self.engine.submit_prompt(prompt, sampling, plan=self._plan, watermark_key=self._key)
            return self._request

    def cancel(self) -> None:
        """Stop speaking: the running turn ends at the next check point and no later turn starts."""
        self._cancelled.set()
        with self._lock:
            request = self._request
        if request is not None:
            request.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._iterated:
            raise CsmError("a LongSpeech's audio can be iterated once")
        self._iterated = True
        return self._chunks()

    def _chunks(self) -> Iterator[np.ndarray]:
        previous: list[Segment] = []
        completed = False
        try:
            for i, text in enumerate(self.turns):
                if i == 0:
                    request, speaker = self.start(), self._first[2]
                else:
                    prompt, sampling, speaker = self._turn(i, previous)
                    request = self._submit_when_room(prompt, sampling)
                if request is None or self.cancelled:
                    return
                yield from request
                self.frames += request.frames
                self.finish_reason = request.finish_reason
                if request.finish_reason == CANCELLED:
                    return  # not completed: the finally block marks the whole speech cancelled
                codes = request.codes
                if len(codes) and self._context_turns:
                    previous = (previous + [Segment(speaker, text, codes=codes)])[-self._context_turns:]
            completed = True
        finally:
            if not completed:  # the listener left early (or a turn failed): stop generating for nobody
                self.cancel()
                self.finish_reason = CANCELLED

    def _submit_when_room(self, prompt: Frames, sampling: Sampling) -> Request | None:
        """Submit a later turn, waiting while the queue is full; None when cancelled meanwhile."""
        while not self.cancelled:
            try:
                request = self.engine.submit_prompt(prompt, sampling, plan=self._plan, watermark_key=self._key)
            except EngineFull:
                self._cancelled.wait(_RETRY_S)
                continue
            with self._lock:
                self._request = request
            if self.cancelled:
                request.cancel()
            return request
        return None
