"""The measurement protocol, the same for every engine (`benchmarks.engines`).

- steady state: frames/s from the difference of two generation lengths, so the prompt's
  prefill and every fixed cost per call cancel out; both after a warm-up call, which also
  captures CUDA graphs and compiles (its time is reported apart, as setup);
- streamed audio: one call that streams code blocks (the first after `first_chunk` frames,
  then every `chunk`) and decodes each block through Mimi as it comes, as a player would.
  Time to first audio = from the call to the first decoded samples; real-time factor =
  the whole call, generation and decode, over the audio's duration. No watermark (it runs
  once, after generation, on the CPU);
- peak memory of the device while the engine ran.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24_000
STREAMING = "streaming"
STAND_IN = "per-block decode (stand-in, no streaming decoder here)"


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


@dataclass
class Steady:
    setup_s: float  # the warm-up call: graph capture, compilation, first-touch allocations
    frames_per_s: float  # all streams together
    frames_timed: int
    codes: list[np.ndarray]  # the short call's codes, to compare implementations


def steady_state(engine, short: int, long: int) -> Steady:
    setup_s, _ = timed(lambda: engine.generate(short), engine.sync)
    t_short, codes_short = timed(lambda: engine.generate(short), engine.sync)
    t_long, codes_long = timed(lambda: engine.generate(long), engine.sync)
    frames = sum(map(len, codes_long)) - sum(map(len, codes_short))
    if frames <= 0 or t_long <= t_short:
        raise RuntimeError(f"no steady state: {frames} more frames in {t_long - t_short:+.3f} s "
                           "(the engine stopped early?)")
    return Steady(setup_s, frames / (t_long - t_short), frames, codes_short)


@dataclass
class StreamedAudio:
    first_audio_s: float
    real_time_factor: float
    audio_s: float
    decoder: str


@contextlib.contextmanager
def block_decoder(codec) -> Iterator[tuple[Callable[[np.ndarray], np.ndarray], str]]:
    """(decode one block of codes [n, 32] -> audio [n * 1920], what kind of decoder it is).

    A streaming decoder keeps Mimi's state from block to block; a codec without one decodes each
    block alone with `codec.decode` (same cost per call, audio slightly off at the seams): a
    stand-in, labelled as such in the results."""
    if not hasattr(codec, "streaming_decoder"):
        yield codec.decode, STAND_IN
        return
    with codec.streaming_decoder() as decoder:
        yield decoder.decode, STREAMING


def streamed_audio(engine, codec, frames: int, first_chunk: int, chunk: int) -> StreamedAudio:
    # an untimed short pass first: Mimi's first calls (kernel selection, allocations) cost
    # seconds on a GPU, once per process, and would otherwise land in the first row's figures
    with block_decoder(codec) as (decode, _):
        for block in engine.stream(first_chunk + chunk, first_chunk, chunk):
            decode(block)
    with block_decoder(codec) as (decode, kind):
        engine.sync()
        start = time.perf_counter()
        first, samples = None, 0
        for block in engine.stream(frames, first_chunk, chunk):
            audio = np.asarray(decode(block))  # numpy on the host: the work behind it is done
            if first is None:
                first = time.perf_counter() - start
            samples += len(audio)
        total = time.perf_counter() - start
    audio_s = samples / SAMPLE_RATE
    return StreamedAudio(first, total / audio_s, audio_s, kind)


# --- peak memory ------------------------------------------------------------------------------

class MemoryMeter:
    """Peak memory of one device since `reset()`, in bytes; `kind` says what is counted."""

    kind = ""

    def reset(self) -> None: ...

    def peak(self) -> int: ...

    def current(self) -> int:
        """What is held now (a row's growth is its peak over this, read before it builds)."""
        return 0


class CudaMemory(MemoryMeter):
    kind = "torch.cuda.max_memory_allocated"

    def reset(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated()

    def current(self) -> int:
        import torch

        return torch.cuda.memory_allocated()


class MlxMemory(MemoryMeter):
    kind = "mx.get_peak_memory"

    def reset(self) -> None:
        import mlx.core as mx

        mx.reset_peak_memory()

    def peak(self) -> int:
        import mlx.core as mx

        return mx.get_peak_memory()


class ProcessMemory(MemoryMeter):
    """The process's peak resident memory. Linux can reset the high-water mark (clear_refs 5),
    so each row counts its own peak; elsewhere it is the peak since the process started."""

    def __init__(self):
        self._status = Path("/proc/self/status")
        self.resettable = self._status.exists() and self._try_reset()
        self.kind = "process peak RSS" + ("" if self.resettable else " since start")

    def _try_reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.resettable:
            self._try_reset()

    def peak(self) -> int:
        if self._status.exists():
            for line in self._status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux

    def current(self) -> int:
        if self._status.exists():
            for line in self._status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0  # no portable reading of the resident size: growth is then the whole peak


# --- the engine under arrivals ----------------------------------------------------------------

@dataclass
class EngineRun:
    streams: int
    arrival_s: float  # between two submissions
    frames_per_s: float  # every stream's frames over the time from the first submission to the last end
    first_audio_s: list[float]  # per stream, from its submission to its first audio (or first codes)
    audio: bool  # first_audio_s is decoded audio (else the first code block)


def engine_arrivals(generator, prompt, streams: int, frames: int, first_chunk: int, chunk: int,
                    audio: bool) -> EngineRun:
    """`streams` requests of `frames` frames each, submitted one by one to a background engine of
    `streams` slots over the first half of the time one stream takes alone; each is consumed in
    its own thread as a player would (audio chunks decoded with its own Mimi state, no watermark)."""
    import threading

    from csm.engine import Engine
    from csm.sampling import FRAME_MS, Sampling
    from csm.streaming import ChunkPlan

    greedy = Sampling(topk=1, max_audio_length_ms=frames * FRAME_MS, seed=0)
    plan = ChunkPlan(first_chunk, chunk)
    with Engine(generator, max_batch_size=streams, max_queue=streams) as engine:
        # warm-up: every batch bucket up to `streams` (graph captures, compiles), then one stream alone
        warm = [engine.submit_prompt(prompt, Sampling(topk=1, max_audio_length_ms=4 * FRAME_MS))
                for _ in range(streams)]
        for r in warm:
            r.wait()
        t = time.perf_counter()
        engine.submit_prompt(prompt, greedy).wait()
        arrival = (time.perf_counter() - t) / 2 / streams
        firsts: list[float | None] = [None] * streams
        counts = [0] * streams

        def consume(i: int, request, submitted: float) -> None:
            source = iter(request) if audio else request.blocks()
            for _ in source:
                if firsts[i] is None:
                    firsts[i] = time.perf_counter() - submitted
            counts[i] = request.frames

        threads = []
        start = time.perf_counter()
        for i in range(streams):
            time.sleep(max(0.0, start + i * arrival - time.perf_counter()))
            submitted = time.perf_counter()
            request = engine.submit_prompt(prompt, greedy, plan=plan if audio else None)
            threads.append(threading.Thread(target=consume, args=(i, request, submitted)))
            threads[-1].start()
        for thread in threads:
            thread.join()
        total = time.perf_counter() - start
    return EngineRun(streams, arrival, sum(counts) / total, [f for f in firsts if f is not None], audio)
