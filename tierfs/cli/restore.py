"""`tierfs restore`: look at, mount, copy out and rebuild from snapshots, local or upstream.

Each subcommand lives in its own module under `tierfs/cli/`; this group only gathers them.
"""

from __future__ import annotations

import click

from tierfs.cli.restore_extract import restore_extract
from tierfs.cli.restore_list import restore_list
from tierfs.cli.restore_mount import restore_mount
from tierfs.cli.restore_site import site as restore_site


@click.group()
def restore() -> None:
    """Point-in-time views of snapshots: list them, mount one read-only, copy files out, or
    rebuild a lost site on a new machine.

    SOURCE is a data directory or a regional store URL (file:///PATH or s3://BUCKET/PREFIX).
    Times are ISO 8601, UTC unless an offset is given; --at TIME means the latest snapshot at
    or before TIME.

    \b
    Examples:
      tierfs restore list /var/lib/tierfs
      tierfs restore list s3://backups/region --key-file store-042.bundle --site store-042
    """


restore.add_command(restore_site)
restore.add_command(restore_mount)
restore.add_command(restore_list)
restore.add_command(restore_extract)
