"""The Mimi audio codec (kyutai) for the PyTorch backend, through moshi's own implementation.

CSM-1B speaks in Mimi codes: 24 kHz mono audio, 12.5 frames/s (1920 samples per frame), 32
codebooks of 2048 codes. Weights come from kyutai's original checkpoint file, or from the
``codec_model.*`` tensors of a transformers-format CSM checkpoint (mapped by csm/mimi_names.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csm.errors import CheckpointError, CsmError
from csm.mimi_names import transformers_to_original

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
NUM_CODEBOOKS = 32
SAMPLE_RATE = 24000
FRAME_SIZE = 1920
CODEC_PREFIX = "codec_model."

KYUTAI_FILE = "kyutai"
TRANSFORMERS = "transformers"

_FIX = (
    f"pass --mimi PATH to {MIMI_FILE}, or download it once with "
    f"`huggingface-cli download {MIMI_REPO} {MIMI_FILE}`"
)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        files = sorted({model_dir / f for name, f in weight_map.items() if name.startswith(CODEC_PREFIX)})
        return files
    return sorted(p for p in model_dir.glob("*.safetensors") if p.name != MIMI_FILE)


def _codec_files(model_dir: Path) -> list[Path]:
    """The safetensors files of model_dir that hold ``codec_model.*`` tensors."""
    from safetensors import safe_open

    found = []
    for path in _safetensors_files(model_dir):
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the safetensors index but missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                if any(k.startswith(CODEC_PREFIX) for k in f.keys()):
                    found.append(path)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return found


def resolve_mimi_weights(model_dir: Path | str | None, mimi: str | Path | None) -> tuple[str, Any]:
    """Where the Mimi weights come from, as (kind, location):

    1. ``mimi`` given: ("kyutai", Path) — kyutai's safetensors file;
    2. model_dir holds the kyutai file under its original name: ("kyutai", Path);
    3. model_dir's safetensors (sharded or not) hold ``codec_model.*``: ("transformers", model_dir);
    4. the Hub cache / download of kyutai's file: ("kyutai", Path).
    """
    if mimi is not None:
        path = Path(mimi).expanduser()
        if path.is_dir() and (path / MIMI_FILE).is_file():
            path = path / MIMI_FILE
        if not path.is_file():
            raise CsmError(f"Mimi weights {path} do not exist; {_FIX}")
        return KYUTAI_FILE, path
    if model_dir is not None:
        model_dir = Path(model_dir)
        if (model_dir / MIMI_FILE).is_file():
            return KYUTAI_FILE, model_dir / MIMI_FILE
        if model_dir.is_dir() and _codec_files(model_dir):
            return TRANSFORMERS, model_dir
    try:
        from huggingface_hub import hf_hub_download

        return KYUTAI_FILE, Path(hf_hub_download(MIMI_REPO, MIMI_FILE))
    except Exception as exc:  # offline, not cached, network errors...
        where = f" in {model_dir}" if model_dir is not None else ""
        raise CsmError(
            f"no Mimi codec weights found{where} nor in the Hugging Face cache "
            f"({type(exc).__name__}); {_FIX}"
        ) from exc


def read_codec_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Only the ``codec_model.*`` tensors of a transformers checkpoint, prefix removed."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in _codec_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(CODEC_PREFIX):
                    state[key[len(CODEC_PREFIX):]] = f.get_tensor(key)
    if not state:
        raise CheckpointError(f"no {CODEC_PREFIX}* tensors in {model_dir}")
    return state


def read_codec_config(model_dir: Path) -> dict | None:
    """The ``codec_config`` (a transformers MimiConfig dict) of model_dir/config.json, if any."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    codec = config.get("codec_config")
    return codec if isinstance(codec, dict) else None


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


def load_mimi(model_dir: Path | str | None = None, mimi: str | Path | None = None, device="cpu") -> "MimiCodec":
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
        num_heads = (codec_config or {}).get("num_attention_heads") or 8
        state = transformers_to_original(read_codec_state(location), num_heads=num_heads)
        model = _build_moshi_mimi(device)
        load_state_into_moshi(model, state, str(location))
    model.set_num_codebooks(NUM_CODEBOOKS)
    model.eval()
    return MimiCodec(model)


class MimiStreamDecoder:
    """Decodes codes a few frames at a time; the concatenated outputs equal one batch decode.
    Holds moshi's streaming state until close() (or the end of a ``with`` block)."""

    def __init__(self, codec: "MimiCodec"):
        self.codec = codec
        self._ctx = codec.model.streaming(1)
        self._ctx.__enter__()
        self._closed = False

    def decode_frames(self, codes: np.ndarray) -> np.ndarray:
        if self._closed:
            raise CsmError("the Mimi stream decoder is closed")
        codes_t = self.codec._codes_to_torch(codes)
        if codes_t.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            audio = self.codec.model.decode(codes_t)
        return audio[0, 0].float().cpu().numpy()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ctx.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MimiCodec:
    """numpy in/out wrapper around moshi's MimiModel (float32, inference mode)."""

    sample_rate = SAMPLE_RATE
    frame_size = FRAME_SIZE
    num_codebooks = NUM_CODEBOOKS

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Mono float32 audio at 24 kHz [N] -> int64 codes [T, 32], T = ceil(N / 1920)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise CsmError(f"Mimi encodes mono audio as a 1-D array, got shape {audio.shape}")
        x = torch.from_numpy(audio).to(self.device).view(1, 1, -1)
        with torch.inference_mode():
            codes = self.model.encode(x)
        return codes[0].transpose(0, 1).to(torch.int64).cpu().numpy()

    def _codes_to_torch(self, codes: np.ndarray) -> torch.Tensor:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS:
            raise CsmError(f"Mimi decodes codes of shape [T, {NUM_CODEBOOKS}], got {codes.shape}")
        return torch.from_numpy(codes.astype(np.int64)).to(self.device).transpose(0, 1).unsqueeze(0)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [T, 32] -> float32 audio [T * 1920]."""
        return self.decode_torch(self._codes_to_torch(codes))[0, 0].float().cpu().numpy()

    def decode_torch(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, 32, T] (on any device) -> float32 audio [B, 1, T * 1920] on the codec's device."""
        with torch.inference_mode():
            return self.model.decode(codes.to(self.device, torch.int64)).float()

    def stream_decoder(self) -> MimiStreamDecoder:
        return MimiStreamDecoder(self)
