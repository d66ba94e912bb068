"""A read-only point-in-time view of a snapshot tree, as FUSE answers.

`SnapshotView` turns a snapshot's Merkle tree (its root blob id, and an async `fetch(id)`
giving the verified plaintext of a tree blob, an extent-list blob or a data chunk) into what
a pyfuse3 `Operations` needs: attributes, lookups, directory listings, symlink targets, file
bytes and xattrs. It is used twice: for `.snapshots/<id>/` inside the live mount
(`tierfs.restore.snapdir`, fetch = the daemon's `FileReader.load_chunk`) and for
`tierfs restore mount` (`tierfs.restore.viewmount`, fetch = `Source.fetch` in a worker
thread).

Nothing is read ahead of need: a lookup fetches the directory blobs on its path, a read
fetches the extent-list blobs and the chunks it touches. Decoded directory blobs, decoded
extent lists and (optionally) chunk plaintext are kept in small byte-bounded LRU caches, each
loaded once however many requests wait for it.

**Inode numbers.** A view owns the range `[base, base + VIEW_SPAN)`; its root gets `root_ino`
(`base` unless the caller says otherwise: a standalone mount's root must be FUSE's 1), every
other entry the next free number of the range when it is first looked up or listed. Numbers
are never reused within a mount. An entry keeps its number while the kernel holds a reference
to it; a hard-linked file (non-zero `link_id` in the tree) keeps it for the whole mount, and
every name of it gets the same number, so `rsync -H`, `du` and `find` see one file. The tree
records no link count: a hard-linked file reports 2 links ("at least two"), other files 1,
and directories 1 (the convention of filesystems that do not count subdirectories, which makes
`find` skip its leaf optimisation).

Everything here raises `FsError` (an errno); the pyfuse3 layer turns it into `FUSEError`.
Every change is refused with `EROFS`.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Generic, TypeVar

import pyfuse3
import trio

from tierfs.data.extents import Extent
from tierfs.errors import TierfsError
from tierfs.fs.namespace import FsError
from tierfs.snap import treeformat as tf

log = logging.getLogger(__name__)

Blob = bytes | memoryview
AsyncFetch = Callable[[bytes], Awaitable[Blob]]
Listed = tuple[bytes, pyfuse3.EntryAttributes, int]  # a readdir entry: name, attributes, cookie

VIEW_SPAN = 1 << 40  # inode numbers per view
BLOCK_SIZE = 4096
DECODE_IN_THREAD = 256 << 10  # blobs larger than this are decoded in a worker thread
DIR_CACHE_BYTES = 16 << 20
EXTENT_CACHE_BYTES = 16 << 20
PREFETCH_BYTES = 4 << 20  # read ahead of a sequential reader (needs `nursery`)
PREFETCH_MAX_TASKS = 16
READERS_TRACKED = 1024
IMMUTABLE_TIMEOUT = 3600.0  # a snapshot never changes: the kernel may cache its answers
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

K = TypeVar("K")
V = TypeVar("V")


class LoadOnce(Generic[K, V]):
    """A byte-bounded LRU whose misses are loaded once, however many tasks wait for them.

    `max_bytes` 0 keeps nothing (loads are still shared while in flight).
    """

    def __init__(self, max_bytes: int, load: Callable[[K], Awaitable[tuple[V, int]]]) -> None:
        self.max_bytes = max_bytes
        self._load = load
        self._items: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()
        self._loading: dict[K, trio.Event] = {}
        self.bytes = 0

    async def get(self, key: K) -> V:
        while True:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
            pending = self._loading.get(key)
            if pending is None:
                break
            await pending.wait()
            if self.max_bytes == 0:
                break  # nothing was kept: load it again ourselves
        event = self._loading[key] = trio.Event()
        try:
            value, size = await self._load(key)
        finally:
            del self._loading[key]
            event.set()
        self._keep(key, value, size)
        return value

    def _keep(self, key: K, value: V, size: int) -> None:
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old


@dataclasses.dataclass(frozen=True)
class _Dir:
    """A decoded directory blob: names in order (for readdir offsets) and entries by name."""

    names: list[bytes]
    entries: dict[bytes, tf.Entry]


@dataclasses.dataclass(slots=True)
class _Node:
    """An entry the kernel knows by inode number; its attributes live in `home`'s blob.

    `home` is the tree id of the directory blob that holds the entry (b"" for the root,
    whose entry is the root blob's), so a node costs a few dozen bytes, not its extents.
    """

    parent: int
    name: bytes
    home: bytes
    link_id: int
    lookups: int = 0


class SnapshotView:
    """FUSE answers for one snapshot tree; see the module docstring."""

    def __init__(
        self,
        root_id: bytes,
        fetch: AsyncFetch,
        *,
        base: int,
        root_ino: int | None = None,
        root_parent: int | None = None,
        label: str = "",
        chunk_cache_bytes: int = 0,
        timeout: float = IMMUTABLE_TIMEOUT,
    ) -> None:
        self.root_id = root_id
        self.fetch = fetch
        self.base = base
        self.root_ino = base if root_ino is None else root_ino
        self.root_parent = self.root_ino if root_parent is None else root_parent
        self.label = label or root_id.hex()[:16]
        self.timeout = timeout
        self.root_entry: tf.Entry | None = None
        self.nodes: dict[int, _Node] = {self.root_ino: _Node(self.root_parent, b"", b"", 0)}
        self._by_name: dict[tuple[int, bytes], int] = {}
        self._by_link: dict[int, int] = {}
        self._next = base + 1
        self._dirs: LoadOnce[bytes, _Dir] = LoadOnce(DIR_CACHE_BYTES, self._load_dir)
        self._lists: LoadOnce[tuple[bytes, int], list[Extent]] = LoadOnce(
            EXTENT_CACHE_BYTES, self._load_list
        )
        self._chunks: LoadOnce[bytes, Blob] = LoadOnce(chunk_cache_bytes, self._load_chunk)
        self._root_lock = trio.Lock()
        self.nursery: trio.Nursery | None = None  # set by the owner: enables read-ahead
        self._last_end: dict[int, int] = {}  # inode -> where its last read ended
        self._prefetching: set[bytes] = set()

    # -- inode numbers

    def owns(self, ino: int) -> bool:
        return ino == self.root_ino or self.base <= ino < self.base + VIEW_SPAN

    @property
    def lookups(self) -> int:
        """References the kernel holds on this view's inodes (0: the view can be dropped)."""
        return sum(n.lookups for n in self.nodes.values())

    def _node(self, ino: int) -> _Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def _child_ino(self, parent: int, home: bytes, entry: tf.Entry) -> int:
        """The inode number of `entry` (in `parent`'s blob `home`), allocated on first sight."""
        key = (parent, entry.name)
        ino = self._by_name.get(key)
        if ino is not None:
            return ino
        if entry.link_id:
            ino = self._by_link.get(entry.link_id)
        if ino is None:
            ino = self._next
            if ino >= self.base + VIEW_SPAN:
                log.error("snapshot view %s: out of inode numbers", self.label)
                raise FsError(errno.ENOSPC)
            self._next += 1
            self.nodes[ino] = _Node(parent, entry.name, home, entry.link_id)
            if entry.link_id:
                self._by_link[entry.link_id] = ino
        self._by_name[key] = ino
        return ino

    def add_lookup(self, ino: int, n: int = 1) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.lookups += n

    def forget(self, ino: int, n: int) -> None:
        """Drop a node the kernel no longer references; hard links and the root stay.

        `n` 0 drops a node allocated for a listing entry the kernel did not take."""
        node = self.nodes.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - n)
        if node.lookups or ino == self.root_ino or node.link_id:
            return
        del self.nodes[ino]
        key = (node.parent, node.name)
        if self._by_name.get(key) == ino:
            del self._by_name[key]

    # -- loading blobs

    async def _fetch(self, blob_id: bytes, what: str) -> Blob:
        """Plaintext of a blob or chunk; a failure is an EIO (logged with its context)."""
        try:
            return await self.fetch(blob_id)
        except FsError as exc:
            log.error(
                "snapshot %s: %s %s unreadable: errno %d",
                self.label,
                what,
                blob_id.hex()[:16],
                exc.errno,
            )
            raise FsError(errno.EIO) from None
        except (TierfsError, OSError) as exc:
            log.error(
                "snapshot %s: %s %s unreadable: %s", self.label, what, blob_id.hex()[:16], exc
            )
            raise FsError(errno.EIO) from None

    async def _decode(self, fn: Callable[[bytes], V], blob: Blob) -> V:
        """Decode a blob; a large one in a worker thread, so the FUSE loop keeps serving."""
        try:
            if len(blob) > DECODE_IN_THREAD:
                return await trio.to_thread.run_sync(fn, bytes(blob))
            return fn(bytes(blob))
        except tf.TreeFormatError as exc:
            log.error("snapshot %s: damaged blob: %s", self.label, exc)
            raise FsError(errno.EIO) from None

    async def _load_dir(self, tree_id: bytes) -> tuple[_Dir, int]:
        blob = await self._fetch(tree_id, "directory")
        entries = await self._decode(lambda b: tf.decode_tree(b, tf.KIND_DIR), blob)
        return _Dir([e.name for e in entries], {e.name: e for e in entries}), len(blob)

    async def _load_list(self, key: tuple[bytes, int]) -> tuple[list[Extent], int]:
        blob = await self._fetch(key[0], "extent list")
        extents = await self._decode(lambda b: tf.decode_extent_list(b, key[1]), blob)
        return extents, len(blob)

    async def _load_chunk(self, chunk_id: bytes) -> tuple[Blob, int]:
        data = await self._fetch(chunk_id, "chunk")
        return data, len(data)

    async def root(self) -> tf.Entry:
        """The root directory's entry, from the root blob (fetched once)."""
        async with self._root_lock:
            if self.root_entry is None:
                blob = await self._fetch(self.root_id, "root blob")
                entries = await self._decode(lambda b: tf.decode_tree(b, tf.KIND_ROOT), blob)
                self.root_entry = entries[0]
            return self.root_entry

    async def entry(self, ino: int) -> tf.Entry:
        node = self._node(ino)
        if ino == self.root_ino:
            return await self.root()
        found = (await self._dirs.get(node.home)).entries.get(node.name)
        if found is None:  # cannot happen with a consistent tree
            raise FsError(errno.ESTALE)
        return found

    async def _dir_of(self, ino: int) -> tuple[tf.Entry, _Dir]:
        entry = await self.entry(ino)
        if entry.type is not tf.FileType.DIR:
            raise FsError(errno.ENOTDIR)
        return entry, await self._dirs.get(entry.tree_id)

    # -- attributes and names

    def attrs(self, ino: int, entry: tf.Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = pyfuse3.ModeT(entry.st_mode)
        a.st_nlink = 2 if entry.link_id else 1
        a.st_uid = entry.uid
        a.st_gid = entry.gid
        a.st_rdev = entry.rdev
        a.st_size = entry.size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (_data_bytes(entry) + 511) // 512
        a.st_atime_ns = entry.mtime_ns  # the tree keeps no access time
        a.st_mtime_ns = entry.mtime_ns
        a.st_ctime_ns = entry.ctime_ns
        return a

    async def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        return self.attrs(ino, await self.entry(ino))

    async def lookup_or_negative(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        """`lookup`, but a missing name is a negative entry the kernel may keep as long as
        any other answer (the tree never changes), instead of an ENOENT asked again."""
        try:
            return await self.lookup(parent, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT or name == b"..":
                raise
        negative = pyfuse3.EntryAttributes()
        negative.st_ino = pyfuse3.InodeT(0)
        negative.entry_timeout = self.timeout
        return negative

    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        """The child's attributes, counting one kernel reference; ENOENT if absent."""
        node = self._node(parent)
        if name == b".":
            ino = parent
        elif name == b"..":
            ino = node.parent
            if not self.owns(ino):
                raise FsError(errno.ENOENT)  # above the view: the caller answers
        else:
            entry, directory = await self._dir_of(parent)
            child = directory.entries.get(name)
            if child is None:
                raise FsError(errno.ENOENT)
            ino = self._child_ino(parent, entry.tree_id, child)
            self.add_lookup(ino)
            return self.attrs(ino, child)
        attrs = await self.getattr(ino)
        self.add_lookup(ino)
        return attrs

    async def readdir(self, ino: int, start: int) -> Iterator[Listed]:
        """(name, attributes, cookie) after cookie `start`; the cookie is the position + 1.

        Lazy: an entry gets its inode number only when the caller takes it, since the kernel
        takes a few dozen per request. The caller counts a lookup (`add_lookup`) for each
        entry the kernel accepts, and calls `forget(ino, 0)` for one it refused.
        """
        entry, directory = await self._dir_of(ino)

        def listing() -> Iterator[Listed]:
            for i in range(start, len(directory.names)):
                child = directory.entries[directory.names[i]]
                child_ino = self._child_ino(ino, entry.tree_id, child)
                yield child.name, self.attrs(child_ino, child), i + 1

        return listing()

    async def opendir(self, ino: int) -> None:
        await self._dir_of(ino)

    async def readlink(self, ino: int) -> bytes:
        entry = await self.entry(ino)
        if entry.type is not tf.FileType.SYMLINK:
            raise FsError(errno.EINVAL)
        return entry.target

    # -- xattrs

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        for key, value in (await self.entry(ino)).xattrs:
            if key == name:
                return value
        raise FsError(errno.ENODATA)

    async def listxattr(self, ino: int) -> list[bytes]:
        return [key for key, _ in (await self.entry(ino)).xattrs]

    # -- file data

    async def open(self, ino: int, flags: int) -> None:
        """Check that a handle may be opened: read-only, on a regular file."""
        if is_write_open(flags):
            raise FsError(errno.EROFS)
        entry = await self.entry(ino)
        if entry.type is tf.FileType.DIR:
            raise FsError(errno.EISDIR)

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        """[offset, offset+size) of a file: its extents' bytes, zeros for holes.

        Only the extent-list blobs and chunks this range touches are fetched, all at once.
        """
        entry = await self.entry(ino)
        if entry.type is not tf.FileType.REG:
            raise FsError(errno.EINVAL)
        end = min(entry.size, offset + size)
        if offset >= end:
            return b""
        extents = await self._extents_between(entry, offset, end)
        self._read_ahead(ino, entry, offset, end)
        chunks: dict[bytes, Blob] = {}

        async def load(chunk_id: bytes) -> None:
            chunks[chunk_id] = await self._chunks.get(chunk_id)

        async with trio.open_nursery() as nursery:
            for chunk_id in dict.fromkeys(x.chunk_id for x in extents):
                nursery.start_soon(load, chunk_id)
        buf = bytearray(end - offset)
        for x in extents:
            lo, hi = max(offset, x.file_off), min(end, x.end)
            data = memoryview(chunks[x.chunk_id])
            src = x.chunk_off + lo - x.file_off
            if src + hi - lo > len(data):
                log.error(
                    "snapshot %s: chunk %s shorter than its extent",
                    self.label,
                    x.chunk_id.hex()[:16],
                )
                raise FsError(errno.EIO)
            buf[lo - offset : hi - offset] = data[src : src + hi - lo]
        return buf

    def _read_ahead(self, ino: int, entry: tf.Entry, offset: int, end: int) -> None:
        """For a read that starts where the last one of the file ended, start loading the
        chunks of the next `PREFETCH_BYTES` in the background, so that a sequential reader
        over a slow store waits for one round trip, not one per chunk."""
        sequential = self._last_end.pop(ino, None) == offset
        self._last_end[ino] = end
        if len(self._last_end) > READERS_TRACKED:
            del self._last_end[next(iter(self._last_end))]
        if not sequential or self.nursery is None or end >= entry.size:
            return
        if len(self._prefetching) < PREFETCH_MAX_TASKS:
            self.nursery.start_soon(self._prefetch, entry, end, end + PREFETCH_BYTES)

    async def _prefetch(self, entry: tf.Entry, start: int, end: int) -> None:
        """Load chunks ahead of a reader; failures are left to the read that needs them."""
        try:
            for x in await self._extents_between(entry, start, end):
                if x.chunk_id in self._prefetching:
                    continue
                if len(self._prefetching) >= PREFETCH_MAX_TASKS:
                    return
                self._prefetching.add(x.chunk_id)
                try:
                    await self._chunks.get(x.chunk_id)
                finally:
                    self._prefetching.discard(x.chunk_id)
        except FsError:
            return
        except Exception:
            log.exception("snapshot %s: read-ahead failed", self.label)

    async def _extents_between(self, entry: tf.Entry, start: int, end: int) -> list[Extent]:
        """The file's extents that overlap [start, end), fetching only the lists needed."""
        if not entry.extent_lists:
            return _overlapping(entry.extents, start, end)
        refs = entry.extent_lists
        first = max(0, bisect.bisect_right([r.start for r in refs], start) - 1)
        out: list[Extent] = []
        for ref in refs[first:]:
            if ref.start >= end:
                break
            if ref.end <= start:
                continue
            extents = await self._lists.get((ref.blob_id, ref.start))
            try:
                tf.check_ref(ref, extents)
            except tf.TreeFormatError as exc:
                log.error("snapshot %s: %s", self.label, exc)
                raise FsError(errno.EIO) from None
            out += _overlapping(extents, start, end)
        return out

    # -- the filesystem

    @staticmethod
    def statfs() -> pyfuse3.StatvfsData:
        """A read-only filesystem: no free blocks or inodes to offer."""
        out = pyfuse3.StatvfsData()
        out.f_bsize = BLOCK_SIZE
        out.f_frsize = BLOCK_SIZE
        out.f_blocks = out.f_bfree = out.f_bavail = 0
        out.f_files = out.f_ffree = out.f_favail = 0
        out.f_namemax = tf.NAME_MAX
        return out


def _overlapping(extents: Sequence[Extent], start: int, end: int) -> list[Extent]:
    """The extents (in file order, not overlapping) that overlap [start, end)."""
    i = max(0, bisect.bisect_right([x.file_off for x in extents], start) - 1)
    out = []
    for x in extents[i:]:
        if x.file_off >= end:
            break
        if x.end > start:
            out.append(x)
    return out


def _data_bytes(entry: tf.Entry) -> int:
    """Bytes the file's extents cover (for st_blocks): exact inline, the lists' spans else."""
    if entry.extent_lists:
        return sum(r.span for r in entry.extent_lists)
    return sum(x.length for x in entry.extents)


def is_write_open(flags: int) -> bool:
    """Whether open(2) flags ask for anything but reading."""
    return bool(flags & WRITE_FLAGS) or flags & os.O_ACCMODE != os.O_RDONLY
