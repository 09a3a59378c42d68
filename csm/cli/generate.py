"""`csm-generate`: speech from text (and a conversation) into a WAV file or the speakers.

One parser for every backend: `csm-generate-mlx` is the same command with the backend fixed, so
their flags cannot drift apart. Every bad input is checked before the model loads where it can
be, and reported as one line with a non-zero exit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from csm.cli.common import entry_point
from csm.errors import CsmError, read_json
from csm.hub import DEFAULT_MODEL
from csm.sampling import DEFAULT_MAX_AUDIO_LENGTH_MS, DEFAULT_TEMPERATURE, DEFAULT_TOPK, FRAME_MS, SamplingParams, max_frames

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


def play(audio, sample_rate: int) -> None:
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:
        raise CsmError(f"cannot play audio: {exc}. Install PortAudio (e.g. apt install libportaudio2) or use -o FILE") from None
    try:
        sd.play(audio, sample_rate)
        sd.wait()
    except Exception as exc:  # PortAudioError and friends
        raise CsmError(f"cannot play audio: no usable output device ({exc}); use -o FILE instead") from None


def run(opts: dict) -> None:
    text = opts["text"]
    if not text or not text.strip():
        raise CsmError("--text is empty: give the words to speak")
    params = SamplingParams(temperature=opts["temperature"], topk=opts["top_k"])
    frames = max_frames(opts["max_audio_length_ms"])
    output = Path(opts["output"]) if opts["output"] else (None if opts["play"] else Path("output.wav"))
    if output is not None and output.exists() and not opts["force"]:
        raise CsmError(f"{output} already exists; pass --force to overwrite it or choose another -o")
    if output is not None and not output.parent.exists():
        raise CsmError(f"output folder {output.parent} does not exist")

    from csm.audio import MODEL_SAMPLE_RATE, write_wav
    from csm.watermark import PUBLIC_KEY, parse_key, resolve_watermark_dir

    key = parse_key(opts["watermark_key"]) if opts["watermark_key"] else PUBLIC_KEY
    if opts["no_watermark"]:
        click.echo("warning: --no-watermark: this clip will not be marked as AI-generated", err=True)
    else:
        resolve_watermark_dir(opts["watermark_model"])  # fail now, not after generating
    context = read_context(Path(opts["context"]), MODEL_SAMPLE_RATE) if opts["context"] else []

    import csm

    gen = csm.load(opts["model"], backend=opts["backend"], device=opts["device"], dtype=opts["dtype"],
                   mimi=opts["mimi"], tokenizer=opts["tokenizer"], watermark_model=opts["watermark_model"],
                   quantize=opts.get("quantize"))
    click.echo(f"loaded {opts['model']} on {gen.backend}/{gen.device}", err=True)

    from tqdm import tqdm

    bar = tqdm(total=frames, unit="frame", desc="generating", file=sys.stderr, leave=False)
    start = time.perf_counter()
    try:
        codes = gen.generate_codes(text, speaker=opts["speaker"], context=context, max_audio_length_ms=opts["max_audio_length_ms"],
                                   temperature=params.temperature, topk=params.topk, seed=opts["seed"],
                                   on_frame=lambda n: bar.update(n - bar.n))
    finally:
        bar.close()
    audio = gen.decode(codes)
    elapsed = time.perf_counter() - start
    if not opts["no_watermark"] and len(audio):
        audio = gen.watermark(audio, key)
    seconds = len(codes) * FRAME_MS / 1000
    rtf = f"RTF {elapsed / seconds:.2f}" if seconds else "no audio"
    click.echo(f"{seconds:.2f} s of audio ({len(codes)} frames) in {elapsed:.2f} s, {rtf}", err=True)
    if output is not None:
        write_wav(output, audio, gen.sample_rate, force=opts["force"])
        click.echo(f"wrote {output}", err=True)
    if opts["play"]:
        play(audio, gen.sample_rate)


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
        click.option("--speaker", "-s", type=int, default=0, show_default=True, help="Speaker id of the new turn."),
        click.option("--context", "-c", type=click.Path(), help='JSON list of {"speaker", "text", "audio"} turns before this one.'),
        click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Local folder/file or Hub repo id."),
        click.option("--mimi", help="Mimi weights (tokenizer-e351c8d8-checkpoint125.safetensors) if not in the model folder."),
        click.option("--tokenizer", help="tokenizer.json, a folder or Hub id if not in the model folder."),
        click.option("--device", help="cuda, cpu or mps; gpu or cpu with MLX (default: best available)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Default: bfloat16 on GPUs, float32 on CPU."),
        click.option("--temperature", type=float, default=DEFAULT_TEMPERATURE, show_default=True),
        click.option("--top-k", "top_k", type=int, default=DEFAULT_TOPK, show_default=True),
        click.option("--max-audio-length-ms", type=float, default=DEFAULT_MAX_AUDIO_LENGTH_MS, show_default=True),
        click.option("--seed", type=int, help="Seed for reproducible sampling."),
        click.option("--output", "-o", type=click.Path(), help="WAV file to write (default output.wav unless --play)."),
        click.option("--force", is_flag=True, help="Overwrite the output file."),
        click.option("--play", is_flag=True, help="Play the audio (sounddevice)."),
        click.option("--watermark-key", help="Your own 5-byte key, e.g. 1,2,3,4,5 (default: Sesame's public key)."),
        click.option("--watermark-model", help="Folder with the silentcipher weights (default: $CSM_WATERMARK_MODEL or the Hub)."),
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
