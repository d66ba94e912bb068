"""`tierfs restore`: look at, mount, copy out and rebuild from snapshots, local or upstream.

Each subcommand lives in its own module under `tierfs/cli/`; this group only gathers them.
"""

from __future__ import annotations

import click

from tierfs.cli import LazyGroup

# Imported when used: `restore extract` and `restore list` need neither trio nor pyfuse3.
SUBCOMMANDS = {
    "site": "tierfs.cli.restore_site:site",
    "mount": "tierfs.cli.restore_mount:restore_mount",
    "list": "tierfs.cli.restore_list:restore_list",
    "extract": "tierfs.cli.restore_extract:restore_extract",
}


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS)
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
