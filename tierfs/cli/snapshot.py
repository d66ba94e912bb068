"""`tierfs snapshot create|list|delete`: point-in-time trees of the mounted filesystem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tierfs import control
from tierfs.datadir import resolve


@click.group()
def snapshot() -> None:
    """Take, list and delete snapshots of a mounted tierfs.

    A snapshot is a point-in-time tree of the whole filesystem (writes pause for a moment
    while it is taken); the chunks it names are kept until it is deleted.

    \b
    Examples:
      tierfs snapshot create /srv/data --name before-upgrade
      tierfs snapshot list /srv/data
      tierfs snapshot delete /srv/data before-upgrade
    """


@snapshot.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="A name to find it by (need not be unique).")
@click.option("--schedule", help="Record it as taken for this schedule (see tierfs.toml).")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
def create(path: Path, name: str | None, schedule: str | None, timeout: float) -> None:
    """Take a snapshot of the mounted filesystem at PATH and print its id.

    Seals staged data first (writers keep running), then pauses writes for the moment it
    takes to record one consistent state; the tree is built afterwards.

    \b
    Examples:
      tierfs snapshot create /srv/data
      tierfs snapshot create /srv/data --name before-upgrade
    """
    dd = resolve(path)
    answer = control.request(
        dd.control_socket, "snapshot_create", timeout=timeout, name=name, schedule=schedule
    )
    snap = answer["snapshot"]
    click.echo(snap["snapshot_id"])
    stats = snap["stats"]
    click.echo(
        f"{stats.get('files', 0):,} files, {stats.get('logical_bytes', 0):,} bytes; "
        f"{stats.get('blobs_new', 0):,} new tree blobs; writes paused "
        f"{snap['pause_ns'] / 1e6:.1f} ms",
        err=True,
    )


@snapshot.command(name="list")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_(path: Path, as_json: bool) -> None:
    """List the kept snapshots of the mounted filesystem at PATH, oldest first.

    \b
    Examples:
      tierfs snapshot list /srv/data
      tierfs snapshot list /srv/data --json | jq -r '.[].snapshot_id'
    """
    dd = resolve(path)
    snaps: list[dict[str, Any]] = control.request(dd.control_socket, "snapshot_list")["snapshots"]
    if as_json:
        click.echo(json.dumps(snaps, indent=2))
        return
    click.echo(f"{'id':<40} {'time (UTC)':<20} {'files':>10} {'bytes':>16}  upstream  name")
    for s in snaps:
        stats = s["stats"]
        click.echo(
            f"{s['snapshot_id']:<40} {s['time']:<20} {stats.get('files', 0):>10,} "
            f"{stats.get('logical_bytes', 0):>16,}  {s['upstream']:<8}  {s['name'] or ''}"
        )


@snapshot.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("snapshot_id")
def delete(path: Path, snapshot_id: str) -> None:
    """Delete the snapshot SNAPSHOT_ID (or the one snapshot with that name) at PATH.

    What only that snapshot held is given back in the background.

    \b
    Examples:
      tierfs snapshot delete /srv/data 20261207T153000Z-4
      tierfs snapshot delete /srv/data before-upgrade
    """
    dd = resolve(path)
    answer = control.request(dd.control_socket, "snapshot_delete", key=snapshot_id)
    click.echo(f"deleted {answer['snapshot']['snapshot_id']}")
