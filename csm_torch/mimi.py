"""The Mimi audio codec (kyutai) for the PyTorch backend, through moshi's own implementation.

CSM-1B speaks in Mimi codes (24 kHz mono audio, 1920 samples per frame, 32 codebooks of 2048
codes: the numbers are defined in `csm.mimi_files`). Weights come from kyutai's original checkpoint
file, or from the ``codec_model.*`` tensors of a transformers-format CSM checkpoint (mapped by
`csm.mimi_names`).
"""

from __future__ import annotations

from pathlib import Path

import moshi.utils.compile
import numpy as np
import torch
from moshi.utils.compile import no_cuda_graph

from csm.errors import CheckpointError
from csm.mimi_codec import MimiCodecBase, StreamingDecoder, share_weights_copy
from csm.mimi_files import (  # noqa: F401  (re-exported: the torch codec's public names)
    CODEC_PREFIX,
    FRAME_SIZE,
    KYUTAI_FILE,
    MIMI_FILE,
    MIMI_REPO,
    NUM_CODEBOOKS,
    SAMPLE_RATE,
    TRANSFORMERS,
    codec_num_heads,
    read_codec_config,
    read_codec_state,
    resolve_mimi_weights,
)
from csm.mimi_names import transformers_to_original


def check_codec_config(codec_config: dict, source: str = "codec_config") -> None:
    """The transformers MimiConfig must describe the Mimi that moshi builds (kyutai's)."""
    from moshi.models import loaders

    seanet, quant, tf = loaders._seanet_kwargs, loaders._quantizer_kwargs, loaders._transformer_kwargs
    expected = {
        "sampling_rate": SAMPLE_RATE,
        "audio_channels": seanet["channels"],
        "hidden_size": seanet["dimension"],
        "num_filters": seanet["n_filters"],
        "num_residual_layers": seanet["n_residual_layers"],
        "upsampling_ratios": list(seanet["ratios"]),
        "kernel_size": seanet["kernel_size"],
        "last_kernel_size": seanet["last_kernel_size"],
        "residual_kernel_size": seanet["residual_kernel_size"],
        "dilation_growth_rate": seanet["dilation_base"],
        "compress": seanet["compress"],
        "use_causal_conv": seanet["causal"],
        "codebook_size": quant["bins"],
        "codebook_dim": quant["dimension"],
        "vector_quantization_hidden_dimension": quant["dimension"],
        "num_semantic_quantizers": 1,
        "num_hidden_layers": tf["num_layers"],
        "num_attention_heads": tf["num_heads"],
        "intermediate_size": tf["dim_feedforward"],
        "sliding_window": tf["context"],
    }
    bad = []
    for key, want in expected.items():
        if key in codec_config and codec_config[key] is not None:
            got = codec_config[key]
            if isinstance(want, list):
                got = list(got)
            if got != want:
                bad.append(f"{key}={got!r} (expected {want!r})")
    nq = codec_config.get("num_quantizers")
    if nq is not None and nq < NUM_CODEBOOKS:
        bad.append(f"num_quantizers={nq!r} (CSM needs {NUM_CODEBOOKS})")
    if bad:
        raise CheckpointError(
            f"the Mimi codec in {source} is not kyutai's Mimi: {', '.join(bad)}"
        )


def _build_moshi_mimi(device: str | torch.device):
    from moshi.models.loaders import get_mimi

    return get_mimi(None, device=device, num_codebooks=NUM_CODEBOOKS)


def load_state_into_moshi(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Load an original-names state dict into a moshi MimiModel. moshi's load hooks rename
    ``in_proj_weight`` / ``out_proj.weight`` (and old codebook names) on the way in."""
    param = next(model.parameters())
    state = {k: v.to(device=param.device, dtype=torch.float32) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Some exports drop the codebooks' `_initialized` flag: moshi only uses it in training.
    missing = [k for k in missing if not k.endswith("._initialized")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:6])}" + (" ..." if len(unexpected) > 6 else ""))
        raise CheckpointError(f"the Mimi weights of {source} do not fit kyutai's Mimi: {'; '.join(parts)}")


def load_mimi(model_dir: Path | str | None = None, mimi: str | Path | None = None, device="cpu") -> MimiCodec:
    # moshi compiles its RoPE with torch.compile at first use. torch.compile's tracing patches
    # nn.Module calls process-wide, so a compile in one stream's decoder thread breaks the
    # engine's frame loop (or another decoder) running in another thread: run moshi uncompiled.
    moshi.utils.compile._compile_disabled = True
    kind, location = resolve_mimi_weights(model_dir, mimi)
    if kind == KYUTAI_FILE:
        from safetensors.torch import load_file

        model = _build_moshi_mimi(device)
        try:
            state = load_file(str(location), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read the Mimi weights {location}: {exc}") from exc
        load_state_into_moshi(model, state, str(location))
    else:
        codec_config = read_codec_config(location)
        if codec_config is not None:
            check_codec_config(codec_config, f"{location}/config.json")
        state = transformers_to_original(read_codec_state(location), num_heads=codec_num_heads(codec_config))
        model = _build_moshi_mimi(device)
        load_state_into_moshi(model, state, str(location))
    model.set_num_codebooks(NUM_CODEBOOKS)
    model.eval()
    return MimiCodec(model)


class MimiStreamingDecoder(StreamingDecoder):
    """moshi's streaming mode (batch size 1): conv and transformer state carry over between blocks."""

    def __init__(self, codec: MimiCodec, home: MimiCodec):
        super().__init__(codec, home)
        self._streaming = codec.model.streaming(1)  # an ExitStack: closing it drops the state

    def _decode_block(self, codes: np.ndarray) -> np.ndarray:
        return self._codec._decode(codes)  # (no moshi CUDA graphs: see `MimiCodec.decode_torch`)

    def _release(self) -> None:
        self._streaming.close()


class MimiCodec(MimiCodecBase):
    """numpy in/out wrapper around moshi's MimiModel (float32, inference mode)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.device = next(model.parameters()).device

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(audio).to(self.device).view(1, 1, -1)
        with torch.inference_mode(), no_cuda_graph():
            codes = self.model.encode(x)
        return codes[0].transpose(0, 1).to(torch.int64).cpu().numpy()

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        codes_t = torch.from_numpy(codes.astype(np.int64)).transpose(0, 1).unsqueeze(0)  # [1, 32, T]
        return self.decode_torch(codes_t)[0, 0].cpu().numpy()

    def decode_torch(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, 32, T] (on any device) -> float32 audio [B, 1, T * 1920] on the codec's device.

        moshi's own CUDA graphs are off: in streaming mode it captures one graph at the first
        block's shape and refuses any other block size (and a capture beside ours failed on an
        H100), while stream chunks vary in size (first chunk, steady chunks, the rest)."""
        with torch.inference_mode(), no_cuda_graph():
            return self.model.decode(codes.to(self.device, torch.int64)).float()

    def _replicate(self) -> MimiCodec:
        return MimiCodec(share_weights_copy(self.model, [*self.model.parameters(), *self.model.buffers()]))

    def _open_stream(self, home: MimiCodec) -> MimiStreamingDecoder:
        return MimiStreamingDecoder(self, home)
