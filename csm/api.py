"""The public API: `csm.load(...)` returns a `Generator`.

    gen = csm.load("unsloth/csm-1b")
    audio = gen.generate("Hello there.", speaker=0, context=[csm.Segment(1, "Hi!", audio)])

The Generator owns everything that is the same on every backend (tokenizer, prompt frames,
watermark) and runs every generation through `csm.engine`; the backend owns the tensor work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from csm.audio import MODEL_SAMPLE_RATE
from csm.backends import create_backend, select_backend
from csm.checkpoint import open_checkpoint
from csm.engine import Engine
from csm.errors import CsmError
from csm.hub import DEFAULT_MODEL
from csm.mimi_files import CODEBOOK_SIZE
from csm.prompt import Frames, Segment, build_prompt, newest_that_fit, segment_positions
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_TOPK, Sampling
from csm.streaming import DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES
from csm.text import load_tokenizer

if TYPE_CHECKING:
    from csm.sesame import SesameGenerator  # imports torch


class Generator:
    """Speech from text and a conversation, on one backend."""

    def __init__(self, backend, tokenizer, watermark_model: str | None = None,
                 loaded_from: tuple[str | None, str | None] = (None, None)):
        self._backend = backend
        # (model, adapter) as `load` was given them (local paths made absolute): what a voice with its
        # own model is checked against
        self.loaded_from = loaded_from
        self.tokenizer = tokenizer
        self.config = backend.config
        self._watermark_model = watermark_model
        self._watermarker = None  # silentcipher loads on first use
        self._engines: dict[int, Engine] = {}
        self._engines_lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def sample_rate(self) -> int:
        return MODEL_SAMPLE_RATE

    # --- engines ------------------------------------------------------------------------------
    def engine(self, max_batch_size: int = 8, max_queue: int = 64) -> Engine:
        """A continuous-batching engine over this model: a background loop over one running batch
        of `max_batch_size` streams that requests join and leave at any time (`csm.engine`)."""
        return Engine(self, max_batch_size=max_batch_size, max_queue=max_queue)

    def _engine_for(self, batch_size: int) -> Engine:
        """The engine `generate`, `generate_batch` and `stream` run on: no thread (the caller's
        waiting runs the loop); kept for the next call of the same size."""
        with self._engines_lock:
            engine = self._engines.get(batch_size)
            if engine is None:
                if batch_size != 1:
                    self._engines = {k: v for k, v in self._engines.items() if k == 1}  # one batch's caches at a time
                engine = self._engines[batch_size] = Engine(self, batch_size, max_queue=max(64, batch_size),
                                                            background=False)
        return engine

    # --- codes --------------------------------------------------------------------------------
    def prompt(self, text: str, speaker: int = 0, context: Iterable[Segment] = ()) -> Frames:
        """The prompt frames for a turn (context audio is encoded with Mimi)."""
        context = list(context)
        for seg in context:
            if not isinstance(seg, Segment):
                raise CsmError(f"context items must be csm.Segment, got {type(seg).__name__}")
        if not isinstance(speaker, (int, np.integer)) or isinstance(speaker, bool) or speaker < 0:
            raise CsmError(f"speaker must be a non-negative integer, got {speaker!r}")
        encoded = [(seg, self._segment_codes(seg)) for seg in context]
        return build_prompt(self.tokenizer, text, speaker, encoded, self.config.audio_num_codebooks)

    def encode(self, audio, sample_rate: int = MODEL_SAMPLE_RATE) -> np.ndarray:
        """Mono audio -> its Mimi codes [frames, 32] (what `decode` turns back into audio): encode a
        context clip once and pass `Segment(..., codes=...)` to every turn that uses it."""
        return self._segment_codes(Segment(0, "", audio=audio, sample_rate=sample_rate))

    def _segment_codes(self, segment: Segment) -> np.ndarray | None:
        """A context segment's Mimi codes: the ones it carries, else its audio encoded, else None."""
        if segment.codes is not None:
            return segment.codes
        return None if segment.audio is None else self._backend.encode_audio(segment.audio)

    def generate_codes(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float | None = None,
        topk: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        on_frame: Callable[[int], None] | None = None,
        *,
        voice=None,
    ) -> np.ndarray:
        """Mimi codes [frames, 32] (int64) of the spoken turn. `on_frame(n)` is called as frames come.
        `voice`: a voice profile's name, speaker id or `csm.voices.Voice` (see `voice_turn`)."""
        speaker, context, sampling = self.voice_turn(voice, text, speaker, context, max_audio_length_ms, temperature,
                                                     topk, top_p, seed)
        request = self._engine_for(1).submit_prompt(self.prompt(text, speaker, context), sampling)
        return request.collect(on_frame)

    def voice_turn(self, voice, text: str, speaker: int | None, context: Sequence[Segment],
                   max_audio_length_ms: float, temperature: float | None, topk: int | None, top_p: float | None,
                   seed: int | None) -> tuple[int, list[Segment], Sampling]:
        """(speaker, context, sampling) of a turn, with what a call leaves out (None) taken from
        `voice` if given, else csm's defaults. A voice's reference clips come before `context`, as
        many as fit the prompt with room for `max_audio_length_ms` of audio: the newest first, whole
        clips only; their codes are cached in the voice store, so each clip is encoded once per Mimi."""
        defaults = dict(temperature=DEFAULT_TEMPERATURE, topk=DEFAULT_TOPK, top_p=DEFAULT_TOP_P)
        context = list(context)
        if voice is not None:
            from csm.voices import resolve_voice

            voice = resolve_voice(voice)
            self._check_voice_model(voice)
            defaults.update(voice.sampling_defaults())
            speaker = voice.speaker_id if speaker is None else speaker
        given = dict(temperature=temperature, topk=topk, top_p=top_p)
        chosen = {k: defaults[k] if v is None else v for k, v in given.items()}
        sampling = Sampling(chosen["temperature"], chosen["topk"], chosen["top_p"], max_audio_length_ms, seed)
        speaker = 0 if speaker is None else speaker
        if voice is not None and voice.references:
            # the context's audio is encoded once here: the budget below needs its length, the prompt its codes
            context = [Segment(s.speaker, s.text, codes=self._segment_codes(s))
                       if isinstance(s, Segment) and s.codes is None and s.audio is not None else s for s in context]
            context = self._voice_clips(voice, text, speaker, context, sampling.max_frames) + context
        return speaker, context, sampling

    def _check_voice_model(self, voice) -> None:
        from csm.voices import model_location

        if voice.model is None and voice.adapter is None:
            return  # a voice of the base model: any loaded model may speak it
        from csm.hub import DEFAULT_MODEL

        model, adapter = self.loaded_from
        wanted = (model_location(voice.model or DEFAULT_MODEL, "model"), model_location(voice.adapter, "adapter"))
        if wanted != (model or DEFAULT_MODEL, adapter):
            wants = " with adapter ".join(str(p) for p in (voice.model or "the default model", voice.adapter) if p)
            raise CsmError(f"voice {voice.name!r} speaks with {wants}, not the model this generator loaded; load it "
                           f"with csm.load(voice={voice.name!r}) (csm-generate --voice {voice.name!r})")

    def _voice_clips(self, voice, text: str, speaker: int, context: list[Segment], max_frames: int) -> list[Segment]:
        """The voice's reference clips as segments with their codes, the newest that fit the prompt."""
        from csm.voices import reference_codes

        codes = reference_codes(voice, self._backend.encode_audio, self._backend.codec_identity)
        clips = [Segment(voice.speaker_id, ref.transcript, codes=c) for ref, c in zip(voice.references, codes,
                                                                                     strict=True)]
        # check_fits: prompt + max_frames < max_seq_len, with the prompt holding the context already
        room = self.config.backbone.max_seq_len - max_frames - len(self.prompt(text, speaker, context))
        kept = newest_that_fit([segment_positions(self.tokenizer, clip) for clip in clips], room, contiguous=False)
        return [clips[i] for i in kept]

    def context_room(self, text: str, speaker: int, max_frames: int) -> int:
        """The prompt positions left for context before `text` by `speaker` when up to `max_frames`
        frames are to be generated: the context's total must stay below it (`check_fits`)."""
        return self.config.backbone.max_seq_len - max_frames - len(self.prompt(text, speaker))

    def generate_codes_batch(
        self,
        texts: Sequence[str],
        speakers: int | Sequence[int] | None = None,
        contexts: Sequence[Sequence[Segment]] | None = None,
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float | None = None,
        topk: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        voice=None,
    ) -> list[np.ndarray]:
        """Codes [frames_i, 32] for several turns generated together in one batch, each stopping on
        its own. `speakers` is one id for all or one per text; `contexts` one conversation per
        text; `voice` one voice profile for every turn (see `generate_codes`). Turn i is seeded
        with `seed + i`, so it gets the codes `generate_codes` gives alone with that seed."""
        texts = list(texts)
        if speakers is None or isinstance(speakers, (int, np.integer)):
            speakers = [speakers] * len(texts)
        speakers = list(speakers)
        contexts = [()] * len(texts) if contexts is None else list(contexts)
        if not texts or len(speakers) != len(texts) or len(contexts) != len(texts):
            raise CsmError(f"give one speaker and one context per text: {len(texts)} texts, "
                           f"{len(speakers)} speakers, {len(contexts)} contexts")
        if voice is not None:
            from csm.voices import resolve_voice

            voice = resolve_voice(voice)  # read once for every turn
        prompts = []
        for text, speaker, context in zip(texts, speakers, contexts, strict=True):
            speaker, context, sampling = self.voice_turn(voice, text, speaker, context, max_audio_length_ms,
                                                         temperature, topk, top_p, seed)
            prompts.append(self.prompt(text, speaker, context))
        engine = self._engine_for(len(prompts))
        requests = [engine.submit_prompt(p, sampling.with_seed(None if seed is None else seed + i))
                    for i, p in enumerate(prompts)]
        return [r.codes for r in requests]

    def generate_batch(
        self,
        texts: Sequence[str],
        speakers: int | Sequence[int] | None = None,
        contexts: Sequence[Sequence[Segment]] | None = None,
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float | None = None,
        topk: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        watermark: bool = True,
        watermark_key: Sequence[int] | None = None,
        *,
        voice=None,
    ) -> list[np.ndarray]:
        """`generate` for several turns at once (see `generate_codes_batch`): one clip per text."""
        key = self.prepare_audio(watermark, watermark_key)
        all_codes = self.generate_codes_batch(texts, speakers, contexts, max_audio_length_ms, temperature, topk,
                                              top_p, seed, voice=voice)
        return [self._finish(codes, key) for codes in all_codes]

    # --- audio --------------------------------------------------------------------------------
    def check_codes(self, codes: np.ndarray, first_frame: int = 0) -> np.ndarray:
        """`codes` as an array [frames, 32] of Mimi codes, or a CsmError naming the bad one
        (`first_frame`: where these codes start in the clip, for the message)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.config.audio_num_codebooks:
            raise CsmError(f"codes must be [frames, {self.config.audio_num_codebooks}], got {codes.shape}")
        bad = np.argwhere((codes < 0) | (codes >= CODEBOOK_SIZE))
        if len(bad):
            frame, book = bad[0]
            raise CsmError(
                f"frame {first_frame + frame}, codebook {book} holds code {codes[frame, book]}, outside Mimi's "
                f"0..{CODEBOOK_SIZE - 1} ({len(bad)} such codes): the model emitted one of its spare ids; "
                f"generate again with another seed"
            )
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [frames, 32] -> float32 mono audio at 24 kHz (1920 samples per frame)."""
        codes = self.check_codes(codes)
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32)
        return self._backend.decode_audio(codes)

    def prepare_audio(self, watermark: bool = True,
                      watermark_key: Sequence[int] | None = None) -> tuple[int, ...] | None:
        """Load what audio output needs (Mimi, and silentcipher when watermarking) so a missing
        piece fails before the first frame, not after the last; returns the watermark key to use."""
        key = None
        if watermark:
            from csm.watermark import PUBLIC_KEY, validate_key

            key = validate_key(watermark_key or PUBLIC_KEY)
            self._loaded_watermarker()
        self._backend.load_codec()
        return key

    def _loaded_watermarker(self):
        from csm.watermark import Watermarker

        with self._engines_lock:
            if self._watermarker is None:
                self._watermarker = Watermarker.load(self._watermark_model)
        return self._watermarker

    def watermark(self, audio: np.ndarray, key: Sequence[int] | None = None) -> np.ndarray:
        """Embed the silentcipher watermark (Sesame's public key unless `key` is given)."""
        from csm.watermark import PUBLIC_KEY

        return self._loaded_watermarker().embed(audio, self.sample_rate, tuple(key or PUBLIC_KEY))

    @property
    def codec(self):
        """The Mimi codec (loaded on first use)."""
        return self._backend.codec

    def generate(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float | None = None,
        topk: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        watermark: bool = True,
        watermark_key: Sequence[int] | None = None,
        on_frame: Callable[[int], None] | None = None,
        *,
        voice=None,
    ) -> np.ndarray:
        """Generate, decode and watermark: float32 mono audio at 24 kHz. Speaker None means the
        voice's speaker id (or 0); sampling None the voice's defaults (or csm's)."""
        key = self.prepare_audio(watermark, watermark_key)
        codes = self.generate_codes(text, speaker, context, max_audio_length_ms, temperature, topk, top_p, seed,
                                    on_frame, voice=voice)
        return self._finish(codes, key)

    def _finish(self, codes: np.ndarray, watermark_key: tuple[int, ...] | None) -> np.ndarray:
        """Codes -> the clip a user gets: decoded, and watermarked with `watermark_key` if given."""
        audio = self.decode(codes)
        if watermark_key is not None and len(audio):
            audio = self.watermark(audio, watermark_key)
        return audio

    def stream(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = DEFAULT_MAX_AUDIO_LENGTH_MS,
        temperature: float | None = None,
        topk: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES,
        chunk_frames: int = DEFAULT_CHUNK_FRAMES,
        watermark: bool = True,
        watermark_key: Sequence[int] | None = None,
        *,
        voice=None,
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
        request = self._engine_for(1).submit(text, speaker, context, max_audio_length_ms, temperature, topk, top_p,
                                             seed, first_chunk_frames, chunk_frames, watermark, watermark_key,
                                             voice=voice)
        return iter(request)


def load(
    model: str | Path | None = None,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    *,
    adapter: str | Path | None = None,
    mimi: str | None = None,
    tokenizer: str | None = None,
    watermark_model: str | None = None,
    quantize: int | None = None,
    compile: bool | str | None = None,
    voice=None,
    backbone_flavor: str | dict | None = None,
    decoder_flavor: str | dict | None = None,
) -> Generator:
    """Load CSM from a local folder/file or a Hub repo id (default unsloth/csm-1b), on `backend`
    ("auto", "torch", "mlx"). `adapter`: a LoRA adapter folder (`csm-finetune`'s, or peft's) merged
    into the weights as they load; `model` may also be an adapter folder alone, whose base model is
    then the one it names. The tokenizer and Mimi always come from the base model.
    `quantize` (4 or 8, MLX only) quantizes float weights at load; quantized folders need no flag.
    `compile` on torch: True/"default" or "max-autotune" compiles the frame's stacks with
    torch.compile (tens of seconds to minutes at first use, then ~2x faster frames on CUDA).
    `voice`: a voice profile (name, speaker id or `csm.voices.Voice`) whose model and adapter to load
    when it names them (then `model` and `adapter` may be left out, or must be the same).
    `backbone_flavor` / `decoder_flavor`: what the weights are when no config.json says so, e.g. a
    training checkpoint file (`checkpoints/model_epoch9_step1000.pt`): a flavor name (`llama-1B`,
    `llama-3B`, `llama-3B-instruct`, `llama-8B`, `llama-100M`, ...) or a dict of dims; the decoder
    defaults to llama-100M. Every tensor's shape is checked against them before any is read."""
    from csm.training.adapters import check_adapter, model_and_adapter
    from csm.voices import model_location

    if voice is not None:
        model, adapter = _voice_model(voice, model, adapter)
    name = select_backend(backend)
    base, lora = model_and_adapter(model, adapter)
    ckpt = open_checkpoint(base, backbone_flavor, decoder_flavor)
    if lora is not None:
        check_adapter(lora, ckpt.config)  # before any weight is read
    text_tokenizer = load_tokenizer(ckpt.root, tokenizer)
    return Generator(create_backend(name, ckpt, device, dtype, mimi, quantize, compile, adapter=lora), text_tokenizer,
                     watermark_model, loaded_from=(model_location(model, "model"), model_location(adapter, "adapter")))


def _voice_model(voice, model, adapter) -> tuple:
    """(model, adapter) to load for `voice`: its own where it names them; a different one given too is an error."""
    from csm.voices import model_location, resolve_voice

    voice = resolve_voice(voice)
    if voice.model is None and voice.adapter is None:
        return model, adapter
    for what, given, own in (("model", model, voice.model), ("adapter", adapter, voice.adapter)):
        if given is not None and model_location(given, what) != own:
            raise CsmError(f"voice {voice.name!r} speaks with {what} {own or 'none'}, not {given}: leave the {what} "
                           f"out to load the voice's, or update the voice (csm-voice update {voice.name!r} --{what})")
    return voice.model, voice.adapter


def load_csm_1b(device_or_model: str | Path | None = None, model: str | Path | None = None, *,
                device: str | None = None, **kwargs) -> SesameGenerator:
    """Sesame's `load_csm_1b(device="cuda")`: the torch backend, wrapped so that `generate` returns 1-D
    float32 torch tensors on `device` (Sesame's contract); the numpy Generator is `.generator`.
    The first argument is a device (Sesame's call) or a model, as in training repos' examples:
    `load_csm_1b("checkpoints/model_epoch9_step1000.pt", backbone_flavor="llama-3B-instruct")`
    (`kwargs` are `csm.load`'s). The device defaults to cuda, the model to unsloth/csm-1b."""
    from csm.sesame import SesameGenerator

    if device_or_model is not None:
        if _is_device_name(device_or_model):
            if device is not None:
                raise CsmError(f"load_csm_1b got two devices, {device_or_model!r} and device={device!r}")
            device = device_or_model
        elif model is not None:
            raise CsmError(f"load_csm_1b got two models, {device_or_model!r} and model={model!r}; pass the device "
                           "as device=")
        else:
            model = device_or_model
    return SesameGenerator(load(model or DEFAULT_MODEL, backend="torch", device=device or "cuda", **kwargs))


def _is_device_name(name) -> bool:
    """A torch device, or a string torch reads as one (cuda, cuda:1, cpu, mps); a path or any other
    string is taken for a model."""
    import os
    import re

    if isinstance(name, os.PathLike):
        return False
    return not isinstance(name, str) or re.fullmatch(r"(cuda|cpu|mps)(:\d+)?", name) is not None
