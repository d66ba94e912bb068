"""Building and walking a snapshot's Merkle tree from the metadata index.

`build_tree` walks the namespace from the root over a read-only view of the index
(`IndexView`; `open_view` gives one over an LMDB read transaction, usable in a worker thread)
and encodes each directory as a tree blob (`treeformat`), bottom-up, so that a directory's
blob names its subdirectories' ids. The root id names a root blob holding the root
directory's own attributes.

Reuse: each directory gets a *stamp*, a hash of what its blob is made from: for every entry
the name, the inode number, the inode record minus atime (so ctime, mtime, size, mode, owner,
link count, flags and the sealed byte count) and, for a subdirectory, that directory's own
stamp. Equal stamps mean an equal subtree, so a directory whose stamp is the one cached from
the previous build reuses that build's tree id without reading its xattrs or extents or
encoding anything. See docs/FORMAT.md, "Snapshot trees", for the rule and its limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import blake3

from tierfs.data.extents import Extent
from tierfs.errors import TierfsError
from tierfs.meta import schema
from tierfs.meta.records import Inode, decode_dirent, decode_extent, decode_staged
from tierfs.meta.store import MetaStore
from tierfs.snap import treeformat as tf

ContentId = Callable[[bytes], bytes]
Fetch = Callable[[bytes], bytes]
# {directory inode: (stamp, tree id)} of a build, handed to the next one.
TreeCache = Mapping[int, tuple[bytes, bytes]]

# Anything that changes what a tree id means for the same index state changes the stamps.
_POLICY = (tf.TREE_VERSION, tf.INLINE_MAX, tf.SPLIT_MIN, tf.SPLIT_MAX, tf.SPLIT_SHIFT)
STAMP_PREFIX = b"tierfs-tree-stamp/%d/%d/%d/%d/%d\0" % _POLICY
_U16 = struct.Struct(">H")


class TreeBuildError(TierfsError):
    """The index cannot be turned into a tree (unsealed data, or an inconsistent index)."""


class IndexView(Protocol):
    """What tree building reads from the index: one consistent, read-only state."""

    def inode(self, ino: int) -> Inode | None: ...

    def dirents(self, ino: int) -> Iterable[tuple[bytes, int]]:
        """(name, child inode) of a directory, in name (byte) order."""
        ...

    def xattrs(self, ino: int) -> Iterable[tuple[bytes, bytes]]:
        """(name, value) in name order."""
        ...

    def symlink(self, ino: int) -> bytes | None: ...

    def extents(self, ino: int) -> Iterable[Extent]:
        """The file's extents in file order."""
        ...

    def has_staged(self, ino: int) -> bool:
        """Whether the file has data not sealed yet (which no extent describes)."""
        ...


class LmdbIndexView:
    """An `IndexView` over one LMDB read transaction of a `MetaStore`'s environment."""

    def __init__(self, store: MetaStore, txn: Any) -> None:
        self.store = store
        self.txn = txn

    def inode(self, ino: int) -> Inode | None:
        raw = self.txn.get(schema.ino_key(ino), db=self.store.inodes)
        return None if raw is None else Inode.decode(ino, raw)

    def _prefixed(self, db: Any, ino: int) -> list[tuple[bytes, bytes]]:
        """(key minus the inode prefix, value) of every record of `ino` in `db`, in order."""
        prefix = schema.ino_key(ino)
        out = []
        with self.txn.cursor(db=db) as cur:
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    out.append((bytes(key[8:]), bytes(value)))
        return out

    def dirents(self, ino: int) -> list[tuple[bytes, int]]:
        return [(name, decode_dirent(v)[0]) for name, v in self._prefixed(self.store.dirents, ino)]

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        return self._prefixed(self.store.xattrs, ino)

    def symlink(self, ino: int) -> bytes | None:
        raw = self.txn.get(schema.ino_key(ino), db=self.store.symlinks)
        return None if raw is None else bytes(raw)

    def extents(self, ino: int) -> Iterator[Extent]:
        for key, value in self._prefixed(self.store.extents, ino):
            chunk_id, chunk_off, length = decode_extent(value)
            yield Extent(schema.unpack_u64(key), length, chunk_id, chunk_off)

    def has_staged(self, ino: int) -> bool:
        raw = self.txn.get(schema.ino_key(ino), db=self.store.staging)
        return bool(raw) and bool(decode_staged(bytes(raw))[1])


@contextlib.contextmanager
def open_view(store: MetaStore) -> Iterator[LmdbIndexView]:
    """A view of the last commit, for one thread at a time (a worker thread is fine)."""
    txn = store.read_view()
    try:
        yield LmdbIndexView(store, txn)
    finally:
        txn.abort()


@dataclasses.dataclass
class TreeStats:
    """What a snapshot holds (whole tree) and what building it cost (this build only).

    `files`, `dirs`, `symlinks`, `others` count entries (a file with two links counts twice);
    `logical_bytes` and `data_bytes` (bytes covered by extents) count each inode once.
    `extents` counts the extents encoded by this build: reused subtrees are not read.
    """

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    others: int = 0
    hard_links: int = 0
    logical_bytes: int = 0
    data_bytes: int = 0
    extents: int = 0
    trees_built: int = 0
    trees_reused: int = 0
    extent_lists_built: int = 0
    blobs_new: int = 0
    blob_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TreeResult:
    """The root id, the blobs this build made ({id: bytes}, empty when a sink took them),
    the cache for the next build, and statistics."""

    root_id: bytes
    blobs: dict[bytes, bytes]
    cache: dict[int, tuple[bytes, bytes]]
    stats: TreeStats


def build_tree(
    reader: IndexView,
    previous: TreeCache | None = None,
    *,
    content_id: ContentId,
    sink: Callable[[bytes, bytes], None] | None = None,
    paths: Sequence[bytes] | None = None,
) -> TreeResult:
    """Encode the namespace seen by `reader` as a Merkle tree (worker thread: CPU and I/O).

    `previous` is the `cache` of an earlier build of the same filesystem: directories whose
    stamp is unchanged reuse their tree id. `content_id` names blobs (the domain's keyed
    BLAKE3, `Chunker.content_id`). `sink(id, blob)`, when given, receives each new blob
    instead of `TreeResult.blobs`, so a large first snapshot need not sit in memory.
    Only pass the cache of a build whose blobs were stored: reused ids are not handed out
    again. Raises TreeBuildError for a file with unsealed data (seal before building).

    `paths` (relative, `/`-separated, without a leading slash; `b""` is the root) narrows the
    tree to those files and directories and the directories on their way from the root: the
    other entries of those directories are left out. Directories on the way are built anew
    every time and not cached (their blob depends on the paths); everything below a listed
    path is built and reused as usual.
    """
    return _Builder(reader, previous or {}, content_id, sink, paths).run()


@dataclasses.dataclass
class _Frame:
    """A directory being built: its entries, and the results of the subdirectories done."""

    ino: int
    path: bytes
    children: list[tuple[bytes, Inode]]
    partial: bool = False  # on the way to a listed path: some entries are left out
    pos: int = 0
    done: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)


class _Builder:
    def __init__(
        self,
        view: IndexView,
        previous: TreeCache,
        content_id: ContentId,
        sink: Callable[[bytes, bytes], None] | None,
        paths: Sequence[bytes] | None = None,
    ) -> None:
        self.view = view
        self.scope = _Scope(paths)
        self.previous = previous
        self.content_id = content_id
        self.sink = sink
        self.blobs: dict[bytes, bytes] = {}
        self.emitted: set[bytes] = set()
        self.cache: dict[int, tuple[bytes, bytes]] = {}
        self.stats = TreeStats()
        self.seen_dirs: set[int] = set()
        self.seen_links: set[int] = set()

    def run(self) -> TreeResult:
        root = self.view.inode(schema.ROOT_INO)
        if root is None or not root.is_dir:
            raise TreeBuildError("the index has no root directory; run tierfs fsck")
        self.stats.dirs += 1
        _, tree_id = self._walk(root.ino)
        root_blob = tf.encode_tree([self._entry(b"", b"", root, tree_id)], tf.KIND_ROOT)
        self.stats.trees_built += 1
        root_id = self._emit(root_blob)
        return TreeResult(root_id, self.blobs, self.cache, self.stats)

    def _walk(self, top: int) -> tuple[bytes, bytes]:
        """Post-order over the directories below `top`, without recursion (deep trees)."""
        stack = [self._open(top, b"")]
        while True:
            frame = stack[-1]
            if frame.pos < len(frame.children):
                name, child = frame.children[frame.pos]
                frame.pos += 1
                if child.is_dir:
                    stack.append(self._open(child.ino, _join(frame.path, name)))
                continue
            stack.pop()
            result = self._finish(frame)
            if not stack:
                return result
            stack[-1].done[frame.ino] = result

    def _open(self, ino: int, path: bytes) -> _Frame:
        """Read a directory's entries and their inodes (which the stamp needs anyway)."""
        if ino in self.seen_dirs:
            raise TreeBuildError(f"directory /{path.decode(errors='replace')} is reached twice")
        self.seen_dirs.add(ino)
        partial = self.scope.partial(path)
        children = []
        for name, child_ino in self.view.dirents(ino):
            if partial and not self.scope.wanted(_join(path, name)):
                continue
            child = self.view.inode(child_ino)
            if child is None:
                where = _join(path, name).decode(errors="replace")
                raise TreeBuildError(f"/{where}: no inode {child_ino}; run tierfs fsck")
            self._count(child)
            children.append((name, child))
        return _Frame(ino, path, children, partial)

    def _count(self, inode: Inode) -> None:
        kind = tf.FileType.of_mode(inode.mode)
        s = self.stats
        if kind is tf.FileType.DIR:
            s.dirs += 1
            return
        if kind is tf.FileType.SYMLINK:
            s.symlinks += 1
        elif kind is tf.FileType.REG:
            s.files += 1
        else:
            s.others += 1
        if inode.nlink > 1:
            s.hard_links += 1
            if inode.ino in self.seen_links:
                return
            self.seen_links.add(inode.ino)
        if kind is tf.FileType.REG:
            s.logical_bytes += inode.size
            s.data_bytes += inode.data_bytes

    def _finish(self, frame: _Frame) -> tuple[bytes, bytes]:
        """The directory's (stamp, tree id): reused when the stamp is the cached one."""
        stamp = self._stamp(frame)
        cached = None if frame.partial else self.previous.get(frame.ino)
        if cached is not None and cached[0] == stamp:
            tree_id = cached[1]
            self.stats.trees_reused += 1
        else:
            entries = [
                self._entry(frame.path, name, child, frame.done.get(child.ino, (b"", b""))[1])
                for name, child in frame.children
            ]
            tree_id = self._emit(tf.encode_tree(entries, tf.KIND_DIR))
            self.stats.trees_built += 1
        if not frame.partial:
            self.cache[frame.ino] = (stamp, tree_id)
        return stamp, tree_id

    def _stamp(self, frame: _Frame) -> bytes:
        """Hash of everything the directory's blob is made from, subdirectories included.

        The inode record stands for the entry's xattrs, target and extents: every change to
        them sets ctime (xattrs, writes, truncations) or data_bytes (sealing). atime and the
        directory's parent field are left out.
        """
        h = blake3.blake3(STAMP_PREFIX)
        for name, c in frame.children:
            record = dataclasses.replace(c, atime_ns=0, parent=0).encode()
            h.update(_U16.pack(len(name)) + name + schema.pack_u64(c.ino) + record)
            if c.is_dir:
                h.update(frame.done[c.ino][0])
        return h.digest()

    def _entry(self, path: bytes, name: bytes, inode: Inode, tree_id: bytes) -> tf.Entry:
        """The full entry of one child: attributes, xattrs and its type's payload."""
        kind = tf.FileType.of_mode(inode.mode)
        entry = tf.Entry(
            name=name,
            type=kind,
            mode=inode.mode & 0o7777,
            uid=inode.uid,
            gid=inode.gid,
            mtime_ns=inode.mtime_ns,
            ctime_ns=inode.ctime_ns,
            size=inode.size,
            rdev=inode.rdev,
            link_id=inode.ino if kind is not tf.FileType.DIR and inode.nlink > 1 else 0,
            xattrs=tuple(self.view.xattrs(inode.ino)),
        )
        if kind is tf.FileType.DIR:
            return dataclasses.replace(entry, tree_id=tree_id)
        if kind is tf.FileType.SYMLINK:
            target = self.view.symlink(inode.ino)
            if target is None:
                raise TreeBuildError(f"/{_show(path, name)}: symlink without a target")
            return dataclasses.replace(entry, target=target)
        if kind is tf.FileType.REG:
            return self._file(entry, path, inode)
        return entry

    def _file(self, entry: tf.Entry, path: bytes, inode: Inode) -> tf.Entry:
        """A regular file's extents: inline when few, else in extent-list blobs."""
        if self.view.has_staged(inode.ino):
            raise TreeBuildError(
                f"/{_show(path, entry.name)}: file has unsealed data; seal before building a tree"
            )
        extents = _clip(self.view.extents(inode.ino), inode.size)
        self.stats.extents += len(extents)
        if len(extents) <= tf.INLINE_MAX:
            return dataclasses.replace(entry, extents=tuple(extents))
        refs = []
        for a, b in tf.split_extents(extents):
            run = extents[a:b]
            blob_id = self._emit(tf.encode_extent_list(run))
            self.stats.extent_lists_built += 1
            start = run[0].file_off
            refs.append(tf.ExtentListRef(start, run[-1].end - start, b - a, blob_id))
        return dataclasses.replace(entry, extent_lists=tuple(refs))

    def _emit(self, blob: bytes) -> bytes:
        """Name a blob by its content id; hand each distinct one out once."""
        blob_id = self.content_id(blob)
        if blob_id not in self.emitted:
            self.emitted.add(blob_id)
            self.stats.blobs_new += 1
            self.stats.blob_bytes += len(blob)
            if self.sink is not None:
                self.sink(blob_id, blob)
            else:
                self.blobs[blob_id] = blob
        return blob_id


class _Scope:
    """Which entries a build keeps: everything, or the listed paths and their ancestors."""

    def __init__(self, paths: Sequence[bytes] | None) -> None:
        listed = [p.strip(b"/") for p in paths] if paths is not None else [b""]
        self.whole = b"" in listed
        self.listed = set(listed)
        self.on_the_way = {p[:i] for p in listed for i in range(len(p)) if p[i : i + 1] == b"/"}

    def partial(self, path: bytes) -> bool:
        """Whether the directory at `path` is kept only in part (it lies above a listed path)."""
        if self.whole or path in self.listed:
            return False
        return not any(path.startswith(p + b"/") for p in self.listed)

    def wanted(self, path: bytes) -> bool:
        """Whether an entry of a partial directory is kept: listed, or above a listed path."""
        return path in self.listed or path in self.on_the_way


def _clip(extents: Iterable[Extent], size: int) -> list[Extent]:
    """Extents cut at the file's size: bytes past the size are not part of the file.

    (The index keeps extents within the size; this makes the tree exact even if it did not.)
    """
    out = []
    for x in extents:
        if x.file_off >= size:
            break
        if x.end > size:
            x = Extent(x.file_off, size - x.file_off, x.chunk_id, x.chunk_off)
        out.append(x)
    return out


def _join(path: bytes, name: bytes) -> bytes:
    return path + b"/" + name if path else name


def _show(path: bytes, name: bytes) -> str:
    return _join(path, name).decode(errors="replace")


# -- reading trees back -------------------------------------------------------------------------


def _fetch_checked(fetch: Fetch, blob_id: bytes, content_id: ContentId | None) -> bytes:
    """Fetch a blob; with `content_id`, refuse one that is not what its id names."""
    blob = fetch(blob_id)
    if content_id is not None and content_id(blob) != blob_id:
        raise tf.TreeFormatError(f"blob {blob_id.hex()} does not match its id")
    return blob


def walk(
    fetch: Fetch, root_id: bytes, content_id: ContentId | None = None
) -> Iterator[tuple[bytes, tf.Entry]]:
    """(path, entry) of every entry, depth first, parents before children, names in order.

    The root comes first with path b"" (its entry holds the root directory's attributes).
    `fetch(id)` returns a blob's bytes; give `content_id` to check every blob against its
    id, which makes the whole tree as trustworthy as the root id (a signed manifest's).
    """
    root = tf.decode_tree(_fetch_checked(fetch, root_id, content_id), tf.KIND_ROOT)[0]
    yield b"", root
    ancestors = {root.tree_id}
    stack: list[tuple[bytes, bytes, Iterator[tf.Entry]]] = []
    stack.append((b"", root.tree_id, iter(_children(fetch, root.tree_id, content_id))))
    while stack:
        path, tree_id, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            ancestors.discard(tree_id)
            continue
        child_path = _join(path, entry.name)
        yield child_path, entry
        if entry.type is tf.FileType.DIR:
            if entry.tree_id in ancestors:
                raise tf.TreeFormatError(f"tree {entry.tree_id.hex()} contains itself")
            ancestors.add(entry.tree_id)
            children = _children(fetch, entry.tree_id, content_id)
            stack.append((child_path, entry.tree_id, iter(children)))


def _children(fetch: Fetch, tree_id: bytes, content_id: ContentId | None) -> list[tf.Entry]:
    return tf.decode_tree(_fetch_checked(fetch, tree_id, content_id), tf.KIND_DIR)


def file_bytes(fetch: Fetch, entry: tf.Entry, content_id: ContentId | None = None) -> bytes:
    """A regular file's whole content from its tree entry, holes as zeros; `fetch` gives
    plaintext by id, for extent-list blobs and data chunks alike."""
    out = bytearray(entry.size)
    for x in file_extents(fetch, entry, content_id):
        chunk = fetch(x.chunk_id)
        out[x.file_off : x.end] = chunk[x.chunk_off : x.chunk_off + x.length]
    return bytes(out)


def file_extents(
    fetch: Fetch, entry: tf.Entry, content_id: ContentId | None = None
) -> Iterator[Extent]:
    """A regular file's extents in file order, fetching its extent-list blobs as needed."""
    yield from entry.extents
    for ref in entry.extent_lists:
        extents = tf.decode_extent_list(_fetch_checked(fetch, ref.blob_id, content_id), ref.start)
        tf.check_ref(ref, extents)
        yield from extents
