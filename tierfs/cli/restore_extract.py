"""`tierfs restore extract SOURCE SNAPSHOT[:PATH] DEST`: copy files out of a snapshot."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from tierfs.cli import exit_fast_when_done
from tierfs.errors import ExitCode, TierfsError
from tierfs.restore.extract import Extractor, Failure, Progress
from tierfs.restore.options import open_from_options, source_options

PROGRESS_EVERY = 0.5  # seconds between progress lines on a terminal


@click.command(name="extract")
@click.argument("source")
@click.argument("args", nargs=-1, required=True, metavar="[SNAPSHOT[:PATH]] DEST")
@click.option("--at", "at", metavar="TIME", help="The latest snapshot at or before TIME.")
@click.option("--site", help="The site whose snapshot to take (its name or UUID).")
@click.option(
    "--workers",
    default=8,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Read requests (runs of chunks) in flight at a time.",
)
@source_options
def restore_extract(
    source: str,
    args: tuple[str, ...],
    at: str | None,
    site: str | None,
    workers: int,
    key_file: Path | None,
    passphrase_file: Path | None,
    endpoint: str | None,
    s3_region: str | None,
    profile: str | None,
) -> None:
    """Copy a snapshot of SOURCE, or the file or directory PATH in it, into DEST.

    SNAPSHOT is an id or a name (`latest`: the newest); or give --at TIME instead (ISO 8601,
    UTC unless an offset is given), optionally with :PATH. A directory's contents go into
    DEST (created if missing), which takes its attributes; a file goes into DEST under its
    own name. Modes, owners (as root), mtimes, xattrs, symlinks, hard links, holes, FIFOs
    and device nodes are restored. Every chunk is verified; a file that uses a damaged or
    missing chunk is reported and left out, everything else is restored (exit 12, or 10 for
    missing data). Rerun the same command to resume: complete files are skipped.

    \b
    Examples:
      tierfs restore extract /var/lib/tierfs latest /tmp/restore
      tierfs restore extract /var/lib/tierfs before-upgrade:etc/app.conf /tmp/restore
      tierfs restore extract s3://backups/region --key-file domain.bundle \\
          --site store-042 --at 2026-12-07T15:00:00Z :srv/db /tmp/db
    """
    exit_fast_when_done()  # the extractor closes every file it writes, failed or not
    spec, dest = _split_args(args, at)
    key, _, path = spec.partition(":") if spec is not None else ("", "", "")
    with open_from_options(
        source, key_file, passphrase_file, endpoint, s3_region, profile, workers
    ) as src:
        info = src.pick(key or None, at, site)
        click.echo(f"restoring {info.site_name}/{info.snapshot_id} into {dest}", err=True)
        total = int(info.stats.get("logical_bytes", 0) or 0) if not path.strip("/") else 0
        extractor = Extractor(
            src,
            dest,
            workers=workers,
            progress=_Printer() if sys.stderr.isatty() else None,
            on_failure=_print_failure,
            on_warning=lambda w: click.echo(f"tierfs: warning: {w}", err=True),
        )
        result = extractor.run(info.root, path, total)
    p = result.progress
    if sys.stderr.isatty():
        click.echo("", err=True)
    click.echo(
        f"restored {p.files_done:,} files ({p.bytes_done:,} bytes), {p.dirs:,} directories, "
        f"{p.symlinks:,} symlinks, {p.links:,} hard links in {p.elapsed:.1f} s "
        f"({p.bytes_done / p.elapsed / 2**20:.1f} MiB/s); {p.files_skipped:,} already complete"
    )
    if result.failures:
        raise TierfsError(
            f"{len(result.failures)} paths could not be restored (listed above); the rest is in "
            f"{dest}",
            result.exit_code,
        )


def _split_args(args: tuple[str, ...], at: str | None) -> tuple[str | None, Path]:
    if len(args) == 2:
        return args[0], Path(args[1])
    if len(args) == 1 and at is not None:
        return None, Path(args[0])
    if len(args) == 1:
        raise TierfsError("give SNAPSHOT[:PATH] DEST, or --at TIME DEST", ExitCode.USAGE)
    raise TierfsError("expected [SNAPSHOT[:PATH]] DEST", ExitCode.USAGE)


def _print_failure(failure: Failure) -> None:
    click.echo(f"tierfs: error: {failure.path}: {failure.error.message}", err=True)


class _Printer:
    """A progress line on stderr, rewritten in place at most every PROGRESS_EVERY seconds."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        of = f" of {p.total_bytes / 2**20:,.0f}" if p.total_bytes else ""
        click.echo(
            f"\r{p.bytes_done / 2**20:,.0f}{of} MiB, {p.files_done + p.files_skipped:,} files, "
            f"{p.bytes_done / p.elapsed / 2**20:,.1f} MiB/s ",
            err=True,
            nl=False,
        )
