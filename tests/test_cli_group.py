"""`csm` holds every command; the older names are the same commands with the same flags."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from csm.cli.main import group


@pytest.mark.parametrize("name, alias", [("generate", "csm.cli.generate:command"),
                                         ("chat", "csm.cli.chat:command"),
                                         ("finetune", "csm.cli.finetune:group"),
                                         ("convert", "csm.convert:main"),
                                         ("watermark", "csm.cli.watermark:cli")])
def test_subcommands_are_the_aliases(name, alias):
    import importlib

    module, attr = alias.split(":")
    assert group.commands[name] is getattr(importlib.import_module(module), attr)
    result = CliRunner().invoke(group, [name, "--help"])
    assert result.exit_code == 0 and "Usage: csm " + name in result.output


def test_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "csm.cli.main", "finetune", "train", "--output-dir",
                          str(tmp_path / "o"), "--lora-rank", "0"], capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.startswith("error: lora_rank must be at least 1") and out.stderr.count("\n") == 1


def test_bench_passes_its_arguments():
    out = subprocess.run([sys.executable, "-m", "csm.cli.main", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--task" in out.stdout
