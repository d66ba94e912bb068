"""The pyfuse3 boundary: requests in, `Namespace` calls, `FUSEError(errno)` out.

Nothing here holds state beyond open handles; every handler is a thin translation. The only
awaits are fsync work, which goes to a worker thread under the I/O limiter, and reads.

Inode numbers from `SNAPDIR_INO` (2**62) up belong to `.snapshots` and the snapshot views
under it (`tierfs.restore.snapdir`), never to the index: every handler sends them there
first, and every change to them is refused (`EROFS`; `EXDEV` for a link or a rename from a
snapshot into the live tree, so that `ln` and `mv` fall back to copying). In the root, the
reserved name itself cannot be created (`EEXIST`: it exists) nor removed or renamed
(`EPERM`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pyfuse3
import trio

from tierfs.data.reader import FileReader
from tierfs.fs.namespace import FsError, Namespace
from tierfs.meta import schema
from tierfs.meta.records import Inode
from tierfs.restore.snapdir import SNAPDIR_INO, SnapshotDir, is_snapshot_ino
from tierfs.restore.view import Listed, SnapshotView

if TYPE_CHECKING:
    from tierfs.config import Config
    from tierfs.snap.capture import WriteGate
    from tierfs.snap.catalog import Catalog

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

BLOCK_SIZE = 4096
LISTING_END = (1 << 63) - 1  # the readdir cookie of `.snapshots` when the root lists it


class Activity:
    """When the last FUSE request arrived: background work yields to applications."""

    def __init__(self) -> None:
        self.last = 0.0

    def idle_for(self) -> float:
        return time.monotonic() - self.last


activity = Activity()


def fuse_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map FsError and OSError to FUSEError; log anything unexpected as an EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        activity.last = time.monotonic()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise pyfuse3.FUSEError(errno.ENOSPC) from None
            log.error("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Handle:
    __slots__ = ("append", "ino")

    def __init__(self, ino: int, append: bool) -> None:
        self.ino = ino
        self.append = append


class TierfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers of one mounted tierfs."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        ns: Namespace,
        reader: FileReader,
        durability: Any,
        data_dir: str,
        attr_timeout: float,
        entry_timeout: float,
        reserve_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.ns = ns
        self.reader = reader
        self.reserve_bytes = reserve_bytes
        self.durability = durability
        self.data_dir = data_dir
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.write_gate: WriteGate | None = None  # set by the daemon (snapshots)
        self.snapdir: SnapshotDir | None = None  # `.snapshots`, set by attach_snapshots

    def attach_snapshots(self, catalog: Catalog, config: Config) -> None:
        """Serve `.snapshots` (`[snapshots]` settings) from the local catalog; snapshot data
        comes through the reader, like file data."""

        async def fetch(chunk_id: bytes) -> bytes | memoryview:
            return await self.reader.load_chunk(chunk_id)

        name = config.get("snapshots", "dir_name").encode()
        self.snapdir = SnapshotDir(
            catalog,
            fetch,
            name,
            config.get("snapshots", "show_dir"),
            schema.ROOT_INO,
            lambda: self.reader.prefetch,
        )
        if self.ns.child_ino(schema.ROOT_INO, name) is not None:
            log.warning(
                "the root holds an entry named %r, hidden by the snapshot directory; set "
                "snapshots.dir_name to another name to reach it",
                name.decode(errors="replace"),
            )

    # -- snapshots

    def _snapdir(self) -> SnapshotDir:
        if self.snapdir is None:
            raise FsError(errno.ESTALE)
        return self.snapdir

    def _view(self, ino: int) -> SnapshotView:
        return self._snapdir().view_of(ino)

    def _reserved(self, parent: int, name: bytes) -> bool:
        """Whether `name` in `parent` is the snapshot directory's reserved name."""
        return self.snapdir is not None and parent == schema.ROOT_INO and name == self.snapdir.name

    def _check_create(self, parent: int, name: bytes) -> None:
        """A new name: refused inside snapshots, and for the reserved name."""
        if is_snapshot_ino(parent):
            raise FsError(errno.EROFS)
        if self._reserved(parent, name):
            raise FsError(errno.EEXIST)

    def _check_remove(self, parent: int, name: bytes) -> None:
        if is_snapshot_ino(parent):
            raise FsError(errno.EROFS)
        if self._reserved(parent, name):
            raise FsError(errno.EPERM)

    def _snapdir_attrs(self) -> pyfuse3.EntryAttributes:
        root = self.ns.inode(schema.ROOT_INO)
        return self._snapdir().attrs(root.uid, root.gid)

    async def _snap_lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        snapdir = self._snapdir()
        if parent == SNAPDIR_INO:
            if name == b".":
                attrs = self._snapdir_attrs()
            elif name == b"..":
                return self.attrs(self.ns.lookup(schema.ROOT_INO, b"."))
            else:
                return await snapdir.lookup_child(name)
        else:
            view = self._view(parent)
            if not (name == b".." and parent == view.root_ino):
                return await view.lookup_or_negative(parent, name)
            attrs = self._snapdir_attrs()
        snapdir.add_lookup(SNAPDIR_INO)
        return attrs

    async def _snap_getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == SNAPDIR_INO:
            return self._snapdir_attrs()
        return await self._view(ino).getattr(ino)

    async def _snap_readdir(self, ino: int, start: int, token: Any) -> None:
        snapdir = self._snapdir()
        listing: Iterable[Listed]
        if ino == SNAPDIR_INO:
            listing = await snapdir.listing(start)
        else:
            listing = await self._view(ino).readdir(ino, start)
        for name, attrs, cookie in listing:
            if not pyfuse3.readdir_reply(token, name, attrs, cookie):
                snapdir.forget(attrs.st_ino, 0)  # numbered for nothing
                break
            snapdir.add_lookup(attrs.st_ino)

    # -- attributes

    def attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(inode.ino)
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = pyfuse3.ModeT(inode.mode)
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = inode.rdev
        a.st_size = inode.size
        a.st_blksize = BLOCK_SIZE
        staged = self.ns.data_bytes(inode)
        a.st_blocks = (staged + BLOCK_SIZE - 1) // BLOCK_SIZE * (BLOCK_SIZE // 512)
        a.st_atime_ns = inode.atime_ns
        a.st_mtime_ns = inode.mtime_ns
        a.st_ctime_ns = inode.ctime_ns
        return a

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        if is_snapshot_ino(parent_inode):
            return await self._snap_lookup(parent_inode, name)
        if self._reserved(parent_inode, name):
            self._snapdir().add_lookup(SNAPDIR_INO)
            return self._snapdir_attrs()
        try:
            return self.attrs(self.ns.lookup(parent_inode, name))
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # A negative entry the kernel may cache: every change goes through it, so it
        # invalidates the entry itself when the name is created.
        negative = pyfuse3.EntryAttributes()
        negative.st_ino = pyfuse3.InodeT(0)
        negative.entry_timeout = self.entry_timeout
        return negative

    @fuse_errors
    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            if is_snapshot_ino(ino):
                if self.snapdir is not None:
                    self.snapdir.forget(ino, n)
                continue
            self.ns.forget(ino, n)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        if is_snapshot_ino(inode):
            return await self._snap_getattr(inode)
        return self.attrs(self.ns.inode(inode))

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: Any,
        ctx: Any,
    ) -> pyfuse3.EntryAttributes:
        if is_snapshot_ino(inode):
            raise FsError(errno.EROFS)
        updated = self.ns.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self.attrs(updated)

    # -- namespace

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        if is_snapshot_ino(inode):
            if inode == SNAPDIR_INO:
                raise FsError(errno.EINVAL)
            return await self._view(inode).readlink(inode)
        return self.ns.readlink(inode)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_create(parent_inode, name)
        return self.attrs(self.ns.create_node(parent_inode, name, mode, ctx.uid, ctx.gid, rdev))

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_create(parent_inode, name)
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        return self.attrs(self.ns.create_node(parent_inode, name, mode, ctx.uid, ctx.gid))

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_create(parent_inode, name)
        inode = self.ns.create_node(
            parent_inode, name, stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, target=target
        )
        return self.attrs(inode)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_create(new_parent_inode, new_name)
        if is_snapshot_ino(inode):
            raise FsError(errno.EXDEV)
        return self.attrs(self.ns.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_remove(parent_inode, name)
        self.ns.unlink(parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_remove(parent_inode, name)
        self.ns.rmdir(parent_inode, name)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        self._check_create(parent_inode_new, name_new)
        if is_snapshot_ino(parent_inode_old):
            raise FsError(errno.EXDEV)
        self._check_remove(parent_inode_old, name_old)
        self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if is_snapshot_ino(inode):
            if inode != SNAPDIR_INO:
                await self._view(inode).opendir(inode)
            return inode
        if not self.ns.inode(inode).is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if is_snapshot_ino(fh):
            await self._snap_readdir(fh, start_id, token)
            return
        if start_id == LISTING_END:
            return
        hide = self.snapdir.name if self.snapdir is not None and fh == schema.ROOT_INO else None
        for name, inode, cookie in self.ns.readdir(fh, start_id):
            if name == hide:
                continue  # the snapshot directory's name shadows a real entry
            if not pyfuse3.readdir_reply(token, name, self.attrs(inode), cookie):
                return
            self.ns.add_lookup(inode.ino)
        if hide is not None and self.snapdir is not None and self.snapdir.show:
            self._list_snapdir(hide, token)

    def _list_snapdir(self, name: bytes, token: Any) -> None:
        """`.snapshots` in the root's listing: last, under a cookie no directory entry
        gets, so that a listing resumed after it ends there."""
        if pyfuse3.readdir_reply(token, name, self._snapdir_attrs(), LISTING_END):
            self._snapdir().add_lookup(SNAPDIR_INO)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if is_snapshot_ino(fh):
            return
        await self.durability.sync(None)

    # -- files

    def _new_handle(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(ino, bool(flags & os.O_APPEND))
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh))

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if is_snapshot_ino(inode):
            if inode == SNAPDIR_INO:
                raise FsError(errno.EISDIR)
            await self._view(inode).open(inode, flags)
            info = self._new_handle(inode, 0)
            info.keep_cache = True  # a snapshot's bytes never change
            return info
        self.ns.open(inode, truncate=bool(flags & os.O_TRUNC))
        return self._new_handle(inode, flags)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_create(parent_inode, name)
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        inode = self.ns.create_node(parent_inode, name, mode, ctx.uid, ctx.gid)
        self.ns.open(inode.ino, truncate=False)
        return self._new_handle(inode.ino, flags), self.attrs(inode)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]
        ino = self.handles[fh].ino
        if is_snapshot_ino(ino):
            return await self._view(ino).read(ino, off, size)
        return await self.reader.read(ino, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.write_gate is not None and self.write_gate.closed:
            await self.write_gate.wait_open()  # a snapshot is taking its point in time
        handle = self.handles[fh]
        if is_snapshot_ino(handle.ino):
            raise FsError(errno.EROFS)
        if handle.append:
            off = self.ns.inode(handle.ino).size
        return self.ns.write(handle.ino, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if not is_snapshot_ino(handle.ino):
            self.ns.release(handle.ino)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if is_snapshot_ino(self.handles[fh].ino):
            return
        await self.durability.sync(self.handles[fh].ino)

    # -- xattrs

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if is_snapshot_ino(inode):
            raise FsError(errno.EROFS)
        self.ns.setxattr(inode, name, value)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            if is_snapshot_ino(inode):
                if inode == SNAPDIR_INO:
                    raise FsError(errno.ENODATA)
                return await self._view(inode).getxattr(inode, name)
            return self.ns.getxattr(inode, name)
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if is_snapshot_ino(inode):
            return [] if inode == SNAPDIR_INO else await self._view(inode).listxattr(inode)
        return self.ns.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        if is_snapshot_ino(inode):
            raise FsError(errno.EROFS)
        try:
            self.ns.removexattr(inode, name)
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    # -- filesystem

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await trio.to_thread.run_sync(os.statvfs, self.data_dir)
        out = pyfuse3.StatvfsData()
        out.f_bsize = BLOCK_SIZE
        out.f_frsize = BLOCK_SIZE
        scale = st.f_frsize / BLOCK_SIZE
        out.f_blocks = int(st.f_blocks * scale)
        out.f_bfree = int(st.f_bfree * scale)
        reserve = self.reserve_bytes // BLOCK_SIZE
        out.f_bavail = max(0, int(st.f_bavail * scale) - reserve)
        out.f_files = max(st.f_files, 1 << 32)
        out.f_ffree = max(st.f_ffree, (1 << 32) - 1024)
        out.f_favail = out.f_ffree
        out.f_namemax = 255
        return out
