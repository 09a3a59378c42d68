"""What both Mimi codecs share (csm_torch.mimi over moshi, csm_mlx.mimi over moshi_mlx): the
input checks, and streaming decode.

Streaming decode turns one clip's codes into audio a block at a time; the blocks concatenated
equal one batch decode, because Mimi's decoder is causal (its convolutions and transformer look
only backwards), and every block of n frames gives exactly n * 1920 samples. The stream's state
lives in the codec's own modules (moshi's streaming mode covers the encoder and the decoder,
moshi_mlx keeps convolution state in the modules), so while a stream is open the codec refuses
other work instead of silently corrupting that stream or the other call's audio.
"""

from __future__ import annotations

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
    """numpy in/out Mimi: subclasses implement `_encode`, `_decode` and `_open_stream`."""

    sample_rate = SAMPLE_RATE
    frame_size = FRAME_SIZE
    num_codebooks = NUM_CODEBOOKS
    _stream: "StreamingDecoder | None" = None

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Mono float32 audio at 24 kHz [N] -> int64 codes [T, 32], T = ceil(N / 1920)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise CsmError(f"Mimi encodes mono audio as a 1-D array, got shape {audio.shape}")
        self._refuse_while_streaming()
        return self._encode(audio)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [T, 32] -> float32 audio [T * 1920]."""
        codes = check_codes_shape(codes)
        self._refuse_while_streaming()
        return self._decode(codes)

    def streaming_decoder(self) -> "StreamingDecoder":
        """A decoder for one clip, fed a block of codes at a time; close it (or use `with`) when done."""
        self._refuse_while_streaming()
        self._stream = self._open_stream()
        return self._stream

    def _refuse_while_streaming(self) -> None:
        if self._stream is not None:
            raise CsmError(
                "this Mimi codec is streaming a clip; finish (or close) that stream before using the codec again"
            )

    @abstractmethod
    def _encode(self, audio: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _decode(self, codes: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _open_stream(self) -> "StreamingDecoder": ...


class StreamingDecoder(ABC):
    """One clip decoded block by block; subclasses implement `_decode_block` and `_release`."""

    def __init__(self, codec: MimiCodecBase):
        self._codec = codec
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
        """Drop the stream's state and give the codec back to batch use."""
        if self.closed:
            return
        self.closed = True
        try:
            self._release()
        finally:
            self._codec._stream = None

    def __enter__(self) -> "StreamingDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def _decode_block(self, codes: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _release(self) -> None: ...
