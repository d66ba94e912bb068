"""A raw zoned block device through the blkzoned ioctls (include/uapi/linux/blkzoned.h).

Only the encodings and the device probe live here so far: the ioctl numbers, the request
and report structs, and a probe that turns a device without zones into a clear error. The
numbers were checked against Debian 12's header (see zns.md A.3). A report tries
BLKREPORTZONEV2 and falls back to BLKREPORTZONE on ENOTTY/EINVAL, as xfsprogs does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from tierfs.errors import ExitCode, TierfsError
from tierfs.tiers.zns.model import BLK_ZONE, REPORT_HEADER, Zone

BLKREPORTZONE = 0xC0101282
BLKREPORTZONEV2 = 0xC010128E
BLKRESETZONE = 0x40101283
BLKGETZONESZ = 0x80041284
BLKGETNRZONES = 0x80041285
BLKOPENZONE = 0x40101286
BLKCLOSEZONE = 0x40101287
BLKFINISHZONE = 0x40101288

ZONE_RANGE = struct.Struct("=QQ")
U32 = struct.Struct("=I")


def pack_range(sector: int, nr_sectors: int) -> bytes:
    """The `struct blk_zone_range` of the reset/open/close/finish ioctls."""
    return ZONE_RANGE.pack(sector, nr_sectors)


def pack_report_request(sector: int, nr_zones: int) -> bytearray:
    """A BLKREPORTZONE buffer: header plus room for `nr_zones` descriptors."""
    buf = bytearray(REPORT_HEADER.size + nr_zones * BLK_ZONE.size)
    REPORT_HEADER.pack_into(buf, 0, sector, nr_zones, 0)
    return buf


def parse_report(buf: bytes) -> list[Zone]:
    _, count, _ = REPORT_HEADER.unpack_from(buf)
    return [
        Zone.unpack(bytes(buf[REPORT_HEADER.size + i * BLK_ZONE.size :][: BLK_ZONE.size]))
        for i in range(count)
    ]


class ZonedBlockDevice:
    """An open zoned block device (probe and report; writing comes with the cold tier)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TierfsError(f"{path}: cannot open: {exc.strerror}", ExitCode.IO) from None
        try:
            self.zone_sectors = self._get_u32(BLKGETZONESZ)
            self.nr_zones = self._get_u32(BLKGETNRZONES)
        except OSError as exc:
            os.close(self.fd)
            raise _not_zoned(path, exc) from None
        if self.zone_sectors == 0 or self.nr_zones == 0:
            os.close(self.fd)
            raise TierfsError(
                f"{path}: not a zoned block device (the kernel reports no zones); use "
                f"--zone-device emulated:SIZE on regular disks",
                ExitCode.CONFIG,
            )

    def _get_u32(self, request: int) -> int:
        buf = bytearray(U32.size)
        fcntl.ioctl(self.fd, request, buf)
        return int(U32.unpack(buf)[0])

    def report(self, sector: int = 0, nr_zones: int = 64) -> list[Zone]:
        for request in (BLKREPORTZONEV2, BLKREPORTZONE):
            buf = pack_report_request(sector, nr_zones)
            try:
                fcntl.ioctl(self.fd, request, buf)
            except OSError as exc:
                if exc.errno in (errno.ENOTTY, errno.EINVAL) and request == BLKREPORTZONEV2:
                    continue
                raise _not_zoned(self.path, exc) from None
            return parse_report(bytes(buf))
        return []

    def close(self) -> None:
        os.close(self.fd)


def _not_zoned(path: Path, exc: OSError) -> TierfsError:
    if exc.errno == errno.ENOTTY:
        return TierfsError(f"{path}: not a zoned block device", ExitCode.CONFIG)
    return TierfsError(f"{path}: zone ioctl failed: {exc.strerror}", ExitCode.IO)
