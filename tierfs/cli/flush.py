"""`tierfs flush`: seal all staged data into chunks now."""

from __future__ import annotations

from pathlib import Path

import click

from tierfs import control
from tierfs.datadir import resolve


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
def flush(path: Path, timeout: float) -> None:
    """Seal every staged byte of the mounted filesystem at PATH into durable chunks.

    PATH is the mount point or the data directory; the whole filesystem is flushed. Waits
    until everything is sealed and durable in the hot tier.

    \b
    Example:
      tierfs flush /srv/data
    """
    dd = resolve(path)
    answer = control.request(dd.control_socket, "flush", timeout=timeout)
    click.echo(f"flushed: {answer.get('sealed_bytes', 0):,} bytes sealed since mount")
