"""`tierfs restore site`: rebuild a lost site on a new machine from its regional store."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import click

from tierfs.cli.key import passphrase_file_option, passphrase_for_reading
from tierfs.errors import ExitCode, TierfsError
from tierfs.restore import site as site_mod
from tierfs.restore.site_tree import TreeStats
from tierfs.restore.source import SnapshotInfo, Source, open_source, parse_time
from tierfs.snap import keys

log = logging.getLogger(__name__)


@click.command("site")
@click.argument("source")
@click.argument("data_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("snapshot", required=False)
@click.option("--site", "site_name", required=True, help="The site to rebuild (its name).")
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The site's recovery bundle ('tierfs key export'; not a --domain-only one).",
)
@passphrase_file_option
@click.option("--at", "at", help="The latest snapshot at or before this ISO 8601 time.")
@click.option("--endpoint", help="S3 endpoint URL (default: the snapshot's settings).")
@click.option("--region", "s3_region", help="S3 region (default: the snapshot's settings).")
@click.option("--profile", help="AWS profile for credentials (default: the AWS environment).")
@click.option(
    "--zone-device",
    default="emulated:auto",
    show_default=True,
    help="The new machine's cold tier: emulated:SIZE, zonefs:DIR, block:/dev/..., or none.",
)
@click.option("--force", is_flag=True, help="Replace a tierfs filesystem already in DATA_DIR.")
@click.option("--workers", default=16, show_default=True, help="Store requests in flight.")
def site(
    source: str,
    data_dir: Path,
    snapshot: str | None,
    site_name: str,
    key_file: Path,
    passphrase_file: Path | None,
    at: str | None,
    endpoint: str | None,
    s3_region: str | None,
    profile: str | None,
    zone_device: str,
    force: bool,
    workers: int,
) -> None:
    """Rebuild site --site in DATA_DIR from its snapshot in the regional store SOURCE.

    Metadata first: the snapshot's tree becomes a fresh index (names, attributes, xattrs,
    links, extents), and the filesystem can be mounted as soon as this command returns; file
    data stays in the region and is read from it on demand. SNAPSHOT is an id or name
    (default: the latest; --at TIME: the latest at or before TIME). The manifest must verify
    against the bundle's domain key (exit 12 otherwise).

    The settings come from the snapshot (they never hold credentials): the store URL is
    SOURCE, the endpoint and region those given here or the snapshot's, the credentials
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment (written to tierfs.toml, mode
    0600) or --profile. The site key is certified again under a new epoch, so nothing the
    rebuilt site publishes reuses a name of the lost machine. DATA_DIR must be empty or new.

    \b
    Examples:
      tierfs restore site s3://acme-region/sites /var/lib/tierfs --site store-042 \\
          --key-file store-042.bundle
      tierfs restore site s3://acme-region/sites /var/lib/tierfs --site store-042 \\
          --key-file store-042.bundle --at 2026-12-01T00:00:00Z --zone-device none
      tierfs mount /var/lib/tierfs /srv/data
    """
    if "://" not in source:
        raise TierfsError(
            f"{source}: a site is rebuilt from its regional store: give its URL "
            "(file:///PATH or s3://BUCKET/PREFIX)",
            ExitCode.USAGE,
        )
    site_mod.check_target(data_dir.absolute(), force)
    passphrase = functools.cache(passphrase_for_reading(passphrase_file, key_file))
    bundle = keys.read_bundle(key_file, passphrase)
    site_mod.check_bundle(bundle, site_name)
    with open_source(
        source,
        key_file=key_file,
        passphrase=passphrase,
        endpoint=endpoint,
        region=s3_region,
        profile=profile,
        workers=workers,
    ) as src:
        info = choose(src, snapshot, at, site_name)
        if not covers_everything(info):
            click.echo(
                f"warning: snapshot {info.snapshot_id} covers only {info.stats.get('paths')}: "
                "the rest of the filesystem will be missing",
                err=True,
            )
        click.echo(f"rebuilding site {site_name!r} from snapshot {info.snapshot_id}", err=True)
        opts = site_mod.SiteOptions(
            data_dir=data_dir.absolute(),
            site=site_name,
            url=source,
            zone_device=zone_device,
            endpoint=endpoint,
            region=s3_region,
            profile=profile,
            force=force,
        )
        result = site_mod.rebuild(opts, bundle, src, info, progress=_progress)
    t = result.tree
    click.echo(
        f"rebuilt site {site_name!r} ({result.site_uuid}) in {result.data_dir} from snapshot "
        f"{result.snapshot_id}: {t.files} files, {t.dirs} directories, {t.symlinks} symlinks, "
        f"{result.chunks} chunks ({_mib(result.evicted_bytes)} MiB) left in the region, "
        f"in {result.seconds:.1f} s"
    )
    click.echo(
        f"epoch {result.epoch}, next snapshot counter {result.next_snapshot}; "
        f"mount it: tierfs mount {result.data_dir} MOUNTPOINT"
    )
    if t.skipped:
        click.echo(f"warning: {t.skipped} device nodes were skipped", err=True)


def covers_everything(info: SnapshotInfo) -> bool:
    """Whether a snapshot holds the whole filesystem (a schedule's may cover some paths)."""
    return bool(info.stats.get("paths", ["/"]) == ["/"])


def choose(src: Source, key: str | None, at: str | None, site_name: str) -> SnapshotInfo:
    """The snapshot to rebuild from: the one named, else the latest whole-filesystem one
    (at or before `at`): the latest of all may be a schedule's snapshot of a few paths."""
    if key is not None and key != "latest":
        return src.pick(key, at, site=site_name)
    limit = None if at is None else parse_time(at)
    whole = [
        i
        for i in src.snapshots(site_name)
        if i.verified and covers_everything(i) and (limit is None or i.time_ns <= limit)
    ]
    latest = src.pick(None, at, site=site_name)  # refuses an unverified latest (exit 12)
    return whole[-1] if whole else latest


def _progress(stats: TreeStats) -> None:
    click.echo(
        f"restore site: {stats.files} files, {stats.dirs} directories so far "
        f"({stats.blobs} tree blobs)",
        err=True,
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"
