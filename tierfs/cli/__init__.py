"""The `tierfs` command line: one module per command group."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from tierfs import __version__
from tierfs.errors import ExitCode, TierfsError

# Command -> "module:function", imported only when the command runs (or help lists it):
# every `tierfs` invocation would otherwise pay for importing the daemon, trio, boto3 and
# the rest, about half a second, which scripts and health checks calling `status` feel.
COMMANDS = {
    "mkfs": "tierfs.cli.mkfs:mkfs",
    "mount": "tierfs.cli.mount:mount",
    "umount": "tierfs.cli.mount:umount",
    "status": "tierfs.cli.status:status",
    "fsck": "tierfs.cli.fsck:fsck",
    "flush": "tierfs.cli.flush:flush",
    "key": "tierfs.cli.key:key",
    "migrate": "tierfs.cli.cold:migrate",
    "zones": "tierfs.cli.cold:zones",
    "snapshot": "tierfs.cli.snapshot:snapshot",
    "sync": "tierfs.cli.sync:sync",
    "evict": "tierfs.cli.evict:evict",
    "restore": "tierfs.cli.restore:restore",
}


class LazyGroup(click.Group):
    """A group whose subcommands, `{name: "module:function"}`, are imported when used."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return None
        module, name = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), name)
        return command


class TierfsGroup(LazyGroup):
    """Turns TierfsError into a one-line message and its exit code; loads commands lazily."""

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


@click.group(
    cls=TierfsGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
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


class _Exit:
    fast = False


def exit_fast_when_done() -> None:
    """For a command whose process holds nothing to tear down once it returns (files closed,
    nothing to flush but stdio): `main` then ends the process without the interpreter's
    teardown, which frees every object one by one (0.1-0.2 s after a restore, whose
    boto3 client alone is tens of thousands). In-process callers (tests) are unaffected."""
    _Exit.fast = True


def main() -> None:
    try:
        cli(prog_name="tierfs")
    except TierfsError as exc:
        click.echo(f"tierfs: error: {exc.message}", err=True)
        sys.exit(int(exc.exit_code))
    except SystemExit as exc:
        if _Exit.fast:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else int(exc.code is not None))
        raise


__all__ = ["ExitCode", "cli", "main"]
