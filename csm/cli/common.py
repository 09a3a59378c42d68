"""What every csm command shares: bad input is one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from csm.errors import CsmError

EXIT_USAGE = 2


def entry_point(command: click.Command) -> Callable[..., None]:
    """Run `command` so that usage errors (click's) and CsmErrors print `error: ...` on one line."""

    def main(args=None) -> None:
        try:
            command.main(args=args, prog_name=command.name, standalone_mode=False)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()} (see {command.name} --help)", err=True)
            sys.exit(EXIT_USAGE)
        except CsmError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except (KeyboardInterrupt, click.Abort):
            click.echo("interrupted", err=True)
            sys.exit(130)

    return main
