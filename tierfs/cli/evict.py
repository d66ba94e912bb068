"""`tierfs evict`: drop local copies of data that is durable in the regional store."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import click

from tierfs import control
from tierfs.datadir import mountpoint_of, resolve
from tierfs.errors import ExitCode, TierfsError


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--all", "everything", is_flag=True, help="Evict every chunk that is upstream.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
def evict(path: Path, files: tuple[Path, ...], everything: bool, timeout: float) -> None:
    """Drop the local copies of data that is durable in the regional store, to free space.

    PATH is the mount point or the data directory of a mounted filesystem. With --all, every
    chunk the regional store holds loses its local copy; with FILEs (files or directories
    inside the mount), only the data of those files. Data not sent yet stays local (run
    `tierfs snapshot create` and `tierfs sync --wait` first). Reads fetch evicted data back
    transparently. The daemon also evicts on its own above evict.high_pct.

    \b
    Examples:
      tierfs evict /srv/data --all
      tierfs evict /srv/data /srv/data/videos/2025 /srv/data/db.dump
    """
    if everything == bool(files):
        raise click.UsageError("give either --all or one or more FILEs")
    dd = resolve(path)
    request: dict[str, object] = {}
    if files:
        mountpoint = mountpoint_of(dd)
        if mountpoint is None:
            raise TierfsError(f"{dd.root}: not mounted", ExitCode.NOT_MOUNTED)
        request["inodes"] = sorted(set(_inodes(mountpoint, files)))
    answer = control.request(dd.control_socket, "evict", timeout=timeout, **request)
    click.echo(
        f"evicted {answer['chunks']:,} chunks ({_mib(answer['bytes'])}); "
        f"local copies now {_mib(answer['local_bytes'])}"
    )
    if answer["kept_chunks"]:
        click.echo(
            f"{answer['kept_chunks']:,} chunks ({_mib(answer['kept_bytes'])}) are not upstream "
            "yet and stay local: snapshot and `tierfs sync --wait` first"
        )


def _inodes(mountpoint: Path, files: tuple[Path, ...]) -> Iterator[int]:
    """Inode numbers of the regular files named, directories walked; each must be inside
    the mount (same device as the mount point)."""
    device = os.stat(mountpoint).st_dev
    for name in files:
        try:
            st = os.lstat(name)
        except OSError as exc:
            raise TierfsError(f"{name}: {exc.strerror}", ExitCode.USAGE) from None
        if st.st_dev != device:
            raise TierfsError(f"{name}: not inside the mount at {mountpoint}", ExitCode.USAGE)
        if stat.S_ISREG(st.st_mode):
            yield st.st_ino
        elif stat.S_ISDIR(st.st_mode):
            yield from _walk(name, device)


def _walk(top: Path, device: int) -> Iterator[int]:
    for root, dirs, names in os.walk(top):
        for n in names:
            st = os.lstat(os.path.join(root, n))
            if stat.S_ISREG(st.st_mode) and st.st_dev == device:
                yield st.st_ino
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(root, d)).st_dev == device]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"
