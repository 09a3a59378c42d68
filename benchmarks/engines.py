"""Every implementation the benchmark times, behind one small interface.

An engine runs greedy generation from a fixed prompt: `generate(frames)` returns the codes of
each stream ([F, 32] each, one per stream of the batch), `stream(frames, first_block, every)`
yields code blocks of a single stream as they are known (what streaming audio is built on),
and `sync()` waits for the device. csm's own frame loops (torch or MLX) and transformers'
`CsmForConditionalGeneration.generate` are wrapped here; the measurement protocol
(`benchmarks.measure`) knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from csm.api import Generator
from csm.backends import Backend
from csm.engine import Engine
from csm.prompt import Frames
from csm.sampling import FRAME_MS, Sampling
from csm.streaming import ChunkPlan, regroup

SEED = 0


@dataclass(frozen=True)
class Impl:
    """One way to run the model: which library, and which of its speed-ups."""

    name: str
    backend: str  # "torch", "mlx" or "transformers"
    label: str
    cuda_graph: bool = False
    compile: bool | str = False  # a csm compile mode ("max-autotune") where it is a string
    batched: bool = False  # runs batch sizes above 1
    cuda_only: bool = False
    cpu_default: bool = True  # in the default set on CPUs too
    gpu_default: bool = True  # in the default set on GPUs
    overlap: bool = True  # MLX: queue frame i+1 before reading frame i back (mx.async_eval)
    arrivals: bool = False  # csm's engine with streams arriving over time (`measure.engine_arrivals`)


IMPLS = {i.name: i for i in (
    # transformers first: it runs on the checkpoint's separate projections, which csm's loop then fuses
    Impl("transformers-eager", "transformers", "transformers generate, eager"),
    # transformers compiles on its own only on CUDA; forced elsewhere it recompiles every frame
    Impl("transformers-static-compile", "transformers", "transformers generate, static cache + torch.compile",
         compile=True, cpu_default=False),
    Impl("csm-torch-eager", "torch", "csm torch, eager", batched=True),
    Impl("csm-torch-compile", "torch", "csm torch, torch.compile per stack", compile=True, batched=True),
    Impl("csm-torch-graph", "torch", "csm torch, frame as one CUDA graph", cuda_graph=True, batched=True,
         cuda_only=True),
    Impl("csm-torch-graph-compile", "torch", "csm torch, CUDA graph + torch.compile", cuda_graph=True, compile=True,
         batched=True, cuda_only=True),
    # ~2 min of Triton tuning per batch size: asked for by name only
    Impl("csm-torch-graph-autotune", "torch", "csm torch, CUDA graph + torch.compile max-autotune", cuda_graph=True,
         compile="max-autotune", batched=True, cuda_only=True, gpu_default=False),
    # csm's engine as csm.load runs it (graphed on CUDA), streams joining a running batch over time
    Impl("csm-torch-engine", "torch", "csm torch engine, streams arriving", batched=True, arrivals=True),
    Impl("csm-mlx", "mlx", "csm mlx, mx.compile", compile=True, batched=True),
    Impl("csm-mlx-engine", "mlx", "csm mlx engine, streams arriving", compile=True, batched=True,
         arrivals=True),
    Impl("csm-mlx-eager", "mlx", "csm mlx, no mx.compile"),
    # what the async overlap buys: each frame evaluated before the next is built
    Impl("csm-mlx-sync", "mlx", "csm mlx, mx.compile, no async overlap", compile=True, overlap=False,
         cpu_default=False),
)}


class BatchingMissing(RuntimeError):
    """An implementation that cannot run batches."""


class BenchBackend(Backend):
    """A backend over a model built by the benchmark (random weights in memory, or a checkpoint):
    csm's engine then drives it as it drives `csm.load`'s."""

    def __init__(self, name: str, model, make_loop: Callable[[int], object], codec=None, serialized: bool = False,
                 turns=None):
        super().__init__(model.config, None, None)
        self.name, self.device, self.serialized = name, "bench", serialized
        self._make_loop, self._codec, self._turns = make_loop, codec, turns
        self.park_threads = turns is not None  # MLX, as MlxBackend

    def lock(self):
        return self._turns() if self._turns is not None else super().lock()

    def frame_loop(self, max_batch_size: int):
        return self._make_loop(max_batch_size)

    def _load_codec(self):
        raise RuntimeError("no Mimi codec was given to the benchmark backend")


class FrameLoopEngine:
    """csm's generation engine (`csm.engine`) over either backend's frame loop, run in the
    measuring thread (no background loop): `generate` is `Generator.generate_codes_batch`'s path,
    `stream` `Generator.stream`'s."""

    def __init__(self, backend: BenchBackend, prompt: Frames, sync: Callable[[], None], batch_size: int = 1):
        self.generator = Generator(backend, tokenizer=None)
        self.engine = Engine(self.generator, max_batch_size=batch_size, background=False)
        self.prompt = prompt
        self.sync = sync
        self.batch_size = batch_size

    def generate(self, frames: int) -> list[np.ndarray]:
        greedy = Sampling(topk=1, max_audio_length_ms=frames * FRAME_MS, seed=SEED)
        requests = [self.engine.submit_prompt(self.prompt, greedy) for _ in range(self.batch_size)]
        return [r.codes for r in requests]

    def stream(self, frames: int, first_block: int, every: int) -> Iterator[np.ndarray]:
        greedy = Sampling(topk=1, max_audio_length_ms=frames * FRAME_MS, seed=SEED)
        plan = ChunkPlan(first_block, every)
        return regroup(self.engine.submit_prompt(self.prompt, greedy, plan=plan).blocks(), plan)


def backend(impl: Impl, model, codec=None) -> BenchBackend:
    """A backend over `model` for `impl`, as `csm.load` builds it (torch graphed wherever there is
    CUDA for the engine rows; MLX serialized between the loop and Mimi)."""
    if impl.backend == "mlx":
        import mlx.core as mx

        from csm_mlx.backend import DeviceTurns
        from csm_mlx.frame_loop import MlxFrameLoop

        return BenchBackend("mlx", model, lambda b: MlxFrameLoop(model, b, compile=impl.compile, overlap=impl.overlap),
                            codec, serialized=True, turns=DeviceTurns(mx.default_device()))
    from csm_torch.frame_loop import TorchFrameLoop

    graphed = impl.cuda_graph or (impl.arrivals and next(model.parameters()).device.type == "cuda")
    return BenchBackend("torch", model, lambda b: TorchFrameLoop(model, b, cuda_graph=graphed, compile=impl.compile),
                        codec)


def loop_engine(impl: Impl, model, prompt: Frames, batch_size: int) -> FrameLoopEngine:
    if impl.backend == "mlx":
        import mlx.core as mx

        sync = mx.synchronize
    else:
        import torch

        sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else (lambda: None)
    return FrameLoopEngine(backend(impl, model), prompt, sync, batch_size)


# --- transformers' reference ------------------------------------------------------------------

# transformers' CSM holds a Mimi it never runs in `generate`: build the smallest one it accepts.
_UNUSED_CODEC = dict(num_filters=8, num_hidden_layers=1, intermediate_size=64, codebook_dim=16,
                     vector_quantization_hidden_dimension=16, num_quantizers=32)


def transformers_model(model):
    """`CsmForConditionalGeneration` over the very tensors of a csm_torch `Model` (shared, not
    copied), renamed through csm's one table: the reference runs on exactly our weights."""
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig
    from transformers.initialization import no_init_weights
    from transformers.utils import logging

    logging.set_verbosity_error()  # its config warnings are about the random model's token ids, not speed

    from csm.config import to_transformers_dict
    from csm.weights import to_csm_name

    p = next(model.parameters())
    d = to_transformers_dict(model.config)
    d.pop("architectures")
    config = CsmConfig(**d, codec_config=MimiConfig(**_UNUSED_CODEC).to_dict())
    with no_init_weights(), torch.device(p.device):
        hf = CsmForConditionalGeneration._from_config(config, dtype=p.dtype)
    ours = dict(model.named_parameters())
    shared = {}
    for name in hf.state_dict():
        csm_name = to_csm_name(name, "transformers")
        if csm_name is not None:
            shared[name] = ours[csm_name]
    missing, _ = hf.load_state_dict(shared, strict=False, assign=True)
    unset = [n for n in missing if not n.startswith("codec_model.")]
    if unset:
        raise RuntimeError(f"transformers parameters left without csm weights: {unset[:4]}")
    return hf.eval()


class TransformersEngine:
    """Greedy `generate` of transformers' CSM. It has no streaming: its first audio comes after
    the whole call, so `stream` yields the codes once, at the end."""

    def __init__(self, hf_model, prompt_ids: list[int], max_frames: int, static_compile: bool):
        import torch

        self.model = hf_model
        self.ids = torch.tensor([prompt_ids], device=hf_model.device)
        self.batch_size = 1
        # A fixed max_new_tokens keeps the static cache one shape for every call (no recompiles);
        # a stopping criterion ends each call at the frames asked for.
        self.max_frames = max_frames
        if static_compile:
            hf_model.generation_config.cache_implementation = "static"
            hf_model.depth_decoder.generation_config.cache_implementation = "static"
            if hf_model.device.type != "cuda":  # generate() compiles on its own only on CUDA
                for cfg in (hf_model.generation_config, hf_model.depth_decoder.generation_config):
                    cfg.compile_config = _compile_everywhere()
        self.sync = torch.cuda.synchronize if hf_model.device.type == "cuda" else (lambda: None)

    def generate(self, frames: int) -> list[np.ndarray]:
        import torch
        from transformers import StoppingCriteriaList

        with torch.no_grad():
            out = self.model.generate(
                input_ids=self.ids, do_sample=False, depth_decoder_do_sample=False,
                max_new_tokens=self.max_frames, min_new_tokens=frames,
                stopping_criteria=StoppingCriteriaList([_stop_after(frames)]),
            )
        return [out[0].cpu().numpy().astype(np.int64)]

    def stream(self, frames: int, first_block: int, every: int) -> Iterator[np.ndarray]:
        yield from self.generate(frames)


def _compile_everywhere():
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
    return config


def _stop_after(frames: int):
    """Stop once `frames` frames exist (ids [B, frames, 32]). CSM's generate keeps only
    MaxLengthCriteria-type criteria, hence the subclass; `max_length`, which CSM rewrites, is unused."""
    import torch
    from transformers import MaxLengthCriteria

    class StopAfter(MaxLengthCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = input_ids.ndim == 3 and input_ids.shape[1] >= frames
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StopAfter(max_length=frames)
