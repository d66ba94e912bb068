"""Rebuilding a site's metadata index from a snapshot tree (`tierfs restore site`).

The tree is walked breadth-first with its blobs (directory trees, extent lists) fetched and
decoded by a thread pool, so that the latency of the regional store is paid once per level
of the tree instead of once per directory; the decoded directories are turned into LMDB
records on the calling thread, in large write transactions (an fsync every `batch_puts`
puts, not every file). Nothing of the file data is read: each extent becomes an extent
record, and the chunks they name are counted (`refs`) for the caller, which records them as
evicted (`tierfs.restore.site`).

Inode numbers are handed out fresh, in the order the walk meets the entries (the root is 1),
with one exception: a hard-linked file keeps its snapshot inode number (its `link_id`) when
that number is still free. A tree blob names a hard-linked file by that number, so keeping it
lets the first snapshot after the rebuild encode unchanged directories to the same blobs as
before, which the region already holds (nothing of them is sent again). Numbers taken that
way are skipped by the fresh allocation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fnmatch
import logging
import re
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

from tierfs.data.extents import Extent
from tierfs.errors import ExitCode, TierfsError
from tierfs.meta import schema
from tierfs.meta.records import FLAG_FIXED_CHUNKING, Inode, encode_dirent, encode_extent
from tierfs.meta.store import MetaStore
from tierfs.snap import treeformat as tf

log = logging.getLogger(__name__)

Fetch = Callable[[bytes], bytes]
ContentId = Callable[[bytes], bytes]
Progress = Callable[["TreeStats"], None]

BATCH_PUTS = 50_000  # puts per LMDB write transaction (one fsync each)
FETCH_WORKERS = 16  # blob fetches in flight: the store's latency, not the CPU, is the limit
PROGRESS_EVERY = 1.0  # seconds between progress reports
_MAX_KEPT_INO = 1 << 62  # a link id above this is not kept (room for the counter to grow)


@dataclasses.dataclass
class TreeStats:
    """What the walk restored so far (entries: a file with two names counts twice)."""

    files: int = 0
    dirs: int = 1  # the root
    symlinks: int = 0
    others: int = 0
    hard_links: int = 0
    skipped: int = 0  # device nodes: the filesystem cannot hold them
    logical_bytes: int = 0
    extents: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    kept_link_inos: int = 0


@dataclasses.dataclass
class TreeResult:
    """The walk's outcome: the chunks the extents use, the blobs read, the counters."""

    refs: collections.Counter[bytes]  # data chunk id -> extents that use it
    blob_ids: set[bytes]  # every tree, root and extent-list blob of the snapshot
    referenced_bytes: int
    next_ino: int
    next_cookie: int
    stats: TreeStats


class BatchWriter:
    """Puts into one LMDB write transaction at a time, committed every `batch_puts` puts.

    A restore writes a fresh index that nothing else reads until it is finished, so there is
    no need for an operation per file: big transactions make the fsyncs few.
    """

    def __init__(self, store: MetaStore, batch_puts: int = BATCH_PUTS) -> None:
        self.store = store
        self.batch_puts = batch_puts
        self.puts = 0
        self.commits = 0
        self._txn: Any = None

    @property
    def txn(self) -> Any:
        if self._txn is None:
            self._txn = self.store.env.begin(write=True)
        return self._txn

    def put(self, key: bytes, value: bytes, db: Any) -> None:
        self.txn.put(key, value, db=db)
        self.count()

    def count(self, n: int = 1) -> None:
        """Puts made through `txn` directly (by a helper that takes a transaction)."""
        self.puts += n
        if self.puts % self.batch_puts == 0:
            self.commit()

    def commit(self) -> None:
        if self._txn is not None:
            self._txn.commit()
            self._txn = None
            self.commits += 1

    def abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None


@dataclasses.dataclass
class _File:
    """A regular file whose inode record waits: for extent-list blobs, or (hard-linked) for
    the end of the walk, when its link count is known."""

    ino: int
    entry: tf.Entry
    nlink: int = 1
    lists_left: int = 0
    data_bytes: int = 0


class TreeRestorer:
    """Walks one snapshot tree into a fresh index (see the module docstring)."""

    def __init__(
        self,
        store: MetaStore,
        fetch: Fetch,
        content_id: ContentId | None,
        *,
        fixed_patterns: Sequence[str] = (),
        progress: Progress | None = None,
        workers: int = FETCH_WORKERS,
        batch_puts: int = BATCH_PUTS,
    ) -> None:
        self.store = store
        self.fetch = fetch
        self.content_id = content_id
        self.progress = progress
        self.workers = workers
        self.writer = BatchWriter(store, batch_puts)
        pattern = "|".join(fnmatch.translate(p) for p in fixed_patterns if p) or "(?!)"
        self._fixed = re.compile(pattern)
        self.stats = TreeStats()
        self.refs: collections.Counter[bytes] = collections.Counter()
        self.blob_ids: set[bytes] = set()
        self.referenced_bytes = 0
        self.next_ino = schema.FIRST_FREE_INO
        self.next_cookie = 1
        self._kept: set[int] = set()  # snapshot inode numbers kept for hard-linked files
        self._links: dict[int, _File] = {}  # link id -> the file of its first entry
        self._lists: dict[int, _File] = {}  # ino -> a file waiting for extent lists
        self._pending: dict[concurrent.futures.Future[Any], list[Callable[[Any], None]]] = {}
        self._inflight: dict[bytes, concurrent.futures.Future[Any]] = {}
        self._last_progress = time.monotonic()

    # -- the walk

    def run(self, root_id: bytes) -> TreeResult:
        """Restore the tree of root blob `root_id` (already trusted: a verified manifest's)."""
        try:
            with concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="restore-fetch"
            ) as pool:
                self._pool = pool
                _, size, (root,) = self._load_tree(root_id, tf.KIND_ROOT)
                self._note_blob(root_id, size)
                self._request(root.tree_id, lambda kids: self._directory(1, 1, root, kids))
                self._drain()
            self._finish_links()
            self.writer.commit()
        except BaseException:
            self.writer.abort()
            raise
        return TreeResult(
            self.refs,
            self.blob_ids,
            self.referenced_bytes,
            max([self.next_ino, *(i + 1 for i in self._kept)]),
            self.next_cookie,
            self.stats,
        )

    def _drain(self) -> None:
        """Run continuations as their blobs arrive, until nothing is in flight."""
        while self._pending:
            done, _ = concurrent.futures.wait(
                list(self._pending), return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                continuations = self._pending.pop(future)
                # a failed fetch or a damaged blob raises here and stops the restore
                blob_id, size, payload = future.result()
                if self._inflight.get(blob_id) is future:
                    del self._inflight[blob_id]
                self._note_blob(blob_id, size)
                for continuation in continuations:
                    continuation(payload)
            self._report()

    def _request(self, tree_id: bytes, then: Callable[[list[tf.Entry]], None]) -> None:
        """Fetch and decode a directory's tree blob in the pool; `then(entries)` runs here.

        Equal subtrees (empty directories alike) share one fetch while it is in flight."""
        future = self._inflight.get(tree_id)
        if future is None:
            future = self._pool.submit(self._load_tree, tree_id, tf.KIND_DIR)
            self._inflight[tree_id] = future
            self._pending[future] = []
        self._pending[future].append(then)

    def _request_list(self, ref: tf.ExtentListRef, then: Callable[[list[Extent]], None]) -> None:
        future = self._pool.submit(self._load_list, ref)
        self._pending[future] = [then]

    def _blob(self, blob_id: bytes) -> bytes:
        """A blob's bytes, checked against its id: the tree is then as trustworthy as the
        verified manifest's root id."""
        blob = self.fetch(blob_id)
        if self.content_id is not None and self.content_id(blob) != blob_id:
            raise tf.TreeFormatError(f"blob {blob_id.hex()[:16]} does not match its id")
        return blob

    def _load_tree(self, tree_id: bytes, kind: int) -> tuple[bytes, int, list[tf.Entry]]:
        """(worker thread) fetch, check and decode a tree blob."""
        blob = self._blob(tree_id)
        return tree_id, len(blob), tf.decode_tree(blob, kind)

    def _load_list(self, ref: tf.ExtentListRef) -> tuple[bytes, int, list[Extent]]:
        """(worker thread) fetch, check and decode an extent-list blob against its ref."""
        blob = self._blob(ref.blob_id)
        extents = tf.decode_extent_list(blob, ref.start)
        tf.check_ref(ref, extents)
        return ref.blob_id, len(blob), extents

    def _note_blob(self, blob_id: bytes, size: int) -> None:
        self.blob_ids.add(blob_id)
        self.stats.blobs += 1
        self.stats.blob_bytes += size

    def _report(self) -> None:
        now = time.monotonic()
        if self.progress is not None and now - self._last_progress >= PROGRESS_EVERY:
            self._last_progress = now
            self.progress(self.stats)

    # -- inode numbers and entries

    def _alloc(self) -> int:
        while self.next_ino in self._kept:
            self.next_ino += 1
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def _alloc_link(self, link_id: int) -> int:
        """The snapshot's own number for a hard-linked file when it is still free."""
        if self.next_ino <= link_id < _MAX_KEPT_INO and link_id not in self._kept:
            self._kept.add(link_id)
            self.stats.kept_link_inos += 1
            return link_id
        return self._alloc()

    def _add_entry(self, parent: int, name: bytes, child: int) -> None:
        cookie = self.next_cookie
        self.next_cookie += 1
        put = self.writer.put
        put(schema.dirent_key(parent, name), encode_dirent(child, cookie), self.store.dirents)
        put(schema.cookie_key(parent, cookie), name, self.store.cookies)

    def _put_inode(self, inode: Inode) -> None:
        self.writer.put(schema.ino_key(inode.ino), inode.encode(), self.store.inodes)

    def _inode(self, ino: int, e: tf.Entry, nlink: int, parent: int = 0) -> Inode:
        """The record of an entry: its attributes as snapshotted (ctime too: the index is
        written directly, so nothing sets it to now); atime, which trees lack, is mtime."""
        flags = 0
        if e.type is tf.FileType.REG and self._fixed.match(e.name.decode(errors="replace")):
            flags = FLAG_FIXED_CHUNKING
        return Inode(
            ino,
            e.st_mode,
            e.uid,
            e.gid,
            nlink,
            e.size,
            e.mtime_ns,
            e.mtime_ns,
            e.ctime_ns,
            e.rdev,
            parent,
            flags,
        )

    def _xattrs(self, ino: int, e: tf.Entry) -> None:
        for name, value in e.xattrs:
            self.writer.put(schema.ino_key(ino) + name, value, self.store.xattrs)

    # -- directories and their entries

    def _directory(self, ino: int, parent: int, e: tf.Entry, children: list[tf.Entry]) -> None:
        """A directory whose blob arrived: its record (link count 2 + subdirectories) and
        its entries; subdirectories are fetched in turn."""
        subdirs = sum(1 for c in children if c.type is tf.FileType.DIR)
        self._put_inode(self._inode(ino, e, 2 + subdirs, parent))
        self._xattrs(ino, e)
        for child in children:
            self._child(ino, child)

    def _child(self, parent: int, e: tf.Entry) -> None:
        if e.type is tf.FileType.DIR:
            ino = self._alloc()
            self.stats.dirs += 1
            self._add_entry(parent, e.name, ino)
            self._request(e.tree_id, lambda kids: self._directory(ino, parent, e, kids))
            return
        if e.type in (tf.FileType.CHR, tf.FileType.BLK):
            self.stats.skipped += 1
            log.warning("device node %r skipped: tierfs does not hold device nodes", e.name)
            return
        if e.link_id and e.link_id in self._links:
            linked = self._links[e.link_id]
            linked.nlink += 1
            self._add_entry(parent, e.name, linked.ino)
            self._count(e, first=False)
            return
        ino = self._alloc_link(e.link_id) if e.link_id else self._alloc()
        self._add_entry(parent, e.name, ino)
        self._count(e, first=True)
        self._xattrs(ino, e)
        if e.type is tf.FileType.REG:
            self._file(ino, e)
        elif e.type is tf.FileType.SYMLINK:
            self.writer.put(schema.ino_key(ino), e.target, self.store.symlinks)
            self._node(ino, e)
        else:
            self._node(ino, e)

    def _count(self, e: tf.Entry, first: bool) -> None:
        s = self.stats
        if e.type is tf.FileType.REG:
            s.files += 1
            if first:
                s.logical_bytes += e.size
        elif e.type is tf.FileType.SYMLINK:
            s.symlinks += 1
        else:
            s.others += 1
        if e.link_id:
            s.hard_links += 1

    def _node(self, ino: int, e: tf.Entry) -> None:
        """A symlink, FIFO or socket: written now, or at the end when hard-linked."""
        node = _File(ino, e)
        if e.link_id:
            self._links[e.link_id] = node
        else:
            self._put_inode(self._inode(ino, e, 1))

    def _file(self, ino: int, e: tf.Entry) -> None:
        f = _File(ino, e)
        if e.link_id:
            self._links[e.link_id] = f
        f.data_bytes = self._extents(ino, e.extents)
        if not e.extent_lists:
            if not e.link_id:
                self._put_file(f)
            return
        f.lists_left = len(e.extent_lists)
        self._lists[ino] = f
        for ref in e.extent_lists:
            self._request_list(ref, lambda extents: self._list_arrived(f, extents))

    def _list_arrived(self, f: _File, extents: list[Extent]) -> None:
        f.data_bytes += self._extents(f.ino, extents)
        f.lists_left -= 1
        if f.lists_left == 0:
            del self._lists[f.ino]
            if not f.entry.link_id:
                self._put_file(f)

    def _put_file(self, f: _File) -> None:
        inode = self._inode(f.ino, f.entry, f.nlink)
        inode.data_bytes = f.data_bytes
        self._put_inode(inode)

    def _extents(self, ino: int, extents: Sequence[Extent]) -> int:
        """Extent records, each one reference on its chunk; returns the bytes covered."""
        covered = 0
        prefix = schema.ino_key(ino)
        for x in extents:
            key = prefix + schema.pack_u64(x.file_off)
            self.writer.put(key, encode_extent(x.chunk_id, x.chunk_off, x.length), self._edb)
            self.refs[x.chunk_id] += 1
            covered += x.length
        self.stats.extents += len(extents)
        self.referenced_bytes += covered
        return covered

    @property
    def _edb(self) -> Any:
        return self.store.extents

    def _finish_links(self) -> None:
        """Hard-linked inodes, now that every name of each is known."""
        if self._lists:
            raise TierfsError(
                f"{len(self._lists)} files still wait for extent lists", ExitCode.INTERNAL
            )
        for f in self._links.values():
            if stat.S_ISREG(f.entry.st_mode):
                self._put_file(f)
            else:
                self._put_inode(self._inode(f.ino, f.entry, f.nlink))
