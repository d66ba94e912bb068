"""A raw zoned block device through the blkzoned ioctls (include/uapi/linux/blkzoned.h).

`ZonedBlockDevice` is the `ZonedDevice` backend for `block:/dev/...`: a host-managed zoned
block device (an NVMe ZNS namespace, an SMR disk, null_blk) opened directly, with no
filesystem in between. The ioctl numbers and struct layouts below were checked against
Debian 12's `linux/blkzoned.h` and `linux/fs.h` (zns.md A.3); the tests recompute them from
the `_IOC` encoding. How each part maps (zns.md A.7):

=================  ==========================================================================
ZonedDevice        raw zoned block device
=================  ==========================================================================
open               `O_RDWR | O_DIRECT | O_EXCL`: the exclusive open fails (EBUSY, exit code
                   6) while a filesystem is mounted on the device or another user holds it
                   exclusively. A read-only device (EROFS) is opened read-only: reads work,
                   writes and zone management answer EPERM.
geometry           logical block size `BLKSSZGET` (raised to sysfs `zone_write_granularity`
                   when larger, as on SMR disks), zone size `BLKGETZONESZ`, zone count
                   `BLKGETNRZONES`, conventional zones and capacities from a full report
                   (`Geometry.zone_capacity` is the largest; `zone_end` uses each zone's
                   own), open and active limits from `/sys/dev/block/MAJ:MIN/queue/
                   max_{open,active}_zones` (0, none, when absent). A device without zones
                   (BLKGETZONESZ 0 or ENOTTY) is refused with exit code 3.
report, zone       `BLKREPORTZONEV2`, or `BLKREPORTZONE` when the kernel does not know V2
                   (ENOTTY/EINVAL, as xfsprogs falls back; remembered). V2 is asked without
                   `BLK_ZONE_REP_CACHED`, whose answer (`ACTIVE` for IMP_OPEN, EXP_OPEN and
                   CLOSED) the interface could not express, so both answer the same. Every
                   report goes to the device: an implicit close done by the drive shows. As
                   in the emulator, a FULL zone reports `wp = start + len` and a READONLY or
                   OFFLINE one `wp = 2^64-1` whatever the driver says.
write              `pwrite` on the O_DIRECT descriptor from a page-aligned (mmap) buffer, at
                   exactly the write pointer: the page cache does not keep write order, and
                   sequential zones take writes only at the write pointer. Alignment, bounds,
                   the write pointer and the capacity are checked first (a refusal is
                   checked again against a fresh report, so a stale view never refuses a good
                   write), then the drive decides: open/active limits (ETOOMANYREFS,
                   EOVERFLOW), READONLY/OFFLINE zones (EIO).
append             User space has no zone append on a raw device (zns.md A.3), so it is a
                   write at the write pointer, which is tracked in memory (one writer: the
                   descriptor is exclusive and the device not thread-safe). After any error
                   the zone is re-read from a report before its write pointer is used again;
                   the report also resynchronises the kernel's zone write plug (Linux 6.10+),
                   which stops taking writes to a zone after a failed one until then.
read               `preadv` on the same O_DIRECT descriptor into the aligned buffer, the range
                   rounded out to whole blocks, and only below the write pointer (capacity
                   for FULL and READONLY zones); zeros are made up past it, as the emulator
                   answers. Direct reads keep no second copy in the page cache (the hot tier
                   is the cache), never read ahead into unwritten blocks or the next zone
                   (unwritten blocks read as the drive's deallocation pattern, which need not
                   be zeros, and an SMR disk may fail them), and need no invalidation after
                   a reset. Cold reads are whole records, block-aligned already.
flush              `fdatasync`: the block device flushes the drive's volatile write cache.
open/close/finish  `BLKOPENZONE` / `BLKCLOSEZONE` / `BLKFINISHZONE` / `BLKRESETZONE` with a
/reset             `struct blk_zone_range` of the zone (sector, nr_sectors; the last zone may
                   be smaller), then a report of the zone. Finish flushes first, as the
                   emulator does. `reset_all` resets each zone that is not EMPTY, READONLY or
                   OFFLINE, one by one.
=================  ==========================================================================

Errnos: the interface's errnos are the kernel's (zns.md A.2), so the drive's answers pass
through; `map_errno` turns the few the ioctl layer adds into them (EBADF, a management ioctl
on a read-only descriptor, and EROFS: EPERM; ENOTTY and EOPNOTSUPP, which no zoned device
answers: EIO). Management on a conventional zone is EIO before any ioctl, as the emulator.
Root (or CAP_SYS_ADMIN with older kernels, which answer EACCES otherwise) is typically needed.

All system calls go through `Syscalls`, which the tests replace by a model of the kernel
over the emulator (no zoned device exists on the machines this was written on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from pathlib import Path

from tierfs.errors import ExitCode, TierfsError
from tierfs.tiers.zns.device import ZonedDevice, ZoneGeometry
from tierfs.tiers.zns.device import zone_error as _err
from tierfs.tiers.zns.model import (
    BLK_ZONE,
    BLK_ZONE_REP_CAPACITY,
    REPORT_HEADER,
    SECTOR,
    WP_INVALID,
    Cond,
    Geometry,
    Zone,
    ZoneType,
)
from tierfs.tiers.zns.zonefs import AlignedBuffer

log = logging.getLogger(__name__)

BLKREPORTZONE = 0xC0101282  # _IOWR(0x12, 130, struct blk_zone_report)
BLKREPORTZONEV2 = 0xC010128E  # _IOWR(0x12, 142, struct blk_zone_report), Linux 6.19+
BLKRESETZONE = 0x40101283  # _IOW(0x12, 131, struct blk_zone_range)
BLKGETZONESZ = 0x80041284  # _IOR(0x12, 132, __u32)
BLKGETNRZONES = 0x80041285  # _IOR(0x12, 133, __u32)
BLKOPENZONE = 0x40101286  # _IOW(0x12, 134, struct blk_zone_range)
BLKCLOSEZONE = 0x40101287  # _IOW(0x12, 135, struct blk_zone_range)
BLKFINISHZONE = 0x40101288  # _IOW(0x12, 136, struct blk_zone_range)
BLKSSZGET = 0x1268  # _IO(0x12, 104), int *: the logical block size
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): the size in bytes

ZONE_RANGE = struct.Struct("=QQ")  # struct blk_zone_range: sector, nr_sectors
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
INT = struct.Struct("=i")

SYSFS_DEV_BLOCK = Path("/sys/dev/block")
DEFAULT_APPEND_MAX = 1 << 20
REPORT_BATCH = 1024  # zones per report ioctl (64 KiB of descriptors)
SEQWRITE_PREF = 0x3  # host-aware zones: not supported

# errnos of the ioctl layer -> the interface's (zns.md A.2); the drive's pass through
_ERRNO_MAP = {
    errno.EBADF: errno.EPERM,  # management ioctl on a descriptor opened read-only
    errno.EROFS: errno.EPERM,
    errno.ENOTTY: errno.EIO,  # not zoned (refused at open, so never seen afterwards)
    errno.EOPNOTSUPP: errno.EIO,
}


def map_errno(code: int) -> int:
    """The interface's errno for one the kernel returned."""
    return _ERRNO_MAP.get(code, code)


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def pack_range(sector: int, nr_sectors: int) -> bytes:
    """The `struct blk_zone_range` of the reset/open/close/finish ioctls."""
    return ZONE_RANGE.pack(sector, nr_sectors)


def pack_report_request(sector: int, nr_zones: int) -> bytearray:
    """A BLKREPORTZONE buffer: header plus room for `nr_zones` descriptors."""
    buf = bytearray(REPORT_HEADER.size + nr_zones * BLK_ZONE.size)
    REPORT_HEADER.pack_into(buf, 0, sector, nr_zones, 0)
    return buf


def parse_report(buf: bytes | bytearray) -> list[Zone]:
    """The zones of a BLKREPORTZONE reply. Without `BLK_ZONE_REP_CAPACITY` (kernels before
    5.9) the capacity is the zone length. A zone type or condition the model does not know
    (host-aware zones, a cached report's ACTIVE) is EIO."""
    _, count, flags = REPORT_HEADER.unpack_from(buf)
    count = min(count, (len(buf) - REPORT_HEADER.size) // BLK_ZONE.size)
    zones = []
    for i in range(count):
        raw = bytes(buf[REPORT_HEADER.size + i * BLK_ZONE.size :][: BLK_ZONE.size])
        try:
            zone = Zone.unpack(raw)
        except ValueError:
            start, _, _, ztype, cond, *_ = BLK_ZONE.unpack(raw)
            raise _err(
                errno.EIO,
                f"zone at sector {start}: type {ztype:#x}, condition {cond:#x} not supported "
                "(only conventional and sequential-write-required zones)",
            ) from None
        if not flags & BLK_ZONE_REP_CAPACITY:
            zone = dataclasses.replace(zone, capacity=zone.len)
        zones.append(zone)
    return zones


class Syscalls:
    """The system calls the backend makes (tests substitute a model of the kernel)."""

    def stat(self, path: Path) -> os.stat_result:
        return os.stat(path)

    def open(self, path: Path, flags: int) -> int:
        return os.open(path, flags)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, buf: bytearray) -> None:
        """`request` with `buf` as its in/out argument."""
        fcntl.ioctl(fd, request, buf)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def preadv(self, fd: int, buf: memoryview, offset: int) -> int:
        return os.preadv(fd, [buf], offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def queue_attr(self, fd: int, name: str) -> str | None:
        """`/sys/dev/block/MAJ:MIN/queue/NAME` of the device open on `fd` (the disk's for a
        partition), None if absent."""
        rdev = os.fstat(fd).st_rdev
        base = SYSFS_DEV_BLOCK / f"{os.major(rdev)}:{os.minor(rdev)}"
        for queue in (base / "queue", base / ".." / "queue"):
            try:
                return (queue / name).read_text().strip()
            except FileNotFoundError:
                continue
            except OSError:
                return None
        return None


class _DirectBuffer(AlignedBuffer):
    """The page-aligned buffer, also to read into (O_DIRECT reads need aligned memory too)."""

    def space(self, n: int) -> memoryview:
        """`n` writable bytes; release the view before the next `load` or `space`."""
        if n > len(self._map):
            self._map.close()
            self._map = mmap.mmap(-1, _round_up(n, mmap.PAGESIZE))
        return memoryview(self._map)[:n]


@dataclasses.dataclass
class _ZoneState:
    """What the backend knows of one zone, in bytes. `wp` is tracked through our own writes
    (at the capacity end for FULL, READONLY and OFFLINE zones); `stale` until re-read after
    an error. `cond` may lag behind implicit closes, which matter to no check made here."""

    start: int
    length: int
    capacity: int
    conventional: bool
    cond: Cond
    wp: int
    stale: bool = False


class ZonedBlockDevice(ZoneGeometry, ZonedDevice):
    """A host-managed zoned block device at `path` as a `ZonedDevice`."""

    def __init__(
        self,
        path: Path,
        *,
        zone_append_max: int = DEFAULT_APPEND_MAX,
        syscalls: Syscalls | None = None,
    ) -> None:
        self.path = path
        self._sys = syscalls or Syscalls()
        self.read_only = False
        self._report_request = BLKREPORTZONEV2
        self._v2_answered = False
        self._unflushed = False
        self._zones: list[_ZoneState] = []
        self.fd = self._open()
        try:
            self.geometry = self._probe(zone_append_max)
        except BaseException:
            self._sys.close(self.fd)
            self.fd = -1
            raise
        self.max_open, self.max_active = self.geometry.effective_limits()
        self._buffer = _DirectBuffer()

    # -- setup

    def _open(self) -> int:
        try:
            st = self._sys.stat(self.path)
        except OSError as exc:
            raise TierfsError(f"{self.path}: cannot open: {exc.strerror}", ExitCode.IO) from None
        if not stat.S_ISBLK(st.st_mode):
            raise TierfsError(
                f"{self.path}: not a block device; use zonefs:DIR for a zonefs mount",
                ExitCode.CONFIG,
            )
        flags = os.O_DIRECT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                return self._sys.open(self.path, flags | os.O_RDWR)
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    raise
            fd = self._sys.open(self.path, flags | os.O_RDONLY)
            self.read_only = True
            log.warning("%s is read-only: zones can be read, not written", self.path)
            return fd
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise TierfsError(
                    f"{self.path}: in use (mounted, or opened exclusively by another process)",
                    ExitCode.BUSY,
                ) from None
            raise TierfsError(f"{self.path}: cannot open: {exc.strerror}", ExitCode.IO) from None

    def _probe(self, zone_append_max: int) -> Geometry:
        """Geometry and limits from the device and sysfs, zone states from a full report."""
        try:
            zone_sectors = self._get(BLKGETZONESZ, U32)
            nr_zones = self._get(BLKGETNRZONES, U32)
        except OSError as exc:
            raise _not_zoned(self.path, exc) from None
        if zone_sectors == 0 or nr_zones == 0:
            raise TierfsError(
                f"{self.path}: not a zoned block device (the kernel reports no zones); use "
                f"--zone-device emulated:SIZE on regular disks",
                ExitCode.CONFIG,
            )
        if self._sys.queue_attr(self.fd, "zoned") == "host-aware":
            raise TierfsError(
                f"{self.path}: a host-aware zoned device; tierfs needs host-managed zones",
                ExitCode.CONFIG,
            )
        self._zone_bytes = zone_sectors * SECTOR
        try:
            lba = self._get(BLKSSZGET, INT)
            self._size = self._get(BLKGETSIZE64, U64)
            zones = self._report(0, None)
        except OSError as exc:
            raise TierfsError(
                f"{self.path}: zone probe failed: {exc.strerror}", ExitCode.IO
            ) from None
        if len(zones) != nr_zones:
            raise TierfsError(
                f"{self.path}: the report lists {len(zones)} zones, BLKGETNRZONES says {nr_zones}",
                ExitCode.IO,
            )
        self._zones = [self._state(zone) for zone in zones]
        seq = [s for s in self._zones if not s.conventional]
        if not seq:
            raise TierfsError(
                f"{self.path}: every zone is conventional; tierfs needs sequential zones",
                ExitCode.CONFIG,
            )
        geometry = Geometry(
            lba_size=max(lba, self._attr_int("zone_write_granularity")),
            zone_size=self._zone_bytes,
            zone_capacity=max(s.capacity for s in seq),
            nr_zones=nr_zones,
            nr_conv=nr_zones - len(seq),
            max_open=self._attr_int("max_open_zones"),
            max_active=self._attr_int("max_active_zones"),
            zone_append_max=zone_append_max,
        )
        try:
            geometry.validate()
        except TierfsError as exc:
            raise TierfsError(f"{self.path}: {exc.message}", exc.exit_code) from None
        return geometry

    def _get(self, request: int, fmt: struct.Struct) -> int:
        buf = bytearray(fmt.size)
        self._sys.ioctl(self.fd, request, buf)
        return int(fmt.unpack(buf)[0])

    def _attr_int(self, name: str) -> int:
        value = self._sys.queue_attr(self.fd, name)
        try:
            return max(0, int(value)) if value is not None else 0
        except ValueError:
            return 0

    # -- geometry

    def zone_end(self, z: int) -> int:
        self._check_zone(z)
        state = self._zones[z]
        return state.start + state.capacity

    def is_conventional(self, z: int) -> bool:
        self._check_zone(z)
        return self._zones[z].conventional

    # -- reports

    def _report(self, sector: int, nr: int | None) -> list[Zone]:
        """Zones from the one holding `sector`, at most `nr` (all when None), as the
        device reports them, normalised; our view of each is updated."""
        zones: list[Zone] = []
        while nr is None or len(zones) < nr:
            want = REPORT_BATCH if nr is None else min(REPORT_BATCH, nr - len(zones))
            batch = self._report_ioctl(sector, want)
            if not batch:
                break
            zones += [self._normalise(zone) for zone in batch]
            last = batch[-1]
            sector = last.start + last.len
            if sector * SECTOR >= self._size:
                break  # the last zone: no need to ask for more
        for zone in zones:
            self._absorb(zone)
        return zones

    def _report_ioctl(self, sector: int, nr: int) -> list[Zone]:
        buf = pack_report_request(sector, nr)
        try:
            self._sys.ioctl(self.fd, self._report_request, buf)
        except OSError as exc:
            if (
                self._report_request != BLKREPORTZONEV2
                or self._v2_answered
                or exc.errno not in (errno.ENOTTY, errno.EINVAL)
            ):
                raise
            self._report_request = BLKREPORTZONE  # a kernel before 6.19
            buf = pack_report_request(sector, nr)
            self._sys.ioctl(self.fd, self._report_request, buf)
        self._v2_answered = True
        return parse_report(buf)

    @staticmethod
    def _normalise(zone: Zone) -> Zone:
        """The write pointer as the emulator (and null_blk) reports it."""
        if zone.type == ZoneType.CONVENTIONAL:
            return dataclasses.replace(
                zone, cond=Cond.NOT_WP, wp=zone.start + zone.len, capacity=zone.len
            )
        if zone.cond == Cond.FULL:
            return dataclasses.replace(zone, wp=zone.start + zone.len)
        if zone.cond in (Cond.READONLY, Cond.OFFLINE):
            return dataclasses.replace(zone, wp=WP_INVALID)
        return zone

    def _state(self, zone: Zone) -> _ZoneState:
        start, capacity = zone.start * SECTOR, zone.capacity * SECTOR
        if zone.cond in (Cond.FULL, Cond.READONLY, Cond.OFFLINE, Cond.NOT_WP):
            wp = start + capacity
        else:
            wp = zone.wp * SECTOR
        return _ZoneState(
            start=start,
            length=zone.len * SECTOR,
            capacity=capacity,
            conventional=zone.type == ZoneType.CONVENTIONAL,
            cond=zone.cond,
            wp=wp,
        )

    def _absorb(self, zone: Zone) -> None:
        z = zone.start * SECTOR // self._zone_bytes
        if 0 <= z < len(self._zones):
            self._zones[z] = self._state(zone)

    def _fresh(self, z: int) -> _ZoneState:
        """Zone `z` re-read from the device."""
        zones = self._report(self._zones[z].start // SECTOR, 1)
        if not zones:
            raise _err(errno.EIO, f"zone {z}: the device reports no such zone")
        return self._zones[z]

    def _known(self, z: int) -> _ZoneState:
        """Our view of zone `z`, re-read first if an error left it in doubt."""
        return self._fresh(z) if self._zones[z].stale else self._zones[z]

    def _reread(self, z: int) -> None:
        """Re-read zone `z` after a command (after a failed one, the report also
        resynchronises the kernel's zone write plug); if the report fails, the zone is
        re-read before its next use."""
        try:
            self._fresh(z)
        except OSError as exc:
            log.warning("%s: zone %d: report failed: %s", self.path, z, exc)
            self._zones[z].stale = True

    def zone(self, z: int) -> Zone:
        self._check_zone(z)
        zones = self._report(self._zones[z].start // SECTOR, 1)
        if not zones:
            raise _err(errno.EIO, f"zone {z}: the device reports no such zone")
        return zones[0]

    def report(self, sector: int = 0, nr: int | None = None) -> list[Zone]:
        if nr is not None and nr <= 0:
            raise _err(errno.EINVAL, "nr_zones must be positive")
        if sector < 0:
            raise _err(errno.EINVAL, "negative sector")
        return self._report(sector, nr)

    def counts(self) -> tuple[int, int]:
        conds = [zone.cond for zone in self._report(0, None)]
        return sum(c.is_open for c in conds), sum(c.is_active for c in conds)

    # -- I/O

    def _check_writable(self) -> None:
        if self.read_only:
            raise _err(errno.EPERM, f"{self.path} is read-only")

    def write(self, offset: int, data: bytes) -> None:
        self._check_io(offset, len(data))
        self._check_writable()
        z = self.zone_of(offset)
        state = self._zones[z]
        if state.conventional:
            if offset + len(data) > state.start + state.length:
                raise _err(errno.EIO, "write crosses a zone boundary")
            if data:
                self._pwrite(z, offset, data)
            return
        self._write_seq(z, offset, data)

    def append(self, z: int, data: bytes) -> int:
        self._check_zone(z)
        if self._zones[z].conventional:
            raise _err(errno.EIO, "zone append to a conventional zone")
        if len(data) > self.geometry.zone_append_max:
            raise _err(errno.EINVAL, "append larger than zone_append_max")
        if len(data) % self.geometry.lba_size:
            raise _err(errno.EINVAL, "I/O not aligned to the logical block size")
        self._check_writable()
        offset = self._known(z).wp
        self._write_seq(z, offset, data)
        return offset

    def _refusal(self, z: int, offset: int, length: int) -> OSError | None:
        state = self._zones[z]
        if state.cond in (Cond.FULL, Cond.READONLY, Cond.OFFLINE):
            return _err(errno.EIO, f"zone {z} is {state.cond.name}")
        if offset != state.wp:
            return _err(errno.EIO, f"write at {offset}, zone {z} write pointer is {state.wp}")
        if offset + length > state.start + state.capacity:
            return _err(errno.EIO, f"write crosses the capacity of zone {z}")
        return None

    def _write_seq(self, z: int, offset: int, data: bytes) -> None:
        """A write at the write pointer of sequential zone `z`. What our view refuses is
        refused only if a fresh report agrees; the drive checks the rest."""
        was_stale = self._zones[z].stale
        state = self._known(z)
        refusal = self._refusal(z, offset, len(data))
        if refusal is not None and not was_stale:
            state = self._fresh(z)
            refusal = self._refusal(z, offset, len(data))
        if refusal is not None:
            raise refusal
        if not data:
            return  # as the kernel: a zero-length write does nothing
        self._pwrite(z, offset, data)
        state.wp = offset + len(data)
        if state.wp >= state.start + state.capacity:
            state.cond = Cond.FULL
        elif state.cond in (Cond.EMPTY, Cond.CLOSED):
            state.cond = Cond.IMP_OPEN

    def _pwrite(self, z: int, offset: int, data: bytes) -> None:
        """O_DIRECT pwrite of `data` from the aligned buffer; on an error zone `z` is
        re-read (a write may have landed in part) and the errno mapped."""
        done = 0
        try:
            with self._buffer.load(data) as view:
                while done < len(data):
                    with view[done:] as rest:
                        n = self._sys.pwrite(self.fd, rest, offset + done)
                    if n <= 0:
                        raise _err(errno.EIO, "short write")
                    done += n
                    self._unflushed = True
        except OSError as exc:
            self._reread(z)
            code = map_errno(exc.errno or errno.EIO)
            raise _err(
                code, f"{self.path}: zone {z}: write of {len(data)} bytes at {offset + done}"
            ) from exc

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.geometry.device_size:
            raise _err(errno.EINVAL, "read past the end of the device")
        z = self.zone_of(offset)
        state = self._known(z)
        if state.conventional:
            valid = state.start + state.length
        elif state.cond == Cond.OFFLINE:
            raise _err(errno.EIO, f"zone {z} is offline")
        elif state.cond in (Cond.FULL, Cond.READONLY):
            valid = state.start + state.capacity
        else:
            valid = state.wp
        end = min(offset + length, valid)
        data = self._pread(z, offset, end) if end > offset else b""
        return data + bytes(length - len(data))

    def _pread(self, z: int, offset: int, end: int) -> bytes:
        """Bytes `offset` to `end`, read direct in whole blocks (short at the device end)."""
        lba = self.geometry.lba_size
        lo = offset // lba * lba
        hi = min(_round_up(end, lba), self._size)
        got = 0
        try:
            with self._buffer.space(hi - lo) as view:
                while lo + got < hi:
                    with view[got:] as rest:
                        n = self._sys.preadv(self.fd, rest, lo + got)
                    if n <= 0:
                        break
                    got += n
                stop = max(offset - lo, min(got, end - lo))  # short only past the device end
                return bytes(view[offset - lo : stop])
        except OSError as exc:
            self._reread(z)
            code = map_errno(exc.errno or errno.EIO)
            raise _err(code, f"{self.path}: zone {z}: read at {lo + got}") from exc

    def flush(self) -> None:
        if not self._unflushed:
            return
        try:
            self._sys.fdatasync(self.fd)
        except OSError as exc:
            raise _err(map_errno(exc.errno or errno.EIO), f"{self.path}: flush") from exc
        self._unflushed = False

    # -- zone management

    def _manage(self, z: int, request: int, name: str) -> None:
        """One management ioctl on zone `z`, then the zone re-read."""
        self._check_zone(z)
        state = self._zones[z]
        if state.conventional:
            raise _err(errno.EIO, f"zone {z} is conventional")
        self._check_writable()
        buf = bytearray(pack_range(state.start // SECTOR, state.length // SECTOR))
        try:
            self._sys.ioctl(self.fd, request, buf)
        except OSError as exc:
            self._reread(z)
            code = map_errno(exc.errno or errno.EIO)
            raise _err(code, f"{self.path}: zone {z}: {name}") from exc
        self._reread(z)

    def open_zone(self, z: int) -> None:
        self._manage(z, BLKOPENZONE, "open")

    def close_zone(self, z: int) -> None:
        self._manage(z, BLKCLOSEZONE, "close")

    def finish_zone(self, z: int) -> None:
        self._check_zone(z)
        if not self._zones[z].conventional:
            self.flush()  # as the emulator: the data below the finished wp is durable
        self._manage(z, BLKFINISHZONE, "finish")

    def reset_zone(self, z: int) -> None:
        self._manage(z, BLKRESETZONE, "reset")

    def reset_all(self) -> None:
        for zone in self._report(0, None):
            z = zone.start * SECTOR // self._zone_bytes
            if zone.type == ZoneType.SEQWRITE_REQ and zone.cond not in (
                Cond.EMPTY,
                Cond.READONLY,
                Cond.OFFLINE,
            ):
                self.reset_zone(z)

    # -- shutdown

    def close_device(self) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
        finally:
            self._buffer.close()
            with contextlib.suppress(OSError):
                self._sys.close(self.fd)
            self.fd = -1


def _not_zoned(path: Path, exc: OSError) -> TierfsError:
    if exc.errno == errno.ENOTTY:
        return TierfsError(f"{path}: not a zoned block device", ExitCode.CONFIG)
    return TierfsError(f"{path}: zone ioctl failed: {exc.strerror}", ExitCode.IO)
