"""Staging: the mutable, NVMe-resident bytes of files, one sparse file per inode.

Writes land here first. Each inode's staged ranges (the byte ranges that hold data written
since they were last sealed) are tracked in memory and written to the index with every group
commit, so a remount after a crash knows what is staged. Until the data path seals ranges into
chunks, every byte of a file lives in its staging file.

Staging files are named by inode number, and inode numbers are never reused, so a staging file
can never hold another file's bytes; files without an owning inode are removed at mount.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from tierfs.fs.ranges import RangeSet

log = logging.getLogger(__name__)


class Staging:
    """Per-inode staging files under DATA_DIR/staging, with a shared fd per open inode."""

    def __init__(self, root: Path, reserve_bytes: int) -> None:
        self.root = root
        self.reserve_bytes = reserve_bytes
        self._fds: dict[int, int] = {}
        self._users: dict[int, int] = {}
        self.ranges: dict[int, RangeSet] = {}
        self.changed: set[int] = set()
        self.unsynced_dirs: set[Path] = set()
        self.unsynced_files: set[int] = set()

    def path(self, ino: int) -> Path:
        return self.root / f"{ino & 0xFF:02x}" / f"{ino:016x}"

    # -- fd management --------------------------------------------------------------------

    def acquire(self, ino: int) -> int:
        """An fd for the inode's staging file, shared by every open handle of the inode."""
        fd = self._fds.get(ino)
        if fd is None:
            fd = self._open(ino)
            self._fds[ino] = fd
        self._users[ino] = self._users.get(ino, 0) + 1
        return fd

    def release(self, ino: int) -> None:
        users = self._users[ino] - 1
        if users:
            self._users[ino] = users
            return
        del self._users[ino]
        os.close(self._fds.pop(ino))

    def _open(self, ino: int) -> int:
        path = self.path(ino)
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.unsynced_dirs.add(self.root)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.unsynced_dirs.add(path.parent)
        return fd

    def fd(self, ino: int) -> int | None:
        return self._fds.get(ino)

    # -- data -----------------------------------------------------------------------------

    def write(self, ino: int, offset: int, data: bytes) -> int:
        fd = self._fds[ino]
        self._check_space(len(data))
        written = os.pwrite(fd, data, offset)
        self._mark(ino, offset, offset + written)
        self.unsynced_files.add(ino)
        return written

    def read(self, ino: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(ino)
        if fd is not None:
            return os.pread(fd, size, offset)
        try:
            with open(self.path(ino), "rb") as f:
                return os.pread(f.fileno(), size, offset)
        except FileNotFoundError:
            return b""

    def truncate(self, ino: int, size: int) -> None:
        fd = self._fds.get(ino)
        if fd is not None:
            os.ftruncate(fd, size)
        elif size == 0:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(self.path(ino), 0)
        else:
            fd = self.acquire(ino)
            try:
                os.ftruncate(fd, size)
            finally:
                self.release(ino)
        ranges = self.ranges.setdefault(ino, RangeSet())
        ranges.truncate(size)
        self.changed.add(ino)
        self.unsynced_files.add(ino)

    def _mark(self, ino: int, start: int, end: int) -> None:
        ranges = self.ranges.get(ino)
        if ranges is None:
            ranges = self.ranges[ino] = RangeSet()
        ranges.add(start, end)
        self.changed.add(ino)

    def _check_space(self, size: int) -> None:
        if self.reserve_bytes <= 0:
            return
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize - size < self.reserve_bytes:
            raise OSError(errno.ENOSPC, "staging reserve reached")

    def remove(self, ino: int) -> None:
        """Drop an inode's staged bytes (the inode is gone)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(ino))
        self.ranges.pop(ino, None)
        self.changed.add(ino)
        self.unsynced_files.discard(ino)

    def allocated_bytes(self, ino: int) -> int:
        fd = self._fds.get(ino)
        try:
            st = os.fstat(fd) if fd is not None else os.stat(self.path(ino))
        except FileNotFoundError:
            return 0
        return st.st_blocks * 512

    # -- durability -------------------------------------------------------------------------

    def take_sync_work(self, ino: int | None = None) -> SyncWork:
        """What must be fsynced to make `ino` (or every inode) durable; run it in a thread.

        Taken on the trio thread so that the bookkeeping sets are never touched by a worker;
        the work holds its own fds, so a concurrent close cannot pull one from under it.
        """
        inos = [ino] if ino is not None else list(self.unsynced_files)
        fds: list[int] = []
        for i in inos:
            if i not in self.unsynced_files:
                continue
            self.unsynced_files.discard(i)
            fd = self._fds.get(i)
            if fd is not None:
                fds.append(os.dup(fd))
            else:
                with contextlib.suppress(FileNotFoundError):
                    fds.append(os.open(self.path(i), os.O_RDONLY | os.O_CLOEXEC))
        dirs = sorted(self.unsynced_dirs, key=lambda p: len(p.parts), reverse=True)
        self.unsynced_dirs.clear()
        return SyncWork(fds, dirs)

    def take_changed(self) -> dict[int, list[tuple[int, int]] | None]:
        """Ranges of inodes changed since the last call, for the group commit (None: none)."""
        out: dict[int, list[tuple[int, int]] | None] = {}
        for ino in self.changed:
            ranges = self.ranges.get(ino)
            out[ino] = ranges.as_list() if ranges else None
        self.changed.clear()
        return out

    def all_files(self) -> Iterator[tuple[int, Path]]:
        """(inode, path) of every staging file on disk."""
        if not self.root.exists():
            return
        for bucket in sorted(self.root.iterdir()):
            if not bucket.is_dir():
                continue
            for f in bucket.iterdir():
                try:
                    yield int(f.name, 16), f
                except ValueError:
                    yield -1, f

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._users.clear()


class SyncWork:
    """fsyncs of staging files and their directories, owned fds included (worker thread)."""

    def __init__(self, fds: list[int], dirs: list[Path]) -> None:
        self.fds = fds
        self.dirs = dirs

    def run(self) -> None:
        try:
            for fd in self.fds:
                os.fsync(fd)
        finally:
            for fd in self.fds:
                os.close(fd)
        for d in self.dirs:
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
