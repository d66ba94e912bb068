"""Mount-time recovery: what a killed daemon or a power loss can leave behind, and its repair.

Each leftover state below is expected after a crash (docs/ARCHITECTURE.md, crash table) and is
repaired before the filesystem serves a request; none of them needs `fsck`:

* orphans: inodes unlinked while open (DB_ORPHANS) -> records, extents and staging removed;
* frees recorded in DB_FREES (their commit is durable) whose space was not given back yet
  -> punched (or the empty segment deleted);
* segment bytes past a segment's committed end (an append whose install never committed)
  -> cut; segment files the index does not know -> removed;
* staging files of inodes the index does not know (created after the last commit) -> removed,
  so are files of another generation than the committed one (a shrinking truncate that did
  not commit, or whose old file was not removed yet), bytes written past the committed size
  -> cut, and bytes outside the staged ranges (sealed, not yet punched) -> punched;
* staged ranges beyond the committed file size -> cut at the size.

Always: the staged ranges are loaded so that sealing resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

from tierfs.crashpoints import crash_point
from tierfs.data.chunkstore import ChunkIndex
from tierfs.fs.namespace import Namespace
from tierfs.fs.ranges import RangeSet
from tierfs.meta import schema
from tierfs.meta.records import SegmentRecord, decode_staged, encode_staged
from tierfs.osutil import punch_hole
from tierfs.tiers.hot import HotStore

log = logging.getLogger(__name__)

K_CLEAN = b"clean_unmount"


@dataclass
class RecoveryReport:
    orphans: int = 0
    stray_staging: int = 0
    trimmed_ranges: int = 0
    cut_segments: int = 0
    stray_segments: int = 0
    finished_frees: int = 0
    held_chunks: int = 0
    was_clean: bool = True

    def anything(self) -> bool:
        return bool(
            self.orphans
            or self.stray_staging
            or self.trimmed_ranges
            or self.cut_segments
            or self.stray_segments
            or self.held_chunks
        )


def recover(ns: Namespace, hot: HotStore, chunks: ChunkIndex) -> RecoveryReport:
    """Repair crash leftovers and mark the filesystem as in use (committed and synced)."""
    store = ns.store
    report = RecoveryReport()
    report.was_clean = store.tx.get(K_CLEAN, db=store.meta) != b"0"
    report.orphans = _remove_orphans(ns)
    crash_point("recovery-after-orphans")
    with store.op() as tx:
        # A snapshot was being taken: chunks it held and nothing took are unused.
        report.held_chunks = chunks.release_held(tx)
    report.cut_segments, report.stray_segments = _recover_segments(ns, hot, chunks)
    report.finished_frees = _finish_frees(ns, hot, chunks)
    if not report.was_clean:
        report.stray_staging = _repair_staging_files(ns)
        report.trimmed_ranges = _trim_ranges(ns)
    _load_staged_ranges(ns)
    with store.op() as tx:
        tx.put(K_CLEAN, b"0", db=store.meta)
    store.commit()
    store.sync_meta()
    store.durable_commits = store.commits
    if report.anything() or not report.was_clean:
        log.info(
            "recovered after %s shutdown: %d orphan inodes, %d stray staging files, "
            "%d staged range lists trimmed, %d segments cut, %d stray segments, "
            "%d chunks held by an unfinished snapshot freed",
            "a clean" if report.was_clean else "an unclean",
            report.orphans,
            report.stray_staging,
            report.trimmed_ranges,
            report.cut_segments,
            report.stray_segments,
            report.held_chunks,
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
            generation = ns.staging_generation(ino, tx)
            ns.delete_inode(tx, ino)
        ns.staging.remove(ino, -1, generation)
    ns.staging.take_changed()
    return len(orphans)


def _recover_segments(ns: Namespace, hot: HotStore, chunks: ChunkIndex) -> tuple[int, int]:
    store = ns.store
    known: dict[int, SegmentRecord] = {}
    with store.tx.cursor(db=store.segments) as cur:
        for key, value in cur:
            known[schema.key_ino(bytes(key))] = SegmentRecord.decode(bytes(value))
    cut = stray = 0
    for seg, record in known.items():
        if hot.cut_to(seg, record.end):
            cut += 1
        if record.active:
            hot.resume(seg, record.end)
    for seg, path in list(hot.all_segments()):
        if seg not in known:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            stray += 1
    return cut, stray


def _finish_frees(ns: Namespace, hot: HotStore, chunks: ChunkIndex) -> int:
    """Give back space whose free was recorded (and so is durable) but not yet done."""
    frees = chunks.recorded_frees()
    for f in frees:
        hot.give_back(f.seg, f.offset, f.length)
    if frees:
        chunks.forget_frees(frees)
    return len(frees)


def _staged(ns: Namespace, ino: int) -> tuple[int, list[tuple[int, int]]]:
    """(generation, ranges) of an inode's committed staging record; (0, []) without one."""
    raw = ns.store.tx.get(schema.ino_key(ino), db=ns.store.staging)
    return decode_staged(bytes(raw)) if raw else (0, [])


def _repair_staging_files(ns: Namespace) -> int:
    """Remove staging files nobody owns (or of another generation than the committed one);
    in the others keep only the staged bytes."""
    stray = 0
    for ino, generation, path in list(ns.staging.all_files()):
        inode = ns.store.get_inode(ino) if ino >= 0 else None
        recorded, ranges = _staged(ns, ino) if inode is not None else (0, [])
        with contextlib.suppress(FileNotFoundError):
            if inode is None or generation != recorded:
                os.unlink(path)
                stray += 1
                continue
            if path.stat().st_size > inode.size:
                os.truncate(path, inode.size)
            _punch_unstaged(path, inode.size, ranges)
    return stray


def _punch_unstaged(path: os.PathLike[str], size: int, ranges: list[tuple[int, int]]) -> None:
    todo = RangeSet([(0, size)])
    for a, b in ranges:
        todo.remove(a, b)
    if not todo:
        return
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for a, b in todo.as_list():
            punch_hole(fd, a, b - a)
    finally:
        os.close(fd)


def _trim_ranges(ns: Namespace) -> int:
    store = ns.store
    trimmed = 0
    with store.tx.cursor(db=store.staging) as cur:
        entries = [(schema.key_ino(k), bytes(v)) for k, v in cur]
    for ino, raw in entries:
        inode = store.get_inode(ino)
        generation, pairs = decode_staged(raw)
        ranges = RangeSet(pairs)
        if inode is None:
            with store.op() as tx:
                tx.delete(schema.ino_key(ino), db=store.staging)
            trimmed += 1
            continue
        before = ranges.as_list()
        ranges.truncate(inode.size)
        if ranges.as_list() != before:
            with store.op() as tx:
                record = encode_staged(generation, ranges.as_list())
                tx.put(schema.ino_key(ino), record, db=store.staging)
            trimmed += 1
    return trimmed


def _load_staged_ranges(ns: Namespace) -> None:
    """Staged data from before the mount is sealed like any other (oldest first)."""
    store = ns.store
    now = time.monotonic()
    with store.tx.cursor(db=store.staging) as cur:
        for key, value in cur:
            ino = schema.key_ino(bytes(key))
            generation, pairs = decode_staged(bytes(value))
            if generation:
                ns.staging.generation[ino] = generation
            ranges = RangeSet(pairs)
            if ranges:
                ns.staging.ranges[ino] = ranges
                ns.staging.dirty_since[ino] = now
                ns.closed_at[ino] = now
