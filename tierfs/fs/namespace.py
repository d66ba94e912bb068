"""Namespace and file operations on the metadata index and staging, free of pyfuse3 types.

Every public method is synchronous and runs on the trio thread: it reads the group
transaction and applies its changes in one `store.op()` child transaction, so it is atomic
and a failure (`FsError`) leaves nothing behind. Errors are errno values; the pyfuse3 layer
(`operations.py`) turns them into `FUSEError`.

Inode lifetime: an inode is deleted when its link count is 0, the kernel holds no lookup
reference to it and no handle is open. An inode whose last link goes while it is still in use
is recorded in DB_ORPHANS so that a crash cannot leak it: mount removes every orphan.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import re
import stat
import time
from collections.abc import Iterator
from typing import Any

from tierfs.crashpoints import crash_point
from tierfs.data.extents import ExtentMap
from tierfs.fs.ranges import RangeSet
from tierfs.fs.staging import Staging
from tierfs.meta import schema
from tierfs.meta.records import (
    FLAG_FIXED_CHUNKING,
    Inode,
    decode_dirent,
    decode_staged,
    encode_dirent,
    encode_staged,
)
from tierfs.meta.store import MetaStore

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_DAY_NS = 86400 * 10**9
MAX_OFFSET = 1 << 63


class FsError(Exception):
    """A filesystem operation failed with `errno` (mapped to FUSEError at the boundary)."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


class Namespace:
    """The filesystem's state machine over the metadata index and staging."""

    def __init__(
        self,
        store: MetaStore,
        staging: Staging,
        extents: ExtentMap,
        atime: str = "relatime",
        fixed_patterns: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.staging = staging
        self.extents = extents
        self.update_atime = atime == "relatime"
        self.fixed_patterns = fixed_patterns
        self._fixed_re = re.compile(
            "|".join(fnmatch.translate(p) for p in fixed_patterns) or "(?!)"
        )
        self.lookups: dict[int, int] = {}
        self.opens: dict[int, int] = {}
        self.closed_at: dict[int, float] = {}

    # -- inode access

    def inode(self, ino: int, tx: Any = None) -> Inode:
        inode = self.store.get_inode(ino, tx)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    def data_bytes(self, inode: Inode) -> int:
        """Bytes of data the file holds (for st_blocks): sealed plus staged, holes excluded."""
        if not inode.is_reg:
            return 0
        return inode.data_bytes + self.staged_ranges(inode.ino).total()

    def staged_ranges(self, ino: int, tx: Any = None) -> RangeSet:
        """The inode's staged ranges; loaded from the index the first time they are needed.

        A file with nothing staged gets a fresh empty set that is not kept, so that stat()ing
        many files does not grow the in-memory table. Inside an operation pass its `tx`:
        LMDB forbids reading a transaction that has an open child.
        """
        ranges = self.staging.ranges.get(ino)
        if ranges is None:
            raw = (tx or self.store.tx).get(schema.ino_key(ino), db=self.store.staging)
            if not raw:
                return RangeSet()
            generation, pairs = decode_staged(bytes(raw))
            ranges = self.staging.ranges[ino] = RangeSet(pairs)
            if generation:
                self.staging.generation[ino] = generation
        return ranges

    def chunking_flags(self, name: bytes) -> int:
        """FLAG_FIXED_CHUNKING for names matching `seal.fixed_chunking_patterns`."""
        text = name.decode(errors="replace")
        return FLAG_FIXED_CHUNKING if self._fixed_re.match(text) else 0

    # -- lookup

    def child_ino(self, parent: int, name: bytes, tx: Any = None) -> int | None:
        raw = (tx or self.store.tx).get(schema.dirent_key(parent, name), db=self.store.dirents)
        return None if raw is None else decode_dirent(raw)[0]

    def lookup(self, parent: int, name: bytes) -> Inode:
        dir_inode = self.inode(parent)
        if not dir_inode.is_dir:
            raise FsError(errno.ENOTDIR)
        if name == b".":
            inode = dir_inode
        elif name == b"..":
            inode = self.inode(dir_inode.parent)
        else:
            _check_name(name)
            child = self.child_ino(parent, name)
            if child is None:
                raise FsError(errno.ENOENT)
            inode = self.inode(child)
        self.add_lookup(inode.ino)
        return inode

    def add_lookup(self, ino: int, n: int = 1) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + n

    def forget(self, ino: int, n: int) -> None:
        left = self.lookups.get(ino, 0) - n
        if left > 0:
            self.lookups[ino] = left
            return
        self.lookups.pop(ino, None)
        if ino not in self.opens:
            ranges = self.staging.ranges.get(ino)
            if ranges is not None and not ranges and ino not in self.staging.changed:
                del self.staging.ranges[ino]
            self._delete_if_unused(ino)

    # -- creating entries

    def create_node(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        """mknod/mkdir/symlink/create: a new inode linked at parent/name."""
        _check_name(name)
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EPERM)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK):
            raise FsError(errno.EINVAL)
        with self.store.op() as tx:
            dir_inode = self._dir_for_change(parent, tx)
            if self.child_ino(parent, name, tx) is not None:
                raise FsError(errno.EEXIST)
            now = time.time_ns()
            ino = self.store.next_counter(tx, schema.K_NEXT_INO)
            is_dir = kind == stat.S_IFDIR
            if is_dir and dir_inode.mode & stat.S_ISGID:
                mode |= stat.S_ISGID
            if dir_inode.mode & stat.S_ISGID:
                gid = dir_inode.gid
            inode = Inode(
                ino,
                mode,
                uid,
                gid,
                2 if is_dir else 1,
                0,
                now,
                now,
                now,
                rdev,
                parent if is_dir else 0,
                self.chunking_flags(name) if kind == stat.S_IFREG else 0,
            )
            if target is not None:
                inode.size = len(target)
                tx.put(schema.ino_key(ino), target, db=self.store.symlinks)
            self.store.put_inode(tx, inode)
            self._add_entry(tx, parent, name, ino)
            if is_dir:
                dir_inode.nlink += 1
            dir_inode.mtime_ns = dir_inode.ctime_ns = now
            self.store.put_inode(tx, dir_inode)
        self.add_lookup(ino)
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        _check_name(name)
        with self.store.op() as tx:
            inode = self.inode(ino, tx)
            if inode.is_dir:
                raise FsError(errno.EPERM)
            dir_inode = self._dir_for_change(parent, tx)
            if self.child_ino(parent, name, tx) is not None:
                raise FsError(errno.EEXIST)
            now = time.time_ns()
            if inode.nlink == 0:
                tx.delete(schema.ino_key(ino), db=self.store.orphans)
            inode.nlink += 1
            inode.ctime_ns = now
            self.store.put_inode(tx, inode)
            self._add_entry(tx, parent, name, ino)
            dir_inode.mtime_ns = dir_inode.ctime_ns = now
            self.store.put_inode(tx, dir_inode)
        self.add_lookup(ino)
        return inode

    def readlink(self, ino: int) -> bytes:
        target = self.store.tx.get(schema.ino_key(ino), db=self.store.symlinks)
        if target is None:
            raise FsError(errno.EINVAL)
        return bytes(target)

    # -- removing entries

    def unlink(self, parent: int, name: bytes) -> None:
        _check_name(name)
        with self.store.op() as tx:
            dir_inode = self._dir_for_change(parent, tx)
            child = self.child_ino(parent, name, tx)
            if child is None:
                raise FsError(errno.ENOENT)
            inode = self.inode(child, tx)
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            now = time.time_ns()
            self._remove_entry(tx, parent, name)
            self._drop_link(tx, inode, now)
            dir_inode.mtime_ns = dir_inode.ctime_ns = now
            self.store.put_inode(tx, dir_inode)
        if child in self.opens:
            crash_point("unlink-open-after")
        self._delete_if_unused(child)

    def rmdir(self, parent: int, name: bytes) -> None:
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        _check_name(name)
        with self.store.op() as tx:
            dir_inode = self._dir_for_change(parent, tx)
            child = self.child_ino(parent, name, tx)
            if child is None:
                raise FsError(errno.ENOENT)
            inode = self.inode(child, tx)
            if not inode.is_dir:
                raise FsError(errno.ENOTDIR)
            if not self._is_empty(tx, child):
                raise FsError(errno.ENOTEMPTY)
            now = time.time_ns()
            self._remove_entry(tx, parent, name)
            inode.nlink = 0
            inode.ctime_ns = now
            self._orphan_or_delete(tx, inode)
            dir_inode.nlink -= 1
            dir_inode.mtime_ns = dir_inode.ctime_ns = now
            self.store.put_inode(tx, dir_inode)
        self._delete_if_unused(child)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        _check_name(old_name)
        _check_name(new_name)
        if (
            flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)
            or flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL)
        replaced: int | None = None
        with self.store.op() as tx:
            src_dir = self._dir_for_change(old_parent, tx)
            dst_dir = src_dir if new_parent == old_parent else self._dir_for_change(new_parent, tx)
            src_ino = self.child_ino(old_parent, old_name, tx)
            if src_ino is None:
                raise FsError(errno.ENOENT)
            dst_ino = self.child_ino(new_parent, new_name, tx)
            src = self.inode(src_ino, tx)
            now = time.time_ns()
            if flags & RENAME_EXCHANGE:
                if dst_ino is None:
                    raise FsError(errno.ENOENT)
                self._exchange(
                    tx, src, src_dir, old_name, self.inode(dst_ino, tx), dst_dir, new_name, now
                )
                return
            if dst_ino is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if dst_ino == src_ino:
                return
            if src.is_dir:
                self._check_not_ancestor(tx, src_ino, new_parent)
            if dst_ino is not None:
                replaced = dst_ino
                self._replace_target(tx, src, self.inode(dst_ino, tx), dst_dir, new_name, now)
            else:
                self._add_entry(tx, new_parent, new_name, src_ino)
                if src.is_dir and dst_dir is not src_dir:
                    dst_dir.nlink += 1
            self._remove_entry(tx, old_parent, old_name)
            if src.is_dir and dst_dir is not src_dir:
                src_dir.nlink -= 1
                src.parent = new_parent
            src.ctime_ns = now
            self.store.put_inode(tx, src)
            for d in {id(src_dir): src_dir, id(dst_dir): dst_dir}.values():
                d.mtime_ns = d.ctime_ns = now
                self.store.put_inode(tx, d)
        crash_point("rename-after")
        if replaced is not None:
            self._delete_if_unused(replaced)

    def _replace_target(
        self, tx: Any, src: Inode, dst: Inode, dst_dir: Inode, name: bytes, now: int
    ) -> None:
        if src.is_dir:
            if not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not self._is_empty(tx, dst.ino):
                raise FsError(errno.ENOTEMPTY)
        elif dst.is_dir:
            raise FsError(errno.EISDIR)
        self._set_entry(tx, dst_dir.ino, name, src.ino)
        if dst.is_dir:
            dst.nlink = 0
            dst.ctime_ns = now
            self._orphan_or_delete(tx, dst)
            if src.parent == dst_dir.ino:
                dst_dir.nlink -= 1
        else:
            self._drop_link(tx, dst, now)

    def _exchange(
        self,
        tx: Any,
        a: Inode,
        a_dir: Inode,
        a_name: bytes,
        b: Inode,
        b_dir: Inode,
        b_name: bytes,
        now: int,
    ) -> None:
        if a.ino == b.ino:
            return
        if a_dir.ino != b_dir.ino:
            if a.is_dir:
                self._check_not_ancestor(tx, a.ino, b_dir.ino)
            if b.is_dir:
                self._check_not_ancestor(tx, b.ino, a_dir.ino)
        self._set_entry(tx, a_dir.ino, a_name, b.ino)
        self._set_entry(tx, b_dir.ino, b_name, a.ino)
        if a_dir.ino != b_dir.ino:
            if a.is_dir:
                a.parent, a_dir.nlink, b_dir.nlink = b_dir.ino, a_dir.nlink - 1, b_dir.nlink + 1
            if b.is_dir:
                b.parent, b_dir.nlink, a_dir.nlink = a_dir.ino, b_dir.nlink - 1, a_dir.nlink + 1
        a.ctime_ns = b.ctime_ns = now
        for inode in (a, b):
            self.store.put_inode(tx, inode)
        for d in {a_dir.ino: a_dir, b_dir.ino: b_dir}.values():
            d.mtime_ns = d.ctime_ns = now
            self.store.put_inode(tx, d)

    def _check_not_ancestor(self, tx: Any, ancestor: int, ino: int) -> None:
        """EINVAL when `ino` is `ancestor` or lies below it (a directory moved into itself)."""
        seen = 0
        while True:
            if ino == ancestor:
                raise FsError(errno.EINVAL)
            if ino == schema.ROOT_INO:
                return
            ino = self.inode(ino, tx).parent
            seen += 1
            if seen > 1_000_000:
                raise FsError(errno.ELOOP)

    # -- directory entries

    def _dir_for_change(self, ino: int, tx: Any) -> Inode:
        inode = self.inode(ino, tx)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        return inode

    def _add_entry(self, tx: Any, parent: int, name: bytes, child: int) -> None:
        cookie = self.store.next_counter(tx, schema.K_NEXT_COOKIE)
        tx.put(schema.dirent_key(parent, name), encode_dirent(child, cookie), db=self.store.dirents)
        tx.put(schema.cookie_key(parent, cookie), name, db=self.store.cookies)

    def _set_entry(self, tx: Any, parent: int, name: bytes, child: int) -> None:
        key = schema.dirent_key(parent, name)
        _, cookie = decode_dirent(tx.get(key, db=self.store.dirents))
        tx.put(key, encode_dirent(child, cookie), db=self.store.dirents)

    def _remove_entry(self, tx: Any, parent: int, name: bytes) -> None:
        key = schema.dirent_key(parent, name)
        _, cookie = decode_dirent(tx.get(key, db=self.store.dirents))
        tx.delete(key, db=self.store.dirents)
        tx.delete(schema.cookie_key(parent, cookie), db=self.store.cookies)

    def _is_empty(self, tx: Any, ino: int) -> bool:
        prefix = schema.ino_key(ino)
        with tx.cursor(db=self.store.dirents) as cur:
            return not (cur.set_range(prefix) and bytes(cur.key()).startswith(prefix))

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Inode, int]]:
        """(name, inode, cookie) of the entries after cookie `start`, in cookie order."""
        tx = self.store.tx
        prefix = schema.ino_key(ino)
        with tx.cursor(db=self.store.cookies) as cur:
            if not cur.set_range(schema.cookie_key(ino, start + 1)):
                return
            for key, name in cur:
                if not key.startswith(prefix):
                    return
                cookie = schema.unpack_u64(key, 8)
                child = self.child_ino(ino, bytes(name), tx)
                if child is None:
                    continue
                yield bytes(name), self.inode(child, tx), cookie

    # -- link counts and deletion

    def _drop_link(self, tx: Any, inode: Inode, now: int) -> None:
        inode.nlink -= 1
        inode.ctime_ns = now
        if inode.nlink == 0:
            self._orphan_or_delete(tx, inode)
        else:
            self.store.put_inode(tx, inode)

    def _orphan_or_delete(self, tx: Any, inode: Inode) -> None:
        """Record a link-less inode as an orphan; `_delete_if_unused` removes it when unused."""
        self.store.put_inode(tx, inode)
        tx.put(schema.ino_key(inode.ino), b"", db=self.store.orphans)

    def _delete_if_unused(self, ino: int) -> None:
        if ino in self.lookups or ino in self.opens:
            return
        inode = self.store.get_inode(ino)
        if inode is None or inode.nlink > 0:
            return
        with self.store.op() as tx:
            generation = self.staging_generation(ino, tx)
            self.delete_inode(tx, ino)
        self.staging.remove(ino, self.store.commits, generation)

    def staging_generation(self, ino: int, tx: Any = None) -> int:
        """The inode's current staging generation (from memory, else from its record)."""
        if ino in self.staging.generation:
            return self.staging.generation[ino]
        raw = (tx or self.store.tx).get(schema.ino_key(ino), db=self.store.staging)
        return decode_staged(bytes(raw))[0] if raw else 0

    def delete_inode(self, tx: Any, ino: int) -> None:
        """Remove every record of an inode (its staging file is removed by the caller)."""
        key = schema.ino_key(ino)
        self.extents.clear(tx, ino, 0, MAX_OFFSET)
        for db in (self.store.inodes, self.store.symlinks, self.store.staging, self.store.orphans):
            tx.delete(key, db=db)
        with tx.cursor(db=self.store.xattrs) as cur:
            while cur.set_range(key) and bytes(cur.key()).startswith(key):
                cur.delete()

    # -- attributes

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Inode:
        now = time.time_ns()
        with self.store.op() as tx:
            inode = self.inode(ino, tx)
            if size is not None:
                if inode.is_dir:
                    raise FsError(errno.EISDIR)
                if not inode.is_reg:
                    raise FsError(errno.EINVAL)
                self._truncate(tx, inode, size, now)
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
            if uid is not None:
                inode.uid = uid
            if gid is not None:
                inode.gid = gid
            if atime_ns is not None:
                inode.atime_ns = atime_ns
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
            inode.ctime_ns = now
            self.store.put_inode(tx, inode)
        return inode

    def _truncate(self, tx: Any, inode: Inode, size: int, now: int) -> None:
        self.staged_ranges(inode.ino, tx)
        self.staging.truncate(inode.ino, size, self.store.commits, shrink=size < inode.size)
        if inode.data_bytes:
            inode.data_bytes -= self.extents.clear(tx, inode.ino, size, MAX_OFFSET)
        if size != inode.size:
            inode.size = size
            inode.mtime_ns = now

    # -- file data

    def open(self, ino: int, truncate: bool) -> Inode:
        inode = self.inode(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if inode.is_reg:
            self.staged_ranges(ino)
            self.staging.acquire(ino)
        self.opens[ino] = self.opens.get(ino, 0) + 1
        if truncate and inode.is_reg:
            now = time.time_ns()
            with self.store.op() as tx:
                inode = self.inode(ino, tx)
                self._truncate(tx, inode, 0, now)
                inode.mtime_ns = inode.ctime_ns = now
                self.store.put_inode(tx, inode)
        return inode

    def release(self, ino: int) -> None:
        left = self.opens[ino] - 1
        self.staging.release(ino)
        if left:
            self.opens[ino] = left
            return
        del self.opens[ino]
        if ino in self.staging.dirty_since:
            self.closed_at[ino] = time.monotonic()
        self._delete_if_unused(ino)

    def write(self, ino: int, offset: int, data: bytes) -> int:
        written = self.staging.write(ino, offset, data)
        crash_point("write-after-staging")
        now = time.time_ns()
        with self.store.single_put() as tx:
            inode = self.inode(ino, tx)
            inode.size = max(inode.size, offset + written)
            inode.mtime_ns = inode.ctime_ns = now
            self.store.put_inode(tx, inode)
        return written

    def touch_atime(self, ino: int, seen: Inode | None = None) -> None:
        """relatime: update atime when older than mtime/ctime or a day.

        Takes the inode number, not a record: a caller that awaited since it read the record
        would otherwise write back a stale size or extent count. A record the caller read
        (`seen`) only tells whether an update can be due at all, which spares every read
        but the first a second lookup.
        """
        if not self.update_atime:
            return
        now = time.time_ns()
        if seen is not None and not _atime_due(seen, now):
            return
        inode = self.store.get_inode(ino)
        if inode is None:
            return
        if _atime_due(inode, now):
            with self.store.op() as tx:
                inode.atime_ns = now
                self.store.put_inode(tx, inode)

    # -- extended attributes

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if not name or len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        key = schema.ino_key(ino) + name
        with self.store.op() as tx:
            inode = self.inode(ino, tx)
            exists = tx.get(key, db=self.store.xattrs) is not None
            if flags & 1 and exists:
                raise FsError(errno.EEXIST)
            if flags & 2 and not exists:
                raise FsError(errno.ENODATA)
            tx.put(key, value, db=self.store.xattrs)
            inode.ctime_ns = time.time_ns()
            self.store.put_inode(tx, inode)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.store.tx.get(schema.ino_key(ino) + name, db=self.store.xattrs)
        if value is None:
            raise FsError(errno.ENODATA)
        return bytes(value)

    def listxattr(self, ino: int) -> list[bytes]:
        self.inode(ino)
        prefix = schema.ino_key(ino)
        names = []
        with self.store.tx.cursor(db=self.store.xattrs) as cur:
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    names.append(bytes(key[8:]))
        return names

    def removexattr(self, ino: int, name: bytes) -> None:
        with self.store.op() as tx:
            inode = self.inode(ino, tx)
            if not tx.delete(schema.ino_key(ino) + name, db=self.store.xattrs):
                raise FsError(errno.ENODATA)
            inode.ctime_ns = time.time_ns()
            self.store.put_inode(tx, inode)

    # -- group commit hook

    def shadowing_unsynced(self) -> list[int]:
        """Inodes about to commit staged ranges over sealed data whose bytes are not flushed.

        A staged range shadows the extents under it. Committed before its bytes are durable,
        it would shadow durable chunks, after a power loss, with whatever the staging file
        kept there (usually the hole punched after the seal: zeros).
        """
        out = []
        for ino in self.staging.unsynced_files & self.staging.changed:
            ranges = self.staging.ranges.get(ino)
            if ranges and any(
                next(iter(self.extents.overlapping(ino, a, b)), None) is not None
                for a, b in ranges.as_list()
            ):
                out.append(ino)
        return out

    def persist_staging_ranges(self) -> None:
        """Write changed staged ranges into the group transaction (called before a commit).

        A record stays while the staging generation is not 0, even with nothing staged, so
        that recovery and fsck know which staging file is the current one.
        """
        changed = self.staging.take_changed()
        if not changed:
            return
        with self.store.op() as tx:
            for ino, ranges in changed.items():
                key = schema.ino_key(ino)
                generation = self.staging.generation.get(ino, 0)
                if (ranges or generation) and self.store.get_inode(ino, tx) is not None:
                    tx.put(key, encode_staged(generation, ranges or []), db=self.store.staging)
                else:
                    tx.delete(key, db=self.store.staging)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


def _atime_due(inode: Inode, now: int) -> bool:
    """relatime's rule: the access time is older than the last change, or than a day."""
    a = inode.atime_ns
    return a <= inode.mtime_ns or a <= inode.ctime_ns or now - a >= _DAY_NS
