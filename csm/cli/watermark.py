"""csm-watermark: check for, or embed, the silentcipher watermark Sesame puts on CSM audio.

    csm-watermark check clip.wav            # exit 0: watermark found, 1: not found, 2: error
    csm-watermark embed in.wav out.wav      # writes a watermarked copy at the input's rate
"""

from __future__ import annotations

import sys

import click

from csm.cli.common import entry_point
from csm.errors import CsmError
from csm.watermark import PUBLIC_KEY, format_key

_DEFAULT_KEY = format_key(PUBLIC_KEY)


def _native_rate(path: str) -> int | None:
    try:
        import soundfile as sf

        return int(sf.info(path).samplerate)
    except Exception:
        return None  # read_audio reports the real problem


_key_option = click.option(
    "--key", default=_DEFAULT_KEY, show_default=True, help="The 5-byte watermark key, comma-separated."
)
_model_option = click.option(
    "--watermark-model",
    "watermark_model",
    default=None,
    metavar="DIR",
    help="Folder of silentcipher's 44.1 kHz weights (default: $CSM_WATERMARK_MODEL, then the Hub cache).",
)


@click.group(name="csm-watermark")
def cli():
    """Check for or embed the silentcipher watermark on audio files."""


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_key_option
@_model_option
def check(file, key, watermark_model):
    """Exit 0 if FILE carries the watermark KEY, 1 if not.

    A key found is reported with the shift it decoded at: how many samples of the 44.1 kHz
    audio come before the watermark's frame grid (0 for a file this package wrote)."""
    from csm.audio import read_audio
    from csm.watermark import WATERMARK_SAMPLE_RATE, Watermarker, format_key, parse_key

    wanted = parse_key(key)
    # Read straight at the watermark model's rate: one resampling step, not two.
    audio = read_audio(file, sample_rate=WATERMARK_SAMPLE_RATE)
    watermarker = Watermarker.load(watermark_model)
    detection = watermarker.locate(audio, WATERMARK_SAMPLE_RATE)
    found = detection.key
    # The shift is in samples of the 44.1 kHz audio dropped from the start to align the decoder.
    at = f" at shift {detection.shift} samples" if detection.shift is not None else ""
    if found == wanted:
        click.echo(f"watermark found (key {format_key(wanted)}){at}")
        sys.exit(0)
    extra = f" (found a watermark with key {format_key(found)}{at})" if found is not None else ""
    click.echo(f"no watermark with key {format_key(wanted)}{extra}")
    sys.exit(1)


@cli.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False))
@_key_option
@_model_option
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def embed(input_path, output_path, key, watermark_model, force):
    """Write a watermarked mono copy of IN to OUT (16-bit WAV, IN's sample rate)."""
    from pathlib import Path

    from csm.audio import MODEL_SAMPLE_RATE, read_audio, write_wav
    from csm.watermark import Watermarker, format_key, parse_key

    wanted = parse_key(key)
    out = Path(output_path)
    if out.exists() and not force:  # fail before the slow part
        raise CsmError(f"{out} already exists; pass --force to overwrite it")
    rate = _native_rate(input_path) or MODEL_SAMPLE_RATE
    audio = read_audio(input_path, sample_rate=rate)
    watermarker = Watermarker.load(watermark_model)
    marked = watermarker.embed(audio, rate, wanted)
    write_wav(out, marked, rate, force=force)
    click.echo(f"wrote {out} (watermark key {format_key(wanted)})")


main = entry_point(cli)

if __name__ == "__main__":
    main()
