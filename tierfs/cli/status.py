"""`tierfs status`: the filesystem at a glance, as a table or as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tierfs import control
from tierfs import status as status_mod
from tierfs.datadir import is_locked, mountpoint_of, resolve
from tierfs.meta.store import MetaStore


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document (docs/STATUS.md).")
def status(path: Path, as_json: bool) -> None:
    """Show what the filesystem at PATH holds and where.

    PATH is the mount point or the data directory; the whole filesystem is reported.
    A mounted filesystem is asked through its control socket; an unmounted one is read
    from its metadata index.

    \b
    Examples:
      tierfs status /srv/data
      tierfs status /var/lib/tierfs --json | jq .tiers
    """
    dd = resolve(path)
    if is_locked(dd):
        doc = control.request(dd.control_socket, "status")["status"]
    else:
        store = MetaStore.open(dd.meta, readonly=True)
        try:
            with store.reader() as tx:
                doc = status_mod.collect(dd, store, tx, mounted=False)
        finally:
            store.env.close()
        mnt = mountpoint_of(dd)
        doc["mountpoint"] = str(mnt) if mnt else None
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(status_mod.render_table(doc))
