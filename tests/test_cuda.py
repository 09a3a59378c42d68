"""The torch backend on a CUDA GPU: same greedy codes as the CPU in float32, bf16/fp16 run, and a
whole frame replays as one CUDA graph (static caches, on-device positions). Skipped without a
GPU (CI has none); run on the GPU machine."""

import numpy as np
import pytest
import torch

import csm
from csm.checkpoint import open_checkpoint
from csm.sampling import Sampling
from csm_torch.frame_loop import TorchFrameLoop
from csm_torch.loading import checkpoint_tensors, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXT = "Testing on the GPU."


def test_float32_cuda_codes_equal_cpu(tiny_csm_dir):
    cpu = csm.load(str(tiny_csm_dir), device="cpu", dtype="float32").generate_codes(
        TEXT, topk=1, max_audio_length_ms=800)
    gpu = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    assert gpu.device.startswith("cuda")
    np.testing.assert_array_equal(gpu.generate_codes(TEXT, topk=1, max_audio_length_ms=800), cpu)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close_to_float32(tiny_csm_dir, dtype):
    ref = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    half = csm.load(str(tiny_csm_dir), device="cuda", dtype=dtype)
    prompt = ref.prompt(TEXT, 0)

    def logits(gen):
        m = gen._backend.model
        tok = torch.from_numpy(prompt.tokens)[None].cuda()
        mask = torch.from_numpy(prompt.mask)[None].cuda()
        with torch.inference_mode():
            h = m.backbone(m.embed_frames(tok, mask), torch.arange(len(prompt), device="cuda"))[:, -1]
            return m.codebook0_head(h).float()

    a, b = logits(ref), logits(half)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99
    codes = half.generate_codes(TEXT, topk=50, seed=0, max_audio_length_ms=400)
    assert codes.shape[1] == 32 and (codes >= 0).all() and (codes < 2051).all()


def loop_codes(loop, prompt, sampling, seed, frames, slot=0):
    """A stream's codes through a frame loop's protocol: start in `slot`, then advance."""
    first = loop.start(slot, prompt.tokens, prompt.mask, sampling, seed)
    rest = loop.advance(frames - 1)[slot]
    loop.drop(slot)
    return np.concatenate([first[None], rest])


def unfused_model(model_dir):
    ckpt = open_checkpoint(model_dir)
    cuda = torch.device("cuda")
    return load_model(ckpt.config, checkpoint_tensors(ckpt, cuda, torch.float32), cuda, torch.float32)


SAMPLINGS = [Sampling(topk=1), Sampling(temperature=0.9, topk=50, top_p=0.9)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_cuda_graph_loop_equals_eager_loop(tiny_csm_dir, sampling):
    gen = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    prompt = gen.prompt(TEXT, 0)
    model = gen._backend.model
    eager = loop_codes(TorchFrameLoop(model), prompt, sampling, 7, 12)
    graphed = TorchFrameLoop(model, cuda_graph=True)
    np.testing.assert_array_equal(loop_codes(graphed, prompt, sampling, 7, 12), eager)
    np.testing.assert_array_equal(loop_codes(graphed, prompt, sampling, 7, 12), eager)  # replayed graphs


def test_fast_path_equals_the_eager_reference(tiny_csm_dir):
    gen = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    prompt = gen.prompt(TEXT, 0)
    eager = loop_codes(TorchFrameLoop(unfused_model(tiny_csm_dir)), prompt, SAMPLINGS[0], 0, 12)
    fast = TorchFrameLoop(gen._backend.model, cuda_graph=True, compile=True)
    np.testing.assert_array_equal(loop_codes(fast, prompt, SAMPLINGS[0], 0, 12), eager)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_graphed_engine_gives_each_joining_stream_its_eager_solo_codes(tiny_csm_dir, sampling):
    """Streams join the graphed batch at different frames (buckets 1, 2, 4 in turn) and get the
    codes an eager loop gives each alone."""
    gen = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    reference = TorchFrameLoop(unfused_model(tiny_csm_dir))
    texts = ["Hi.", "A much longer sentence, to pad the others.", "Medium length here.", "Four."]
    prompts = [gen.prompt(t, 1) for t in texts]
    frames = 20
    alone = [loop_codes(reference, p, sampling, 30 + i, frames) for i, p in enumerate(prompts)]
    engine = csm.Engine(gen, max_batch_size=4, background=False)
    requests = []
    for i, p in enumerate(prompts):
        stream = csm.Sampling(sampling.temperature, sampling.topk, sampling.top_p, frames * 80, seed=30 + i)
        requests.append(engine.submit_prompt(p, stream))
        engine.step(max_frames=3)
    for r, a in zip(requests, alone, strict=True):
        np.testing.assert_array_equal(r.codes, a)
