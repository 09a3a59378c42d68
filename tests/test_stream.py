"""Generator.stream on both backends: chunk sizes, the chunks concatenating to the non-streamed
audio, the watermark on every chunk, and bad arguments."""

import numpy as np
import pytest

import csm
from csm.errors import CsmError
from csm.streaming import WATERMARK_WINDOW_FRAMES, ChunkPlan, plan_chunks, regroup

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXT = "Hello there, how are you?"
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("mlx"), reason="MLX is not installed"))]


@pytest.fixture(scope="module", params=BACKENDS)
def gen(request, tiny_model_dir, watermark_dir):
    return csm.load(tiny_model_dir, backend=request.param, device="cpu", dtype="float32",
                    watermark_model=str(watermark_dir))


def test_chunks_concatenate_to_the_decoded_codes(gen):
    chunks = list(gen.stream(TEXT, max_audio_length_ms=800, topk=50, seed=7, first_chunk_frames=2, chunk_frames=3,
                             watermark=False))
    codes = gen.generate_codes(TEXT, max_audio_length_ms=800, topk=50, seed=7)
    assert len(codes) == 10  # the tiny model does not stop early on this seed
    assert [len(c) for c in chunks] == [2 * 1920, 3 * 1920, 3 * 1920, 2 * 1920]
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    whole = gen.decode(codes)
    diff = np.abs(np.concatenate(chunks) - whole).max()
    print(f"{gen.backend}: streamed vs non-streamed audio max |diff| {diff:.1e} "
          f"(max |audio| {np.abs(whole).max():.2f})")
    assert diff <= 1e-5, diff


def test_watermarked_chunks_are_whole_windows_each_marked_on_its_own(gen):
    args = dict(max_audio_length_ms=2400, seed=3, first_chunk_frames=2, chunk_frames=8)
    plain = list(gen.stream(TEXT, watermark=False, **args))
    marked = list(gen.stream(TEXT, watermark_key=(1, 2, 3, 4, 5), **args))
    # 30 frames: the requested 2 and 8 grow to the 13-frame watermark window
    assert WATERMARK_WINDOW_FRAMES == 13
    assert [len(c) // 1920 for c in plain] == [2, 8, 8, 8, 4]
    assert [len(c) // 1920 for c in marked] == [13, 13, 4]
    plain = np.concatenate(plain)
    watermarker = gen._loaded_watermarker()
    start = 0
    for chunk in marked:
        source = plain[start : start + len(chunk)]
        assert not np.allclose(chunk, source, atol=1e-4)  # the watermark changed the audio
        np.testing.assert_allclose(chunk, watermarker.embed(source, 24_000, (1, 2, 3, 4, 5)), atol=1e-6, rtol=0)
        start += len(chunk)
    assert start == len(plain)


def test_two_streams_at_once_and_decoding_beside_them(gen):
    # 3 frames a stream: one chunk each before the decode beside them, two after (MLX's Mimi on
    # the CPU takes ~1 s a frame, and the interleaving is the same at any length)
    args = dict(max_audio_length_ms=240, topk=50, first_chunk_frames=1, chunk_frames=1, watermark=False)
    one, two = gen.stream(TEXT, seed=1, **args), gen.stream("Another line.", speaker=2, seed=2, **args)
    first = [next(one), next(two)]
    assert gen.decode(np.zeros((1, 32), dtype=np.int64)).shape == (1920,)
    rest_one, rest_two = list(one), list(two)
    assert len(rest_one) == len(rest_two) == 2
    np.testing.assert_allclose(np.concatenate([first[0], *rest_one]),
                               gen.decode(gen.generate_codes(TEXT, seed=1, max_audio_length_ms=240, topk=50)),
                               atol=1e-5)
    np.testing.assert_allclose(np.concatenate([first[1], *rest_two]), gen.decode(
        gen.generate_codes("Another line.", speaker=2, seed=2, max_audio_length_ms=240, topk=50)), atol=1e-5)


def test_leaving_a_stream_early_frees_the_generator(gen):
    stream = gen.stream(TEXT, max_audio_length_ms=2400, seed=1, first_chunk_frames=1, chunk_frames=1, watermark=False)
    next(stream)
    stream.close()  # what a `for` loop left with `break` does: the rest is not generated
    assert len(gen.generate_codes(TEXT, max_audio_length_ms=160, topk=1)) == 2


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(first_chunk_frames=0), "first_chunk_frames must be a whole number of frames >= 1"),
    (dict(chunk_frames=2.5), "chunk_frames must be a whole number of frames >= 1"),
    (dict(chunk_frames=True), "chunk_frames"),
    (dict(watermark_key=(1, 2, 3)), "watermark key must be 5 integers"),
    (dict(topk=0), "top-k must be a whole number >= 1"),
    (dict(top_p=0.0), "top-p must be in"),
    (dict(max_audio_length_ms=0), "max audio length must be positive"),
])
def test_bad_arguments_raise_before_generating(gen, kwargs, fragment):
    with pytest.raises(CsmError, match=fragment):
        gen.stream(TEXT, **kwargs)  # no iteration: the call itself checks


def test_plan_grows_chunks_to_the_watermark_window_only_when_watermarking():
    assert plan_chunks(2, 8, watermark=False) == ChunkPlan(2, 8)
    assert plan_chunks(2, 8, watermark=True) == ChunkPlan(13, 13)
    assert plan_chunks(20, 30, watermark=True) == ChunkPlan(20, 30)


@pytest.mark.parametrize("sizes", [[1] * 10, [5, 5], [2, 3, 3, 2], [10], [4, 1, 4, 1]])
def test_regroup_gives_first_then_every_then_the_rest(sizes):
    codes = np.arange(10 * 32).reshape(10, 32)
    blocks = np.split(codes, np.cumsum(sizes)[:-1])
    chunks = list(regroup(blocks, ChunkPlan(first=2, every=3)))
    assert [len(c) for c in chunks] == [2, 3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), codes)
    assert list(regroup([], ChunkPlan(2, 3))) == []
