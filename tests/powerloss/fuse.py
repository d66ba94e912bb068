"""A minimal FUSE server: the kernel protocol on /dev/fuse, one request at a time (tests only).

Why not pyfuse3: it has no handler for FALLOCATE, so a pyfuse3 filesystem answers it with
EOPNOTSUPP, and tierfs punches holes in its staging and segment files (its mount-time
recovery fails without them). The protocol subset a passthrough-like filesystem needs is
small: this module parses requests, calls a `Filesystem`, and packs the replies. It negotiates
protocol 7.31 without writeback caching, readdirplus, locks or xattrs (the kernel keeps flock
and POSIX locks itself, and caches "no xattrs"), and mounts with mount(2), so it must run as
root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Opcodes (linux/fuse.h).
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, FLUSH, INIT, OPENDIR, READDIR = 17, 18, 20, 25, 26, 27, 28
RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT, DESTROY = 29, 30, 34, 35, 36, 38
BATCH_FORGET, FALLOCATE, RENAME2 = 42, 43, 45
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 128, 256
FOPEN_KEEP_CACHE = 2
FUSE_ASYNC_READ, FUSE_BIG_WRITES = 1, 1 << 5

PROTOCOL_MINOR = 31
MAX_WRITE = 128 * 1024
BUFFER_SIZE = MAX_WRITE + 64 * 1024
CACHE_TIMEOUT = 60

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QII")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
CREATE_IN = struct.Struct("<IIII")
RW_IN = struct.Struct("<QQIIQII")  # fuse_read_in and fuse_write_in
WRITE_OUT = struct.Struct("<II")
FH_IN = struct.Struct("<Q")  # the fh that leads release, flush, fsync and fsyncdir
FALLOCATE_IN = struct.Struct("<QQQII")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")

MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int


@dataclass(frozen=True)
class SetAttr:
    """The changes of a SETATTR request; None: unchanged. Times in ns, -1: now."""

    mode: int | None
    uid: int | None
    gid: int | None
    size: int | None
    atime_ns: int | None
    mtime_ns: int | None


class Filesystem(Protocol):
    """What the server calls. Errors are OSError with an errno, answered as such."""

    def lookup(self, parent: int, name: bytes) -> Attr: ...
    def getattr(self, ino: int) -> Attr: ...
    def setattr(self, ino: int, changes: SetAttr) -> Attr: ...
    def readlink(self, ino: int) -> bytes: ...
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr: ...
    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr: ...
    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr: ...
    def link(self, ino: int, parent: int, name: bytes) -> Attr: ...
    def unlink(self, parent: int, name: bytes) -> None: ...
    def rmdir(self, parent: int, name: bytes) -> None: ...
    def rename(self, parent: int, name: bytes, new_parent: int, new: bytes, flags: int) -> None: ...
    def open(self, ino: int, flags: int) -> int: ...
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Attr, int]: ...
    def read(self, fh: int, offset: int, size: int) -> bytes: ...
    def write(self, fh: int, offset: int, data: bytes) -> int: ...
    def release(self, fh: int) -> None: ...
    def fsync(self, fh: int) -> None: ...
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None: ...
    def readdir(self, ino: int, offset: int) -> Iterator[tuple[bytes, Attr, int]]: ...
    def fsyncdir(self, ino: int) -> None: ...
    def statfs(self) -> os.statvfs_result: ...


STOP_POLL = 0.2  # seconds


class Stop(Exception):
    """Raised by a signal handler to leave the request loop while it waits for a request."""


class FuseServer:
    """Mounts `fs` at `mountpoint` and answers the kernel's requests until stopped."""

    def __init__(self, fs: Filesystem, mountpoint: Path, fsname: str) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.fd = -1
        self.waiting = False
        self.stopping = False
        self._handlers: dict[int, Callable[[int, Caller, bytes], bytes]] = {
            LOOKUP: self._lookup,
            GETATTR: self._getattr,
            SETATTR: self._setattr,
            READLINK: self._readlink,
            SYMLINK: self._symlink,
            MKNOD: self._mknod,
            MKDIR: self._mkdir,
            UNLINK: self._unlink,
            RMDIR: self._rmdir,
            RENAME: self._rename,
            RENAME2: self._rename2,
            LINK: self._link,
            OPEN: self._open,
            READ: self._read,
            WRITE: self._write,
            STATFS: self._statfs,
            RELEASE: self._release,
            FSYNC: self._fsync,
            FLUSH: self._nothing_to_do,
            OPENDIR: self._opendir,
            READDIR: self._readdir,
            RELEASEDIR: self._nothing_to_do,
            FSYNCDIR: self._fsyncdir,
            ACCESS: self._nothing_to_do,
            CREATE: self._create,
            FALLOCATE: self._fallocate,
            INIT: self._init,
            DESTROY: self._destroy,
        }

    # -- mounting and the request loop -----------------------------------------------------

    def mount(self) -> None:
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        options = (
            f"fd={self.fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
            "default_permissions"
        )
        target = os.fsencode(self.mountpoint)
        kind = f"fuse.{self.fsname}".encode()
        if _libc.mount(self.fsname.encode(), target, kind, MS_NOSUID | MS_NODEV, options.encode()):
            err = ctypes.get_errno()
            raise OSError(err, f"mount {self.mountpoint}: {os.strerror(err)}")

    def unmount(self) -> None:
        """Detach the mount and close the channel: requests still queued fail."""
        _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def serve(self) -> None:
        """Answer requests until `stopping` is set or the filesystem is unmounted."""
        while True:
            try:
                # `waiting` goes up before `stopping` is looked at: a SIGTERM that lands
                # between the two then raises Stop here instead of leaving us blocked in a
                # read that no request will ever end.
                self.waiting = True
                if self.stopping:
                    return
                # A signal that lands after the check above but before the read blocks
                # runs its handler only once the read returns: poll with a timeout so that
                # such a stop is seen within STOP_POLL seconds instead of never.
                if not self._poll.poll(STOP_POLL * 1000):
                    continue
                request = os.read(self.fd, BUFFER_SIZE)
            except Stop:
                return
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # unmounted
                    return
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # the request was interrupted before we read it
                raise
            finally:
                self.waiting = False
            self._answer(request)

    def _answer(self, request: bytes) -> None:
        length, opcode, unique, ino, uid, gid, _, _, _ = IN_HEADER.unpack_from(request)
        body = request[IN_HEADER.size : length]
        if opcode in NO_REPLY:
            return
        handler = self._handlers.get(opcode)
        try:
            if handler is None:
                raise OSError(errno.ENOSYS, "not implemented")
            payload, error = handler(ino, Caller(uid, gid), body), 0
        except OSError as exc:
            payload, error = b"", -(exc.errno or errno.EIO)
        reply = OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload
        try:
            os.write(self.fd, reply)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the caller was interrupted meanwhile
                raise

    # -- requests ---------------------------------------------------------------------------

    def _init(self, ino: int, caller: Caller, body: bytes) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major != 7:
            raise OSError(errno.EPROTO, f"FUSE protocol {major} is not 7")
        ours = flags & (FUSE_ASYNC_READ | FUSE_BIG_WRITES)
        minor = min(minor, PROTOCOL_MINOR)
        return INIT_OUT.pack(7, minor, max_readahead, ours, 16, 12, MAX_WRITE, 1, 0, 0, 0)

    def _destroy(self, ino: int, caller: Caller, body: bytes) -> bytes:
        self.stopping = True
        return b""

    def _nothing_to_do(self, ino: int, caller: Caller, body: bytes) -> bytes:
        """FLUSH (close makes nothing durable), RELEASEDIR (directory handles are inode
        numbers), ACCESS (the kernel checks permissions: default_permissions)."""
        return b""

    def _lookup(self, ino: int, caller: Caller, body: bytes) -> bytes:
        return self._entry_out(self.fs.lookup(ino, _name(body)))

    def _getattr(self, ino: int, caller: Caller, body: bytes) -> bytes:
        return self._attr_out(self.fs.getattr(ino))

    def _readlink(self, ino: int, caller: Caller, body: bytes) -> bytes:
        return self.fs.readlink(ino)

    def _opendir(self, ino: int, caller: Caller, body: bytes) -> bytes:
        return OPEN_OUT.pack(ino, 0, 0)

    def _setattr(self, ino: int, caller: Caller, body: bytes) -> bytes:
        (valid, _, _, size, _, atime, mtime, _, atime_nsec, mtime_nsec, _, mode, _, uid, gid, _) = (
            SETATTR_IN.unpack_from(body)
        )
        changes = SetAttr(
            mode=mode if valid & FATTR_MODE else None,
            uid=uid if valid & FATTR_UID else None,
            gid=gid if valid & FATTR_GID else None,
            size=size if valid & FATTR_SIZE else None,
            atime_ns=_time(valid, FATTR_ATIME, FATTR_ATIME_NOW, atime, atime_nsec),
            mtime_ns=_time(valid, FATTR_MTIME, FATTR_MTIME_NOW, mtime, mtime_nsec),
        )
        return self._attr_out(self.fs.setattr(ino, changes))

    def _symlink(self, ino: int, caller: Caller, body: bytes) -> bytes:
        name, target = body.split(b"\0")[:2]
        return self._entry_out(self.fs.symlink(ino, name, target, caller))

    def _mknod(self, ino: int, caller: Caller, body: bytes) -> bytes:
        mode, rdev, _, _ = MKNOD_IN.unpack_from(body)
        name = _name(body[MKNOD_IN.size :])
        return self._entry_out(self.fs.mknod(ino, name, mode, rdev, caller))

    def _mkdir(self, ino: int, caller: Caller, body: bytes) -> bytes:
        mode, _ = MKDIR_IN.unpack_from(body)
        name = _name(body[MKDIR_IN.size :])
        return self._entry_out(self.fs.mkdir(ino, name, stat.S_IFDIR | mode, caller))

    def _unlink(self, ino: int, caller: Caller, body: bytes) -> bytes:
        self.fs.unlink(ino, _name(body))
        return b""

    def _rmdir(self, ino: int, caller: Caller, body: bytes) -> bytes:
        self.fs.rmdir(ino, _name(body))
        return b""

    def _release(self, ino: int, caller: Caller, body: bytes) -> bytes:
        self.fs.release(_fh(body))
        return b""

    def _fsync(self, ino: int, caller: Caller, body: bytes) -> bytes:
        self.fs.fsync(_fh(body))
        return b""

    def _fsyncdir(self, ino: int, caller: Caller, body: bytes) -> bytes:
        self.fs.fsyncdir(_fh(body))
        return b""

    def _rename(self, ino: int, caller: Caller, body: bytes) -> bytes:
        (new_parent,) = RENAME_IN.unpack_from(body)
        old, new = body[RENAME_IN.size :].split(b"\0")[:2]
        self.fs.rename(ino, old, new_parent, new, 0)
        return b""

    def _rename2(self, ino: int, caller: Caller, body: bytes) -> bytes:
        new_parent, flags, _ = RENAME2_IN.unpack_from(body)
        old, new = body[RENAME2_IN.size :].split(b"\0")[:2]
        self.fs.rename(ino, old, new_parent, new, flags)
        return b""

    def _link(self, ino: int, caller: Caller, body: bytes) -> bytes:
        (target,) = LINK_IN.unpack_from(body)
        return self._entry_out(self.fs.link(target, ino, _name(body[LINK_IN.size :])))

    def _open(self, ino: int, caller: Caller, body: bytes) -> bytes:
        flags, _ = OPEN_IN.unpack_from(body)
        return OPEN_OUT.pack(self.fs.open(ino, flags), FOPEN_KEEP_CACHE, 0)

    def _create(self, ino: int, caller: Caller, body: bytes) -> bytes:
        flags, mode, _, _ = CREATE_IN.unpack_from(body)
        name = _name(body[CREATE_IN.size :])
        attr, fh = self.fs.create(ino, name, mode, flags, caller)
        return self._entry_out(attr) + OPEN_OUT.pack(fh, FOPEN_KEEP_CACHE, 0)

    def _read(self, ino: int, caller: Caller, body: bytes) -> bytes:
        fh, offset, size, *_ = RW_IN.unpack_from(body)
        return self.fs.read(fh, offset, size)

    def _write(self, ino: int, caller: Caller, body: bytes) -> bytes:
        fh, offset, size, *_ = RW_IN.unpack_from(body)
        data = body[RW_IN.size : RW_IN.size + size]
        return WRITE_OUT.pack(self.fs.write(fh, offset, data), 0)

    def _fallocate(self, ino: int, caller: Caller, body: bytes) -> bytes:
        fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body)
        self.fs.fallocate(fh, mode, offset, length)
        return b""

    def _readdir(self, ino: int, caller: Caller, body: bytes) -> bytes:
        fh, offset, size, *_ = RW_IN.unpack_from(body)
        out = bytearray()
        for name, attr, cookie in self.fs.readdir(fh, offset):
            entry = DIRENT.pack(attr.ino, cookie, len(name), stat.S_IFMT(attr.mode) >> 12) + name
            entry += bytes(-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return bytes(out)

    def _statfs(self, ino: int, caller: Caller, body: bytes) -> bytes:
        st = self.fs.statfs()
        return STATFS_OUT.pack(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize,
            st.f_namemax,
            st.f_frsize,
            0,
        )

    # -- replies ----------------------------------------------------------------------------

    def _entry_out(self, attr: Attr) -> bytes:
        head = ENTRY_OUT.pack(attr.ino, 0, CACHE_TIMEOUT, CACHE_TIMEOUT, 0, 0)
        return head + _pack_attr(attr)

    def _attr_out(self, attr: Attr) -> bytes:
        return ATTR_OUT.pack(CACHE_TIMEOUT, 0, 0) + _pack_attr(attr)


def _pack_attr(a: Attr) -> bytes:
    times = [divmod(t, 10**9) for t in (a.atime_ns, a.mtime_ns, a.ctime_ns)]
    return ATTR.pack(
        a.ino,
        a.size,
        a.blocks,
        times[0][0],
        times[1][0],
        times[2][0],
        times[0][1],
        times[1][1],
        times[2][1],
        a.mode,
        a.nlink,
        a.uid,
        a.gid,
        a.rdev,
        4096,
        0,
    )


def _name(body: bytes) -> bytes:
    return body.split(b"\0", 1)[0]


def _fh(body: bytes) -> int:
    (fh,) = FH_IN.unpack_from(body)
    return int(fh)


def _time(valid: int, given: int, now: int, seconds: int, nsec: int) -> int | None:
    if valid & now:
        return -1
    if valid & given:
        return seconds * 10**9 + nsec
    return None


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def syncfs(path: Path) -> None:
    """syncfs(2) on the filesystem holding `path`: its dirty pages go to its server now."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
