"""fsx-style test: 10,000 random reads, writes, truncates and size checks on one file.

Every operation is applied to the file on the mount and to an in-memory model; every read and
size check must agree. The seed is printed in every assertion message.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from pathlib import Path

from tests.conftest import Mount, assert_mostly_sealed

SEED = 4242
OPS = 10_000
MAX_SIZE = 2 * 1024 * 1024
MAX_IO = 128 * 1024


class Fsx:
    def __init__(self, path: Path, rng: random.Random) -> None:
        self.path = path
        self.rng = rng
        self.model = bytearray()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.step = 0

    def where(self) -> str:
        return f"seed {SEED}, op {self.step}"

    def write(self) -> None:
        off = self.rng.randrange(0, MAX_SIZE)
        data = self.rng.randbytes(self.rng.randrange(1, MAX_IO))
        assert os.pwrite(self.fd, data, off) == len(data), self.where()
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off : off + len(data)] = data

    def read(self) -> None:
        off = self.rng.randrange(0, max(1, len(self.model) + 4096))
        size = self.rng.randrange(0, MAX_IO)
        assert os.pread(self.fd, size, off) == bytes(self.model[off : off + size]), self.where()

    def truncate(self) -> None:
        size = self.rng.randrange(0, MAX_SIZE)
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def check_size(self) -> None:
        assert os.fstat(self.fd).st_size == len(self.model), self.where()

    def map_read(self) -> None:
        if not self.model:
            return
        with mmap.mmap(self.fd, len(self.model), prot=mmap.PROT_READ) as m:
            off = self.rng.randrange(0, len(self.model))
            size = self.rng.randrange(0, MAX_IO)
            assert m[off : off + size] == bytes(self.model[off : off + size]), self.where()

    def reopen(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    def run(self, ops: int) -> None:
        actions = [self.write] * 4 + [self.read] * 4 + [self.truncate, self.check_size]
        actions += [self.map_read, self.reopen]
        for self.step in range(ops):
            self.rng.choice(actions)()
        self.check_size()
        os.close(self.fd)


def test_fsx_single_file(any_fs: Mount) -> None:
    fs = any_fs
    fsx = Fsx(fs.mnt / "fsx.bin", random.Random(SEED))
    fsx.run(OPS)
    time.sleep(1)
    assert_mostly_sealed(fs)
    assert (fs.mnt / "fsx.bin").read_bytes() == bytes(fsx.model), f"seed {SEED}, final content"
    fs.remount()
    assert (fs.mnt / "fsx.bin").read_bytes() == bytes(fsx.model), f"seed {SEED}, after remount"
