"""`tierfs restore list SOURCE`: the snapshots a data directory or a regional store offers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tierfs.errors import ExitCode
from tierfs.restore.options import open_from_options, source_options
from tierfs.restore.source import SnapshotInfo


@click.command(name="list")
@click.argument("source")
@click.option("--site", help="Only this site's snapshots (its name or UUID).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@source_options
def restore_list(
    source: str,
    site: str | None,
    as_json: bool,
    key_file: Path | None,
    passphrase_file: Path | None,
    endpoint: str | None,
    s3_region: str | None,
    profile: str | None,
) -> None:
    """List the snapshots of SOURCE, oldest first, and whether each verifies.

    SOURCE is a data directory (its local snapshots) or a regional store URL (every site's
    published manifests, each verified against the domain key of --key-file). A manifest
    that does not verify is listed as FAILED with the reason, and the command exits 12 after
    the listing: it was altered, or signed by a key the domain did not certify.

    \b
    Examples:
      tierfs restore list /var/lib/tierfs
      tierfs restore list s3://backups/region --key-file store-042.bundle --site store-042
      AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... tierfs restore list \\
          s3://backups/region --endpoint https://s3.example.net --key-file domain.bundle --json
    """
    with open_from_options(source, key_file, passphrase_file, endpoint, s3_region, profile) as src:
        infos = src.snapshots(site)
    if as_json:
        click.echo(json.dumps([i.to_json() for i in infos], indent=2))
    else:
        _table(infos)
    if any(not i.verified for i in infos):
        sys.exit(int(ExitCode.VERIFY_FAILED))


def _table(infos: list[SnapshotInfo]) -> None:
    click.echo(
        f"{'site':<16} {'snapshot':<36} {'time (UTC)':<20} {'schedule':<10} "
        f"{'files':>9} {'bytes':>15}  {'name':<16} status"
    )
    for i in infos:
        status = "verified" if i.verified else f"FAILED: {i.error}"
        files, size = i.stats.get("files"), i.stats.get("logical_bytes")
        click.echo(
            f"{i.site_name:<16} {i.snapshot_id:<36} {i.time if i.time_ns else '?':<20} "
            f"{i.schedule or '-':<10} {_number(files):>9} {_number(size):>15}  "
            f"{i.name or '-':<16} {status}"
        )


def _number(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"
