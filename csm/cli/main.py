"""`csm`: every command under one name.

    csm generate --text "Hello." -o hello.wav      # = csm-generate
    csm chat --mode test -d out/                   # = csm-chat
    csm finetune voice-adapt ...                   # = csm-finetune
    csm convert SRC DST --to csm                   # = csm-convert
    csm watermark check clip.wav                   # = csm-watermark
    csm serve --model unsloth/csm-1b --port 8000   # OpenAI-compatible speech server (serve extra)
    csm bench ...                                  # = python -m benchmarks (from a clone)

The older names stay as aliases with the same flags: each is the same click command object.
"""

from __future__ import annotations

import importlib

import click

from csm.cli.common import entry_point
from csm.errors import CsmError


@click.group(name="csm", context_settings={"help_option_names": ["-h", "--help"]})
def group():
    """Sesame's CSM: generate speech and conversations, fine-tune voices, convert checkpoints, check watermarks."""


def _add(module: str, attr: str, name: str) -> None:
    group.add_command(getattr(importlib.import_module(module), attr), name=name)


_add("csm.cli.generate", "command", "generate")
_add("csm.cli.chat", "command", "chat")
_add("csm.cli.finetune", "group", "finetune")
_add("csm.convert", "main", "convert")
_add("csm.cli.watermark", "cli", "watermark")
# commands whose modules are optional in this tree
for _module, _attr, _name in (("csm.cli.voice", "group", "voice"), ("csm.cli.evaluate", "cli", "eval"),
                               ("csm.cli.serve", "command", "serve")):
    try:
        _add(_module, _attr, _name)
    except (ImportError, AttributeError):
        pass


@group.command(name="bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                               "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args):
    """Benchmarks (python -m benchmarks; from a clone of the repository). `csm bench --help` lists
    their flags."""
    try:
        from benchmarks.cli import main as bench_main
    except ImportError:
        raise CsmError("the benchmarks live in the repository, not the package: run `csm bench` from a clone "
                       "(uv run csm bench ...)") from None
    raise SystemExit(bench_main(list(args)))


main = entry_point(group)

if __name__ == "__main__":
    main()
