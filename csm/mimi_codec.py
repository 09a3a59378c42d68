"""What both Mimi codecs share (csm_torch.mimi over moshi, csm_mlx.mimi over moshi_mlx): the
input checks, and streaming decode.

Streaming decode turns one clip's codes into audio a block at a time; the blocks concatenated
equal one batch decode, because Mimi's decoder is causal (its convolutions and transformer look
only backwards), and every block of n frames gives exactly n * 1920 samples. A stream's state
lives in modules (moshi's streaming mode, moshi_mlx's convolution state), so each open stream
runs on its own copy of the codec's modules that shares the weights (`_replicate`): any number
of clips stream at once, each with its own state, and the codec itself stays free for batch
encode and decode. Closed streams' copies are kept for the next stream.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod

import numpy as np

from csm.errors import CsmError
from csm.mimi_files import FRAME_SIZE, NUM_CODEBOOKS, SAMPLE_RATE


def check_codes_shape(codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS:
        raise CsmError(f"Mimi decodes codes of shape [T, {NUM_CODEBOOKS}], got {codes.shape}")
    return codes


class MimiCodecBase(ABC):
    """numpy in/out Mimi: subclasses implement `_encode`, `_decode`, `_replicate` and `_open_stream`."""

    sample_rate = SAMPLE_RATE
    frame_size = FRAME_SIZE
    num_codebooks = NUM_CODEBOOKS

    def __init__(self):
        self._spare_replicas: list[MimiCodecBase] = []
        self._replica_lock = threading.Lock()

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Mono float32 audio at 24 kHz [N] -> int64 codes [T, 32], T = ceil(N / 1920)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise CsmError(f"Mimi encodes mono audio as a 1-D array, got shape {audio.shape}")
        return self._encode(audio)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [T, 32] -> float32 audio [T * 1920]."""
        return self._decode(check_codes_shape(codes))

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder for one clip, fed a block of codes at a time, with a state of its own; close
        it (or use `with`) when done."""
        with self._replica_lock:
            replica = self._spare_replicas.pop() if self._spare_replicas else self._replicate()
        return replica._open_stream(home=self)

    def _give_back(self, replica: MimiCodecBase) -> None:
        with self._replica_lock:
            self._spare_replicas.append(replica)

    @abstractmethod
    def _encode(self, audio: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _decode(self, codes: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _replicate(self) -> MimiCodecBase:
        """A codec over a copy of this one's modules sharing its weights (a state of its own)."""

    @abstractmethod
    def _open_stream(self, home: MimiCodecBase) -> StreamingDecoder:
        """A stream on this codec (a replica), handed back to `home` when it closes."""


class StreamingDecoder(ABC):
    """One clip decoded block by block; subclasses implement `_decode_block` and `_release`."""

    def __init__(self, codec: MimiCodecBase, home: MimiCodecBase):
        self._codec = codec  # the replica this stream runs on
        self._home = home
        self.closed = False

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The next codes [n, 32] of the clip -> float32 audio [n * 1920]."""
        if self.closed:
            raise CsmError("this Mimi streaming decoder is closed; start another with codec.streaming_decoder()")
        codes = check_codes_shape(codes)
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32)
        return self._decode_block(codes)

    def close(self) -> None:
        """Drop the stream's state and hand its modules back for the next stream."""
        if self.closed:
            return
        self.closed = True
        self._release()
        self._home._give_back(self._codec)

    def __enter__(self) -> StreamingDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def _decode_block(self, codes: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _release(self) -> None: ...


def share_weights_copy(module, tensors):
    """A deep copy of `module` whose `tensors` (its weights) are the original objects, not copies."""
    return copy.deepcopy(module, memo={id(t): t for t in tensors})
