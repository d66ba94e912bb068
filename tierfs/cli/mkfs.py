"""`tierfs mkfs`: create a data directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from tierfs import config
from tierfs.datadir import DataDir, is_locked
from tierfs.errors import ExitCode, TierfsError
from tierfs.meta.store import MetaStore


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--site", help="Site name (default: the host name).")
@click.option("--force", is_flag=True, help="Replace an existing filesystem (its data is lost).")
def mkfs(data_dir: Path, site: str | None, force: bool) -> None:
    """Create a tierfs filesystem in DATA_DIR.

    Writes tierfs.toml (every setting, commented, with its default) and an empty metadata
    index. Refuses to touch an existing filesystem unless --force is given.

    \b
    Example:
      tierfs mkfs /var/lib/tierfs --site store-042
    """
    dd = DataDir(data_dir.absolute())
    if dd.is_filesystem():
        if not force:
            raise TierfsError(
                f"{dd.root}: already holds a tierfs filesystem (use --force to replace it)",
                ExitCode.ALREADY_EXISTS,
            )
        if is_locked(dd):
            raise TierfsError(f"{dd.root}: filesystem is mounted; unmount it first", ExitCode.BUSY)
        for sub in (dd.meta, dd.staging, dd.run):
            shutil.rmtree(sub, ignore_errors=True)
    elif dd.root.exists() and not dd.root.is_dir():
        raise TierfsError(f"{dd.root}: exists and is not a directory", ExitCode.NOT_A_FILESYSTEM)
    cfg = config.defaults(site)
    if site is not None:
        config.parse({"site": {"name": site}}, "--site")
    try:
        dd.root.mkdir(parents=True, exist_ok=True)
        dd.make_layout()
        store = MetaStore.create(dd.meta, cfg.site)
        info = store.info()
        store.close()
        config.write(dd.root, cfg)
    except OSError as exc:
        raise TierfsError(
            f"{dd.root}: cannot create filesystem: {exc.strerror}", ExitCode.IO
        ) from None
    click.echo(f"created tierfs filesystem {info['uuid']} for site {cfg.site!r} in {dd.root}")
