"""Codecs of the values stored in the LMDB index (layouts in docs/FORMAT.md)."""

from __future__ import annotations

import dataclasses
import stat
import struct

from tierfs.errors import ExitCode, TierfsError

INODE_RECORD_VERSION = 1
_INODE = struct.Struct(">BIIIIQqqqQQ")
_DIRENT = struct.Struct(">QQ")
_RANGE = struct.Struct(">QQ")
RANGES_VERSION = 1


@dataclasses.dataclass(slots=True)
class Inode:
    """One inode. `parent` is kept for directories only (they have exactly one)."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    parent: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def encode(self) -> bytes:
        return _INODE.pack(
            INODE_RECORD_VERSION,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.rdev,
            self.parent,
        )

    @classmethod
    def decode(cls, ino: int, data: bytes) -> Inode:
        if not data or data[0] != INODE_RECORD_VERSION:
            raise TierfsError(
                f"inode {ino}: record version {data[:1].hex() or 'missing'} is unknown",
                ExitCode.VERSION,
            )
        fields = _INODE.unpack(data)
        return cls(ino, *fields[1:])


def encode_dirent(child: int, cookie: int) -> bytes:
    return _DIRENT.pack(child, cookie)


def decode_dirent(data: bytes) -> tuple[int, int]:
    child, cookie = _DIRENT.unpack(data)
    return int(child), int(cookie)


def encode_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """[(start, end), ...] half-open byte ranges -> version byte + pairs."""
    return bytes([RANGES_VERSION]) + b"".join(_RANGE.pack(a, b) for a, b in ranges)


def decode_ranges(data: bytes) -> list[tuple[int, int]]:
    if not data or data[0] != RANGES_VERSION:
        raise TierfsError("staging range record has an unknown version", ExitCode.VERSION)
    return [
        (int(a), int(b))
        for a, b in (_RANGE.unpack_from(data, 1 + i * 16) for i in range((len(data) - 1) // 16))
    ]
