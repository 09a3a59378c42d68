"""csm-eval: objective checks of a clip (pauses, speech rate, pitch, energy, length, speaker similarity),
or of how a model holds conversations (every held-out turn generated with the real ones before it).

    csm-eval out.wav --text "Hello there." --reference voice.wav --other someone_else.wav \\
        --json out.json --figure out.png
    csm-eval --conversations prepared-data --model my-model --split validation --json conv.json
"""

from __future__ import annotations

import sys

import click

from csm.cli.common import entry_point
from csm.errors import CsmError


def _read(path: str | None):
    """Mono samples at the file's own rate (evaluate resamples once, to 16 kHz)."""
    if path is None:
        return None, None
    import soundfile as sf

    from csm.audio import read_audio

    try:
        rate = int(sf.info(path).samplerate)
    except Exception:
        rate = 16_000  # read_audio reports the real problem
    return read_audio(path, sample_rate=rate), rate


def _check_output(path: str | None, force: bool) -> None:
    from pathlib import Path

    if path is None:
        return
    out = Path(path)
    if out.exists() and not force:
        raise CsmError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise CsmError(f"output folder {out.parent} does not exist")


@click.command(name="csm-eval")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option("--reference", metavar="REF.wav", help="The target voice: speaker similarity and pitch offset.")
@click.option("--other", metavar="OTHER.wav", help="A different voice: calibrates the similarity (needs --reference).")
@click.option("--text", help="The text spoken: speech rate and expected duration.")
@click.option("--json", "json_path", metavar="OUT.json", help="Also write the numbers as JSON.")
@click.option("--figure", metavar="OUT.png", help="Also write pitch contours and a bar chart of the metrics.")
@click.option("--pauses", type=click.Choice(["auto", "silero", "energy"]), default="auto", show_default=True,
              help="Pause detector.")
@click.option("--conversations", metavar="DATA", help="Instead of FILE: a prepared dataset whose conversations "
              "the model speaks turn by turn (EOS rate, lengths, rate, gaps, voice consistency per speaker).")
@click.option("--model", metavar="MODEL", help="With --conversations: the model (folder, Hub id or fine-tuned voice).")
@click.option("--adapter", metavar="DIR", help="With --conversations: a LoRA adapter merged into --model.")
@click.option("--split", default="validation", show_default=True, help="With --conversations: the split to speak.")
@click.option("--max-conversations", type=click.IntRange(min=1), default=8, show_default=True,
              help="With --conversations: at most this many.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --conversations: sampling seed.")
@click.option("--backend", default="auto", show_default=True, help="With --conversations: auto, torch or mlx.")
@click.option("--device", default=None, help="With --conversations: cuda, cpu or mps.")
@click.option("--force", is_flag=True, help="Overwrite OUT.json / OUT.png if they exist.")
def cli(file, reference, other, text, json_path, figure, pauses, conversations, model, adapter, split,
        max_conversations, seed, backend, device, force):
    """Measure FILE (or a model's --conversations) and print a table of the results."""
    if conversations is not None:
        if file or reference or other or text:
            raise click.UsageError("--conversations measures a model, not a FILE: leave out FILE, --reference, "
                                   "--other and --text")
        _check_output(json_path, force)
        _check_output(figure, force)
        report = _conversations(conversations, model, adapter, split, max_conversations, seed, backend, device)
    else:
        if file is None:
            raise click.UsageError("give a FILE to measure, or --conversations DATA --model MODEL")
        if other and not reference:
            raise click.UsageError("--other calibrates the similarity to --reference: give --reference too")
        _check_output(json_path, force)  # fail before the slow part
        _check_output(figure, force)
        audio, rate = _read(file)
        ref, ref_rate = _read(reference)
        oth, oth_rate = _read(other)
        try:
            from csm.evaluation import evaluate
        except ImportError as exc:
            raise CsmError(f"csm-eval needs the eval extra ({exc}): pip install 'csm-speech[eval]'") from None
        report = evaluate(audio, rate, text=text, reference=ref, reference_sample_rate=ref_rate, other_voice=oth,
                          other_sample_rate=oth_rate, pause_detector=pauses)
    click.echo(report.table())
    if json_path:
        from csm.files import write_json_atomic

        write_json_atomic(json_path, report.to_dict())
        click.echo(f"wrote {json_path}", err=True)
    if figure:
        report.figure(figure)
        click.echo(f"wrote {figure}", err=True)


def _conversations(data, model, adapter, split, max_conversations, seed, backend, device):
    import csm
    from csm.conversation_eval import conversations_from_dataset, evaluate_conversations

    if model is None:
        raise click.UsageError("--conversations needs --model: the model that speaks them")
    chosen = conversations_from_dataset(data, split=split, max_conversations=max_conversations)
    gen = csm.load(model, backend=backend, device=device, adapter=adapter)
    total = sum(len(c.turns) - 1 for c in chosen)
    with click.progressbar(length=total, label="turns", file=sys.stderr) as bar:
        return evaluate_conversations(gen, chosen, seed=seed, on_turn=lambda done, _total: bar.update(1))


main = entry_point(cli)

if __name__ == "__main__":
    main()
