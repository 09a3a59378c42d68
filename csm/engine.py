"""The generation engine: the frame loop's policy, written once, over one running batch.

    with gen.engine(max_batch_size=8) as engine:          # a background loop over one batch
        req = engine.submit("Hello.", speaker=0, seed=3)  # safe from any thread
        for chunk in req: ...                             # float32 24 kHz audio as it is made
        req.codes                                         # [frames, 32] once it has ended

A backend's `FrameLoop` does the tensor work (prefill a prompt into a slot, advance every slot
n frames, free a slot); everything else is here, the same for every backend:

- **admission**: requests wait in order (at most `max_queue`); at each check point the waiting
  ones take free slots and are prefilled one by one, so the running streams stall for those
  prefills only; each joins the batch with its first frame;
- **check points**: the loop advances the batch by blocks of frames with one host sync each:
  `block_frames` of the backend (every frame eagerly, 8 when CUDA-graphed), fewer when a
  stream's first chunk of audio or its maximum length comes sooner;
- **end of speech**: a stream ends on its first all-zero frame, which is not kept, or at its
  maximum length; cancelling ends it at the next check point; either way its slot is free at once;
- **independence**: each stream samples with its own generator seeded at submission, and rows
  of a batch never mix, so a stream's codes are those it would get alone with the same seed,
  whatever runs beside it and whenever it joined;
- **audio**: each request decodes its own blocks with its own Mimi streaming state and
  watermarks them (`csm.streaming` says how the chunks are cut), in the thread that iterates it,
  so the batch never waits for a decoder.

An engine made with `background=False` has no thread: waiting on a request runs the loop in the
waiting thread. `Generator.generate`, `generate_batch` and `stream` use it that way.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from csm.errors import CsmError
from csm.prompt import Frames, Segment, check_fits
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, Sampling
from csm.streaming import DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, ChunkPlan, plan_chunks, regroup

if TYPE_CHECKING:
    from csm.api import Generator

END_OF_SPEECH, MAX_LENGTH, CANCELLED = "end_of_speech", "max_length", "cancelled"


class EngineFull(CsmError):
    """More requests wait than the engine's queue holds."""


class Request:
    """One submitted turn: iterate it for audio chunks (once), or read `codes` when it has ended.

    `finish_reason` is None while it runs, then "end_of_speech", "max_length" or "cancelled";
    `joined_frame` is the engine's frame count when it joined the batch, and `slot` the batch row
    it took (both None before)."""

    def __init__(self, engine: Engine, sampling: Sampling, seed: int, first_block: int,
                 plan: ChunkPlan | None, watermark_key: tuple[int, ...] | None):
        self.sampling = sampling
        self.seed = seed
        self.first_block = first_block
        self.joined_frame: int | None = None
        self.slot: int | None = None
        self.finish_reason: str | None = None
        self._engine = engine
        self._plan = plan
        self._watermark_key = watermark_key
        self._cond = threading.Condition()
        self._unread: deque[np.ndarray] = deque()
        self._kept: list[np.ndarray] = []
        self._frames = 0
        self._error: BaseException | None = None
        self._cancel = False
        self._iterated = False

    # --- for the user -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def frames(self) -> int:
        """Frames kept so far."""
        return self._frames

    def cancel(self) -> None:
        """End the request at the next check point (its slot, or its place in the queue, is freed)."""
        with self._cond:
            self._cancel = True
        self._engine._wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has ended (True) or `timeout` seconds have passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if not self._engine._pump():
                with self._cond:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left if left is not None else 0.5)
        return True

    @property
    def codes(self) -> np.ndarray:
        """Every kept frame's codes [frames, 32] (int64), once the request has ended (waits)."""
        self.wait()
        self._raise_error()
        return self._concat(self._kept)

    def blocks(self) -> Iterator[np.ndarray]:
        """Code blocks [n, 32] as the loop clears them, until the request ends."""
        while True:
            with self._cond:
                block = self._unread.popleft() if self._unread else None
                ended = block is None and self.done
            if block is not None:
                yield block
            elif ended:
                self._raise_error()
                return
            elif not self._engine._pump():
                with self._cond:
                    if not self._unread and not self.done:
                        self._cond.wait(0.5)

    def collect(self, on_frame: Callable[[int], None] | None = None) -> np.ndarray:
        """`codes`, calling `on_frame(frames so far)` after each block."""
        kept, total = [], 0
        for block in self.blocks():
            kept.append(block)
            total += len(block)
            if on_frame is not None:
                on_frame(total)
        return self._concat(kept)

    def __iter__(self) -> Iterator[np.ndarray]:
        """float32 mono 24 kHz audio chunks, as `Generator.stream` yields them."""
        if self._plan is None:
            raise CsmError("this request was submitted for codes only; read request.codes")
        if self._iterated:
            raise CsmError("a request's audio can be iterated once; keep the chunks you need")
        self._iterated = True
        return self._audio(self._plan)

    # --- for the engine -----------------------------------------------------------------------
    def _audio(self, plan: ChunkPlan) -> Iterator[np.ndarray]:
        gen, lock = self._engine.generator, self._engine._backend.lock
        done = 0
        try:
            with lock():
                decoder = gen.codec.streaming_decoder()  # this request's own Mimi state
            with decoder:
                for codes in regroup(self.blocks(), plan):
                    codes = gen.check_codes(codes, first_frame=done)
                    with lock():
                        audio = decoder.decode(codes)
                    done += len(codes)
                    if self._watermark_key is not None:
                        audio = gen.watermark(audio, self._watermark_key)
                    yield audio
        finally:
            if not self.done:  # the listener left early: stop generating for nobody
                self.cancel()

    def _concat(self, blocks: Sequence[np.ndarray]) -> np.ndarray:
        if not blocks:
            return np.zeros((0, self._engine.generator.config.audio_num_codebooks), dtype=np.int64)
        return np.concatenate(blocks)

    def _raise_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, CsmError):
                raise self._error
            raise CsmError(f"generation failed: {self._error!r}") from self._error

    def _take(self, block: np.ndarray) -> bool:
        """Keep a new block of frames [n, 32] up to its first all-zero frame; True once ended.
        (The loop never runs a stream past its maximum length, so the block fits.)"""
        silent = np.flatnonzero(~block.any(axis=1))
        kept = block[: silent[0]] if len(silent) else block
        with self._cond:
            if len(kept):
                self._unread.append(kept)
                self._kept.append(kept)
                self._frames += len(kept)
            self._cond.notify_all()
        if len(silent):
            self._finish(END_OF_SPEECH)
        elif self._frames >= self.sampling.max_frames:
            self._finish(MAX_LENGTH)
        return self.done

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason = reason
                self._error = error
            self._cond.notify_all()

    def _frames_to_next_check(self, block_frames: int) -> int:
        """Frames until this stream wants the loop to stop: its first block, its maximum length."""
        left = self.sampling.max_frames - self._frames
        if self._frames < self.first_block:
            left = min(left, self.first_block - self._frames)
        return max(1, min(left, block_frames))


class Engine:
    """Continuous batching over one backend frame loop of `max_batch_size` slots."""

    def __init__(self, generator: Generator, max_batch_size: int = 8, max_queue: int = 64,
                 background: bool = True):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CsmError(f"{name} must be a whole number >= 1, got {value!r}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.frames = 0  # frames the batch has advanced: the engine's clock
        backend = generator._backend
        self._backend = backend
        with backend.lock():
            self._loop = backend.frame_loop(max_batch_size)
        self._slots: list[Request | None] = [None] * max_batch_size
        self._waiting: deque[tuple[Request, Frames]] = deque()
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        if background:
            self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
            self._thread.start()

    # --- submitting ---------------------------------------------------------------------------
    def submit(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float | None = None,
        topk: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES,
        chunk_frames: int = DEFAULT_CHUNK_FRAMES,
        watermark: bool = True,
        watermark_key: Sequence[int] | None = None,
        *,
        voice=None,
    ) -> Request:
        """Queue a turn to speak (`Generator.stream`'s arguments); iterate the request for its audio.
        Bad arguments, a missing codec or missing watermark weights raise here, before any frame.
        None means the `voice`'s value (its speaker id, sampling defaults), else csm's default."""
        speaker, context, sampling = self.generator.voice_turn(voice, text, speaker, context, max_audio_length_ms,
                                                               temperature, topk, top_p, seed)
        plan = plan_chunks(first_chunk_frames, chunk_frames, watermark)
        key = self.generator.prepare_audio(watermark, watermark_key)
        prompt = self.generator.prompt(text, speaker, context)
        return self.submit_prompt(prompt, sampling, plan=plan, watermark_key=key)

    def submit_prompt(self, prompt: Frames, sampling: Sampling, plan: ChunkPlan | None = None,
                      watermark_key: tuple[int, ...] | None = None) -> Request:
        """Queue prompt frames (`Generator.prompt`); with a chunk `plan` the request yields audio,
        without one it is read as codes."""
        if self._closed:
            raise CsmError("this engine is closed; make another with gen.engine()")
        check_fits(len(prompt), sampling.max_frames, self.generator.config.backbone.max_seq_len)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        first_block = plan.first if plan is not None else self._loop.block_frames
        request = Request(self, sampling, seed, first_block, plan, watermark_key)
        with self._cond:
            if self._closed:
                raise CsmError("this engine is closed; make another with gen.engine()")
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"{len(self._waiting)} requests already wait for a slot (max_queue={self.max_queue}); "
                                 "try again later, or make the engine with a larger max_queue or max_batch_size")
            self._waiting.append((request, prompt))
            self._cond.notify_all()
        return request

    # --- state --------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Streams in the batch now."""
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Cancel what is queued or running, stop the loop and free the batch's memory."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._stopped.wait()
        with self._step_lock:
            for request, _ in self._waiting:
                request._finish(CANCELLED)
            self._waiting.clear()
            for slot, request in enumerate(self._slots):
                if request is not None:
                    request._finish(CANCELLED)
                    self._slots[slot] = None
            self._loop = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the loop -----------------------------------------------------------------------------
    def step(self, max_frames: int | None = None) -> bool:
        """One turn of the loop: admit waiting requests to free slots, then advance the batch by
        one block (of at most `max_frames` frames, if given). False when there was nothing to do.
        The background thread calls this; call it yourself on an engine made without one."""
        with self._step_lock:
            if self._loop is None:
                return False
            self._drop_cancelled()
            admitted = self._admit()
            running = [(slot, r) for slot, r in enumerate(self._slots) if r is not None]
            if not running:
                return admitted
            block = self._loop.block_frames if max_frames is None else max(1, min(max_frames, self._loop.block_frames))
            n = min(r._frames_to_next_check(block) for _, r in running)
            try:
                with self._backend.lock():
                    codes = self._loop.advance(n)
            except Exception as exc:  # the device failed: every running stream fails with it
                for slot, request in running:
                    self._release(slot, request, CANCELLED, exc)
                return True
            self.frames += n
            for slot, request in running:
                if request._take(codes[slot]):
                    self._release(slot, request)
            return True

    def _admit(self) -> bool:
        admitted = False
        for slot in range(self.max_batch_size):
            if self._slots[slot] is not None:
                continue
            with self._cond:
                if not self._waiting:
                    break
                request, prompt = self._waiting.popleft()
            if request._cancel:
                request._finish(CANCELLED)
                continue
            admitted = True
            try:
                with self._backend.lock():
                    first = self._loop.start(slot, prompt.tokens, prompt.mask, request.sampling, request.seed)
            except Exception as exc:
                request._finish(CANCELLED, exc)
                self._loop.drop(slot)  # whatever the failed start left there
                continue
            request.joined_frame, request.slot = self.frames, slot
            self._slots[slot] = request
            if request._take(first[None]):
                self._release(slot, request)
        return admitted

    def _drop_cancelled(self) -> None:
        with self._cond:
            kept = deque(item for item in self._waiting if not item[0]._cancel)
            for request, _ in self._waiting:
                if request._cancel:
                    request._finish(CANCELLED)
            self._waiting = kept
        for slot, request in enumerate(self._slots):
            if request is not None and request._cancel:
                self._release(slot, request, CANCELLED)

    def _release(self, slot: int, request: Request, reason: str | None = None, error: BaseException | None = None):
        if reason is not None:
            request._finish(reason, error)
        self._slots[slot] = None
        self._loop.drop(slot)

    def _pump(self) -> bool:
        """Run the loop in the calling thread when the engine has none; False if it has one."""
        if self._thread is not None:
            return False
        return self.step()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not any(self._slots):
                    self._cond.wait()
                if self._closed:
                    break
            self.step()
        self._stopped.set()
        if self._backend.park_threads:
            threading.Event().wait()  # a daemon thread that never ends (see `Backend.park_threads`)
