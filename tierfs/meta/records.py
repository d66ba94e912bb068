"""Codecs of the values stored in the LMDB index (layouts in docs/FORMAT.md)."""

from __future__ import annotations

import dataclasses
import stat
import struct

from tierfs.errors import ExitCode, TierfsError

INODE_RECORD_VERSION = 1
_INODE = struct.Struct(">BIIIIQqqqQQIQ")
_DIRENT = struct.Struct(">QQ")
_RANGE = struct.Struct(">QQ")
_GEN = struct.Struct(">I")
RANGES_VERSION = 1


@dataclasses.dataclass(slots=True)
class Inode:
    """One inode. `parent` is kept for directories only (they have exactly one).

    `flags` holds FLAG_* bits; `data_bytes` is the number of file bytes covered by extents
    (sealed data), kept so that getattr can report allocated blocks without a scan.
    """

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
    flags: int = 0
    data_bytes: int = 0

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
            self.flags,
            self.data_bytes,
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


def encode_staged(generation: int, ranges: list[tuple[int, int]]) -> bytes:
    """The staging record: version byte, staging-file generation (u32), (start, end) pairs."""
    pairs = b"".join(_RANGE.pack(a, b) for a, b in ranges)
    return bytes([RANGES_VERSION]) + _GEN.pack(generation) + pairs


def decode_staged(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    if not data or data[0] != RANGES_VERSION:
        raise TierfsError("staging range record has an unknown version", ExitCode.VERSION)
    (generation,) = _GEN.unpack_from(data, 1)
    count = (len(data) - 5) // 16
    pairs = [_RANGE.unpack_from(data, 5 + i * 16) for i in range(count)]
    return int(generation), [(int(a), int(b)) for a, b in pairs]


def decode_ranges(data: bytes) -> list[tuple[int, int]]:
    return decode_staged(data)[1]


FLAG_FIXED_CHUNKING = 1

_EXTENT = struct.Struct(">32sII")
_CHUNK_HEAD = struct.Struct(">BBIIIB")
_LOCATION = struct.Struct(">BQQ")
CHUNK_RECORD_VERSION = 1
FLAG_TREE = 1  # ChunkRecord.flags: the chunk is a snapshot tree blob (tierfs.snap.refs)
SEGMENT_RECORD_VERSION = 1
_SEGMENT = struct.Struct(">BBQQI")

TIER_HOT = 1
TIER_COLD = 2  # (TIER_COLD, zone number, record offset in the zone)
ZONE_RECORD_VERSION = 1
_ZONE = struct.Struct(">BBQ")


def encode_extent(chunk_id: bytes, chunk_off: int, length: int) -> bytes:
    return _EXTENT.pack(chunk_id, chunk_off, length)


def decode_extent(data: bytes) -> tuple[bytes, int, int]:
    chunk_id, chunk_off, length = _EXTENT.unpack(data)
    return bytes(chunk_id), int(chunk_off), int(length)


@dataclasses.dataclass(slots=True)
class ChunkRecord:
    """A stored chunk: how many extents use it, its sizes, and where its copies are.

    `locations` holds (tier, a, b) triples; for the hot tier a = segment id, b = offset of
    the frame in the segment. Later tiers add their own triples.
    """

    refcount: int
    raw_len: int
    frame_len: int
    codec: int
    locations: list[tuple[int, int, int]]
    flags: int = 0  # FLAG_TREE: a snapshot tree blob, holding references to what it names

    def encode(self) -> bytes:
        head = _CHUNK_HEAD.pack(
            CHUNK_RECORD_VERSION,
            self.flags,
            self.refcount,
            self.raw_len,
            self.frame_len,
            self.codec,
        )
        return head + b"".join(_LOCATION.pack(*loc) for loc in self.locations)

    @classmethod
    def decode(cls, data: bytes) -> ChunkRecord:
        if not data or data[0] != CHUNK_RECORD_VERSION:
            raise TierfsError("chunk record has an unknown version", ExitCode.VERSION)
        _, flags, refcount, raw_len, frame_len, codec = _CHUNK_HEAD.unpack_from(data)
        n = (len(data) - _CHUNK_HEAD.size) // _LOCATION.size
        locations = [
            tuple(
                int(x) for x in _LOCATION.unpack_from(data, _CHUNK_HEAD.size + i * _LOCATION.size)
            )
            for i in range(n)
        ]
        return cls(refcount, raw_len, frame_len, codec, locations, flags)  # type: ignore[arg-type]

    def hot_location(self) -> tuple[int, int] | None:
        for tier, a, b in self.locations:
            if tier == TIER_HOT:
                return a, b
        return None

    def cold_location(self) -> tuple[int, int] | None:
        """(zone, record offset) of the copy in the cold tier, if any."""
        for tier, a, b in self.locations:
            if tier == TIER_COLD:
                return a, b
        return None


@dataclasses.dataclass(slots=True)
class SegmentRecord:
    """A hot-tier segment file: its committed length and how many of its bytes are live."""

    active: bool
    end: int
    live_bytes: int
    live_frames: int

    def encode(self) -> bytes:
        return _SEGMENT.pack(
            SEGMENT_RECORD_VERSION, int(self.active), self.end, self.live_bytes, self.live_frames
        )

    @classmethod
    def decode(cls, data: bytes) -> SegmentRecord:
        if not data or data[0] != SEGMENT_RECORD_VERSION:
            raise TierfsError("segment record has an unknown version", ExitCode.VERSION)
        _, active, end, live, frames = _SEGMENT.unpack(data)
        return cls(bool(active), int(end), int(live), int(frames))


@dataclasses.dataclass(slots=True)
class ZoneRecord:
    """A cold-tier zone as the index sees it: the lifetime class of its records and how many
    of its bytes committed chunk locations point at (record lengths, padding included)."""

    klass: int
    live_bytes: int

    def encode(self) -> bytes:
        return _ZONE.pack(ZONE_RECORD_VERSION, self.klass, self.live_bytes)

    @classmethod
    def decode(cls, data: bytes) -> ZoneRecord:
        if not data or data[0] != ZONE_RECORD_VERSION:
            raise TierfsError("zone record has an unknown version", ExitCode.VERSION)
        _, klass, live = _ZONE.unpack(data)
        return cls(int(klass), int(live))
