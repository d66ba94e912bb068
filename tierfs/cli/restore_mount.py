"""`tierfs restore mount`: a snapshot as a read-only mount, its data fetched on demand."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from tierfs.cli.key import passphrase_file_option, passphrase_for_reading
from tierfs.cli.mount import start_and_wait_ready
from tierfs.errors import ExitCode, TierfsError
from tierfs.restore import viewmount
from tierfs.restore.source import open_source
from tierfs.restore.view import SnapshotView


def default_log_file() -> Path:
    return Path(tempfile.gettempdir()) / f"tierfs-restore-mount-{os.getuid()}.log"


@click.command("mount")
@click.argument("source")
@click.argument("args", nargs=-1, metavar="[SNAPSHOT] MOUNTPOINT")
@click.option("--at", "at", help="The latest snapshot at or before this ISO 8601 time.")
@click.option("--site", "site_name", help="The site whose snapshots to look at (by name).")
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Recovery bundle whose domain key verifies the manifests (a regional store).",
)
@passphrase_file_option
@click.option("--endpoint", help="S3 endpoint URL.")
@click.option("--region", "s3_region", help="S3 region.")
@click.option("--profile", help="AWS profile for credentials (default: the AWS environment).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="FUSE mount options, passed through (noallow_other: private mount when root).",
)
@click.option(
    "--log-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where the background process logs (default: TMPDIR/tierfs-restore-mount-UID.log).",
)
def restore_mount(
    source: str,
    args: tuple[str, ...],
    at: str | None,
    site_name: str | None,
    key_file: Path | None,
    passphrase_file: Path | None,
    endpoint: str | None,
    s3_region: str | None,
    profile: str | None,
    foreground: bool,
    options: tuple[str, ...],
    log_file: Path | None,
) -> None:
    """Mount snapshot SNAPSHOT (an id or name; --at TIME: the latest at or before TIME) of
    SOURCE read-only at MOUNTPOINT.

    Nothing is copied: directories and file data are fetched from SOURCE when they are read
    (the regional store's manifest is verified first, with the --key-file bundle). Returns
    once the mount is ready; a background process serves it until 'tierfs umount
    MOUNTPOINT' (or fusermount3 -u). An encrypted bundle needs --passphrase-file in the
    background. Copy files out with cp or rsync -aH.

    \b
    Examples:
      tierfs restore mount /var/lib/tierfs 20261207T020000Z-41-nightly /mnt/old
      tierfs restore mount s3://acme-region/sites --key-file store-042.bundle \\
          --site store-042 --at 2026-12-01T00:00:00Z /mnt/old
      tierfs umount /mnt/old
    """
    key, mountpoint = _split_args(args, at)
    mnt = mountpoint.absolute()
    opts = [o.strip() for group in options for o in group.split(",") if o.strip()]
    if foreground:
        passphrase = functools.cache(passphrase_for_reading(passphrase_file, key_file or Path()))

        def open_view() -> tuple[SnapshotView, Callable[[], None], str]:
            src = open_source(
                source,
                key_file=key_file,
                passphrase=passphrase,
                endpoint=endpoint,
                region=s3_region,
                profile=profile,
            )
            try:
                info = src.pick(key, at, site=site_name)
                src.fetch(info.root)  # a missing root fails the mount, not the first ls
            except BaseException:
                src.close()
                raise
            view = SnapshotView(
                info.root,
                viewmount.thread_fetch(src.fetch),
                base=viewmount.VIEW_BASE,
                root_ino=1,
                label=info.snapshot_id,
                chunk_cache_bytes=viewmount.CHUNK_CACHE_BYTES,
            )
            return view, src.close, f"snapshot {info.snapshot_id} of {source}"

        viewmount.run(open_view, mnt, opts)
        return
    argv = [
        "restore",
        "mount",
        "--foreground",
        *_pass_on(
            at=at,
            site=site_name,
            key_file=key_file and key_file.absolute(),
            passphrase_file=passphrase_file and passphrase_file.absolute(),
            endpoint=endpoint,
            region=s3_region,
            profile=profile,
        ),
        *(["-o", ",".join(opts)] if opts else []),
        "--",
        _absolute_source(source),
        *([key] if key is not None else []),
        str(mnt),
    ]
    start_and_wait_ready(argv, log_file or default_log_file(), "restore mount")
    click.echo(f"mounted snapshot of {source} read-only at {mnt}")


def _split_args(args: tuple[str, ...], at: str | None) -> tuple[str | None, Path]:
    """SNAPSHOT MOUNTPOINT, or MOUNTPOINT alone with --at (or for the latest snapshot)."""
    if len(args) == 2 and at is None:
        return args[0], Path(args[1])
    if len(args) == 1:
        return None, Path(args[0])
    if len(args) == 2:
        raise TierfsError("give a snapshot or --at TIME, not both", ExitCode.USAGE)
    raise TierfsError("expected [SNAPSHOT] MOUNTPOINT after SOURCE", ExitCode.USAGE)


def _absolute_source(source: str) -> str:
    """A data directory given relatively is made absolute: the process starts in /."""
    return source if "://" in source else str(Path(source).absolute())


def _pass_on(**values: object) -> list[str]:
    out: list[str] = []
    for name, value in values.items():
        if value:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out
