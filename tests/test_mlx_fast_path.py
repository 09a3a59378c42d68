"""The MLX fast path (async evaluation of the next frame, compiled steps) gives the very codes of a
plain loop: one frame at a time, evaluated before the next is built, nothing compiled, mlx-lm's
own KV cache. Seeded sampling as well as greedy, float and quantized weights."""

import numpy as np
import pytest

import csm
from csm.sampling import SamplingParams

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXT, SPEAKER = "Hello there, how are you?", 0
FRAMES = 8
SAMPLING = [SamplingParams(topk=1), SamplingParams(temperature=0.9, topk=50)]


def reference_codes(model, tokens, mask, max_frames, params, seed) -> np.ndarray:
    """The frame loop written as plainly as it reads in CSM_FACTS §3, with the generator's key schedule."""
    from csm_mlx.generator import FrameGenerator

    tail = FrameGenerator(model, compile=False).frame_tail
    key = mx.random.key(seed)
    cache = model.backbone.make_cache()
    x = model.embed_frames(mx.array(tokens)[None], mx.array(mask)[None])
    audio_mask = mx.array([[[True] * 32 + [False]]])
    frames = []
    for _ in range(max_frames):
        key, frame_key = mx.random.split(key)
        codes = tail(model.backbone(x, cache)[:, -1], frame_key, params)
        block = np.array(codes).astype(np.int64)
        if not block.any():
            break
        frames.append(block)
        x = model.embed_frames(mx.concatenate([codes, mx.zeros((1, 1), dtype=mx.int32)], axis=1)[:, None], audio_mask)
    return np.concatenate(frames)


@pytest.fixture(scope="module")
def quantizable_dir(tmp_path_factory):
    from fakes.csm_models import save_transformers_dir
    from test_mlx_quantize import quantizable_config

    path = tmp_path_factory.mktemp("quantizable")
    save_transformers_dir(path, quantizable_config(), seed=5)
    return path


@pytest.fixture(scope="module", params=["float32", "4-bit"])
def mlx_gen(request, tiny_model_dir):
    if request.param == "float32":
        return csm.load(tiny_model_dir, backend="mlx", device="cpu", dtype="float32")
    return csm.load(request.getfixturevalue("quantizable_dir"), backend="mlx", device="cpu", dtype="float32",
                    quantize=4)


@pytest.mark.parametrize("params", SAMPLING, ids=["greedy", "top-k 50"])
@pytest.mark.parametrize("compile, overlap", [(True, True), (False, True), (True, False)],
                         ids=["compiled", "eager", "no-overlap"])
def test_fast_path_gives_the_reference_codes(mlx_gen, params, compile, overlap):
    from csm_mlx.generator import FrameGenerator

    prompt = mlx_gen.prompt(TEXT, SPEAKER)
    model = mlx_gen._backend.model
    expected = reference_codes(model, prompt.tokens, prompt.mask, FRAMES, params, seed=21)
    assert len(expected) == FRAMES and len(np.unique(expected)) > 8
    ours = FrameGenerator(model, compile=compile, overlap=overlap).generate(prompt.tokens, prompt.mask, FRAMES, params, seed=21)
    np.testing.assert_array_equal(ours, expected)


def test_frames_after_end_of_speech_are_dropped(mlx_gen):
    """The frame after an all-zero one is already queued when the zeros are seen: it must not come out."""
    from csm_mlx.generator import FrameGenerator

    class SilentFromFrame4(FrameGenerator):
        calls = 0

        def frame(self, *args):
            codes = super().frame(*args)
            self.calls += 1
            return codes * 0 if self.calls == 4 else codes

    prompt = mlx_gen.prompt(TEXT, SPEAKER)
    params = SAMPLING[1]
    gen = SilentFromFrame4(mlx_gen._backend.model)
    blocks = list(gen.stream(prompt.tokens, prompt.mask, FRAMES, params, seed=3))
    assert [len(b) for b in blocks] == [1, 1, 1]
    expected = reference_codes(mlx_gen._backend.model, prompt.tokens, prompt.mask, 3, params, seed=3)
    np.testing.assert_array_equal(np.concatenate(blocks), expected)
    assert gen.calls <= 5  # at most one frame computed past the end
