"""`tierfs sync`: send queued snapshots to the regional store now."""

from __future__ import annotations

from pathlib import Path

import click

from tierfs import control
from tierfs.datadir import resolve


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="Return only once no snapshot is left queued.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
def sync(path: Path, wait: bool, timeout: float) -> None:
    """Send the queued snapshots of the mounted filesystem at PATH to its regional store.

    Snapshots are sent in the background anyway; this starts at once, after a failure too.
    With --wait it returns when every queued snapshot is published (exit code 11 if that
    takes longer than --timeout, with the last error, e.g. an unreachable store).

    \b
    Examples:
      tierfs sync /srv/data
      tierfs snapshot create /srv/data && tierfs sync /srv/data --wait
    """
    dd = resolve(path)
    answer = control.request(
        dd.control_socket, "upload", timeout=timeout + 5, wait=wait, timeout_s=timeout
    )
    if wait:
        click.echo("every snapshot is sent")
    else:
        click.echo(f"{answer['queued']} snapshots queued; sending")
