"""The timed workloads. Each does plain syscalls from this process and returns a rate (the
write of the data path returns its times), and the data they write.

They are deliberately simple loops over `os` calls: Python's per-call cost is a few
microseconds, small against a FUSE round trip, and identical for all three targets.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

IO_SIZE = 1 << 20
SMALL_FILE_SIZE = 4096
RANDOM_READ_SIZE = 4096
FILES_PER_DIR = 100
SPOT_CHECKS = 64
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


def random_bytes(size: int, seed: str) -> bytes:
    """`size` incompressible bytes, different for each seed and the same on every run.

    BLAKE3's extendable output makes a gigabyte in about a second (os.urandom takes three),
    and outside the timed loops. Every block is unique, so tierfs can neither deduplicate nor
    compress it: the data path does all its work.
    """
    return blake3.blake3(seed.encode()).digest(length=size)


@dataclass(frozen=True)
class WriteTimes:
    """Seconds from open until fsync returned (what the application waits for), and until
    the target said the data is durable in its final form (tierfs: sealed into chunks)."""

    fsynced: float
    durable: float


def write_file(path: Path, data: bytes, size: int, seal: Callable[[], None]) -> WriteTimes:
    """Write `size` bytes in IO_SIZE writes, cycling through `data`; fsync, close, `seal`.

    `data` is the whole file (random data) or a block repeated until `size` (duplicate-heavy
    data); its length must be a multiple of IO_SIZE so that every write is a full slice.
    """
    if len(data) % IO_SIZE and len(data) < size:
        raise ValueError("a repeated block must be a multiple of the I/O size")
    view = memoryview(data)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pos = 0
        while pos < size:
            at = pos % len(data)
            pos += os.write(fd, view[at : at + min(size - pos, IO_SIZE)])
        os.fsync(fd)
        fsynced = time.perf_counter() - started
    finally:
        os.close(fd)
    seal()
    return WriteTimes(fsynced, time.perf_counter() - started)


def seq_write(path: Path, data: bytes, size: int) -> float:
    """MB/s of writing `size` bytes of `data` in IO_SIZE writes, fsync included."""
    times = write_file(path, data, size, lambda: None)
    return size / MB / max(times.fsynced, 1e-9)


def read_through(path: Path, buf: bytearray) -> int:
    """Open the file and read it to its end in reads of `buf`'s size; the bytes read."""
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total


def seq_read(path: Path, size: int) -> float:
    """MB/s of reading the file back in IO_SIZE reads into one reused buffer."""
    buf = bytearray(IO_SIZE)
    started = time.perf_counter()
    total = read_through(path, buf)
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


def random_reads(path: Path, size: int, count: int, seed: int) -> float:
    """Reads/s of `count` RANDOM_READ_SIZE preads at aligned offsets drawn from `seed`.

    Offsets are drawn before the clock starts and are the same for every target, so all of
    them read the same blocks in the same order.
    """
    rng = random.Random(seed)
    blocks = size // RANDOM_READ_SIZE
    offsets = [rng.randrange(blocks) * RANDOM_READ_SIZE for _ in range(count)]
    buf = bytearray(RANDOM_READ_SIZE)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for off in offsets:
            if os.preadv(fd, [buf], off) != RANDOM_READ_SIZE:
                raise RuntimeError(f"{path}: short read at {off}")
    finally:
        os.close(fd)
    return _rate(count, started)


def spot_check(path: Path, data: bytes, size: int) -> None:
    """Compare SPOT_CHECKS blocks of the file with what was written (outside the timing).

    A benchmark that read back wrong bytes fast would be worse than useless; a full compare
    would cost as much as the read itself, a sample catches a broken data path.
    """
    rng = random.Random(size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(SPOT_CHECKS):
            off = rng.randrange(size - RANDOM_READ_SIZE + 1)
            if os.pread(fd, RANDOM_READ_SIZE, off) != _pattern(data, off, RANDOM_READ_SIZE):
                raise RuntimeError(f"{path}: wrong bytes at offset {off}")
    finally:
        os.close(fd)


def _pattern(data: bytes, off: int, length: int) -> bytes:
    """The `length` bytes at file offset `off` of a file that repeats `data`."""
    at = off % len(data)
    head = data[at : at + length]
    return head + data[: length - len(head)]
