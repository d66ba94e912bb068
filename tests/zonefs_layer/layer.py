"""A test-only FUSE filesystem presenting an emulated zoned device as zonefs does.

Run as `python -m tests.zonefs_layer.layer IMAGE MOUNTPOINT [--explicit-open]
[--errors=MODE]` (see `process.ZonefsLayer`). IMAGE is an `EmulatedZonedDevice` (made with
`EmulatedZonedDevice.create`); the layer owns it while it runs and closes it (flushed) when
it stops. zonefs's rules live in `zones.py`; this module translates FUSE requests to them.

Layout as zonefs's: `/` and `/seq` (mode 0555; the size of `seq` is its number of files),
and `seq/0..N-1` (mode 0640, owned by root). Every open uses FUSE `direct_io`, so O_DIRECT
opens work and no page cache sits between a test and the rules; attributes and entries are
never cached (timeouts 0), because a file's size and mode change under the kernel when zonefs
handles an I/O error. Creating, removing, renaming files and changing modes or owners are
refused with the errnos the VFS gives for a filesystem without those operations (EACCES for
a create, EPERM otherwise).

Test hooks (extended attributes of the layer; zonefs itself has none):

* setxattr `user.zonefs_layer.fault` = `readonly`, `offline` or `fail-after=N` injects a
  fault into the zone's device state (`EmulatedZonedDevice.set_readonly`, ...); zonefs notices
  at the next I/O error, as on hardware;
* getxattr `user.zonefs_layer.zone` returns the device's own view of the zone, a packed
  `struct blk_zone` (`Zone.unpack`).
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from tierfs.tiers.zns.emulated import EmulatedZonedDevice

from .zones import ERRORS_MODES, ZoneFile, Zonefs, refuse

log = logging.getLogger("zonefs_layer")

P = ParamSpec("P")
R = TypeVar("R")

FSNAME = "zonefs_layer"
ROOT_INO = pyfuse3.ROOT_INODE
SEQ_INO = 2
FIRST_FILE_INO = 3
SEQ_NAME = b"seq"
DIR_MODE = stat.S_IFDIR | 0o555
NAME_MAX = 16
FAULT_XATTR = b"user.zonefs_layer.fault"
ZONE_XATTR = b"user.zonefs_layer.zone"


def fuse_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """OSError(errno) from the rules becomes that errno; anything else is a bug: EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(frozen=True)
class Handle:
    file: ZoneFile
    write: bool
    direct: bool


class ZonefsOperations(pyfuse3.Operations):
    """The FUSE side of the layer: inodes, handles, directories, attributes."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, fs: Zonefs) -> None:
        super().__init__()
        self.fs = fs
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.mounted_ns = time.time_ns()

    # -- inodes and attributes

    def _file(self, ino: int) -> ZoneFile:
        index = ino - FIRST_FILE_INO
        if 0 <= index < len(self.fs.files):
            return self.fs.files[index]
        if ino in (ROOT_INO, SEQ_INO):
            raise refuse(errno.EISDIR, f"inode {ino} is a directory")
        raise refuse(errno.ENOENT, f"no inode {ino}")

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_blksize = self.fs.lba
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mounted_ns
        if ino == ROOT_INO:
            a.st_mode, a.st_nlink, a.st_size = pyfuse3.ModeT(DIR_MODE), 3, 1
        elif ino == SEQ_INO:
            a.st_mode, a.st_nlink, a.st_size = pyfuse3.ModeT(DIR_MODE), 2, len(self.fs.files)
        else:
            f = self._file(ino)
            a.st_mode = pyfuse3.ModeT(stat.S_IFREG | f.mode)
            a.st_nlink = 1
            a.st_size = f.wpoffset
            a.st_blocks = f.capacity // 512
        return a

    def _entries(self, ino: int) -> list[tuple[bytes, int]]:
        if ino == ROOT_INO:
            return [(SEQ_NAME, SEQ_INO)]
        if ino == SEQ_INO:
            return [(str(f.index).encode(), FIRST_FILE_INO + f.index) for f in self.fs.files]
        raise refuse(errno.ENOTDIR, f"inode {ino} is not a directory")

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        for entry, ino in self._entries(parent_inode):
            if entry == name:
                return self.attrs(ino)
        raise refuse(errno.ENOENT, f"no {name!r}")

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self.attrs(inode)

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: Any,
        ctx: Any,
    ) -> pyfuse3.EntryAttributes:
        """Times are accepted (and not kept), a size is a truncate, the rest refused."""
        self.fs.check_write_access()
        if inode in (ROOT_INO, SEQ_INO):
            raise refuse(errno.EPERM, "zonefs directories cannot be changed")
        f = self._file(inode)
        if f.immutable:
            raise refuse(errno.EPERM, f"seq/{f.index} is immutable")
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise refuse(errno.EPERM, "zonefs files keep their mode and owner")
        if fields.update_size:
            self.fs.truncate(f, attr.st_size)
        return self.attrs(inode)

    # -- files

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        f = self._file(inode)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        if write:
            self.fs.open_for_write(f)
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(f, write, bool(flags & os.O_DIRECT))
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True, keep_cache=False)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        return self.fs.read(handle.file, off, size, handle.direct)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        return self.fs.write(handle.file, off, buf, handle.direct)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if handle.write:
            self.fs.close_for_write(handle.file)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(self.handles[fh].file)

    # -- directories and the filesystem

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self._entries(inode)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._entries(fh)
        for cookie, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self.attrs(ino), cookie):
                break

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = self.fs.lba
        out.f_blocks = sum(f.capacity for f in self.fs.files) // self.fs.lba
        used = sum(f.wpoffset for f in self.fs.files) // self.fs.lba
        out.f_bfree = out.f_bavail = out.f_blocks - used
        out.f_files = len(self.fs.files) + 1
        out.f_ffree = out.f_favail = 0
        out.f_namemax = NAME_MAX
        return out

    # -- test hooks

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if name != FAULT_XATTR:
            raise refuse(errno.EOPNOTSUPP, "zonefs has no extended attributes")
        self.fs.inject(self._file(inode), value)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if name != ZONE_XATTR:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return self.fs.device_zone(self._file(inode))

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    # -- what zonefs has no operation for

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise refuse(errno.EACCES, "zonefs files cannot be created")

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "zonefs files cannot be created")

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "zonefs directories cannot be created")

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "zonefs has no symbolic links")

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "zonefs files cannot be linked")

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise refuse(errno.EPERM, "zonefs files cannot be removed")

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise refuse(errno.EPERM, "zonefs directories cannot be removed")

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
        raise refuse(errno.EPERM, "zonefs files cannot be renamed")


# -- the process --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.zonefs_layer.layer")
    parser.add_argument("image", type=Path, help="an EmulatedZonedDevice image")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--explicit-open", action="store_true", help="zonefs's explicit-open")
    parser.add_argument("--errors", choices=ERRORS_MODES, default="remount-ro")
    return parser.parse_args(argv)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: stopping", signum)
            pyfuse3.terminate()


def main(argv: list[str] | None = None) -> int:
    """Serve until unmounted (fusermount3 -u) or signalled; the device is closed last."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    dev = EmulatedZonedDevice.open(args.image)
    try:
        ops = ZonefsOperations(Zonefs(dev, args.explicit_open, args.errors))
        options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}"}
        pyfuse3.init(ops, str(args.mountpoint), options)
        try:
            trio.run(_serve)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        dev.close_device()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
