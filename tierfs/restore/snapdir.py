"""`.snapshots` in the live mount: a read-only directory of the local snapshots.

The root of the live tree has one reserved name (`snapshots.dir_name`, `.snapshots` by
default). Looking it up gives a directory, not in the index, that lists the snapshots of the
local catalog by snapshot id; each is the root of a `SnapshotView` whose fetch is the daemon's
`FileReader.load_chunk` (tree blobs and data chunks are local chunks, kept by the snapshot's
references). The catalog is read at every lookup and listing of the directory, so a snapshot
taken or deleted meanwhile appears or vanishes at once (within `LISTING_TIMEOUT` for a name
the kernel has cached).

**Inode numbers.** The live tree numbers its inodes from an LMDB counter starting at 2; this
directory is `SNAPDIR_INO` = 2**62, and the snapshot with catalog counter N owns the range
[2**62 + N * 2**40, 2**62 + (N + 1) * 2**40) (`view_base`), its root being the first number.
The counter of a snapshot is never reused, so neither are its numbers; 2**40 numbers per
snapshot and counters below 3 * 2**22 keep every number below 2**64.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

from tierfs.fs.namespace import FsError
from tierfs.restore.view import VIEW_SPAN, Blob, Listed, SnapshotView
from tierfs.snap.catalog import Catalog, SnapshotRecord

log = logging.getLogger(__name__)

SNAPDIR_INO = 1 << 62
MAX_COUNTER = (((1 << 64) - SNAPDIR_INO) // VIEW_SPAN) - 1
LISTING_TIMEOUT = 1.0  # the directory's own answers: snapshots come and go


def view_base(counter: int) -> int:
    """The first inode number of the view of the snapshot with catalog counter `counter`."""
    return SNAPDIR_INO + counter * VIEW_SPAN


def is_snapshot_ino(ino: int) -> bool:
    """Whether an inode number belongs to `.snapshots` or a view under it."""
    return ino >= SNAPDIR_INO


class SnapshotDir:
    """The `.snapshots` directory and the views under it (all on the trio thread)."""

    def __init__(
        self,
        catalog: Catalog,
        fetch: Callable[[bytes], Awaitable[Blob]],
        name: bytes,
        show: bool,
        root_ino: int,
        nursery: Callable[[], trio.Nursery | None] = lambda: None,
    ) -> None:
        self.catalog = catalog
        self.nursery = nursery  # where views read ahead (the daemon's, once it serves)
        self.fetch = fetch
        self.name = name
        self.show = show
        self.root_ino = root_ino
        self.views: dict[int, SnapshotView] = {}
        self.lookups = 0

    # -- the directory itself

    def _records(self) -> dict[bytes, SnapshotRecord]:
        return {r.snapshot_id.encode(): r for r in self.catalog.records()}

    def attrs(self, uid: int = 0, gid: int = 0) -> pyfuse3.EntryAttributes:
        """Attributes of `.snapshots`: read-only, dated by the newest snapshot."""
        latest = self.catalog.latest()
        when = latest.time_ns if latest is not None else time.time_ns()
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(SNAPDIR_INO)
        a.entry_timeout = LISTING_TIMEOUT
        a.attr_timeout = LISTING_TIMEOUT
        a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
        a.st_nlink = 2
        a.st_uid = uid
        a.st_gid = gid
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = when
        return a

    def _view(self, record: SnapshotRecord) -> SnapshotView:
        view = self.views.get(record.counter)
        if view is None:
            if record.counter > MAX_COUNTER:
                log.error("snapshot %s: counter beyond the view range", record.snapshot_id)
                raise FsError(errno.EOVERFLOW)
            view = SnapshotView(
                record.root,
                self.fetch,
                base=view_base(record.counter),
                root_parent=SNAPDIR_INO,
                label=record.snapshot_id,
            )
            view.nursery = self.nursery()
            self.views[record.counter] = view
        return view

    def view_of(self, ino: int) -> SnapshotView:
        """The view an inode number belongs to; ESTALE for a view that is gone."""
        view = self.views.get((ino - SNAPDIR_INO) // VIEW_SPAN)
        if view is None or not view.owns(ino):
            raise FsError(errno.ESTALE)
        return view

    def _drop_unused(self, records: dict[bytes, SnapshotRecord]) -> None:
        """Forget views of deleted snapshots once the kernel holds none of their inodes."""
        kept = {r.counter for r in records.values()}
        for counter in [c for c, v in self.views.items() if c not in kept and not v.lookups]:
            del self.views[counter]

    async def _root_attrs(self, record: SnapshotRecord) -> pyfuse3.EntryAttributes:
        view = self._view(record)
        attrs = view.attrs(view.root_ino, await view.root())
        attrs.entry_timeout = LISTING_TIMEOUT  # the name goes when the snapshot is deleted
        return attrs

    async def lookup_child(self, name: bytes) -> pyfuse3.EntryAttributes:
        records = self._records()
        self._drop_unused(records)
        record = records.get(name)
        if record is None:
            raise FsError(errno.ENOENT)
        attrs = await self._root_attrs(record)
        self.views[record.counter].add_lookup(attrs.st_ino)
        return attrs

    async def listing(self, start: int) -> list[Listed]:
        """(snapshot id, its root's attributes, cookie) after `start`; the cookie is the
        snapshot's counter, so deletions and new snapshots never shift a listing."""
        records = self._records()
        self._drop_unused(records)
        out = []
        for name, record in sorted(records.items(), key=lambda kv: kv[1].counter):
            if record.counter <= start:
                continue
            try:
                attrs = await self._root_attrs(record)
            except FsError:
                log.warning("snapshot %s: root unreadable, not listed", record.snapshot_id)
                continue
            out.append((name, attrs, record.counter))
        return out

    def add_lookup(self, ino: int) -> None:
        if ino == SNAPDIR_INO:
            self.lookups += 1
        else:
            self.view_of(ino).add_lookup(ino)

    def forget(self, ino: int, n: int) -> None:
        if ino == SNAPDIR_INO:
            self.lookups = max(0, self.lookups - n)
            return
        view = self.views.get((ino - SNAPDIR_INO) // VIEW_SPAN)
        if view is not None:
            view.forget(ino, n)
