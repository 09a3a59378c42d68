"""Audio out of the speakers (`csm-generate --play`, `csm chat`) and in from the microphone
(`csm chat --record`). sounddevice is the `audio` extra and needs the PortAudio system library (it
raises at import without it), so it is imported here, and only when playing or recording."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np

from csm.errors import CsmError

_NO_DEVICE = "cannot play audio: no usable output device ({}); use -o FILE instead"


def import_sounddevice(what: str = "play audio", instead: str = "use -o FILE"):
    """sounddevice, or a CsmError saying what to install (`what` could not be done; `instead`: the way
    around it)."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # no PortAudio raises OSError at import
        raise CsmError(
            f"cannot {what}: {exc}. Install the audio extra (pip install 'csm-speech[audio]') and PortAudio "
            f"(e.g. apt install libportaudio2), or {instead}"
        ) from None
    return sounddevice


def has_output_device() -> bool:
    """Whether sounddevice is installed and PortAudio has a default output device."""
    try:
        import sounddevice

        sounddevice.query_devices(kind="output")
    except Exception:  # ImportError, OSError without PortAudio, PortAudioError without a device
        return False
    return True


def require_input_device() -> None:
    """A CsmError now, before a model loads, when recording cannot work."""
    sd = import_sounddevice("record", "leave out --record")
    try:
        sd.query_devices(kind="input")
    except Exception as exc:  # PortAudioError
        raise CsmError(f"cannot record: no usable input device ({exc}); leave out --record") from None


def record(sample_rate: int, until: Callable[[], object]) -> np.ndarray:
    """Record mono audio from the default input device from now until `until()` returns (e.g. the
    user pressed Enter), as float32 at `sample_rate`."""
    from csm.audio import resample

    sd = import_sounddevice("record", "leave out --record")
    blocks = []
    try:
        # the device's own rate: many microphones refuse 24 kHz; soxr resamples afterwards
        rate = int(sd.query_devices(kind="input")["default_samplerate"])
        stream = sd.InputStream(samplerate=rate, channels=1, dtype="float32",
                                callback=lambda indata, frames, time, status: blocks.append(indata[:, 0].copy()))
        stream.start()
    except Exception as exc:  # PortAudioError: no default input device
        raise CsmError(f"cannot record: no usable input device ({exc}); leave out --record") from None
    try:
        until()
    finally:
        stream.stop()
        stream.close()
    audio = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    return resample(audio, rate, sample_rate)


def play(audio: np.ndarray, sample_rate: int) -> None:
    """Play a whole clip and wait for the end."""
    sd = import_sounddevice()
    try:
        sd.play(audio, sample_rate)
        sd.wait()
    except Exception as exc:  # PortAudioError and friends
        raise CsmError(_NO_DEVICE.format(exc)) from None


class ChunkPlayer:
    """Plays a clip while it is still being generated.

    The output device pulls samples in its own thread (sounddevice's callback) from a queue that
    `feed` fills, so it never waits on the generating thread between chunks. Playback starts once
    the buffered audio outlasts the wait for the next chunk (the caller's estimate), so a device
    that starts early does not run dry when generation is faster than real time but not by much;
    if the queue runs dry anyway the device plays silence and `underruns` counts it. Use as a
    context manager: leaving it on an error stops the device at once.
    """

    def __init__(self, sample_rate: int, blocksize: int = 1024):
        sd = import_sounddevice()
        self.sample_rate = sample_rate
        self.underruns = 0
        self.started = False
        self._queue: queue.Queue = queue.Queue()
        self._current = np.zeros(0, dtype=np.float32)
        self._ended = False  # the callback reached the end-of-clip marker
        self._drained = threading.Event()
        self._fed = 0
        self._played = 0
        try:
            self._stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32",
                                           blocksize=blocksize, callback=self._callback)
        except Exception as exc:  # PortAudioError: no default output device
            raise CsmError(_NO_DEVICE.format(exc)) from None

    @property
    def buffered_seconds(self) -> float:
        return (self._fed - self._played) / self.sample_rate

    def feed(self, chunk: np.ndarray, next_chunk_in: float = 0.0) -> None:
        """Queue `chunk`; `next_chunk_in`: seconds until the next chunk is expected."""
        chunk = np.asarray(chunk, dtype=np.float32)
        self._queue.put(chunk)
        self._fed += len(chunk)
        if not self.started and self.buffered_seconds >= next_chunk_in:
            self._start()

    def finish(self) -> None:
        """Mark the end of the clip and wait until all of it has been played."""
        self.end()
        self.wait()

    def end(self) -> None:
        """No more chunks: play what is queued (starting now if not started yet)."""
        self._queue.put(None)
        self._start()

    def wait(self) -> None:
        """Wait until everything up to `end()` has been played, then close the device."""
        self._drained.wait()
        self._stream.stop()  # returns once the device's last buffers have played
        self._stream.close()

    def __enter__(self) -> ChunkPlayer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not self._stream.closed:
            self._stream.abort()
            self._stream.close()

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        try:
            self._stream.start()
        except Exception as exc:
            raise CsmError(_NO_DEVICE.format(exc)) from None

    def _callback(self, outdata, frames, time, status) -> None:
        out = outdata[:, 0]
        filled = 0
        while filled < frames and not self._ended:
            if not len(self._current):
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    self.underruns += 1  # generation fell behind the device
                    break
                if item is None:
                    self._ended = True
                    break
                self._current = item
                continue
            n = min(frames - filled, len(self._current))
            out[filled : filled + n] = self._current[:n]
            self._current = self._current[n:]
            filled += n
        out[filled:] = 0
        self._played += filled
        if self._ended:
            self._drained.set()
