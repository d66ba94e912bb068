"""The benchmark's floor: a minimal pyfuse3 + trio passthrough of one directory.

It measures what any Python FUSE filesystem pays before doing real work: every request
crosses the kernel, libfuse and pyfuse3, and is answered by the plain syscall on the
underlying directory, made directly on the trio thread (no worker threads). tierfs cannot be
faster than this on the same machine, so its figures are judged against it.

To compare like with like it mounts with tierfs's own FUSE options (built by
`tierfs.daemon.fuse_options`, only the subtype differs so `tierfs umount` never mistakes it for
a tierfs) and answers with tierfs's attribute and entry timeouts; like tierfs it leaves the
writeback cache off and does not ask the kernel to keep the page cache across opens, and it
sets the mount's kernel read-ahead to tierfs's default `mount.read_ahead_kb`.

It is a benchmark instrument, not a general passthrough: inode numbers are its own and hard
links get one inode per path. It passes extended attributes through, as tierfs must support
them: a filesystem without xattrs answers ENOSYS once and the kernel stops asking, while one
with xattrs is asked for `security.capability` on every write(2); the floor pays that too.

Usage: python -m tools.bench.passthrough SOURCE MOUNTPOINT
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import stat
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import trio

from tierfs import config as tierfs_config
from tierfs.daemon import fuse_options, tune_read_ahead
from tierfs.datadir import DataDir

log = logging.getLogger(__name__)

SUBTYPE = "tierfs-bench-floor"
USAGE = "Mount a minimal pyfuse3 passthrough of SOURCE at MOUNTPOINT (the benchmark floor)."
_STATVFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


def mount_options(source: Path) -> set[str]:
    """tierfs's FUSE options for `source`, with our own subtype (see the module docstring)."""
    options = fuse_options(DataDir(source), tierfs_config.defaults("bench"), [])
    options = {o for o in options if not o.startswith("subtype=")}
    return options | {f"subtype={SUBTYPE}"}


def tierfs_timeouts() -> tuple[float, float]:
    """tierfs's default (attr_timeout, entry_timeout), so the kernel caches as much as for it."""
    defaults = tierfs_config.defaults("bench")
    return defaults.get("mount", "attr_timeout"), defaults.get("mount", "entry_timeout")


def _fuse_error(exc: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


class Passthrough(pyfuse3.Operations):
    """pyfuse3 handlers that map each request to one syscall on the source directory."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, source: bytes, attr_timeout: float, entry_timeout: float) -> None:
        super().__init__()
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: source}
        self.inos: dict[bytes, int] = {source: pyfuse3.ROOT_INODE}
        self.lookups: dict[int, int] = {}
        self.dirs: dict[int, list[bytes]] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._next_dir_fh = 1
        self._uid = os.geteuid()
        self._gid = os.getegid()

    # -- inode <-> path bookkeeping ---------------------------------------------------------

    def _path(self, ino: int) -> bytes:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _ino_of(self, path: bytes) -> int:
        """The inode number of `path`, a new one the first time the kernel sees the path."""
        ino = self.inos.get(path)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self.inos[path] = ino
            self.paths[ino] = path
        return ino

    def _remember(self, path: bytes) -> int:
        """The inode number of `path`, counting one more kernel lookup reference to it."""
        ino = self._ino_of(path)
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return ino

    def _forget_path(self, path: bytes) -> None:
        """The name is gone; a new file created there later gets a new inode number."""
        self.inos.pop(path, None)

    def _attrs(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = pyfuse3.ModeT(st.st_mode)
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _entry(self, path: bytes) -> pyfuse3.EntryAttributes:
        """lstat `path` and count the kernel's new reference to it (lookup, create, mkdir...)."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._attrs(self._remember(path), st)

    def _chown_to_caller(self, path: bytes, ctx: pyfuse3.RequestContext) -> None:
        """New entries belong to the caller, as in tierfs (a no-op when it is us)."""
        if ctx.uid != self._uid or ctx.gid != self._gid:
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    # -- attributes and lookups --------------------------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._entry(self._path(parent_inode))
        if name == b"..":
            return self._entry(os.path.dirname(self._path(parent_inode)))
        return self._entry(self._child(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            if ino == pyfuse3.ROOT_INODE:
                continue
            path = self.paths.pop(ino, None)
            if path is not None and self.inos.get(path) == ino:
                del self.inos[path]

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._attrs(inode, os.lstat(self._path(inode)))
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode), follow_symlinks=False)
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                os.chown(path, uid, gid, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
            return self._attrs(inode, os.lstat(path))
        except OSError as exc:
            raise _fuse_error(exc) from None

    # -- namespace ----------------------------------------------------------------------------

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.readlink(self._path(inode))
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode, rdev)
            self._chown_to_caller(path, ctx)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._entry(path)

    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
            self._chown_to_caller(path, ctx)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._entry(path)

    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.symlink(target, path)
            self._chown_to_caller(path, ctx)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._entry(path)

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._entry(path)

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        path = self._child(parent_inode, name)
        try:
            os.unlink(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._forget_path(path)

    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        path = self._child(parent_inode, name)
        try:
            os.rmdir(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._forget_path(path)

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._forget_path(new)
        self._move_paths(old, new)

    def _move_paths(self, old: bytes, new: bytes) -> None:
        """Re-point the inodes of `old` and everything below it (a directory) to `new`."""
        below = old + b"/"
        moved = [p for p in self.inos if p == old or p.startswith(below)]
        for path in moved:
            ino = self.inos.pop(path)
            renamed = new + path[len(old) :]
            self.inos[renamed] = ino
            self.paths[ino] = renamed

    # -- directories --------------------------------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        """List the directory once per open, so readdir offsets stay stable."""
        try:
            names = sorted(os.listdir(self._path(inode)))
        except OSError as exc:
            raise _fuse_error(exc) from None
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self.dirs[fh] = [self._path(inode), *names]
        return pyfuse3.FileHandleT(fh)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        directory, *names = self.dirs[fh]
        for index in range(start_id, len(names)):
            path = os.path.join(directory, names[index])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            ino = self._ino_of(path)
            if not pyfuse3.readdir_reply(token, names[index], self._attrs(ino, st), index + 1):
                break
            self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        dfd = os.open(self.dirs[fh][0], os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- files --------------------------------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fd))

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT, mode)
            self._chown_to_caller(path, ctx)
            st = os.fstat(fd)
        except OSError as exc:
            raise _fuse_error(exc) from None
        fi = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fd))
        return fi, self._attrs(self._remember(path), st)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        os.close(fh)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        try:
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        try:
            os.setxattr(self._path(inode), name, value, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[bytes]:
        try:
            names = os.listxattr(self._path(inode), follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return [n.encode() for n in names]

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        try:
            os.removexattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for field in _STATVFS_FIELDS:
            setattr(out, field, getattr(st, field))
        return out


async def _serve(mountpoint: Path) -> None:
    """Serve until unmounted; SIGTERM/SIGINT end the session like an unmount would."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(_tune_read_ahead, mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tune_read_ahead(mountpoint: Path) -> None:
    """tierfs's read-ahead, set as tierfs sets it: once the kernel has our INIT answer."""
    await trio.to_thread.run_sync(os.stat, mountpoint)
    tune_read_ahead(mountpoint, tierfs_config.defaults("bench").get("mount", "read_ahead_kb"))


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()


def serve(source: Path, mountpoint: Path) -> None:
    """Mount `source` at `mountpoint` and serve until unmounted or signalled."""
    attr_timeout, entry_timeout = tierfs_timeouts()
    ops = Passthrough(os.fsencode(source.absolute()), attr_timeout, entry_timeout)
    options = mount_options(source.absolute())
    pyfuse3.init(ops, str(mountpoint), options)
    log.info("mounted %s at %s (options %s)", source, mountpoint, ",".join(sorted(options)))
    try:
        trio.run(_serve, mountpoint)
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=USAGE)
    parser.add_argument("source", type=Path, help="directory to pass through")
    parser.add_argument("mountpoint", type=Path, help="where to mount it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s floor: %(message)s")
    serve(args.source, args.mountpoint)


if __name__ == "__main__":
    main()
