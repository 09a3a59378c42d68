"""`csm-generate-mlx`: `csm-generate` with the backend fixed to MLX (same parser, so the flags
cannot drift apart), plus `--quantize` for 4- or 8-bit weights quantized at load."""

from __future__ import annotations

import click

from csm.cli.common import entry_point
from csm.cli.generate import make_command

QUANTIZE = click.option(
    "--quantize", type=click.Choice(["4", "8"]),
    callback=lambda ctx, param, value: None if value is None else int(value),
    help="Quantize float weights to 4 or 8 bits at load "
         "(folders from `convert_weights.py --to mlx --quantize` need no flag).",
)

command = make_command(backend="mlx", name="csm-generate-mlx", extra_options=[QUANTIZE])
main = entry_point(command)

if __name__ == "__main__":
    main()
