"""Model resolution: a local path, or a Hugging Face Hub repo id (downloaded once, then cached)."""

from __future__ import annotations

from pathlib import Path

from csm.errors import CsmError

DEFAULT_MODEL = "unsloth/csm-1b"  # ungated transformers-format copy of sesame/csm-1b, Mimi and tokenizer inside

# What a model snapshot needs: config, weights (any supported layout), tokenizer files.
_MODEL_PATTERNS = ["*.json", "*.safetensors", "ckpt.pt", "*.model"]


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_error(repo: str, what: str, exc: Exception) -> CsmError:
    reason = (str(exc).splitlines() or [""])[0][:200]  # the first line: hub errors can run to pages
    return CsmError(
        f"could not get {what} from the Hugging Face Hub repo {repo!r} ({type(exc).__name__}: {reason}). "
        "Check the name and your network, log in with `huggingface-cli login` for gated repos, "
        "or pass a local path"
    )


def resolve_model(model: str | Path) -> Path:
    """A local directory/file as is; otherwise download the Hub repo (cached) and return its folder."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    if not _looks_like_repo_id(name):
        raise CsmError(f"model not found: {name} is neither a local path nor a Hub repo id like 'unsloth/csm-1b'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=_MODEL_PATTERNS))
    except Exception as exc:
        raise _hub_error(name, "the model", exc) from None


def hub_file(repo: str, filename: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:
        raise _hub_error(repo, what, exc) from None
