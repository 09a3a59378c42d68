"""The MLX backend against the torch backend on the same tiny random weights: float32 logits of
codebook 0 and of the decoder, greedy codes frame for frame (with and without context audio),
every checkpoint layout, seeded sampling, and backend selection."""

import numpy as np
import pytest
import torch

import csm
from csm.backends import select_backend

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CASES = [("Hello there, how are you?", 0), ("A different sentence to speak!", 3)]
MAX_MS = 800  # 10 frames


def assert_close_rel(ours, theirs, rel=1e-4):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    scale = np.abs(theirs).max()
    assert scale > 0
    diff = np.abs(ours - theirs).max()
    assert diff <= rel * scale, f"max abs diff {diff} > {rel} x max|logits| {scale}"
    return diff / scale


@pytest.fixture(scope="module")
def torch_gen(tiny_model_dir):
    return csm.load(tiny_model_dir, backend="torch", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def mlx_gen(tiny_model_dir):
    return csm.load(tiny_model_dir, backend="mlx", device="cpu", dtype="float32")


def prompt_hidden(torch_gen, mlx_gen, text, speaker):
    """The backbone's last hidden state over the same prompt, in both backends."""
    prompt = torch_gen.prompt(text, speaker)
    tm, mm = torch_gen._backend.model, mlx_gen._backend.model
    with torch.no_grad():
        tokens, mask = torch.from_numpy(prompt.tokens)[None], torch.from_numpy(prompt.mask)[None]
        th = tm.backbone(tm.embed_frames(tokens, mask), torch.arange(tokens.shape[1]))[:, -1]
    mh = mm.backbone(mm.embed_frames(mx.array(prompt.tokens)[None], mx.array(prompt.mask)[None]))[:, -1]
    return th, mh


@pytest.mark.parametrize("text, speaker", CASES)
def test_codebook0_and_decoder_logits_match_torch(torch_gen, mlx_gen, text, speaker):
    tm, mm = torch_gen._backend.model, mlx_gen._backend.model
    th, mh = prompt_hidden(torch_gen, mlx_gen, text, speaker)
    with torch.no_grad():
        t_logits = tm.codebook0_head(th)[0]
    rel = assert_close_rel(np.array(mm.codebook0_head(mh)[0]), t_logits.numpy())
    print(f"codebook-0 logits: max |diff| / max |logits| = {rel:.2e}")
    for c0 in (int(t_logits.argmax()), 7, 2050):
        with torch.no_grad():
            x = torch.stack([th, tm.embed_audio(0, torch.tensor([c0]))], dim=1)
            t_state = tm.decoder(tm.projection(x), torch.arange(2))[:, -1]
        x = mx.stack([mh, mm.embed_audio(0, mx.array([c0]))], axis=1)
        m_state = mm.decoder(mm.projection(x))[:, -1]
        for i in (1, 17, 31):
            rel = assert_close_rel(np.array(mm.codebook_logits(i, m_state)[0]),
                                   tm.codebook_logits(i, t_state)[0].numpy())
            print(f"decoder logits (c0={c0}, codebook {i}): {rel:.2e}")


@pytest.mark.parametrize("text, speaker", CASES)
def test_greedy_codes_equal_torch(torch_gen, mlx_gen, text, speaker):
    theirs = torch_gen.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS)
    ours = mlx_gen.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS)
    assert ours.dtype == np.int64 and len(theirs) >= 8
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(ours)) > 8


def test_greedy_codes_equal_torch_with_context_audio(torch_gen, mlx_gen):
    t = np.arange(12_000) / 24_000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    context = [csm.Segment(speaker=1, text="Hi!", audio=audio)]
    # the prompts agree, Mimi codes of the context included (see test_mlx_mimi)
    np.testing.assert_array_equal(mlx_gen.prompt("Hello.", 0, context).tokens,
                                  torch_gen.prompt("Hello.", 0, context).tokens)
    theirs = torch_gen.generate_codes("Hello.", 0, context, topk=1, max_audio_length_ms=MAX_MS)
    ours = mlx_gen.generate_codes("Hello.", 0, context, topk=1, max_audio_length_ms=MAX_MS)
    assert len(theirs) >= 8
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("layout", ["tiny_official_dir", "tiny_csm_dir"])
def test_every_layout_loads_the_same_weights(mlx_gen, layout, request):
    other = csm.load(request.getfixturevalue(layout), backend="mlx", device="cpu", dtype="float32")
    from mlx.utils import tree_flatten

    a = dict(tree_flatten(mlx_gen._backend.model.parameters()))
    b = dict(tree_flatten(other._backend.model.parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_uncompiled_frames_equal_compiled(mlx_gen, tiny_model_dir):
    plain = csm.load(tiny_model_dir, backend="mlx", device="cpu", dtype="float32", compile=False)
    kw = dict(max_audio_length_ms=6 * 80, temperature=0.9, topk=50, seed=11)
    np.testing.assert_array_equal(plain.generate_codes(*CASES[0], **kw), mlx_gen.generate_codes(*CASES[0], **kw))


def test_seeded_sampling_is_reproducible(mlx_gen):
    text, speaker = CASES[1]
    kw = dict(topk=50, temperature=0.9, max_audio_length_ms=MAX_MS)
    a = mlx_gen.generate_codes(text, speaker, seed=1234, **kw)
    b = mlx_gen.generate_codes(text, speaker, seed=1234, **kw)
    c = mlx_gen.generate_codes(text, speaker, seed=4321, **kw)
    assert len(a) >= 1
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    greedy = mlx_gen.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS)
    assert a.shape != greedy.shape or not np.array_equal(a, greedy)
    np.testing.assert_array_equal(
        greedy, mlx_gen.generate_codes(text, speaker, topk=50, temperature=0.0, max_audio_length_ms=MAX_MS))


def test_sampling_keeps_to_the_top_k():
    from csm_mlx.sampling import exponential_noise, sample

    logits = mx.array(np.random.default_rng(0).normal(size=(1, 100)).astype(np.float32))
    top3 = set(np.argsort(-np.array(logits[0]))[:3].tolist())
    one, three = mx.array([1.0]), mx.array([3])
    noise = [mx.pad(exponential_noise(k, (1, 3)), [(0, 0), (0, 97)], constant_values=1.0)
             for k in mx.random.split(mx.random.key(0), 200)]
    drawn = {int(sample(logits, one, three, one, n)[0]) for n in noise}
    assert drawn == top3


# --- backend selection ----------------------------------------------------------------------------

def test_auto_picks_torch_on_cpu_on_linux(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("CSM_BACKEND", raising=False)
    assert select_backend("auto") == "torch"
    gen = csm.load(tiny_model_dir, backend="auto")
    assert (gen.backend, gen.device) == ("torch", "cpu")


def test_auto_picks_mlx_on_apple_silicon(monkeypatch):
    import platform

    monkeypatch.delenv("CSM_BACKEND", raising=False)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert select_backend("auto") == "mlx"
    monkeypatch.setenv("CSM_BACKEND", "torch")
    assert select_backend("auto") == "torch"


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("CSM_BACKEND", "mlx")
    assert select_backend("auto") == "mlx"
    assert select_backend("torch") == "torch"  # an explicit choice wins


def test_missing_mlx_says_how_to_install(tiny_model_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "csm_mlx.backend", None)  # import fails as if MLX were absent
    with pytest.raises(csm.CsmError, match=r"pip install 'csm-speech\[mlx\]'"):
        csm.load(tiny_model_dir, backend="mlx")


def test_mlx_backend_reports_itself(mlx_gen):
    assert (mlx_gen.backend, mlx_gen.device) == ("mlx", "cpu")


@pytest.mark.parametrize("kind", ["safetensors", "ckpt.pt"])
def test_bfloat16_checkpoints_load_bit_exact(tiny_csm_dir, tmp_path, kind):
    """numpy has no bfloat16, so neither safetensors' MLX reader nor a float32 detour is used:
    MLX gets the very bits torch does, from either file kind."""
    from mlx.utils import tree_flatten
    from safetensors.torch import load_file

    from csm.checkpoint import open_checkpoint
    from csm.convert import convert
    from csm_mlx.loading import load_checkpoint
    from csm_torch.loading import checkpoint_tensors, load_model

    d = convert(tiny_csm_dir, tmp_path / "bf16", to="csm", dtype="bfloat16")
    if kind == "ckpt.pt":
        torch.save(load_file(d / "model.safetensors"), d / "ckpt.pt")
        (d / "model.safetensors").unlink()
    ckpt = open_checkpoint(d)
    cpu = torch.device("cpu")
    ours = dict(load_model(ckpt.config, checkpoint_tensors(ckpt, cpu, torch.bfloat16), cpu,
                           torch.bfloat16).named_parameters())
    theirs = dict(tree_flatten(load_checkpoint(ckpt, mx.bfloat16).parameters()))
    assert theirs.keys() == ours.keys()
    for name, t in ours.items():
        assert theirs[name].dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(theirs[name].view(mx.uint16)), t.view(torch.uint16).numpy(),
                                      err_msg=name)
