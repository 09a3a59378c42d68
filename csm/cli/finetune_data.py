"""`csm-finetune prepare`: turn recordings and transcripts into a prepared dataset, once.

    csm-finetune prepare --data my_voice/ --output-dir my_voice_prepared
    csm-finetune prepare --audio-dir wavs --transcript-dir texts --output-dir prepared
    csm-finetune prepare --data talks.jsonl --output-dir prepared --validation-split 0.05
    csm-finetune prepare --format switchboard --input-dir /data/LDC97S62 --output-dir switchboard
    csm-finetune make-dialogues --output-dir dialogues     # a small corpus spoken by espeak-ng, no download

`prepare_command` and `make_dialogues_command` are registered in the csm-finetune group; `main`
runs `prepare` alone. Errors are one line on stderr (`csm.cli.common.entry_point`).
"""

from __future__ import annotations

import sys

import click

from csm.cli.common import entry_point
from csm.training.config import FIELDS
from csm.training.dialogues import DIALOGUES, VOICES
from csm.training.sources import DATA_FORMATS


def _help(name: str) -> str:
    """The run setting's own help text: one wording for `prepare` and `train`."""
    return FIELDS[name].metadata["help"]


@click.command("prepare")
@click.option("--data", "--input-dir", "data", default=None, metavar="PATH",
              help="a folder of audio + .txt files, an LJSpeech metadata.csv, a .jsonl manifest, or a Hugging Face "
                   "dataset (a save_to_disk folder or a Hub name); with --format, the corpus folder")
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS), default="auto", show_default=True,
              help="auto: tell the formats above apart; switchboard: Switchboard-1 (LDC97S62) .sph files with the "
                   "MS-State transcripts (beside them, or in --transcript-dir)")
@click.option("--audio-dir", default=None, metavar="DIR", help=_help("audio_dir"))
@click.option("--transcript-dir", default=None, metavar="DIR", help=_help("transcript_dir") + " (default: --audio-dir)")
@click.option("--output-dir", required=True, metavar="DIR",
              help="the prepared folder (new, empty, or prepared before: its cached codes are reused)")
@click.option("--model-path", default="unsloth/csm-1b", show_default=True,
              help="the model whose Mimi codec and tokenizer to use: Hub id or folder")
@click.option("--speaker-id", type=int, default=0, show_default=True,
              help="speaker id of clips whose input names none")
@click.option("--text-column", default="text", show_default=True, help="Hugging Face datasets: the transcript column")
@click.option("--audio-column", default="audio", show_default=True, help="Hugging Face datasets: the audio column")
@click.option("--speaker-column", default=None, help="Hugging Face datasets: the speaker column (default: none)")
@click.option("--validation-split", type=float, default=0.1, show_default=True, help=_help("validation_split"))
@click.option("--test-split", type=float, default=0.0, show_default=True, help="share of the data held out for tests")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the split")
@click.option("--normalize-loudness", is_flag=True, help=_help("normalize_loudness"))
@click.option("--max-clip-seconds", type=float, default=30.0, show_default=True, help=_help("max_clip_seconds"))
@click.option("--backend", default="auto", show_default=True, help="the backend whose Mimi encodes: auto, torch or mlx")
@click.option("--device", default=None, help="cuda, cpu or mps for torch's Mimi (default: the best there is)")
@click.option("--force", is_flag=True, help="write into a non-empty folder that is not a prepared dataset")
def prepare_command(data, data_format, audio_dir, transcript_dir, output_dir, model_path, speaker_id, text_column,
                    audio_column, speaker_column, validation_split, test_split, seed, normalize_loudness,
                    max_clip_seconds, backend, device, force):
    """Read, check and encode fine-tuning data once (Mimi codes, cached) into --output-dir."""
    from csm.training.data import prepare_dataset

    with _ProgressBar() as bar:
        dataset = prepare_dataset(
            data, output_dir, audio_dir=audio_dir, transcript_dir=transcript_dir, model_path=model_path,
            speaker_id=speaker_id, text_column=text_column, audio_column=audio_column, speaker_column=speaker_column,
            validation_split=validation_split, test_split=test_split, seed=seed,
            normalize_loudness=normalize_loudness, max_clip_seconds=max_clip_seconds, backend=backend, device=device,
            force=force, data_format=data_format, progress=bar.update)
    click.echo(dataset.summary())


class _ProgressBar:
    """A tqdm bar on stderr fed by `prepare_dataset`'s progress calls (hidden when stderr is not
    a terminal, so logs and pipes get only the summary)."""

    def __init__(self):
        self._bar = None

    def update(self, done: int, total: int, what: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, unit="clip", desc=f"preparing {what}", file=sys.stderr, disable=None)
        self._bar.update(done - self._bar.n)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


@click.command("make-dialogues")
@click.option("--output-dir", required=True, metavar="DIR",
              help="the new folder: <dialogue>/turn-NN.wav (24 kHz) and dialogues.jsonl")
@click.option("--count", type=int, default=None, metavar="N",
              help=f"speak only the first N of the {len(DIALOGUES)} built-in dialogues (default: all)")
@click.option("--voices", default=",".join(VOICES), show_default=True, metavar="VOICE0,VOICE1",
              help="the espeak-ng voices of speaker 0 and speaker 1 (espeak-ng --voices=en lists them)")
@click.option("--force", is_flag=True, help="write again over a dialogue corpus already in --output-dir")
def make_dialogues_command(output_dir, count, voices, force):
    """Write a small two-speaker conversational corpus (scripted dialogues spoken by espeak-ng,
    no download) with the JSONL manifest `prepare --data` reads as conversations."""
    from csm.training.dialogues import write_dialogues

    corpus = write_dialogues(output_dir, count=count, voices=tuple(v.strip() for v in voices.split(",")), force=force)
    click.echo(corpus.summary())


main = entry_point(prepare_command)
