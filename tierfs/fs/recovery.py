"""Mount-time recovery: what a killed daemon or a power loss can leave behind, and its repair.

Each leftover state below is expected after a crash (docs/ARCHITECTURE.md, crash table) and is
repaired before the filesystem serves a request; none of them needs `fsck`:

* orphans: inodes unlinked while open (DB_ORPHANS) -> records and staging file removed;
* staging files of inodes the index does not know (created after the last commit) -> removed,
  and bytes written past the committed size -> cut;
* staged ranges beyond the committed file size -> cut at the size.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from tierfs.crashpoints import crash_point
from tierfs.fs.namespace import Namespace
from tierfs.fs.ranges import RangeSet
from tierfs.meta import schema
from tierfs.meta.records import decode_ranges, encode_ranges

log = logging.getLogger(__name__)

K_CLEAN = b"clean_unmount"


@dataclass
class RecoveryReport:
    orphans: int = 0
    stray_staging: int = 0
    trimmed_ranges: int = 0
    was_clean: bool = True


def recover(ns: Namespace) -> RecoveryReport:
    """Repair crash leftovers and mark the filesystem as in use (committed and synced)."""
    store = ns.store
    report = RecoveryReport()
    report.was_clean = store.tx.get(K_CLEAN, db=store.meta) != b"0"
    report.orphans = _remove_orphans(ns)
    crash_point("recovery-after-orphans")
    if not report.was_clean:
        report.stray_staging = _remove_stray_staging(ns)
        report.trimmed_ranges = _trim_ranges(ns)
    with store.op() as tx:
        tx.put(K_CLEAN, b"0", db=store.meta)
    store.commit()
    store.sync_meta()
    if report.orphans or report.stray_staging or report.trimmed_ranges:
        log.info(
            "recovered after %s shutdown: %d orphan inodes, %d stray staging files, "
            "%d staged range lists trimmed",
            "a clean" if report.was_clean else "an unclean",
            report.orphans,
            report.stray_staging,
            report.trimmed_ranges,
        )
    return report


def mark_clean(ns: Namespace) -> None:
    with ns.store.op() as tx:
        tx.put(K_CLEAN, b"1", db=ns.store.meta)


def _remove_orphans(ns: Namespace) -> int:
    store = ns.store
    with store.tx.cursor(db=store.orphans) as cur:
        orphans = [schema.key_ino(k) for k in cur.iternext(keys=True, values=False)]
    for ino in orphans:
        with store.op() as tx:
            ns.delete_inode(tx, ino)
        ns.staging.remove(ino)
    ns.staging.take_changed()
    return len(orphans)


def _remove_stray_staging(ns: Namespace) -> int:
    """Remove staging files nobody owns; cut owned ones at their committed file size."""
    stray = 0
    for ino, path in list(ns.staging.all_files()):
        inode = ns.store.get_inode(ino) if ino >= 0 else None
        with contextlib.suppress(FileNotFoundError):
            if inode is None:
                os.unlink(path)
                stray += 1
            elif path.stat().st_size > inode.size:
                os.truncate(path, inode.size)
    return stray


def _trim_ranges(ns: Namespace) -> int:
    store = ns.store
    trimmed = 0
    with store.tx.cursor(db=store.staging) as cur:
        entries = [(schema.key_ino(k), bytes(v)) for k, v in cur]
    for ino, raw in entries:
        inode = store.get_inode(ino)
        ranges = RangeSet(decode_ranges(raw))
        if inode is None:
            with store.op() as tx:
                tx.delete(schema.ino_key(ino), db=store.staging)
            trimmed += 1
            continue
        before = ranges.as_list()
        ranges.truncate(inode.size)
        if ranges.as_list() != before:
            with store.op() as tx:
                tx.put(schema.ino_key(ino), encode_ranges(ranges.as_list()), db=store.staging)
            trimmed += 1
    return trimmed
