"""`csm-voice`: keep voice profiles (a speaker id, a description, reference clips, a model, sampling
defaults) in the voice store and hear them (`csm.voices`); `csm-generate --voice NAME` uses one.

Listing and editing profiles imports neither torch nor MLX: only `sample` loads a model.
"""

from __future__ import annotations

from pathlib import Path

import click

from csm.cli.common import entry_point
from csm.errors import CsmError


def parse_reference(value: str) -> tuple[str, str]:
    """FILE:"transcript" -> (file, transcript); the first ':' after which a file exists splits them,
    so a Windows drive letter or a ':' in the transcript is no problem."""
    from pathlib import Path

    for i, ch in enumerate(value):
        if ch == ":" and Path(value[:i]).expanduser().is_file():
            return value[:i], value[i + 1:]
    if ":" not in value:
        raise CsmError(f'--reference {value!r} needs a transcript: FILE:"the words said in it"')
    raise CsmError(f"reference clip not found: {value.split(':', 1)[0]} (--reference FILE:\"transcript\")")


def store():
    from csm.voices import VoiceStore

    return VoiceStore()


PROFILE_OPTIONS = [
    click.option("--gender"),
    click.option("--age-range", "age_range", help="e.g. 30-40."),
    click.option("--accent"),
    click.option("--language", help="e.g. en."),
    click.option("--reference", "references", multiple=True, metavar='FILE:"TRANSCRIPT"',
                 help="A clip of the voice and the words said in it (repeatable); copied into the store."),
    click.option("--model-path", "model", help="The base model (folder or Hub id) the voice speaks with."),
    click.option("--adapter", help="The LoRA adapter folder the voice speaks with."),
    click.option("--temperature", type=float, help="Sampling default of the voice."),
    click.option("--top-k", "topk", type=int, help="Sampling default of the voice."),
    click.option("--top-p", "top_p", type=float, help="Sampling default of the voice."),
]


def with_options(options):
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def given(fields: dict) -> dict:
    """The options the user gave (click passes None, or () for a repeatable one, for the others)."""
    out = {k: v for k, v in fields.items() if v is not None and v != ()}
    if "references" in out:
        out["references"] = [parse_reference(r) for r in out["references"]]
    return out


@click.group(name="csm-voice", context_settings={"help_option_names": ["-h", "--help"]})
def group():
    """Voice profiles: create, list, hear, export and import named voices."""


@group.command(name="list")
def list_voices():
    """A table of the voices in the store."""
    voices = store().list()
    if not voices:
        click.echo(f"no voices yet in {store().root}; add one with `csm-voice create`")
        return
    rows = [("NAME", "SPEAKER", "CLIPS", "MODEL", "DESCRIPTION")]
    for v in voices:
        model = " + ".join(x for x in (v.model, v.adapter) if x) or "(default)"
        rows.append((v.name, str(v.speaker_id), str(len(v.references)), model, v.description or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join([c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]).rstrip())


@group.command()
@click.argument("name_or_id")
def show(name_or_id):
    """Everything a voice's profile holds."""
    voice = store().get(name_or_id)
    data = voice.to_dict()
    refs = data.pop("references")
    for key, value in data.items():
        if value is not None:
            click.echo(f"{key}: {value}")
    for i, ref in enumerate(refs, 1):
        click.echo(f"reference {i}: {voice.root / ref['file']} ({ref['duration_s']:.2f} s) {ref['transcript']!r}")


@group.command()
@click.argument("name")
@click.argument("speaker_id", type=int)
@click.argument("description")
@with_options(PROFILE_OPTIONS)
def create(name, speaker_id, description, **fields):
    """Add voice NAME speaking as SPEAKER_ID."""
    voice = store().create(name, speaker_id, description, **given(fields))
    click.echo(f"created voice {voice.name!r} (speaker {voice.speaker_id}, {len(voice.references)} clips)")


@group.command()
@click.argument("name_or_id")
@click.option("--name", "new_name", help="A new name.")
@click.option("--speaker-id", type=int, help="A new speaker id.")
@click.option("--description")
@with_options(PROFILE_OPTIONS)
def update(name_or_id, new_name, speaker_id, description, **fields):
    """Change the fields given; --reference replaces every clip."""
    changes = given(dict(fields, name=new_name, speaker_id=speaker_id, description=description))
    if not changes:
        raise CsmError("nothing to update: give the fields to change (see csm-voice update --help)")
    voice = store().update(name_or_id, **changes)
    click.echo(f"updated voice {voice.name!r}")


@group.command()
@click.argument("name_or_id")
def delete(name_or_id):
    """Remove a voice and its clips."""
    voice = store().delete(name_or_id)
    click.echo(f"deleted voice {voice.name!r}")


@group.command(name="export")
@click.argument("name_or_id")
@click.argument("archive", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite the archive.")
def export_voice(name_or_id, archive, force):
    """Write a voice and its clips into ARCHIVE (.tar.gz, .tgz or .zip)."""
    path = store().export(name_or_id, archive, force=force)
    click.echo(f"wrote {path}")


@group.command(name="import")
@click.argument("archive", type=click.Path())
@click.option("--rename", help="Import under this name.")
@click.option("--speaker-id", type=int, help="Import with this speaker id.")
def import_voice(archive, rename, speaker_id):
    """Add the voice in ARCHIVE (from csm-voice export) to the store."""
    voice = store().import_(archive, rename=rename, speaker_id=speaker_id)
    click.echo(f"imported voice {voice.name!r} (speaker {voice.speaker_id}, {len(voice.references)} clips)")


@group.command()
@click.argument("name_or_id")
@click.option("--text", "-t", required=True, help="The words to speak.")
@click.option("--output", "-o", type=click.Path(), required=True, help="WAV file to write.")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.option("--model", "-m", help="The base model, for a voice that names none [default: unsloth/csm-1b].")
@click.option("--device", help="cuda, cpu or mps (default: best available).")
@click.option("--backend", "-b", default="auto", show_default=True, help="auto, torch or mlx.")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--max-audio-length-ms", type=float, help="Longest clip [default: csm-generate's].")
@click.option("--mimi", help="Mimi weights if not in the model folder.")
@click.option("--watermark-model", help="Folder with the silentcipher weights.")
@click.option("--no-watermark", is_flag=True, help="Do not watermark (not recommended).")
def sample(name_or_id, **opts):
    """Speak --text in a voice into a WAV file (csm-generate --voice with the voice's settings),
    and measure it against the voice's newest reference clip (csm eval): a table here, the
    numbers in <output>.eval.json."""
    from csm.cli.generate import generate_defaults, run

    voice = store().get(name_or_id)
    report_path = Path(opts["output"]).with_suffix(".eval.json")
    if report_path.exists() and not opts.get("force"):
        raise CsmError(f"{report_path} already exists; pass --force to overwrite it")
    run({**generate_defaults(), **{k: v for k, v in opts.items() if v is not None}, "voice": name_or_id})
    _evaluate_sample(Path(opts["output"]), opts["text"], voice, report_path)


def _evaluate_sample(clip: Path, text: str, voice, report_path: Path) -> None:
    try:
        from csm.evaluation import evaluate
    except ImportError as exc:
        click.echo(f"(no evaluation: the eval extra is not installed ({exc}); pip install 'csm-speech[eval]')",
                   err=True)
        return
    from csm.audio import read_audio
    from csm.files import write_json_atomic

    audio = read_audio(clip)
    reference = read_audio(store().root / voice.references[-1].file) if voice.references else None
    report = evaluate(audio, 24_000, text=text, reference=reference, reference_sample_rate=24_000)
    write_json_atomic(report_path, report.to_dict())
    click.echo(report.table())
    click.echo(f"wrote {report_path}")


main = entry_point(group)

if __name__ == "__main__":
    main()
