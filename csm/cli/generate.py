"""`csm-generate`: speech from text (and a conversation) into a WAV file or the speakers.

One parser for every backend: `csm-generate-mlx` is the same command with the backend fixed, so
their flags cannot drift apart. Every bad input is checked before the model loads where it can
be, and reported as one line with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click
import numpy as np

from csm.audio import MODEL_SAMPLE_RATE
from csm.cli.common import entry_point
from csm.cli.playback import ChunkPlayer, play
from csm.errors import CsmError, read_json
from csm.hub import DEFAULT_MODEL
from csm.mimi_files import FRAME_SIZE
from csm.sampling import (
    DEFAULT_MAX_AUDIO_LENGTH_MS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    DEFAULT_TOPK,
    FRAME_MS,
    Sampling,
)
from csm.streaming import DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES


def read_context(path: Path, sample_rate: int) -> list:
    """A JSON list of {"speaker": 0, "text": "...", "audio": "file.wav"}; audio paths are relative
    to the JSON file, and optional."""
    from csm.audio import read_audio
    from csm.prompt import Segment

    items = read_json(path, "context file")
    if not isinstance(items, list):
        raise CsmError(f'context file {path} must hold a list of {{"speaker": 0, "text": "...", "audio": "file.wav"}}')
    segments = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or "speaker" not in item:
            raise CsmError(f'context item {i} in {path} needs "speaker" (int) and "text" (string)')
        audio = None
        if item.get("audio"):
            audio = read_audio(path.parent / item["audio"], sample_rate)
        segments.append(Segment(speaker=item["speaker"], text=item["text"], audio=audio))
    return segments


def generate_defaults() -> dict:
    """Every option of the generate command at its default: what `csm-voice sample` starts from."""
    params = command.make_context(command.name, ["--text", "-"]).params  # click's own defaults, flags False
    return {k: v for k, v in params.items() if k != "text"}


def voice_and_sampling(opts: dict):
    """(the voice profile or None, the Sampling): a flag given wins over the voice's default, which wins
    over csm's."""
    voice = None
    if opts.get("voice") is not None:
        from csm.voices import VoiceStore

        voice = VoiceStore().get(opts["voice"])
    defaults = dict(temperature=DEFAULT_TEMPERATURE, topk=DEFAULT_TOPK, top_p=DEFAULT_TOP_P)
    if voice is not None:
        defaults.update(voice.sampling_defaults())
    flags = dict(temperature=opts["temperature"], topk=opts["top_k"], top_p=opts["top_p"])
    chosen = {k: defaults[k] if v is None else v for k, v in flags.items()}
    return voice, Sampling(chosen["temperature"], chosen["topk"], chosen["top_p"], opts["max_audio_length_ms"],
                           opts["seed"])


def reference_segment(opts: dict):
    """--ref-audio with --ref-text: one clip of the voice to clone, as the first context turn."""
    audio, text = opts.get("ref_audio"), opts.get("ref_text")
    if audio is None and text is None:
        return None
    if audio is None or text is None or not text.strip():
        raise CsmError("--ref-audio and --ref-text go together: the clip to clone and the words said in it")
    if opts.get("voice") is not None:
        raise CsmError("--voice brings its own clips: use --voice or --ref-audio/--ref-text, not both")
    from csm.audio import read_audio
    from csm.prompt import Segment

    return Segment(speaker=0 if opts["speaker"] is None else opts["speaker"], text=text.strip(),
                   audio=read_audio(audio, MODEL_SAMPLE_RATE))


def run(opts: dict) -> None:
    text = opts["text"]
    if not text or not text.strip():
        raise CsmError("--text is empty: give the words to speak")
    voice, sampling = voice_and_sampling(opts)
    plan = chunk_plan(opts)
    output = Path(opts["output"]) if opts["output"] else (None if opts["play"] else Path("output.wav"))
    if output is not None and output.exists() and not opts["force"]:
        raise CsmError(f"{output} already exists; pass --force to overwrite it or choose another -o")
    if output is not None and not output.parent.exists():
        raise CsmError(f"output folder {output.parent} does not exist")

    from csm.audio import write_wav
    from csm.watermark import PUBLIC_KEY, parse_key, resolve_watermark_dir

    key = parse_key(opts["watermark_key"]) if opts["watermark_key"] else PUBLIC_KEY
    if opts["no_watermark"]:
        click.echo("warning: --no-watermark: this clip will not be marked as AI-generated", err=True)
    else:
        resolve_watermark_dir(opts["watermark_model"])  # fail now, not after generating
    context = read_context(Path(opts["context"]), MODEL_SAMPLE_RATE) if opts["context"] else []
    reference = reference_segment(opts)
    if reference is not None:
        context.insert(0, reference)
    # streamed playback opens the output device first: no device fails before the model loads
    streamed_playback = opts["play"] and plan is not None
    with ChunkPlayer(MODEL_SAMPLE_RATE) if streamed_playback else contextlib.nullcontext() as player:
        import csm

        gen = csm.load(opts["model"], backend=opts["backend"], device=opts["device"], dtype=opts["dtype"],
                       adapter=opts["adapter"], mimi=opts["mimi"], tokenizer=opts["tokenizer"],
                       watermark_model=opts["watermark_model"], quantize=opts.get("quantize"), compile=opts["compile"],
                       voice=voice)
        # Mimi (and the watermark) must be there before the first frame, not after the last
        watermark_key = gen.prepare_audio(watermark=not opts["no_watermark"], watermark_key=key)
        click.echo(f"loaded {describe_model(opts, voice)} on {gen.backend}/{gen.device}", err=True)
        request = dict(text=text, speaker=opts["speaker"], context=context,
                       max_audio_length_ms=sampling.max_audio_length_ms, temperature=sampling.temperature,
                       topk=sampling.topk, top_p=sampling.top_p, seed=sampling.seed, voice=voice)

        from tqdm import tqdm

        start = time.perf_counter()
        with tqdm(total=sampling.max_frames, unit="frame", desc="generating", file=sys.stderr, leave=False) as bar:
            if plan is None:
                audio, first_audio = generate_whole(gen, request, bar), None
            else:
                audio, first_audio = generate_streamed(gen, request, watermark_key, bar, plan, player)
        elapsed = time.perf_counter() - start
        if plan is None and watermark_key is not None and len(audio):
            audio = gen.watermark(audio, watermark_key)  # streamed chunks come watermarked
        report_speed(len(audio) // FRAME_SIZE, elapsed, first_audio)
        if output is not None:
            write_wav(output, audio, gen.sample_rate, force=opts["force"])
            click.echo(f"wrote {output}", err=True)
        if player is not None:
            player.finish()
            if player.underruns:
                click.echo(f"warning: playback ran dry {player.underruns} times: generation is slower than real "
                           f"time here; use -o FILE, or a larger --first-chunk-frames", err=True)
        elif opts["play"]:
            play(audio, gen.sample_rate)


def describe_model(opts: dict, voice=None) -> str:
    model, adapter = opts["model"], opts["adapter"]
    if voice is not None and (voice.model or voice.adapter):
        model, adapter = voice.model, voice.adapter
    suffix = "" if voice is None else f" for voice {voice.name!r}"
    if adapter is None:
        return f"{model or DEFAULT_MODEL}{suffix}"
    return f"{model or 'the base model'} with adapter {adapter}{suffix}"


def generate_whole(gen, request: dict, bar):
    """The whole clip at once, not yet watermarked (the speed figure leaves the watermark out)."""
    codes = gen.generate_codes(**request, on_frame=lambda n: bar.update(n - bar.n))
    return gen.decode(codes)


def generate_streamed(gen, request: dict, watermark_key, bar, plan, player):
    """Chunks from Generator.stream, fed to the player as they come: (audio, time to first audio)."""
    start, first_audio, chunks = time.perf_counter(), None, []
    for chunk in gen.stream(**request, first_chunk_frames=plan.first, chunk_frames=plan.every,
                            watermark=watermark_key is not None, watermark_key=watermark_key):
        chunks.append(chunk)
        elapsed = time.perf_counter() - start
        if first_audio is None:
            first_audio = elapsed
        bar.update(len(chunk) // FRAME_SIZE)
        if player is not None:
            # the next chunk comes after its frames are generated, at the pace kept so far
            produced = sum(len(c) for c in chunks) / MODEL_SAMPLE_RATE
            player.feed(chunk, next_chunk_in=elapsed / produced * plan.every * FRAME_MS / 1000)
    return (np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)), first_audio


def report_speed(n_frames: int, elapsed: float, first_audio: float | None) -> None:
    seconds = n_frames * FRAME_MS / 1000
    rtf = f"RTF {elapsed / seconds:.2f}" if seconds else "no audio"
    ttfa = "" if first_audio is None else f", first audio after {first_audio:.2f} s"
    click.echo(f"{seconds:.2f} s of audio ({n_frames} frames) in {elapsed:.2f} s, {rtf}{ttfa}", err=True)


def chunk_plan(opts: dict):
    """The stream's chunk sizes with --stream, else None (and the chunk flags are refused)."""
    from csm.streaming import plan_chunks

    if not opts["stream"]:
        for flag in ("first_chunk_frames", "chunk_frames"):
            if opts[flag] is not None:
                raise CsmError(f"--{flag.replace('_', '-')} sets the chunks of --stream: add --stream or drop it")
        return None
    first = DEFAULT_FIRST_CHUNK_FRAMES if opts["first_chunk_frames"] is None else opts["first_chunk_frames"]
    every = DEFAULT_CHUNK_FRAMES if opts["chunk_frames"] is None else opts["chunk_frames"]
    return plan_chunks(first, every, watermark=not opts["no_watermark"])


def make_command(backend: str | None = None, name: str = "csm-generate", extra_options=()) -> click.Command:
    """The generate command; `backend` fixes the backend (no --backend flag then); `extra_options`
    are click options only that backend has."""

    def command(**opts):
        """Generate speech with CSM."""
        if backend is not None:
            opts["backend"] = backend
        run(opts)

    options = [
        click.option("--text", "-t", required=True, help="The words to speak."),
        click.option("--speaker", "-s", type=int,
                     help="Speaker id of the new turn [default: the --voice's, else 0]."),
        click.option("--voice", "-v", metavar="NAME|ID",
                     help="A voice profile (csm-voice): its clips, speaker id, model and sampling defaults."),
        click.option("--ref-audio", type=click.Path(),
                     help="Clone the voice of this clip (with --ref-text), without a profile."),
        click.option("--ref-text", help="The words said in --ref-audio."),
        click.option("--context", "-c", type=click.Path(),
                     help='JSON list of {"speaker", "text", "audio"} turns before this one.'),
        click.option("--model", "-m",
                     help=f"Local folder/file or Hub repo id [default: {DEFAULT_MODEL}, or the base model "
                          "--adapter names]."),
        click.option("--adapter", type=click.Path(),
                     help="LoRA adapter folder (csm-finetune's or peft's) to merge into the model at load."),
        click.option("--mimi",
                     help="Mimi weights (tokenizer-e351c8d8-checkpoint125.safetensors) if not in the model folder."),
        click.option("--tokenizer", help="tokenizer.json, a folder or Hub id if not in the model folder."),
        click.option("--device", help="cuda, cpu or mps; gpu or cpu with MLX (default: best available)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Default: bfloat16 on GPUs, float32 on CPU."),
        click.option("--temperature", type=float,
                     help=f"[default: the --voice's, else {DEFAULT_TEMPERATURE}]"),
        click.option("--top-k", "top_k", type=int, help=f"[default: the --voice's, else {DEFAULT_TOPK}]"),
        click.option("--top-p", "top_p", type=float,
                     help="Nucleus sampling after top-k: keep the most probable codes up to this total probability "
                          f"[default: the --voice's, else {DEFAULT_TOP_P}]."),
        click.option("--max-audio-length-ms", type=float, default=DEFAULT_MAX_AUDIO_LENGTH_MS, show_default=True),
        click.option("--seed", type=int, help="Seed for reproducible sampling."),
        click.option("--compile", type=click.Choice(["default", "max-autotune"]),
                     help="torch.compile the model's stacks (CUDA: ~2x faster frames after 30 s-2 min of compiling)."),
        click.option("--output", "-o", type=click.Path(),
                     help="WAV file to write (default output.wav unless --play)."),
        click.option("--force", is_flag=True, help="Overwrite the output file."),
        click.option("--play", is_flag=True,
                     help="Play the audio (sounddevice); with --stream, while it is generated."),
        click.option("--stream", is_flag=True,
                     help="Generate chunk by chunk (first audio sooner); see --first-chunk-frames."),
        click.option("--first-chunk-frames", type=click.IntRange(min=1),
                     help=f"--stream: frames (80 ms) in the first chunk [default: {DEFAULT_FIRST_CHUNK_FRAMES}; "
                          "at least 13 with the watermark]."),
        click.option("--chunk-frames", type=click.IntRange(min=1),
                     help=f"--stream: frames in each later chunk [default: {DEFAULT_CHUNK_FRAMES}; "
                          "at least 13 with the watermark]."),
        click.option("--watermark-key", help="Your own 5-byte key, e.g. 1,2,3,4,5 (default: Sesame's public key)."),
        click.option("--watermark-model",
                     help="Folder with the silentcipher weights (default: $CSM_WATERMARK_MODEL or the Hub)."),
        click.option("--no-watermark", is_flag=True, help="Do not watermark (not recommended)."),
    ]
    if backend is None:
        options.append(click.option("--backend", "-b", default="auto", show_default=True,
                                    help="auto, torch or mlx (auto: MLX on Apple Silicon, else PyTorch)."))
    options.extend(extra_options)
    for option in reversed(options):
        command = option(command)
    return click.command(name=name, context_settings={"help_option_names": ["-h", "--help"]})(command)


command = make_command()
main = entry_point(command)

if __name__ == "__main__":
    main()
