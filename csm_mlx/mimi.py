"""The Mimi audio codec (kyutai) for the MLX backend, through moshi_mlx's implementation.

The same weights as the torch side (`csm.mimi_files` finds them): kyutai's original file, which
moshi_mlx reads as it is, or a transformers checkpoint's ``codec_model.*`` tensors renamed to the
original names by `csm.mimi_names`. Always float32, never quantized.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from csm.errors import CheckpointError
from csm.mimi_codec import MimiCodecBase, StreamingDecoder, share_weights_copy
from csm.mimi_files import (
    FRAME_SIZE,
    KYUTAI_FILE,
    NUM_CODEBOOKS,
    codec_num_heads,
    read_codec_config,
    read_codec_state,
    resolve_mimi_weights,
)
from csm.mimi_names import transformers_to_original
from csm_mlx.loading import materialize


def _load_original_file(model, path: Path, source: str) -> None:
    try:
        model.load_pytorch_weights(str(path), strict=True)
    except (ValueError, RuntimeError) as exc:  # mlx reports missing / unexpected / mis-shaped weights so
        raise CheckpointError(f"the Mimi weights of {source} do not fit kyutai's Mimi: {exc}") from None


def load_mimi(model_dir: Path | str | None = None, mimi: str | Path | None = None) -> MimiCodec:
    from moshi_mlx.models.mimi import Mimi, mimi_202407

    kind, location = resolve_mimi_weights(model_dir, mimi)
    model = Mimi(mimi_202407(NUM_CODEBOOKS))
    if kind == KYUTAI_FILE:
        _load_original_file(model, location, str(location))
    else:
        num_heads = codec_num_heads(read_codec_config(location))
        state = transformers_to_original(read_codec_state(location, "mlx"), num_heads=num_heads)
        # moshi_mlx reads original-name weights from a file only: hand them over as one
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mimi.safetensors"
            mx.save_safetensors(str(path), {k: v.astype(mx.float32) for k, v in state.items()})
            _load_original_file(model, path, str(location))
    return MimiCodec(model)


class MimiCodec(MimiCodecBase):
    """numpy in/out wrapper around moshi_mlx's Mimi (float32).

    moshi_mlx's own `encode`/`decode` (and its steps, 2 positions each) run Mimi's transformers
    without a causal mask, so every position also sees the later ones and the codes differ from
    kyutai's causal Mimi. Here the convolutions run over the whole clip (they are causal by
    construction) and the transformers one position at a time against their KV cache, which is
    causal attention exactly."""

    def __init__(self, model):
        super().__init__()
        materialize(model)  # streams decode in their listeners' threads: no lazy array of this one's
        self.model = model

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        # moshi pads the last partial frame with zeros; moshi_mlx drops it: pad here
        audio = np.pad(audio, (0, -len(audio) % FRAME_SIZE))
        m = self.model
        m.encoder.reset_state()
        _reset(m.encoder_cache)
        latents = m.encoder(mx.array(audio)[None, None])  # [1, 512, 2T]
        latents = m.downsample(_causal(m.encoder_transformer, m.encoder_cache, latents))  # [1, 512, T]
        codes = m.quantizer.encode(latents)  # [1, 32, T]
        return np.array(codes[0].T).astype(np.int64)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        m = self.model
        _reset(m.decoder_cache)
        latents = m.upsample(_quantized_latents(m, codes))  # [1, 512, 2T]
        latents = _causal(m.decoder_transformer, m.decoder_cache, latents)
        m.decoder.reset_state()
        return _mono(m.decoder(latents))

    def _replicate(self) -> MimiCodec:
        return MimiCodec(share_weights_copy(self.model, [a for _, a in tree_flatten(self.model.parameters())]))

    def _open_stream(self, home: MimiCodec) -> MimiStreamingDecoder:
        return MimiStreamingDecoder(self, home)


class MimiStreamingDecoder(StreamingDecoder):
    """The batch decode split at block boundaries: the upsampler and the SEANet decoder run their
    `step` (they keep the inputs a later output still needs, and hold back the transposed
    convolutions' overlapping tails until the next block completes them), the transformer keeps
    its KV cache."""

    def __init__(self, codec: MimiCodec, home: MimiCodec):
        super().__init__(codec, home)
        self._reset_decoder()

    def _decode_block(self, codes: np.ndarray) -> np.ndarray:
        m = self._codec.model
        latents = m.upsample.step(_quantized_latents(m, codes))  # [1, 512, 2n]
        latents = _causal(m.decoder_transformer, m.decoder_cache, latents)
        return _mono(m.decoder.step(latents))  # [n * 1920]

    def _release(self) -> None:
        self._reset_decoder()  # frees the held-back tails and the cache

    def _reset_decoder(self) -> None:
        m = self._codec.model
        m.upsample.reset_state()
        m.decoder.reset_state()
        _reset(m.decoder_cache)


def _quantized_latents(m, codes: np.ndarray) -> mx.array:
    return m.quantizer.decode(mx.array(codes.T.astype(np.int32))[None])  # [1, 512, T]


def _mono(audio: mx.array) -> np.ndarray:
    return np.array(audio[0, 0].astype(mx.float32))  # [1, 1, N] -> [N]


def _reset(cache) -> None:
    for c in cache:
        c.reset()


def _causal(transformer, cache, xs: mx.array) -> mx.array:
    """A Mimi transformer over xs [B, C, T] (conv layout), one position at a time, continuing `cache`."""
    return mx.concatenate([transformer(xs[..., t : t + 1], cache=cache)[0] for t in range(xs.shape[-1])], axis=-1)
