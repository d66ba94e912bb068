"""An emulated zoned device on a regular file, faithful to the kernel's zoned-device rules.

It rejects exactly what a real drive (as Linux's null_blk models it) rejects, with the same
errnos, so that code written against it is right on hardware: writes only at the write
pointer, never across capacity, open/active zone limits with implicit close of IMP_OPEN zones
only, finish/reset/close semantics, READONLY and OFFLINE zones.

Persistence: data lives in one sparse file (`nr_zones x zone_size` bytes); zone state in a
sidecar file (`PATH.zones`) that is replaced atomically. The persisted write pointer is never
ahead of durable data: `flush()` fdatasyncs the data first, then writes the sidecar. After a
restart, open zones come back CLOSED (EMPTY if nothing was written), as after a power cycle.
When a zone opens, its whole range is allocated (fallocate) so that the host disk cannot fail
half-way through a zone; a reset punches the range out again.

The device is synchronous and thread-agnostic: callers run it in a worker thread.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

from tierfs.errors import ExitCode, TierfsError
from tierfs.osutil import punch_hole
from tierfs.tiers.zns.device import ZoneGeometry
from tierfs.tiers.zns.device import zone_error as _err
from tierfs.tiers.zns.model import (
    BLK_ZONE_REP_CAPACITY,
    REPORT_HEADER,
    SECTOR,
    WP_INVALID,
    Cond,
    Geometry,
    Zone,
    ZoneType,
)

SIDECAR_MAGIC = b"TFZONES1"
_ZONE_STATE = struct.Struct("=QBB6x")


class EmulatedZonedDevice(ZoneGeometry):
    """A zoned device on `path` (data) and `path.zones` (state)."""

    def __init__(self, path: Path, geometry: Geometry) -> None:
        geometry.validate()
        self.path = path
        self.sidecar = path.with_name(path.name + ".zones")
        self.geometry = geometry
        self.max_open, self.max_active = geometry.effective_limits()
        n = geometry.nr_zones
        self.wp = [self.zone_start(z) for z in range(n)]
        self.cond = [Cond.NOT_WP if z < geometry.nr_conv else Cond.EMPTY for z in range(n)]
        self.flushed_wp = list(self.wp)
        self._fail_after: dict[int, int] = {}
        self._imp_lru: list[int] = []
        self.fd = -1

    # -- lifecycle

    @classmethod
    def create(cls, path: Path, geometry: Geometry) -> EmulatedZonedDevice:
        dev = cls(path, geometry)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, geometry.device_size)
        dev.fd = fd
        dev._save_state()
        return dev

    @staticmethod
    def _read_sidecar(path: Path) -> tuple[bytes, Geometry, int]:
        """The sidecar's bytes, the geometry it records and where the zone states start."""
        sidecar = path.with_name(path.name + ".zones")
        try:
            raw = sidecar.read_bytes()
        except FileNotFoundError:
            raise TierfsError(f"{sidecar}: zone state missing", ExitCode.NOT_A_FILESYSTEM) from None
        if not raw.startswith(SIDECAR_MAGIC):
            raise TierfsError(f"{sidecar}: not an emulated zone device", ExitCode.VERSION)
        header_len = struct.unpack_from("=I", raw, len(SIDECAR_MAGIC))[0]
        start = len(SIDECAR_MAGIC) + 4
        geometry = Geometry(**json.loads(raw[start : start + header_len]))
        return raw, geometry, start + header_len

    @classmethod
    def geometry_of(cls, path: Path) -> Geometry:
        """The geometry of the device at `path`, read without opening (or touching) it."""
        return cls._read_sidecar(path)[1]

    @classmethod
    def open(cls, path: Path) -> EmulatedZonedDevice:
        raw, geometry, pos = cls._read_sidecar(path)
        dev = cls(path, geometry)
        for z in range(geometry.nr_zones):
            wp, cond, _ = _ZONE_STATE.unpack_from(raw, pos + z * _ZONE_STATE.size)
            dev.wp[z], dev.cond[z] = wp, dev._after_restart(z, wp, Cond(cond))
        dev.flushed_wp = list(dev.wp)
        dev.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return dev

    def _after_restart(self, z: int, wp: int, cond: Cond) -> Cond:
        if cond.is_open:
            return Cond.EMPTY if wp == self.zone_start(z) else Cond.CLOSED
        return cond

    def close_device(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1

    def _save_state(self) -> None:
        """Write the sidecar atomically (tmp + fsync + rename + directory fsync)."""
        header = json.dumps(self.geometry.__dict__).encode()
        body = b"".join(
            _ZONE_STATE.pack(self.flushed_wp[z], self._persisted_cond(z), 0)
            for z in range(self.geometry.nr_zones)
        )
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(SIDECAR_MAGIC + struct.pack("=I", len(header)) + header + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.sidecar)
        dfd = os.open(self.sidecar.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _persisted_cond(self, z: int) -> Cond:
        """The condition that matches the flushed write pointer."""
        cond = self.cond[z]
        if cond == Cond.FULL and self.flushed_wp[z] != self.wp[z]:
            return Cond.CLOSED
        return cond

    # -- geometry

    def zone_end(self, z: int) -> int:
        """End of the writable part (start + capacity)."""
        return self.zone_start(z) + self.geometry.zone_capacity

    def is_conventional(self, z: int) -> bool:
        return z < self.geometry.nr_conv

    # -- reports

    def zone(self, z: int) -> Zone:
        g = self.geometry
        start = self.zone_start(z) // SECTOR
        length = g.zone_size // SECTOR
        cap = g.zone_capacity // SECTOR
        if self.is_conventional(z):
            return Zone(start, length, start + length, ZoneType.CONVENTIONAL, Cond.NOT_WP, length)
        cond = self.cond[z]
        if cond == Cond.FULL:
            wp = start + length
        elif cond in (Cond.READONLY, Cond.OFFLINE):
            wp = WP_INVALID
        else:
            wp = self.wp[z] // SECTOR
        return Zone(start, length, wp, ZoneType.SEQWRITE_REQ, cond, cap)

    def report(self, sector: int = 0, nr: int | None = None) -> list[Zone]:
        """Zones from the one containing `sector`, at most `nr` of them (BLKREPORTZONE)."""
        if nr is not None and nr <= 0:
            raise _err(errno.EINVAL, "nr_zones must be positive")
        first = sector * SECTOR // self.geometry.zone_size
        last = self.geometry.nr_zones if nr is None else min(self.geometry.nr_zones, first + nr)
        return [self.zone(z) for z in range(first, last)]

    def pack_report(self, sector: int = 0, nr: int = 1) -> bytes:
        """The exact BLKREPORTZONE reply: header then 64-byte zone descriptors."""
        zones = self.report(sector, nr)
        return REPORT_HEADER.pack(sector, len(zones), BLK_ZONE_REP_CAPACITY) + b"".join(
            z.pack() for z in zones
        )

    # -- resources

    def counts(self) -> tuple[int, int]:
        """(open, active) zone counts."""
        opened = sum(1 for c in self.cond if c.is_open)
        active = sum(1 for c in self.cond if c.is_active)
        return opened, active

    def _check_active(self) -> None:
        if self.max_active and self.counts()[1] >= self.max_active:
            raise _err(errno.EOVERFLOW, "active zones exceeded")

    def _check_open(self) -> None:
        if not self.max_open or self.counts()[0] < self.max_open:
            return
        victims = [z for z in self._imp_lru if self.cond[z] == Cond.IMP_OPEN]
        if not victims:
            raise _err(errno.ETOOMANYREFS, "open zones exceeded")
        self._close_zone(victims[0])

    def _open_resources(self, z: int) -> None:
        """The checks a zone takes to become open (null_blk's order: active, then open)."""
        cond = self.cond[z]
        if cond == Cond.EMPTY:
            self._check_active()
            self._check_open()
            self._reserve(z)
        elif cond == Cond.CLOSED:
            self._check_open()

    def _reserve(self, z: int) -> None:
        """Allocate the zone's whole range so the host disk cannot fill up half-way."""
        try:
            os.posix_fallocate(self.fd, self.zone_start(z), self.geometry.zone_capacity)
        except OSError as exc:
            raise _err(exc.errno or errno.ENOSPC, f"cannot reserve zone {z}") from None

    def _set_imp_open(self, z: int) -> None:
        self.cond[z] = Cond.IMP_OPEN
        if z in self._imp_lru:
            self._imp_lru.remove(z)
        self._imp_lru.append(z)

    def _close_zone(self, z: int) -> None:
        self.cond[z] = Cond.EMPTY if self.wp[z] == self.zone_start(z) else Cond.CLOSED
        if z in self._imp_lru:
            self._imp_lru.remove(z)

    # -- I/O

    def write(self, offset: int, data: bytes) -> None:
        """A regular write: in a sequential zone only at the write pointer."""
        self._check_io(offset, len(data))
        z = self.zone_of(offset)
        if self.is_conventional(z):
            if offset + len(data) > self.zone_start(z) + self.geometry.zone_size:
                raise _err(errno.EIO, "write crosses a zone boundary")
            self._pwrite(offset, data)
            return
        self._write_seq(z, offset, data)

    def append(self, z: int, data: bytes) -> int:
        """Zone append: written at the write pointer, whose offset is returned."""
        if self.is_conventional(z):
            raise _err(errno.EIO, "zone append to a conventional zone")
        if len(data) > self.geometry.zone_append_max:
            raise _err(errno.EINVAL, "append larger than zone_append_max")
        self._check_io(self.wp[z] if self.wp[z] != WP_INVALID else 0, len(data))
        offset = self.wp[z]
        self._write_seq(z, offset, data)
        return offset

    def _write_seq(self, z: int, offset: int, data: bytes) -> None:
        cond = self.cond[z]
        if cond in (Cond.FULL, Cond.READONLY, Cond.OFFLINE):
            raise _err(errno.EIO, f"zone {z} is {cond.name}")
        if offset != self.wp[z]:
            raise _err(errno.EIO, f"write at {offset}, zone {z} write pointer is {self.wp[z]}")
        if offset + len(data) > self.zone_end(z):
            raise _err(errno.EIO, f"write crosses the capacity of zone {z}")
        if cond in (Cond.EMPTY, Cond.CLOSED):
            self._open_resources(z)
            self._set_imp_open(z)
        elif cond == Cond.IMP_OPEN:
            self._set_imp_open(z)
        limit = self._fail_after.pop(z, None)
        if limit is not None and limit < len(data):
            part = limit // self.geometry.lba_size * self.geometry.lba_size
            self._pwrite(offset, data[:part])
            self._advance(z, part)
            raise _err(errno.EIO, f"injected failure after {part} bytes in zone {z}")
        self._pwrite(offset, data)
        self._advance(z, len(data))

    def _advance(self, z: int, n: int) -> None:
        self.wp[z] += n
        if self.wp[z] == self.zone_end(z):
            self.cond[z] = Cond.FULL
            if z in self._imp_lru:
                self._imp_lru.remove(z)

    def _pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def read(self, offset: int, length: int) -> bytes:
        """Data below the write pointer; past it zeros (or EIO with read_past_wp="error")."""
        if offset < 0 or offset + length > self.geometry.device_size:
            raise _err(errno.EINVAL, "read past the end of the device")
        z = self.zone_of(offset)
        if not self.is_conventional(z):
            if self.cond[z] == Cond.OFFLINE:
                raise _err(errno.EIO, f"zone {z} is offline")
            valid = self.zone_start(z) + self.geometry.zone_capacity
            if self.cond[z] not in (Cond.FULL, Cond.READONLY):
                valid = self.wp[z]
            if offset + length > valid and self.geometry.read_past_wp == "error":
                raise _err(errno.EIO, "read past the write pointer")
            if offset >= valid:
                return bytes(length)
            head = os.pread(self.fd, min(length, valid - offset), offset)
            return head + bytes(length - len(head))
        return os.pread(self.fd, length, offset)

    def flush(self) -> None:
        """Make written data durable, then persist write pointers (never ahead of data)."""
        os.fdatasync(self.fd)
        self.flushed_wp = list(self.wp)
        self._save_state()

    # -- zone management

    def _managed(self, z: int) -> Cond:
        if not 0 <= z < self.geometry.nr_zones:
            raise _err(errno.EINVAL, f"no zone {z}")
        if self.is_conventional(z):
            raise _err(errno.EIO, f"zone {z} is conventional")
        cond = self.cond[z]
        if cond in (Cond.READONLY, Cond.OFFLINE):
            raise _err(errno.EIO, f"zone {z} is {cond.name}")
        return cond

    def open_zone(self, z: int) -> None:
        cond = self._managed(z)
        if cond == Cond.FULL:
            raise _err(errno.EIO, f"zone {z} is FULL")
        if cond == Cond.EXP_OPEN:
            return
        if cond in (Cond.EMPTY, Cond.CLOSED):
            self._open_resources(z)
        if z in self._imp_lru:
            self._imp_lru.remove(z)
        self.cond[z] = Cond.EXP_OPEN

    def close_zone(self, z: int) -> None:
        cond = self._managed(z)
        if cond in (Cond.EMPTY, Cond.FULL):
            raise _err(errno.EIO, f"zone {z} is {cond.name}")
        if cond.is_open:
            self._close_zone(z)

    def finish_zone(self, z: int) -> None:
        cond = self._managed(z)
        if cond == Cond.FULL:
            return
        self._open_resources(z)
        if z in self._imp_lru:
            self._imp_lru.remove(z)
        os.fdatasync(self.fd)
        self.wp[z] = self.zone_end(z)
        self.cond[z] = Cond.FULL
        self.flushed_wp[z] = self.wp[z]
        self._save_state()

    def reset_zone(self, z: int) -> None:
        cond = self._managed(z)
        if cond == Cond.EMPTY:
            return
        if z in self._imp_lru:
            self._imp_lru.remove(z)
        self.wp[z] = self.flushed_wp[z] = self.zone_start(z)
        self.cond[z] = Cond.EMPTY
        self._save_state()
        punch_hole(self.fd, self.zone_start(z), self.geometry.zone_size)

    def reset_all(self) -> None:
        """Reset every sequential zone, skipping EMPTY, READONLY and OFFLINE ones."""
        for z in range(self.geometry.nr_conv, self.geometry.nr_zones):
            if self.cond[z] not in (Cond.EMPTY, Cond.READONLY, Cond.OFFLINE):
                self.reset_zone(z)

    # -- fault injection

    def set_readonly(self, z: int) -> None:
        self._fault(z, Cond.READONLY)

    def set_offline(self, z: int) -> None:
        self._fault(z, Cond.OFFLINE)

    def _fault(self, z: int, cond: Cond) -> None:
        if z in self._imp_lru:
            self._imp_lru.remove(z)
        self.cond[z] = cond
        self._save_state()

    def fail_next_write(self, z: int, after_bytes: int) -> None:
        """The next write to zone `z` stops after `after_bytes` (block-rounded), then EIO."""
        self._fail_after[z] = after_bytes

    def crash(self, drop_unflushed: bool = True) -> None:
        """Test hook: forget everything not flushed, as a power cut would."""
        if drop_unflushed:
            for z in range(self.geometry.nr_conv, self.geometry.nr_zones):
                if self.cond[z] not in (Cond.READONLY, Cond.OFFLINE):
                    start = self.flushed_wp[z]
                    end = self.zone_start(z) + self.geometry.zone_size
                    if end > start:
                        punch_hole(self.fd, start, end - start)
        os.close(self.fd)
        self.fd = -1
