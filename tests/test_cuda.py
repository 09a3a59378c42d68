"""The torch backend on a CUDA GPU: same greedy codes as the CPU in float32, bf16/fp16 run, and a
whole frame replays as one CUDA graph (static caches, on-device positions). Skipped without a
GPU (CI has none); run on the GPU machine."""

import numpy as np
import pytest
import torch

import csm
from csm.sampling import SamplingParams
from csm.checkpoint import open_checkpoint
from csm_torch.generator import FrameGenerator, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXT = "Testing on the GPU."


def test_float32_cuda_codes_equal_cpu(tiny_csm_dir):
    cpu = csm.load(str(tiny_csm_dir), device="cpu", dtype="float32").generate_codes(TEXT, topk=1, max_audio_length_ms=800)
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


@pytest.mark.parametrize("params, seed", [(SamplingParams(topk=1), None), (SamplingParams(temperature=0.9, topk=50), 7)])
def test_cuda_graph_loop_equals_eager_loop(tiny_csm_dir, params, seed):
    """Prefill eagerly, then every frame replayed from one captured graph: same codes as eager,
    greedy and seeded sampling alike, also when a second call reuses the captured graph."""
    gen = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    prompt = gen.prompt(TEXT, 0)
    model = gen._backend.model
    eager = FrameGenerator(model).generate(prompt.tokens, prompt.mask, 12, params, seed=seed)
    graphed = FrameGenerator(model, cuda_graph=True)
    for _ in range(2):
        np.testing.assert_array_equal(graphed.generate(prompt.tokens, prompt.mask, 12, params, seed=seed), eager)
    assert len(eager) == 12


def unfused_model(model_dir):
    """The eager reference: the checkpoint's own separate q/k/v and gate/up projections."""
    return load_model(open_checkpoint(model_dir), torch.device("cuda"), torch.float32)


def test_fast_path_equals_the_eager_reference(tiny_csm_dir):
    """Fused projections + compiled stacks + one graph per frame: the eager, unfused loop's greedy codes."""
    gen = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    prompt = gen.prompt(TEXT, 0)
    params = SamplingParams(topk=1)
    eager = FrameGenerator(unfused_model(tiny_csm_dir)).generate(prompt.tokens, prompt.mask, 12, params)
    fast = FrameGenerator(gen._backend.model, cuda_graph=True, compile=True)
    np.testing.assert_array_equal(fast.generate(prompt.tokens, prompt.mask, 12, params), eager)


def test_graphed_batch_gives_each_stream_its_eager_greedy_codes(tiny_csm_dir):
    gen = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    texts = ["Hi.", "A longer sentence to pad the batch with.", TEXT]
    prompts = [(p.tokens, p.mask) for p in (gen.prompt(t, 0) for t in texts)]
    params = SamplingParams(topk=1)
    reference = FrameGenerator(unfused_model(tiny_csm_dir))
    alone = [reference.generate(tokens, mask, 12, params) for tokens, mask in prompts]
    batch = FrameGenerator(gen._backend.model, batch_size=3, cuda_graph=True).generate_batch(prompts, 12, params)
    for a, b in zip(alone, batch):
        np.testing.assert_array_equal(b, a)
