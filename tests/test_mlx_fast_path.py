"""The MLX fast path (async evaluation of the next frame, compiled steps, mlx-lm's batch caches)
gives the very codes of a plain loop: one frame at a time, evaluated before the next is built,
nothing compiled, mlx-lm's own KV cache. Seeded sampling as well as greedy, float and quantized weights."""

import numpy as np
import pytest

import csm
from csm.sampling import Sampling, row_settings

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXT, SPEAKER = "Hello there, how are you?", 0
FRAMES = 8
SAMPLING = [Sampling(topk=1), Sampling(temperature=0.9, topk=50, top_p=0.9)]


def reference_codes(model, tokens, mask, max_frames, sampling: Sampling, seed) -> np.ndarray:
    """The frame loop written as plainly as the model reads, with a stream's key schedule (one
    split per frame, Exp(1) noise per codebook and rank of its top-k) and the shared sampler."""
    from csm_mlx.sampling import exponential_noise, sample

    books, vocab = model.config.audio_num_codebooks, model.config.audio_vocab_size
    temperature, topk, top_p = (mx.array([v]) for v in row_settings(sampling))
    key = mx.random.key(seed)
    cache = model.backbone.make_cache()
    x = model.embed_frames(mx.array(tokens)[None], mx.array(mask)[None])
    audio_mask = mx.array([[[True] * books + [False]]])
    frames = []
    for _ in range(max_frames):
        noise = None
        if not sampling.greedy:
            key, frame_key = mx.random.split(key)
            drawn = exponential_noise(frame_key, (books, sampling.topk))  # a rank's noise, ones beyond top-k
            noise = mx.pad(drawn, [(0, 0), (0, vocab - sampling.topk)], constant_values=1.0)[None]  # [1, 32, V]

        def pick(logits, i, noise=noise):
            return sample(logits, temperature, topk, top_p, None if noise is None else noise[:, i])

        h = model.backbone(x, cache)[:, -1]
        codes = [pick(model.codebook0_head(h), 0)]
        decoder_cache = model.decoder.make_cache()
        y = mx.stack([h, model.embed_audio(0, codes[0])], axis=1)
        for i in range(1, books):
            codes.append(pick(model.codebook_logits(i, model.decoder(model.projection(y), decoder_cache)[:, -1]), i))
            y = model.embed_audio(i, codes[-1])[:, None]
        codes = mx.stack(codes, axis=1)
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


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "top-k 50, top-p 0.9"])
@pytest.mark.parametrize("compile, overlap", [(True, True), (False, True), (True, False)],
                         ids=["compiled", "eager", "no-overlap"])
def test_fast_path_gives_the_reference_codes(mlx_gen, sampling, compile, overlap):
    from csm_mlx.frame_loop import MlxFrameLoop

    prompt = mlx_gen.prompt(TEXT, SPEAKER)
    model = mlx_gen._backend.model
    expected = reference_codes(model, prompt.tokens, prompt.mask, FRAMES, sampling, seed=21)
    assert len(expected) == FRAMES and len(np.unique(expected)) > 8
    loop = MlxFrameLoop(model, max_batch_size=2, compile=compile, overlap=overlap)
    first = loop.start(1, prompt.tokens, prompt.mask, sampling, seed=21)
    ours = np.concatenate([first[None], loop.advance(3)[1], loop.advance(FRAMES - 4)[1]])
    np.testing.assert_array_equal(ours, expected)


def test_the_api_runs_the_fast_path(mlx_gen):
    prompt = mlx_gen.prompt(TEXT, SPEAKER)
    expected = reference_codes(mlx_gen._backend.model, prompt.tokens, prompt.mask, FRAMES, SAMPLING[1], seed=4)
    ours = mlx_gen.generate_codes(TEXT, SPEAKER, max_audio_length_ms=FRAMES * 80, temperature=0.9, topk=50, top_p=0.9,
                                  seed=4)
    np.testing.assert_array_equal(ours, expected)
