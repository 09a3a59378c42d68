"""The public API: `csm.load(...)` returns a `Generator`.

    gen = csm.load("unsloth/csm-1b")
    audio = gen.generate("Hello there.", speaker=0, context=[csm.Segment(1, "Hi!", audio)])

The Generator owns everything that is the same on every backend (tokenizer, prompt frames,
sampling parameters, watermark); the backend owns frames -> codes and codes <-> audio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from csm.audio import MODEL_SAMPLE_RATE
from csm.backends import create_backend, select_backend
from csm.checkpoint import open_checkpoint
from csm.errors import CsmError
from csm.hub import DEFAULT_MODEL, resolve_model
from csm.prompt import Segment, build_prompt
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, DEFAULT_TEMPERATURE, DEFAULT_TOPK, SamplingParams, max_frames
from csm.streaming import DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, plan_chunks, regroup
from csm.text import load_tokenizer


MIMI_CODEBOOK_SIZE = 2048  # the audio vocabulary's 2051 ids = Mimi's codes + 3 spare ids


class Generator:
    """Speech from text and a conversation, on one backend."""

    def __init__(self, backend, tokenizer, watermark_model: str | None = None):
        self._backend = backend
        self.tokenizer = tokenizer
        self.config = backend.config
        self._watermark_model = watermark_model
        self._watermarker = None  # silentcipher loads on first use

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def sample_rate(self) -> int:
        return MODEL_SAMPLE_RATE

    # --- codes --------------------------------------------------------------------------------
    def prompt(self, text: str, speaker: int = 0, context: Iterable[Segment] = ()):
        """The prompt frames for a turn (context audio is encoded with Mimi)."""
        context = list(context)
        for seg in context:
            if not isinstance(seg, Segment):
                raise CsmError(f"context items must be csm.Segment, got {type(seg).__name__}")
        encoded = [(seg, None if seg.audio is None else self._backend.encode_audio(seg.audio)) for seg in context]
        if not isinstance(speaker, (int, np.integer)) or speaker < 0:
            raise CsmError(f"speaker must be a non-negative integer, got {speaker!r}")
        return build_prompt(self.tokenizer, text, speaker, encoded, self.config.audio_num_codebooks)

    def generate_codes(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float = DEFAULT_TEMPERATURE,
        topk: int = DEFAULT_TOPK,
        seed: int | None = None,
        on_frame: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Mimi codes [frames, 32] (int64) of the spoken turn. `on_frame(n)` is called after each frame."""
        params = SamplingParams(temperature=temperature, topk=topk)
        frames = max_frames(max_audio_length_ms)
        prompt = self.prompt(text, speaker, context)
        return self._backend.generate_codes(prompt.tokens, prompt.mask, frames, params, seed, on_frame)

    def generate_codes_batch(
        self,
        texts: Sequence[str],
        speakers: int | Sequence[int] = 0,
        contexts: Sequence[Sequence[Segment]] | None = None,
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float = DEFAULT_TEMPERATURE,
        topk: int = DEFAULT_TOPK,
        seed: int | None = None,
    ) -> list[np.ndarray]:
        """Codes [frames_i, 32] for several turns generated together (one batch on the torch
        backend; each turn stops on its own). `speakers` is one id for all or one per text;
        `contexts` one conversation per text."""
        texts = list(texts)
        speakers = [speakers] * len(texts) if isinstance(speakers, (int, np.integer)) else list(speakers)
        contexts = [()] * len(texts) if contexts is None else list(contexts)
        if not texts or len(speakers) != len(texts) or len(contexts) != len(texts):
            raise CsmError(f"give one speaker and one context per text: {len(texts)} texts, "
                           f"{len(speakers)} speakers, {len(contexts)} contexts")
        params = SamplingParams(temperature=temperature, topk=topk)
        prompts = [self.prompt(t, s, c) for t, s, c in zip(texts, speakers, contexts)]
        return self._backend.generate_codes_batch([(p.tokens, p.mask) for p in prompts],
                                                  max_frames(max_audio_length_ms), params, seed)

    def generate_batch(
        self,
        texts: Sequence[str],
        speakers: int | Sequence[int] = 0,
        contexts: Sequence[Sequence[Segment]] | None = None,
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float = DEFAULT_TEMPERATURE,
        topk: int = DEFAULT_TOPK,
        seed: int | None = None,
        watermark: bool = True,
        watermark_key: Sequence[int] | None = None,
    ) -> list[np.ndarray]:
        """`generate` for several turns at once (see `generate_codes_batch`): one clip per text."""
        all_codes = self.generate_codes_batch(texts, speakers, contexts, max_audio_length_ms, temperature, topk, seed)
        return [self._finish(codes, watermark, watermark_key) for codes in all_codes]

    # --- audio --------------------------------------------------------------------------------
    def check_codes(self, codes: np.ndarray, first_frame: int = 0) -> np.ndarray:
        """`codes` as an array [frames, 32] of Mimi codes, or a CsmError naming the bad one
        (`first_frame`: where these codes start in the clip, for the message)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.config.audio_num_codebooks:
            raise CsmError(f"codes must be [frames, {self.config.audio_num_codebooks}], got {codes.shape}")
        bad = np.argwhere((codes < 0) | (codes >= MIMI_CODEBOOK_SIZE))
        if len(bad):
            frame, book = bad[0]
            raise CsmError(
                f"frame {first_frame + frame}, codebook {book} holds code {codes[frame, book]}, outside Mimi's "
                f"0..{MIMI_CODEBOOK_SIZE - 1} ({len(bad)} such codes): the model emitted one of its spare ids; "
                f"generate again with another seed"
            )
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [frames, 32] -> float32 mono audio at 24 kHz (1920 samples per frame)."""
        codes = self.check_codes(codes)
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32)
        return self._backend.decode_audio(codes)

    def _loaded_watermarker(self):
        from csm.watermark import Watermarker

        if self._watermarker is None:
            self._watermarker = Watermarker.load(self._watermark_model)
        return self._watermarker

    def watermark(self, audio: np.ndarray, key: Sequence[int] | None = None) -> np.ndarray:
        """Embed the silentcipher watermark (Sesame's public key unless `key` is given)."""
        from csm.watermark import PUBLIC_KEY

        return self._loaded_watermarker().embed(audio, self.sample_rate, tuple(key or PUBLIC_KEY))

    def generate(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float = DEFAULT_TEMPERATURE,
        topk: int = DEFAULT_TOPK,
        seed: int | None = None,
        watermark: bool = True,
        watermark_key: Sequence[int] | None = None,
        on_frame: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Generate, decode and watermark: float32 mono audio at 24 kHz."""
        codes = self.generate_codes(text, speaker, context, max_audio_length_ms, temperature, topk, seed, on_frame)
        return self._finish(codes, watermark, watermark_key)

    def _finish(self, codes: np.ndarray, watermark: bool, watermark_key: Sequence[int] | None) -> np.ndarray:
        """Codes -> the clip a user gets: decoded, and watermarked unless asked not to be."""
        audio = self.decode(codes)
        if watermark and len(audio):
            audio = self.watermark(audio, watermark_key)
        return audio

    def stream(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float = DEFAULT_TEMPERATURE,
        topk: int = DEFAULT_TOPK,
        seed: int | None = None,
        first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES,
        chunk_frames: int = DEFAULT_CHUNK_FRAMES,
        watermark: bool = True,
        watermark_key: Sequence[int] | None = None,
    ) -> Iterator[np.ndarray]:
        """`generate`, yielding float32 mono 24 kHz chunks while the frames are produced: the first
        after `first_chunk_frames` frames (80 ms each), then every `chunk_frames` frames, the last
        with the rest. Without the watermark the chunks concatenate to `generate(..., watermark=False)`
        for the same seed.

        With the watermark (the default) every chunk is watermarked on its own and holds at least
        13 frames (1.04 s: silentcipher needs 0.975 s to carry the whole key), so every sample is
        marked and every chunk but a shorter last one carries the key by itself; the price is that
        the first chunk comes after 1.04 s of speech instead of `first_chunk_frames`
        (see `csm.streaming`). Bad arguments raise here; the generation runs as you iterate.
        """
        from csm.watermark import PUBLIC_KEY, validate_key

        plan = plan_chunks(first_chunk_frames, chunk_frames, watermark)
        params = SamplingParams(temperature=temperature, topk=topk)
        frames = max_frames(max_audio_length_ms)
        if watermark:
            key = validate_key(watermark_key or PUBLIC_KEY)
            self._loaded_watermarker()  # missing weights fail now, not after the first chunk
        self._backend.codec  # loads Mimi now: its errors raise here, its load time is not time to first audio
        prompt = self.prompt(text, speaker, context)
        blocks = self._backend.stream_codes(prompt.tokens, prompt.mask, frames, params, seed,
                                            first_block=plan.first, check_every=plan.every)
        return self._stream_audio(regroup(blocks, plan), key if watermark else None)

    def _stream_audio(self, chunks: Iterable[np.ndarray], watermark_key: tuple[int, ...] | None) -> Iterator[np.ndarray]:
        done = 0
        with self._backend.codec.streaming_decoder() as decoder:
            for codes in chunks:
                audio = decoder.decode(self.check_codes(codes, first_frame=done))
                done += len(codes)
                yield audio if watermark_key is None else self._loaded_watermarker().embed(audio, self.sample_rate, watermark_key)


def load(
    model: str | Path = DEFAULT_MODEL,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    *,
    mimi: str | None = None,
    tokenizer: str | None = None,
    watermark_model: str | None = None,
    quantize: int | None = None,
    compile: bool | str | None = None,
) -> Generator:
    """Load CSM from a local folder/file or a Hub repo id, on `backend` ("auto", "torch", "mlx").
    `quantize` (4 or 8, MLX only) quantizes float weights at load; quantized folders need no flag.
    `compile` on torch: True/"default" or "max-autotune" compiles the frame's stacks with
    torch.compile (tens of seconds to minutes at first use, then ~2x faster frames on CUDA)."""
    name = select_backend(backend)
    ckpt = open_checkpoint(resolve_model(model))
    text_tokenizer = load_tokenizer(ckpt.root, tokenizer)
    return Generator(create_backend(name, ckpt, device, dtype, mimi, quantize, compile), text_tokenizer, watermark_model)


def load_csm_1b(device: str = "cuda", model: str | Path = DEFAULT_MODEL, **kwargs) -> SesameGenerator:  # noqa: F821 (imported in the body)
    """Sesame's `load_csm_1b(device)`: the torch backend, wrapped so that `generate` returns 1-D
    float32 torch tensors on `device` (Sesame's contract); the numpy Generator is `.generator`."""
    from csm.sesame import SesameGenerator

    return SesameGenerator(load(model, backend="torch", device=device, **kwargs))
