"""The generation engine: streams joining a running batch at any frame get exactly the codes they
get alone with the same seed (greedy and sampled, both backends); cancelled slots are reused; the
loop's check points, end of speech and queue limits; many threads submitting to a background loop."""

import threading

import numpy as np
import pytest

import csm
from csm.backends import Backend, FrameLoop
from csm.config import FLAVORS, CsmConfig
from csm.prompt import Frames
from csm.sampling import Sampling

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("mlx"), reason="MLX is not installed"))]
TURNS = [("Hello there, how are you?", 0), ("A different sentence to speak!", 3), ("Short.", 1),
         ("The fourth one is a little longer than the others.", 2), ("And a fifth to take a freed slot.", 0)]
MAX_MS = 1280  # 16 frames


@pytest.fixture(scope="module", params=BACKENDS)
def gen(request, tiny_model_dir):
    return csm.load(tiny_model_dir, backend=request.param, device="cpu", dtype="float32")


def run_until(engine, frame):
    while engine.frames < frame:
        assert engine.step(max_frames=1)


@pytest.mark.parametrize("sampling", [dict(topk=1), dict(topk=50, temperature=0.9, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_streams_joining_a_running_batch_get_their_solo_codes(gen, sampling):
    seeds = [11, 12, 13, 14, 15]
    solo = [gen.generate_codes(t, s, max_audio_length_ms=MAX_MS, seed=seed, **sampling)
            for (t, s), seed in zip(TURNS, seeds, strict=True)]
    engine = csm.Engine(gen, max_batch_size=4, background=False)

    def submit(i):
        text, speaker = TURNS[i]
        return engine.submit_prompt(gen.prompt(text, speaker),
                                    Sampling(max_audio_length_ms=MAX_MS, seed=seeds[i], **sampling))

    requests = []
    for i, frame in enumerate([0, 3, 7, 12]):  # four streams join the running batch at these frames
        run_until(engine, frame)
        requests.append(submit(i))
        engine.step(max_frames=1)
        assert requests[i].joined_frame == frame and engine.active == i + 1 - sum(r.done for r in requests)
    requests[1].cancel()  # midway: it has run 13 of its 16 frames at most
    engine.step(max_frames=1)
    assert requests[1].finish_reason == "cancelled" and requests[1].slot == 1
    requests.append(submit(4))
    engine.step(max_frames=1)
    assert requests[4].slot == 1  # the cancelled stream's slot, freed at once and taken by the next
    while engine.step():
        pass

    for i in (0, 2, 3, 4):
        assert requests[i].finish_reason in ("end_of_speech", "max_length")
        np.testing.assert_array_equal(requests[i].codes, solo[i], err_msg=f"stream {i} ({gen.backend}, {sampling})")
    cancelled = requests[1].codes
    assert 0 < len(cancelled) < len(solo[1])
    np.testing.assert_array_equal(cancelled, solo[1][: len(cancelled)])
    assert len(solo[0]) > 7  # the streams really ran side by side
    engine.close()


def test_background_engine_serves_many_threads(gen):
    # MLX's Mimi runs its transformer a position at a time on the CPU: fewer, shorter clips there
    threads, ms = (4, 640) if gen.backend == "torch" else (2, 320)
    results, errors = {}, []

    def speak(i):
        try:
            text, speaker = TURNS[i]
            req = engine.submit(text, speaker, max_audio_length_ms=ms, seed=i, first_chunk_frames=1, chunk_frames=3,
                                watermark=False)
            chunks = list(req)
            results[i] = (chunks, req.codes)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    with gen.engine(max_batch_size=2, max_queue=8) as engine:
        workers = [threading.Thread(target=speak, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=300)
    assert not errors, errors
    for i, (chunks, codes) in results.items():
        text, speaker = TURNS[i]
        np.testing.assert_array_equal(codes, gen.generate_codes(text, speaker, max_audio_length_ms=ms, seed=i))
        assert [len(c) // 1920 for c in chunks][:1] == [1]
        np.testing.assert_allclose(np.concatenate(chunks), gen.decode(codes), atol=1e-5)
    assert len(results) == threads


# --- the loop's policy, on a scripted frame loop -----------------------------------------------

class ScriptedLoop(FrameLoop):
    """Plays given codes per slot and records what the engine asks of it."""

    def __init__(self, max_batch_size, block_frames, script):
        self.max_batch_size, self.block_frames, self.script = max_batch_size, block_frames, script
        self.calls, self.position = [], {}

    def start(self, slot, tokens, mask, sampling, seed):
        self.calls.append(("start", slot))
        self.position[slot] = (len(self.calls), 1)
        return self.script[0]

    def advance(self, n):
        self.calls.append(("advance", n))
        out = np.zeros((self.max_batch_size, n, 32), dtype=np.int64)
        for slot, (key, done) in self.position.items():
            out[slot] = self.script[done : done + n]
            self.position[slot] = (key, done + n)
        return out

    def drop(self, slot):
        self.calls.append(("drop", slot))
        self.position.pop(slot)


class ScriptedBackend(Backend):
    name, device = "scripted", "cpu"

    def __init__(self, script, block_frames):
        super().__init__(CsmConfig(FLAVORS["llama-1B"], FLAVORS["llama-100M"]), None, None)
        self.loop = None
        self._script, self._block = script, block_frames

    def frame_loop(self, max_batch_size):
        self.loop = ScriptedLoop(max_batch_size, self._block, self._script)
        return self.loop

    def _load_codec(self):
        raise AssertionError("codes only")


def scripted(script, block_frames=8):
    backend = ScriptedBackend(np.asarray(script), block_frames)
    return csm.Generator(backend, tokenizer=None), backend


PROMPT = Frames(np.zeros((4, 33), dtype=np.int64), np.ones((4, 33), dtype=bool))


def frames_with_silence_at(n, silent):
    codes = np.arange(1, n * 32 + 1).reshape(n, 32)
    if silent is not None:
        codes[silent] = 0
    return codes


def test_check_points_are_the_first_block_then_every_block_and_the_maximum():
    gen, backend = scripted(frames_with_silence_at(40, None), block_frames=8)
    engine = csm.Engine(gen, max_batch_size=2, background=False)
    from csm.streaming import ChunkPlan

    req = engine.submit_prompt(PROMPT, Sampling(max_audio_length_ms=20 * 80), plan=ChunkPlan(3, 8))
    assert len(req.codes) == 20 and req.finish_reason == "max_length"
    # the first frame comes from start, the first block ends at 3 frames, then blocks of 8, then
    # what is left up to the maximum (never a frame past it)
    assert backend.loop.calls == [("start", 0), ("advance", 2), ("advance", 8), ("advance", 8), ("advance", 1),
                                  ("drop", 0)]


def test_an_all_zero_frame_ends_the_stream_and_is_not_kept():
    script = frames_with_silence_at(40, 5)
    gen, backend = scripted(script, block_frames=4)
    engine = csm.Engine(gen, max_batch_size=1, background=False)
    req = engine.submit_prompt(PROMPT, Sampling())
    np.testing.assert_array_equal(req.codes, script[:5])
    assert req.finish_reason == "end_of_speech"
    assert backend.loop.calls[-1] == ("drop", 0)


def test_a_silent_first_frame_gives_no_codes():
    gen, _ = scripted(frames_with_silence_at(4, 0))
    req = csm.Engine(gen, max_batch_size=1, background=False).submit_prompt(PROMPT, Sampling())
    assert req.codes.shape == (0, 32) and req.finish_reason == "end_of_speech"


def test_requests_queue_in_order_and_a_full_queue_is_a_clear_error():
    gen, backend = scripted(frames_with_silence_at(40, None))
    engine = csm.Engine(gen, max_batch_size=1, max_queue=2, background=False)
    first = engine.submit_prompt(PROMPT, Sampling(max_audio_length_ms=160))
    second = engine.submit_prompt(PROMPT, Sampling(max_audio_length_ms=160))
    with pytest.raises(csm.EngineFull, match="max_queue=2"):
        engine.submit_prompt(PROMPT, Sampling(max_audio_length_ms=160))
    assert second.codes.shape == (2, 32) and first.done  # waiting on the second ran the first before it
    assert [c for c in backend.loop.calls if c[0] == "start"] == [("start", 0), ("start", 0)]


def test_cancelling_a_queued_request_never_starts_it_and_close_cancels_the_rest():
    gen, backend = scripted(frames_with_silence_at(40, None))
    engine = csm.Engine(gen, max_batch_size=1, background=False)
    running = engine.submit_prompt(PROMPT, Sampling())
    queued = engine.submit_prompt(PROMPT, Sampling())
    engine.step()
    queued.cancel()
    engine.step()
    assert queued.finish_reason == "cancelled" and queued.codes.shape == (0, 32)
    engine.close()
    assert running.finish_reason == "cancelled" and len(running.codes) > 0
    assert backend.loop.calls.count(("start", 0)) == 1
    with pytest.raises(csm.CsmError, match="engine is closed"):
        engine.submit_prompt(PROMPT, Sampling())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(top_p=0), "top-p must be in"),
    (dict(top_p=1.5), "top-p must be in"),
    (dict(topk=0), "top-k must be a whole number"),
    (dict(temperature=-1), "temperature must be"),
    (dict(seed=-3), "seed must be"),
    (dict(max_audio_length_ms=0), "max audio length must be positive"),
])
def test_bad_sampling_is_a_clear_error(kwargs, fragment):
    with pytest.raises(csm.CsmError, match=fragment):
        Sampling(**kwargs)


def test_engine_sizes_are_checked():
    gen, _ = scripted(frames_with_silence_at(4, None))
    with pytest.raises(csm.CsmError, match="max_batch_size must be"):
        csm.Engine(gen, max_batch_size=0)


def test_the_core_imports_neither_torch_nor_mlx():
    """Every module of csm/ (the engine, the API, the CLIs, the converters) imports without a
    framework: a backend's package is imported when a backend is created."""
    import pkgutil
    import subprocess
    import sys

    modules = [m.name for m in pkgutil.walk_packages(csm.__path__, "csm.")]
    assert "csm.engine" in modules and "csm.cli.generate" in modules
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'mlx', 'mlx.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
