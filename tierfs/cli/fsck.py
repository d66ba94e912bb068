"""`tierfs fsck`: check and repair an unmounted filesystem."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tierfs import config
from tierfs.datadir import DataDir, MountLock
from tierfs.errors import ExitCode
from tierfs.fs.staging import Staging
from tierfs.fsck import check
from tierfs.meta.store import MetaStore


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--repair", is_flag=True, help="Fix what can be fixed safely, and say what was done.")
def fsck(data_dir: Path, repair: bool) -> None:
    """Check the filesystem in DATA_DIR (it must not be mounted).

    Checks link counts, orphan inodes, dangling entries, directory loops, readdir cookies and
    staging files without owners. Exit code 0 when clean, 1 when problems remain.

    \b
    Examples:
      tierfs fsck /var/lib/tierfs
      tierfs fsck /var/lib/tierfs --repair
    """
    dd = DataDir(data_dir.absolute()).require()
    cfg = config.load(dd.root)
    lock = MountLock(dd)
    lock.acquire()
    try:
        store = MetaStore.open(dd.meta, readonly=not repair)
        try:
            result = check(store, Staging(dd.staging, 0), repair)
        finally:
            store.env.close()
    finally:
        lock.release()
    for f in result.findings:
        suffix = (
            f" -> {f.repair}" if f.repaired else (f" (--repair: {f.repair})" if f.repair else "")
        )
        click.echo(f"{'repaired' if f.repaired else 'problem'}: {f.problem}{suffix}")
    unrepaired = [f for f in result.findings if not f.repaired]
    click.echo(
        f"{cfg.site}: checked {result.inodes} inodes, {result.entries} entries: "
        f"{len(result.findings)} problems, {len(unrepaired)} unrepaired"
    )
    sys.exit(ExitCode.PROBLEMS_FOUND if unrepaired else ExitCode.OK)
