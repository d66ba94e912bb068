"""The `tierfs` command line: one module per command group."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from tierfs import __version__
from tierfs.cli import (
    cold,
    evict,
    flush,
    fsck,
    key,
    mkfs,
    mount,
    restore,
    snapshot,
    status,
    sync,
)
from tierfs.errors import ExitCode, TierfsError


class TierfsGroup(click.Group):
    """Turns TierfsError into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TierfsError as exc:
            click.echo(f"tierfs: error: {exc.message}", err=True)
            sys.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            click.echo("tierfs: interrupted", err=True)
            sys.exit(int(ExitCode.INTERRUPTED))
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # The reader of our output went away (`tierfs zones | head`): not an error of
            # ours. Point stdout at /dev/null so that the exit's flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except Exception as exc:
            click.echo(f"tierfs: internal error: {exc!r} (please report it)", err=True)
            sys.exit(int(ExitCode.INTERNAL))


@click.group(cls=TierfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tierfs")
def cli() -> None:
    """tierfs: a tiered, self-protecting filesystem for edge sites.

    \b
    Quick start:
      tierfs mkfs /var/lib/tierfs --site store-042
      tierfs mount /var/lib/tierfs /srv/data
      tierfs status /srv/data
      tierfs umount /srv/data

    Exit codes are listed in docs/EXIT_CODES.md.
    """


cli.add_command(mkfs.mkfs)
cli.add_command(mount.mount)
cli.add_command(mount.umount)
cli.add_command(status.status)
cli.add_command(fsck.fsck)
cli.add_command(flush.flush)
cli.add_command(key.key)
cli.add_command(cold.migrate)
cli.add_command(cold.zones)
cli.add_command(snapshot.snapshot)
cli.add_command(sync.sync)
cli.add_command(evict.evict)
cli.add_command(restore.restore)


def main() -> None:
    try:
        cli(prog_name="tierfs")
    except TierfsError as exc:
        click.echo(f"tierfs: error: {exc.message}", err=True)
        sys.exit(int(exc.exit_code))


__all__ = ["ExitCode", "cli", "main"]
