"""The torch backend on a CUDA GPU: same greedy codes as the CPU in float32, bf16/fp16 run, and a
whole frame replays as one CUDA graph (static caches, on-device positions). Skipped without a
GPU (CI has none); run on the GPU machine."""

import numpy as np
import pytest
import torch

import csm
from csm.sampling import SamplingParams
from csm_torch.generator import FrameGenerator

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


def test_frame_replays_as_one_cuda_graph(tiny_csm_dir):
    """Prefill eagerly, then capture one frame and replay it: same greedy codes as the eager loop."""
    gen = csm.load(str(tiny_csm_dir), device="cuda", dtype="float32")
    prompt = gen.prompt(TEXT, 0)
    params = SamplingParams(topk=1)
    eager = gen._backend._frames.generate(prompt.tokens, prompt.mask, 8, params)

    frames = FrameGenerator(gen._backend.model)
    n = len(prompt)
    with torch.inference_mode():
        tok = torch.from_numpy(prompt.tokens)[None].cuda()
        mask = torch.from_numpy(prompt.mask)[None].cuda()
        first = frames.frame(tok, mask, torch.arange(n, device="cuda"), params)
        # static inputs of one decode step
        step_tok = torch.zeros(1, 1, 33, dtype=torch.long, device="cuda")
        step_mask = torch.ones(1, 1, 33, dtype=torch.bool, device="cuda")
        step_mask[..., -1] = False
        step_pos = torch.tensor([n], device="cuda")
        step_tok[0, 0, :32] = first[0]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocations) outside the graph
            frames.frame(step_tok, step_mask, step_pos, params)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = frames.frame(step_tok, step_mask, step_pos, params)
        codes = [first[0].cpu().numpy()]
        for i in range(1, 8):
            step_pos.fill_(n + i - 1)
            step_tok[0, 0, :32] = torch.from_numpy(codes[-1]).cuda()
            graph.replay()
            codes.append(out[0].cpu().numpy())
    np.testing.assert_array_equal(np.stack(codes), eager)
