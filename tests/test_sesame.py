"""Sesame's name means Sesame's contract: the flow of Sesame's example script `run_csm.py`, with
only its import changed to `from csm import load_csm_1b, Segment`, runs on the tiny model."""

import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import csm
from csm import Segment, load_csm_1b
from csm.errors import CsmError
from csm.sesame import SesameGenerator

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cpu"
SAMPLES_PER_FRAME = 1920  # Mimi: 80 ms at 24 kHz


@pytest.fixture(scope="module")
def generator(tiny_model_dir, watermark_dir):
    return load_csm_1b(DEVICE, model=tiny_model_dir, watermark_model=str(watermark_dir), dtype="float32")


def _prompt_audio(seconds: float, freq: float, sample_rate: int) -> torch.Tensor:
    """Stands in for run_csm.py's load_prompt_audio (torchaudio.load + resample): a 1-D float
    torch tensor at the generator's rate."""
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float32) / sample_rate
    return 0.3 * torch.sin(2 * math.pi * freq * t) * torch.sin(2 * math.pi * 3 * t)


def _prepare_prompt(text: str, speaker: int, audio: torch.Tensor) -> Segment:
    return Segment(text=text, speaker=speaker, audio=audio)


def test_run_csm_conversation(generator, tmp_path):
    assert isinstance(generator, SesameGenerator) and generator.sample_rate == 24_000
    # short lines and clips: the tiny model has 256 positions for all six turns
    prompt_a = _prepare_prompt("Like an exam.", 0, _prompt_audio(1.0, 220.0, generator.sample_rate))
    prompt_b = _prepare_prompt("A math test.", 1, _prompt_audio(1.2, 150.0, generator.sample_rate))
    conversation = [
        {"text": "Hey, how are you?", "speaker_id": 0},
        {"text": "Pretty good. You?", "speaker_id": 1},
        {"text": "I'm great!", "speaker_id": 0},
        {"text": "Cool stuff.", "speaker_id": 1},
    ]

    prompt_segments = [prompt_a, prompt_b]
    generated_segments = []
    for utterance in conversation:
        audio_tensor = generator.generate(
            text=utterance["text"],
            speaker=utterance["speaker_id"],
            context=prompt_segments + generated_segments,
            max_audio_length_ms=400,
        )
        assert isinstance(audio_tensor, torch.Tensor)
        assert audio_tensor.ndim == 1 and audio_tensor.dtype == torch.float32
        assert audio_tensor.device == torch.device(DEVICE)
        assert len(audio_tensor) % SAMPLES_PER_FRAME == 0 and len(audio_tensor) <= 5 * SAMPLES_PER_FRAME
        generated_segments.append(Segment(text=utterance["text"], speaker=utterance["speaker_id"], audio=audio_tensor))

    all_audio = torch.cat([seg.audio for seg in generated_segments], dim=0)  # the script's line, as is
    assert all_audio.ndim == 1 and len(all_audio) == sum(len(seg.audio) for seg in generated_segments)

    out = tmp_path / "full_conversation.wav"
    sf.write(out, all_audio.unsqueeze(0).cpu().numpy().T, generator.sample_rate)  # torchaudio.save's [1, N]
    data, rate = sf.read(out, dtype="float32")
    assert rate == generator.sample_rate and data.shape == (len(all_audio),)


def test_generate_matches_the_numpy_generator(generator):
    """Same seed, same clip: the wrapper only changes the type."""
    context = [Segment(0, "Hello there.", audio=_prompt_audio(0.5, 200.0, generator.sample_rate))]
    clip = generator.generate("Hi.", 1, context, max_audio_length_ms=240, topk=1, seed=3)
    ref = generator.generator.generate("Hi.", 1, context, max_audio_length_ms=240, topk=1, seed=3)
    assert isinstance(ref, np.ndarray)
    np.testing.assert_array_equal(clip.numpy(), ref)


def test_segment_takes_a_tensor_or_an_array_alike(generator):
    samples = _prompt_audio(0.5, 180.0, generator.sample_rate)
    from_tensor = Segment(0, "hi", audio=samples)
    from_array = Segment(0, "hi", audio=samples.numpy())
    assert from_tensor.audio is samples  # kept as given, as Sesame's Segment does
    assert isinstance(from_array.audio, np.ndarray) and from_array.audio.dtype == np.float32
    np.testing.assert_array_equal(from_tensor.audio.numpy(), from_array.audio)
    # the model sees the same prompt either way
    np.testing.assert_array_equal(generator.generator.prompt("ok", 1, [from_tensor]).tokens,
                                  generator.generator.prompt("ok", 1, [from_array]).tokens)


def test_segment_takes_other_float_dtypes():
    samples = torch.linspace(-0.5, 0.5, 480, dtype=torch.bfloat16)
    seg = Segment(0, "hi", audio=samples)
    np.testing.assert_array_equal(csm.audio.as_samples(seg.audio), samples.float().numpy())


def test_tensor_at_another_rate_is_resampled_and_stays_a_tensor():
    seg = Segment(0, "hi", audio=torch.zeros(16_000, dtype=torch.float64), sample_rate=16_000)
    assert isinstance(seg.audio, torch.Tensor) and seg.audio.dtype == torch.float64
    assert seg.audio.shape == (24_000,) and seg.sample_rate == 24_000


def test_two_dimensional_tensor_is_an_error():
    with pytest.raises(CsmError, match="mono"):
        Segment(0, "hi", audio=torch.zeros(2, 480))


def test_load_still_returns_numpy(tiny_model_dir, watermark_dir):
    gen = csm.load(tiny_model_dir, backend="torch", device=DEVICE, dtype="float32", watermark_model=str(watermark_dir))
    assert isinstance(gen, csm.Generator)
    audio = gen.generate("Hi.", 0, max_audio_length_ms=160, topk=1, seed=0)
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32


def test_importing_csm_sesame_does_not_import_torch():
    code = "import sys, csm, csm.sesame; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
