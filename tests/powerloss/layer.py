"""A FUSE filesystem that forgets what was not made durable when its power is cut (tests only).

Run as `python -m tests.powerloss.layer DISK SCRATCH MOUNTPOINT` (see `process.LayerProcess`),
as root. It serves the directory tree in DISK at MOUNTPOINT, so that a tierfs data directory
can live inside it, and simulates a disk that loses power. It speaks the FUSE protocol itself
(`fuse.py`), because tierfs needs fallocate (hole punching), which pyfuse3 cannot serve.

Durability model
----------------
While the layer runs it owns the tree: the bytes of every regular file move to
SCRATCH/objects (one file per inode, read and written in place, so mmap through the page cache
works), the directory entries are kept in memory. Two states are tracked:

* the live state, which every request reads and changes;
* the durable state, which is what survives a power cut:
  - a regular file's bytes and size are durable as of its last fsync or fdatasync (through
    any handle of the inode). Every write, truncate or fallocate since then first saves the
    original bytes it changes (and the original size) in an undo log, which a power cut
    replays;
  - a directory's entries (name -> inode) are durable as of the directory's last fsync.
    Creating, linking, renaming and unlinking change only the live entries, so an inode that
    is still named in a durable entry lives on until the power cut decides its fate;
  - an inode is in the durable tree when a chain of durable entries leads to it from the
    root. A file fsynced but never named by a durable entry is lost, as on a real disk.

SIGUSR1 cuts the power: from then on nothing becomes durable (fsync and fsyncdir fail with
EIO, as a dead disk makes them fail), while every other request is still answered so that no
process hangs; SCRATCH/power-cut acknowledges it. SIGTERM (or an unmount) stops the layer:
it unmounts and writes DISK back as a plain directory tree, holding the durable state if the
power was cut and the live state otherwise (a clean shutdown makes everything durable). A new
layer process then serves exactly what the disk kept.

Simplifications (each either makes the model stricter than a real disk or does not matter
to tierfs):

* An fsync persists all of the file or nothing: no torn or partially persisted writes, and
  nothing written since the last fsync survives (a real disk may keep any part of it).
* fdatasync counts as fsync: it persists the size too, which it must when the size changed.
* fsync of a file does not make its directory entry durable (ext4 does; POSIX does not
  promise it).
* Attributes (mode, owner, times) are not versioned: the durable tree gets the live ones.
* Each directory's entries become durable on their own: after a rename between two
  directories of which only one was fsynced, a power cut can leave the file in both or in
  neither (a journaling filesystem would keep the rename atomic), and directory renames that
  would make the durable tree cyclic are cut at the second visit. tierfs renames nothing
  between directories of its data directory.
* No xattrs, no lseek(SEEK_DATA/SEEK_HOLE) (the kernel then treats files as all data) and no
  lock requests (the kernel keeps flock and POSIX locks itself).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from .fuse import Attr, Caller, FuseServer, SetAttr, Stop, fallocate

log = logging.getLogger("powerloss")

FSNAME = "powerloss"
READY_NAME = "ready"
CUT_NAME = "power-cut"
OBJECTS_NAME = "objects"
ROOT_INO = 1
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Ranges:
    """Disjoint, sorted half-open byte ranges."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int]] = []

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) that no range covers."""
        out: list[tuple[int, int]] = []
        pos = start
        for a, b in self._items:
            if a >= end:
                break
            if b <= pos:
                continue
            if a > pos:
                out.append((pos, a))
            pos = b
        if pos < end:
            out.append((pos, end))
        return out

    def add(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self._items, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._items = merged


class UndoLog:
    """How to roll a file back to its last durable state: that size, and the bytes overwritten.

    Invariant: every byte below `size` that no saved range covers still holds its durable
    value, so saving a range before its first change is enough.
    """

    def __init__(self) -> None:
        self.size: int | None = None  # None: unchanged since the file was last made durable
        self._saved: list[tuple[int, bytes]] = []
        self._covered = Ranges()

    def before_change(self, fd: int, start: int, end: int) -> None:
        """Save the durable bytes of [start, end) that have not been saved yet."""
        if self.size is None:
            self.size = os.fstat(fd).st_size
        for a, b in self._covered.missing(start, min(end, self.size)):
            self._saved.append((a, os.pread(fd, b - a, a)))
            self._covered.add(a, b)

    def made_durable(self) -> None:
        self.size = None
        self._saved = []
        self._covered = Ranges()

    def roll_back(self, fd: int) -> None:
        if self.size is None:
            return
        os.ftruncate(fd, self.size)
        for offset, data in self._saved:
            os.pwrite(fd, data, offset)
        self.made_durable()


@dataclass(eq=False, kw_only=True)
class Node:
    """An inode of any kind; the subclasses add what directories and files hold."""

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    links: int = 1
    target: bytes = b""
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)

    def changed(self, content: bool) -> None:
        now = time.time_ns()
        self.ctime_ns = now
        if content:
            self.mtime_ns = now


@dataclass(eq=False, kw_only=True)
class Dir(Node):
    """Live entries, durable entries, and a stable readdir cookie per live entry."""

    live: dict[bytes, Node] = field(default_factory=dict)
    durable: dict[bytes, Node] = field(default_factory=dict)
    cookies: dict[bytes, int] = field(default_factory=dict)
    next_cookie: int = 1

    def add(self, name: bytes, node: Node) -> None:
        self.live[name] = node
        self.cookies[name] = self.next_cookie
        self.next_cookie += 1
        self.changed(content=True)

    def remove(self, name: bytes) -> Node:
        del self.cookies[name]
        self.changed(content=True)
        return self.live.pop(name)

    def subdirs(self) -> int:
        return sum(isinstance(n, Dir) for n in self.live.values())


@dataclass(eq=False, kw_only=True)
class File(Node):
    """A regular file: its object file (kept open) and the undo log of unsynced changes."""

    path: bytes
    fd: int
    undo: UndoLog = field(default_factory=UndoLog)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        current = self.size()
        self.undo.before_change(self.fd, min(size, current), max(size, current))
        os.ftruncate(self.fd, size)
        self.changed(content=True)

    def write(self, offset: int, data: bytes) -> int:
        self.undo.before_change(self.fd, offset, offset + len(data))
        written = os.pwrite(self.fd, data, offset)
        self.changed(content=True)
        return written

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """Any fallocate(2) mode (tierfs punches holes); the undo log covers the range."""
        self.undo.before_change(self.fd, offset, offset + length)
        fallocate(self.fd, mode, offset, length)
        self.changed(content=True)


def _fail(err: int) -> OSError:
    return OSError(err, os.strerror(err))


class PowerLossFs:
    """The filesystem the FUSE server calls (`fuse.Filesystem`), one request at a time."""

    def __init__(self, objects: Path) -> None:
        self.objects = objects
        self.root = Dir(ino=ROOT_INO, mode=stat.S_IFDIR | 0o755)
        self.nodes: dict[int, Node] = {self.root.ino: self.root}
        self.handles: dict[int, File] = {}
        self.next_ino = ROOT_INO + 1
        self.next_fh = 1
        self.power_cut = False

    # -- nodes ------------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> Dir:
        node = self._node(ino)
        if not isinstance(node, Dir):
            raise _fail(errno.ENOTDIR)
        return node

    def _file(self, ino: int) -> File:
        node = self._node(ino)
        if not isinstance(node, File):
            raise _fail(errno.EISDIR if isinstance(node, Dir) else errno.EINVAL)
        return node

    def _new_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def _new_file(self, mode: int, uid: int, gid: int, adopt: bytes | None = None) -> File:
        """A file node with its object; `adopt` moves an existing file in as the object."""
        ino = self._new_ino()
        path = os.fsencode(self.objects / str(ino))
        if adopt is not None:
            os.rename(adopt, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        node = File(ino=ino, mode=mode, uid=uid, gid=gid, path=path, fd=fd)
        self.nodes[ino] = node
        return node

    def _new_node(self, node: Node) -> Node:
        self.nodes[node.ino] = node
        return node

    def attr(self, node: Node) -> Attr:
        size, blocks, nlink = len(node.target), 0, node.links
        if isinstance(node, Dir):
            size, nlink = 4096, 2 + node.subdirs()
        elif isinstance(node, File):
            st = os.fstat(node.fd)
            size, blocks = st.st_size, st.st_blocks
        return Attr(
            node.ino,
            node.mode,
            nlink,
            node.uid,
            node.gid,
            node.rdev,
            size,
            blocks,
            node.atime_ns,
            node.mtime_ns,
            node.ctime_ns,
        )

    def _link_new(self, parent: int, name: bytes, node: Node) -> Attr:
        d = self._dir(parent)
        if name in d.live:
            raise _fail(errno.EEXIST)
        d.add(name, node)
        return self.attr(node)

    # -- namespace --------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Attr:
        node = self._dir(parent).live.get(name)
        if node is None:
            raise _fail(errno.ENOENT)
        return self.attr(node)

    def getattr(self, ino: int) -> Attr:
        return self.attr(self._node(ino))

    def setattr(self, ino: int, changes: SetAttr) -> Attr:
        node = self._node(ino)
        if changes.size is not None:
            self._file(ino).truncate(changes.size)
        if changes.mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(changes.mode)
        if changes.uid is not None:
            node.uid = changes.uid
        if changes.gid is not None:
            node.gid = changes.gid
        now = time.time_ns()
        if changes.atime_ns is not None:
            node.atime_ns = now if changes.atime_ns < 0 else changes.atime_ns
        if changes.mtime_ns is not None:
            node.mtime_ns = now if changes.mtime_ns < 0 else changes.mtime_ns
        node.changed(content=False)
        return self.attr(node)

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise _fail(errno.EINVAL)
        return node.target

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        if stat.S_ISREG(mode):
            node: Node = self._new_file(mode, caller.uid, caller.gid)
        else:
            node = Node(ino=self._new_ino(), mode=mode, uid=caller.uid, gid=caller.gid, rdev=rdev)
        return self._link_new(parent, name, self._new_node(node))

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        node = Dir(ino=self._new_ino(), mode=mode, uid=caller.uid, gid=caller.gid)
        return self._link_new(parent, name, self._new_node(node))

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        mode = stat.S_IFLNK | 0o777
        node = Node(ino=self._new_ino(), mode=mode, uid=caller.uid, gid=caller.gid, target=target)
        return self._link_new(parent, name, self._new_node(node))

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        node = self._node(ino)
        if isinstance(node, Dir):
            raise _fail(errno.EPERM)
        self._link_new(parent, name, node)
        node.links += 1
        node.changed(content=False)
        return self.attr(node)

    def unlink(self, parent: int, name: bytes) -> None:
        d = self._dir(parent)
        node = d.live.get(name)
        if node is None:
            raise _fail(errno.ENOENT)
        if isinstance(node, Dir):
            raise _fail(errno.EISDIR)
        d.remove(name)
        node.links -= 1
        node.changed(content=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        d = self._dir(parent)
        node = d.live.get(name)
        if node is None:
            raise _fail(errno.ENOENT)
        if not isinstance(node, Dir):
            raise _fail(errno.ENOTDIR)
        if node.live:
            raise _fail(errno.ENOTEMPTY)
        d.remove(name)

    def rename(self, parent: int, name: bytes, new_parent: int, new: bytes, flags: int) -> None:
        src, dst = self._dir(parent), self._dir(new_parent)
        node = src.live.get(name)
        if node is None:
            raise _fail(errno.ENOENT)
        target = dst.live.get(new)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise _fail(errno.ENOENT)
            src.live[name], dst.live[new] = target, node
            src.changed(content=True)
            dst.changed(content=True)
            return
        if target is node:
            return
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            self._replace(dst, new, node, target)
        src.remove(name)
        dst.add(new, node)
        node.changed(content=False)

    def _replace(self, d: Dir, name: bytes, node: Node, target: Node) -> None:
        """Drop `target` from d/name, which `node` is about to take over (rename(2) rules)."""
        if isinstance(target, Dir):
            if not isinstance(node, Dir):
                raise _fail(errno.EISDIR)
            if target.live:
                raise _fail(errno.ENOTEMPTY)
        elif isinstance(node, Dir):
            raise _fail(errno.ENOTDIR)
        d.remove(name)
        target.links -= 1
        target.changed(content=False)

    # -- directories ------------------------------------------------------------------------

    def readdir(self, ino: int, offset: int) -> Iterator[tuple[bytes, Attr, int]]:
        d = self._dir(ino)
        for cookie, name in sorted((c, n) for n, c in d.cookies.items()):
            if cookie > offset:
                yield name, self.attr(d.live[name]), cookie

    def fsyncdir(self, ino: int) -> None:
        d = self._dir(ino)
        self._require_power()
        d.durable = dict(d.live)

    # -- files ------------------------------------------------------------------------------

    def _open(self, node: File) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node
        return fh

    def _handle(self, fh: int) -> File:
        node = self.handles.get(fh)
        if node is None:
            raise _fail(errno.EBADF)
        return node

    def open(self, ino: int, flags: int) -> int:
        node = self._file(ino)
        if flags & os.O_TRUNC:
            node.truncate(0)
        return self._open(node)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Attr, int]:
        if name in self._dir(parent).live:
            raise _fail(errno.EEXIST)
        node = self._new_file(stat.S_IFREG | stat.S_IMODE(mode), caller.uid, caller.gid)
        return self._link_new(parent, name, node), self._open(node)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self._handle(fh).fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return self._handle(fh).write(offset, data)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self._handle(fh).fallocate(mode, offset, length)

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    def fsync(self, fh: int) -> None:
        node = self._handle(fh)
        self._require_power()
        node.undo.made_durable()

    def _require_power(self) -> None:
        if self.power_cut:
            raise _fail(errno.EIO)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.objects)

    # -- taking over the disk and writing it back --------------------------------------------

    def load(self, disk: Path) -> None:
        """Take over the tree in `disk`: file bytes move to objects/, entries into memory."""
        st = os.lstat(disk)
        self._load_dir(self.root, os.fsencode(disk), {})
        _copy_attrs(self.root, st)

    def _load_dir(self, d: Dir, path: bytes, files: dict[int, File]) -> None:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            d.add(entry.name, self._load_entry(entry.path, files))
        d.durable = dict(d.live)

    def _load_entry(self, path: bytes, files: dict[int, File]) -> Node:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_ino in files:
            os.unlink(path)
            files[st.st_ino].links += 1
            return files[st.st_ino]
        node: Node
        if stat.S_ISDIR(st.st_mode):
            d = Dir(ino=self._new_ino(), mode=st.st_mode)
            self._load_dir(d, path, files)
            os.rmdir(path)
            node = self._new_node(d)
        elif stat.S_ISREG(st.st_mode):
            node = files[st.st_ino] = self._new_file(st.st_mode, st.st_uid, st.st_gid, path)
        else:
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else b""
            node = self._new_node(Node(ino=self._new_ino(), mode=st.st_mode, target=target))
            os.unlink(path)
        _copy_attrs(node, st)
        return node

    def write_back(self, disk: Path) -> None:
        """Write the durable tree (after a power cut) or the live one to `disk`."""
        durable = self.power_cut
        for node in self.nodes.values():
            if isinstance(node, File):
                if durable:
                    node.undo.roll_back(node.fd)
                os.close(node.fd)
        path = os.fsencode(disk)
        self._write_dir(self.root, path, durable, {self.root.ino})
        _apply_attrs(self.root, path)
        shutil.rmtree(self.objects)

    def _write_dir(self, d: Dir, path: bytes, durable: bool, seen: set[int]) -> None:
        for name, node in (d.durable if durable else d.live).items():
            child = os.path.join(path, name)
            if isinstance(node, Dir):
                if node.ino in seen:
                    continue
                seen.add(node.ino)
                os.mkdir(child)
                self._write_dir(node, child, durable, seen)
            elif isinstance(node, File):
                os.link(node.path, child)
            elif stat.S_ISLNK(node.mode):
                os.symlink(node.target, child)
            else:
                os.mknod(child, node.mode, node.rdev)
            _apply_attrs(node, child)


def _copy_attrs(node: Node, st: os.stat_result) -> None:
    node.mode = st.st_mode
    node.uid, node.gid, node.rdev = st.st_uid, st.st_gid, st.st_rdev
    node.atime_ns, node.mtime_ns, node.ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def _apply_attrs(node: Node, path: bytes) -> None:
    if not stat.S_ISLNK(node.mode):
        os.chmod(path, stat.S_IMODE(node.mode))
    if os.geteuid() == 0:
        os.lchown(path, node.uid, node.gid)
    os.utime(path, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)


# -- the process ----------------------------------------------------------------------------


class Signals:
    """SIGUSR1 cuts the power (acknowledged in a file); SIGTERM and SIGINT stop the server.

    Handlers run between two Python bytecodes of the main thread, so they only set flags; to
    stop a server that waits for a request they raise `Stop` out of its read.
    """

    def __init__(self, fs: PowerLossFs, server: FuseServer, scratch: Path) -> None:
        self.fs = fs
        self.server = server
        self.scratch = scratch

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self.cut_power)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def cut_power(self, signum: int, frame: FrameType | None) -> None:
        self.fs.power_cut = True
        (self.scratch / CUT_NAME).write_text("cut\n")

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.server.stopping = True
        if self.server.waiting:
            raise Stop


def _raise_fd_limit() -> None:
    """Every file keeps its object open until the layer stops."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("disk", type=Path, help="the directory tree to serve (the disk)")
    parser.add_argument("scratch", type=Path, help="working space on the same filesystem")
    parser.add_argument("mountpoint", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s powerloss: %(message)s"
    )
    _raise_fd_limit()
    objects = args.scratch / OBJECTS_NAME
    objects.mkdir(parents=True)  # fails if a previous layer died before writing its disk back
    fs = PowerLossFs(objects)
    fs.load(args.disk)
    server = FuseServer(fs, args.mountpoint, FSNAME)
    Signals(fs, server, args.scratch).install()
    server.mount()
    try:
        (args.scratch / READY_NAME).write_text(f"{os.getpid()}\n")
        server.serve()
    finally:
        server.unmount()
        fs.write_back(args.disk)
        log.info("wrote back the %s state", "durable" if fs.power_cut else "live")


if __name__ == "__main__":
    main()
