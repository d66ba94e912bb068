"""The zone record: how one chunk is stored in a zone (docs/FORMAT.md, "Zone records").

    offset size  field
    0      4     magic b"TFZR"
    4      1     format version (1)
    5      1     flags: bit 0 = relocated by reclaim; other bits 0
    6      1     lifetime class
    7      1     codec (copied from the frame: 0 raw, 1 zstd)
    8      4     plaintext length (u32, big-endian)
    12     4     payload length (u32): the length of the chunk frame that follows
    16     8     zone offset (u64): where this record starts, in bytes from its zone's start
    24     32    chunk id
    56     8     xxh3-64 of bytes 0..55 and the payload
    64     ...   payload: the chunk frame (tierfs/data/frame.py), unchanged
    ...          zeros up to a multiple of the device's logical block size

Why the payload is the whole chunk frame rather than its payload: migration copies a frame
from the hot tier and promotion copies it back, byte for byte, with no decode or re-encode;
plaintext always comes out of `frame.decode`, the one decode and checksum path every tier
shares. The record adds what only a zone needs: a magic to find records by scanning, the
lifetime class and relocation flag (to rebuild the allocator's zone streams from the device
alone), and the record's own zone offset, so that a frame which happens to contain bytes
that look like a record (a zone image stored as a file) is not taken for a real record when
a scan resynchronises after damage.

The record checksum covers the record header and the whole frame, so a zone can be checked
by scanning, without the index. Padding is not covered: readers ignore it.

A record is never split across zones, and records of a zone are back to back from offset 0.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator

import xxhash

from tierfs.data import frame
from tierfs.tiers.cold.errors import RecordError

MAGIC = b"TFZR"
VERSION = 1
FLAG_RELOCATED = 0x01
KNOWN_FLAGS = FLAG_RELOCATED
HEADER = struct.Struct(">4sBBBBIIQ32s")
HEADER_SIZE = HEADER.size + 8
LOCATION = struct.Struct(">IQI")


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class Location:
    """Where a record lies: zone index, byte offset from the zone's start, and the record's
    length on the device (padding included, so a multiple of the logical block size).

    The length is what the record costs in its zone: live-byte accounting sums it."""

    zone: int
    offset: int
    length: int

    def pack(self) -> bytes:
        """16 bytes (`>IQI`), for the caller's index records."""
        return LOCATION.pack(self.zone, self.offset, self.length)

    @classmethod
    def unpack(cls, raw: bytes) -> Location:
        zone, offset, length = LOCATION.unpack(raw)
        return cls(zone, offset, length)


@dataclasses.dataclass(frozen=True, slots=True)
class RecordHeader:
    """A parsed record header (not yet checked against its payload)."""

    version: int
    flags: int
    klass: int
    codec: int
    raw_len: int
    payload_len: int
    zone_offset: int
    chunk_id: bytes
    checksum: bytes

    @property
    def stored_len(self) -> int:
        """Header and payload, without padding."""
        return HEADER_SIZE + self.payload_len

    def record_len(self, lba: int) -> int:
        """The record's length on the device: padded to the logical block size."""
        return padded(self.stored_len, lba)

    @property
    def relocated(self) -> bool:
        return bool(self.flags & FLAG_RELOCATED)


def padded(n: int, lba: int) -> int:
    """`n` rounded up to a multiple of `lba`."""
    return -(-n // lba) * lba


def record_len(frame_len: int, lba: int) -> int:
    """The device length of a record holding a frame of `frame_len` bytes."""
    return padded(HEADER_SIZE + frame_len, lba)


def frame_info(chunk_frame: bytes | memoryview) -> frame.FrameInfo:
    """The header of a frame about to be stored; ValueError if it is not a whole frame (a
    caller's bug, caught before anything is written)."""
    try:
        info = frame.parse_header(chunk_frame)
    except frame.FrameError as exc:
        raise ValueError(f"not a chunk frame: {exc}") from None
    if info.frame_len != len(chunk_frame):
        raise ValueError(f"frame is {len(chunk_frame)} bytes, its header says {info.frame_len}")
    return info


def encode(
    chunk_frame: bytes | memoryview, *, klass: int, zone_offset: int, lba: int, flags: int = 0
) -> bytes:
    """The padded record for one chunk frame, to be written at `zone_offset` of a zone.

    The frame's own header gives the chunk id, codec and plaintext length; its checksum is
    not verified here (readers verify it when they decode the frame)."""
    if not 0 <= klass <= 0xFF:
        raise ValueError(f"lifetime class {klass} does not fit a byte")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown record flags {flags:#x}")
    info = frame_info(chunk_frame)
    header = HEADER.pack(
        MAGIC,
        VERSION,
        flags,
        klass,
        info.codec,
        info.raw_len,
        len(chunk_frame),
        zone_offset,
        info.chunk_id,
    )
    digest = xxhash.xxh3_64(header)
    digest.update(chunk_frame)
    body = header + digest.digest() + bytes(chunk_frame)
    return body + bytes(-len(body) % lba)


def parse_header(buf: bytes | memoryview, zone_offset: int | None = None) -> RecordHeader:
    """The header at the start of `buf`; checks magic, version, flags and lengths, and, when
    given, that the record says it was written at `zone_offset`."""
    if len(buf) < HEADER_SIZE:
        raise RecordError("truncated record header")
    magic, version, flags, klass, codec, raw_len, payload_len, offset, chunk_id = (
        HEADER.unpack_from(buf)
    )
    if magic != MAGIC:
        raise RecordError("bad record magic")
    if version != VERSION:
        raise RecordError(f"unknown record version {version}")
    if flags & ~KNOWN_FLAGS:
        raise RecordError(f"unknown record flags {flags:#x}")
    if payload_len < frame.HEADER_SIZE:
        raise RecordError(f"record payload of {payload_len} bytes cannot hold a frame")
    if zone_offset is not None and offset != zone_offset:
        raise RecordError(f"record at zone offset {zone_offset} says it was written at {offset}")
    checksum = bytes(buf[HEADER.size : HEADER_SIZE])
    return RecordHeader(
        version, flags, klass, codec, raw_len, payload_len, offset, bytes(chunk_id), checksum
    )


def decode(
    buf: bytes | memoryview,
    zone_offset: int | None = None,
    expected_id: bytes | None = None,
) -> tuple[RecordHeader, bytes]:
    """Check a whole record (padding optional) and return its header and chunk frame.

    Checks, in order: the header (`parse_header`), the length, the chunk id the caller
    expects, the record checksum, and that the frame's header agrees with the record's."""
    header = parse_header(buf, zone_offset)
    if len(buf) < header.stored_len:
        raise RecordError(f"record of {len(buf)} bytes, its header says {header.stored_len}")
    if expected_id is not None and header.chunk_id != expected_id:
        raise RecordError("record holds another chunk")
    payload = memoryview(buf)[HEADER_SIZE : header.stored_len]
    digest = xxhash.xxh3_64(memoryview(buf)[: HEADER.size])
    digest.update(payload)
    if digest.digest() != header.checksum:
        raise RecordError("record checksum mismatch")
    chunk_frame = bytes(payload)
    try:
        info = frame.parse_header(chunk_frame)
    except frame.FrameError as exc:
        raise RecordError(f"record payload is not a frame: {exc}") from None
    if (info.chunk_id, info.codec, info.raw_len, info.frame_len) != (
        header.chunk_id,
        header.codec,
        header.raw_len,
        header.payload_len,
    ):
        raise RecordError("record header and frame header disagree")
    return header, chunk_frame


# -- scanning


@dataclasses.dataclass(frozen=True, slots=True)
class ScanEntry:
    """One step of a zone scan: a record (`header` set) or a damaged span (`problem` set)."""

    offset: int
    length: int
    header: RecordHeader | None = None
    problem: str | None = None


ReadFn = Callable[[int, int], bytes]
"""read(zone offset, length) -> bytes, within one zone."""


def scan(
    read: ReadFn, end: int, lba: int, *, stop_at_zeros: bool, verify: bool = True
) -> Iterator[ScanEntry]:
    """Walk a zone's records from offset 0 up to `end` (the write pointer), without the index.

    Rules (docs/FORMAT.md, "Zone records"):

    * a record starts at a block boundary; its length comes from its header;
    * with `verify`, a record counts only if its whole checksum holds (without, only the
      header is read: a quick listing that trusts lengths);
    * a block that is not the start of a good record (a torn write, a crash's leftover below
      the write pointer, corruption) starts a damaged span; the scan resynchronises by trying
      every following block, and a good record must name its own zone offset, so a record
      image inside a frame's payload is not mistaken for one;
    * an all-zero block where a record should start ends the scan when `stop_at_zeros`: a
      finished (FULL) zone is zeros after its last record, and a READONLY zone has no usable
      write pointer. Below a known write pointer zeros are damage.
    """
    pos = 0
    damage: tuple[int, str] | None = None
    while pos + lba <= end:
        block = read(pos, lba)
        if stop_at_zeros and not any(block):
            break
        entry = _record_at(read, block, pos, end, lba, verify)
        if entry.problem is not None:
            damage = damage or (pos, entry.problem)
            pos += lba
            continue
        if damage is not None:
            yield ScanEntry(damage[0], pos - damage[0], problem=damage[1])
            damage = None
        yield entry
        pos += entry.length
    if damage is not None:
        yield ScanEntry(damage[0], pos - damage[0], problem=damage[1])


def _record_at(read: ReadFn, block: bytes, pos: int, end: int, lba: int, verify: bool) -> ScanEntry:
    """The record starting at `pos` (whose first block is `block`), or the reason there is
    none."""
    try:
        header = parse_header(block, zone_offset=pos)
    except RecordError as exc:
        return ScanEntry(pos, lba, problem=str(exc) if any(block) else "zeros below the wp")
    length = header.record_len(lba)
    if pos + length > end:
        return ScanEntry(pos, lba, problem="record runs past the write pointer")
    if verify:
        rest = read(pos + lba, length - lba) if length > lba else b""
        try:
            decode(block + rest, zone_offset=pos)
        except RecordError as exc:
            return ScanEntry(pos, lba, problem=str(exc))
    return ScanEntry(pos, length, header=header)
