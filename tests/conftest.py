import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@contextlib.contextmanager
def _one_torch_thread():
    """The tiny models are far faster on one thread, and torch's spinning worker threads make
    them ~20x slower on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("torch_single_thread")` in a test module."""
    with _one_torch_thread():
        yield


def _convert_dir(src: Path, dst: Path, fmt: str) -> Path:
    """The weights of the checkpoint in `src` rewritten in layout `fmt`, with csm's config.json
    (to_official_dict only knows named flavors; the loader detects the weight layout from tensor
    names and the config dialect from keys independently) and the same tokenizer.json."""
    from safetensors.torch import save_file

    from csm.checkpoint import iter_tensors, open_checkpoint
    from csm.weights import convert_state
    from fakes.csm_models import write_json

    ckpt = open_checkpoint(src)
    converted = convert_state(iter_tensors(ckpt), ckpt.format, fmt, ckpt.config)
    state = {name: t.contiguous().clone() for name, t in converted}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"))
    write_json(dst / "config.json", ckpt.config.to_dict())
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


@pytest.fixture(scope="session")
def tiny_transformers_dir(tmp_path_factory):
    """(folder like unsloth/csm-1b with tiny random weights, the transformers model itself)."""
    from fakes.csm_models import save_transformers_dir

    path = tmp_path_factory.mktemp("tiny_transformers")
    with _one_torch_thread():
        model = save_transformers_dir(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_official_dir(tiny_transformers_dir, tmp_path_factory):
    """The same weights in Sesame's layout (torchtune names, interleaved RoPE rows)."""
    with _one_torch_thread():
        return _convert_dir(tiny_transformers_dir[0], tmp_path_factory.mktemp("tiny_official"), "official")


@pytest.fixture(scope="session")
def tiny_csm_dir(tiny_transformers_dir, tmp_path_factory):
    """The same weights in csm's canonical layout."""
    with _one_torch_thread():
        return _convert_dir(tiny_transformers_dir[0], tmp_path_factory.mktemp("tiny_csm"), "csm")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_transformers_dir, tmp_path_factory):
    """A complete model folder: tiny transformers weights + tokenizer + a random kyutai Mimi
    file (what moshi loads), as a user's download would be."""
    from csm_torch.mimi import MIMI_FILE
    from fakes.mimi import save_kyutai_mimi_file

    dst = tmp_path_factory.mktemp("tiny_model") / "model"
    shutil.copytree(tiny_transformers_dir[0], dst)
    with _one_torch_thread():
        save_kyutai_mimi_file(dst / MIMI_FILE, seed=1)
    return dst


@pytest.fixture(scope="session")
def watermark_dir(tmp_path_factory):
    """Random silentcipher weights in the real layout."""
    from fakes.watermark import make_random_watermark_dir

    return make_random_watermark_dir(tmp_path_factory.mktemp("silentcipher"))


@pytest.fixture
def cli_main(tmp_path, monkeypatch, capsys):
    """run(args, module) calls a CLI's `main` in this process, in `tmp_path`, on one torch thread,
    and returns what it wrote to stderr; an error exits (SystemExit) with its one line. A
    subprocess per run would import torch and load the model again (10-20 s each): keep those
    (test_cli.run_cli) for exit codes, one-line errors and a real process end to end."""
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CSM_WATERMARK_MODEL", raising=False)

    def run(args, module: str = "csm.cli.generate") -> str:
        main = importlib.import_module(module).main
        capsys.readouterr()
        with _one_torch_thread():
            main([str(a) for a in args])
        return capsys.readouterr().err

    return run
