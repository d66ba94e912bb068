"""The Linux zoned block device model: zone types, conditions, reports and geometry.

Everything follows include/uapi/linux/blkzoned.h and the kernel's null_blk emulator (see
docs/ARCHITECTURE.md, "Cold tier"): report fields are in 512-byte sectors, a zone descriptor
packs into the 64-byte `struct blk_zone`, and geometry is validated as Linux validates it.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from tierfs.errors import ExitCode, TierfsError

SECTOR = 512
BLK_ZONE = struct.Struct("=QQQBBBB4xQ24x")
REPORT_HEADER = struct.Struct("=QII")
BLK_ZONE_REP_CAPACITY = 1
WP_INVALID = (1 << 64) - 1


class ZoneType(enum.IntEnum):
    CONVENTIONAL = 0x1
    SEQWRITE_REQ = 0x2


class Cond(enum.IntEnum):
    NOT_WP = 0x0
    EMPTY = 0x1
    IMP_OPEN = 0x2
    EXP_OPEN = 0x3
    CLOSED = 0x4
    READONLY = 0xD
    FULL = 0xE
    OFFLINE = 0xF

    @property
    def is_open(self) -> bool:
        return self in (Cond.IMP_OPEN, Cond.EXP_OPEN)

    @property
    def is_active(self) -> bool:
        return self in (Cond.IMP_OPEN, Cond.EXP_OPEN, Cond.CLOSED)


@dataclasses.dataclass(frozen=True)
class Zone:
    """One zone as BLKREPORTZONE describes it (all positions in 512-byte sectors)."""

    start: int
    len: int
    wp: int
    type: ZoneType
    cond: Cond
    capacity: int
    non_seq: int = 0
    reset: int = 0

    def pack(self) -> bytes:
        return BLK_ZONE.pack(
            self.start,
            self.len,
            self.wp,
            self.type,
            self.cond,
            self.non_seq,
            self.reset,
            self.capacity,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Zone:
        start, length, wp, ztype, cond, non_seq, reset, capacity = BLK_ZONE.unpack(data)
        return cls(start, length, wp, ZoneType(ztype), Cond(cond), capacity, non_seq, reset)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Zone geometry and limits; byte units. `max_open`/`max_active` 0 mean unlimited."""

    lba_size: int = 4096
    zone_size: int = 4 << 20
    zone_capacity: int = 3 << 20
    nr_zones: int = 64
    nr_conv: int = 2
    max_open: int = 6
    max_active: int = 8
    zone_append_max: int = 1 << 20
    read_past_wp: str = "zeros"

    @property
    def nr_seq(self) -> int:
        return self.nr_zones - self.nr_conv

    @property
    def device_size(self) -> int:
        return self.nr_zones * self.zone_size

    def effective_limits(self) -> tuple[int, int]:
        """(max_open, max_active) as null_blk applies them: open <= active, and a limit at
        or above the number of sequential zones means no limit."""
        active = 0 if self.max_active >= self.nr_seq else self.max_active
        opened = 0 if self.max_open >= self.nr_seq else self.max_open
        if active and (opened == 0 or opened > active):
            opened = active
        return opened, active

    def validate(self) -> None:
        def bad(why: str) -> TierfsError:
            return TierfsError(f"zone geometry: {why}", ExitCode.CONFIG)

        if self.lba_size < SECTOR or self.lba_size & (self.lba_size - 1):
            raise bad("lba_size must be a power of two >= 512")
        if self.zone_size & (self.zone_size - 1) or self.zone_size % self.lba_size:
            raise bad("zone_size must be a power of two and a multiple of lba_size")
        if not 0 < self.zone_capacity <= self.zone_size or self.zone_capacity % self.lba_size:
            raise bad("zone_capacity must be in (0, zone_size] and a multiple of lba_size")
        if self.nr_zones <= 0 or not 0 <= self.nr_conv < self.nr_zones:
            raise bad("need at least one sequential zone")
        if self.max_open < 0 or self.max_active < 0:
            raise bad("zone limits cannot be negative")
        if self.zone_append_max <= 0 or self.zone_append_max % self.lba_size:
            raise bad("zone_append_max must be a positive multiple of lba_size")
        if self.read_past_wp not in ("zeros", "error"):
            raise bad('read_past_wp must be "zeros" or "error"')


PROFILES: dict[str, Geometry] = {
    "test": Geometry(),
    "zn540": Geometry(
        lba_size=4096,
        zone_size=2 << 30,
        zone_capacity=1077 << 20,
        nr_zones=904,
        nr_conv=0,
        max_open=14,
        max_active=14,
    ),
}
