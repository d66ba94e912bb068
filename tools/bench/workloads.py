"""The timed workloads. Each does plain syscalls from this process and returns a rate.

They are deliberately simple loops over `os` calls: Python's per-call cost is a few
microseconds, small against a FUSE round trip, and identical for all three targets.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

IO_SIZE = 1 << 20
SMALL_FILE_SIZE = 4096
FILES_PER_DIR = 100
MB = 1_000_000


@dataclass(frozen=True)
class Tree:
    """The small-file tree: `dirs` directories of up to FILES_PER_DIR files each."""

    dirs: list[bytes]
    files: list[bytes]

    @classmethod
    def under(cls, root: Path, count: int) -> Tree:
        """Paths are built once, so the timed loops only make syscalls."""
        base = os.fsencode(root)
        ndirs = max(1, -(-count // FILES_PER_DIR))
        dirs = [os.path.join(base, b"d%03d" % d) for d in range(ndirs)]
        files = [os.path.join(dirs[i // FILES_PER_DIR], b"f%03d" % i) for i in range(count)]
        return cls(dirs, files)


def _rate(amount: float, started: float) -> float:
    return amount / max(time.perf_counter() - started, 1e-9)


def seq_write(path: Path, size: int) -> float:
    """MB/s of writing `size` bytes in IO_SIZE writes, fsync included (the data is on disk)."""
    view = memoryview(os.urandom(IO_SIZE))
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, view[: min(left, IO_SIZE)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return _rate(size / MB, started)


def seq_read(path: Path, size: int) -> float:
    """MB/s of reading the file back in IO_SIZE reads into one reused buffer."""
    buf = bytearray(IO_SIZE)
    total = 0
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    rate = _rate(total / MB, started)
    if total != size:
        raise RuntimeError(f"{path}: read {total} bytes, expected {size}")
    return rate


def create_files(tree: Tree) -> float:
    """Files/s of creating the tree: mkdir each directory, then create+write+close each file."""
    payload = os.urandom(SMALL_FILE_SIZE)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    started = time.perf_counter()
    for d in tree.dirs:
        os.mkdir(d)
    for f in tree.files:
        fd = os.open(f, flags, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    return _rate(len(tree.files), started)


def stat_files(tree: Tree) -> float:
    """Files/s of stat() by path (the kernel looks each name up once when cold)."""
    started = time.perf_counter()
    for f in tree.files:
        if os.stat(f).st_size != SMALL_FILE_SIZE:
            raise RuntimeError(f"{f!r}: wrong size")
    return _rate(len(tree.files), started)


def read_files(tree: Tree) -> float:
    """Files/s of open+read+close of every file."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    started = time.perf_counter()
    for f in tree.files:
        fd = os.open(f, flags)
        try:
            if len(os.read(fd, SMALL_FILE_SIZE)) != SMALL_FILE_SIZE:
                raise RuntimeError(f"{f!r}: short read")
        finally:
            os.close(fd)
    return _rate(len(tree.files), started)


def delete_files(tree: Tree) -> float:
    """Files/s of unlinking every file, then removing the directories."""
    started = time.perf_counter()
    for f in tree.files:
        os.unlink(f)
    for d in tree.dirs:
        os.rmdir(d)
    return _rate(len(tree.files), started)
