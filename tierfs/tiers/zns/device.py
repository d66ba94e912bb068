"""The interface every zoned device backend shares (emulated, zonefs, raw block device).

Callers (the cold tier) are written once against `ZonedDevice`, so every backend must accept
and refuse the same operations with the same errnos: those of the kernel's zoned block layer
(zns.md A.2), raised as `OSError(errno)`. In short:

* `EIO`: a write off the write pointer, across the zone capacity, or to a FULL, READONLY or
  OFFLINE zone; a read of an OFFLINE zone; a state transition the zone does not allow;
* `EINVAL`: I/O not aligned to `geometry.lba_size`, out of the device, a bad zone index, an
  append larger than `geometry.zone_append_max`;
* `ETOOMANYREFS`: no open zone can be closed implicitly (they are all explicitly open);
* `EOVERFLOW`: the active zone limit is reached;
* `EPERM`: the device as a whole has become read-only.

Positions are bytes from the start of the device (zone `z` starts at `z * zone_size`);
`Zone` reports use 512-byte sectors as `struct blk_zone` does. Devices are synchronous and
not thread-safe: callers serialise access and run it in a worker thread.

`EmulatedZonedDevice` satisfies the protocol structurally; `ZonefsDevice` and
`ZonedBlockDevice` declare it. All three take the geometry arithmetic that follows from
`geometry` alone (and the checks of zone indices and I/O ranges) from `ZoneGeometry`.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol, runtime_checkable

from tierfs.tiers.zns.model import SECTOR, Geometry, Zone


def zone_error(code: int, why: str) -> OSError:
    """`OSError(code)` as the backends raise it: the errno's text, then why."""
    return OSError(code, f"{os.strerror(code)}: {why}")


class ZoneGeometry:
    """The part of `ZonedDevice` every backend answers from `geometry` alone: zone positions
    and counts, and the EINVAL checks of zone indices and of I/O alignment and range. Listed
    first among a backend's bases, so that it overrides the protocol's stubs."""

    geometry: Geometry

    def zone_start(self, z: int) -> int:
        """Byte offset of zone `z`."""
        return z * self.geometry.zone_size

    def zone_of(self, offset: int) -> int:
        """The zone holding byte `offset` (EINVAL outside the device)."""
        z = offset // self.geometry.zone_size
        if not 0 <= z < self.geometry.nr_zones:
            raise zone_error(errno.EINVAL, f"offset {offset} is outside the device")
        return z

    def zone_size_sectors(self) -> int:
        """The zone size in sectors, as BLKGETZONESZ answers."""
        return self.geometry.zone_size // SECTOR

    def nr_zones(self) -> int:
        """The number of zones, as BLKGETNRZONES answers."""
        return self.geometry.nr_zones

    def _check_zone(self, z: int) -> None:
        if not 0 <= z < self.geometry.nr_zones:
            raise zone_error(errno.EINVAL, f"no zone {z}")

    def _check_io(self, offset: int, length: int) -> None:
        lba = self.geometry.lba_size
        if offset % lba or length % lba or offset < 0:
            raise zone_error(errno.EINVAL, "I/O not aligned to the logical block size")
        if offset + length > self.geometry.device_size:
            raise zone_error(errno.EINVAL, "I/O past the end of the device")


@runtime_checkable
class ZonedDevice(Protocol):
    """A zoned device: geometry and limits, zone reports, I/O at the write pointer, and
    zone management (open, close, finish, reset)."""

    geometry: Geometry
    max_open: int
    """Effective open zone limit (0: none), as null_blk applies `Geometry` limits."""
    max_active: int
    """Effective active zone limit (0: none)."""

    # -- geometry

    def zone_start(self, z: int) -> int:
        """Byte offset of zone `z`."""
        ...

    def zone_end(self, z: int) -> int:
        """End of the writable part of zone `z` (start + capacity)."""
        ...

    def zone_of(self, offset: int) -> int:
        """The zone holding byte `offset` (EINVAL outside the device)."""
        ...

    def zone_size_sectors(self) -> int:
        """The zone size in sectors, as BLKGETZONESZ answers."""
        ...

    def nr_zones(self) -> int:
        """The number of zones, as BLKGETNRZONES answers."""
        ...

    def is_conventional(self, z: int) -> bool: ...

    # -- reports

    def zone(self, z: int) -> Zone:
        """Zone `z` as BLKREPORTZONE describes it."""
        ...

    def report(self, sector: int = 0, nr: int | None = None) -> list[Zone]:
        """Zones from the one holding `sector`, at most `nr` (EINVAL if `nr` <= 0)."""
        ...

    def counts(self) -> tuple[int, int]:
        """(open, active) zones."""
        ...

    # -- I/O

    def write(self, offset: int, data: bytes) -> None:
        """A regular write; in a sequential zone only at the write pointer."""
        ...

    def append(self, z: int, data: bytes) -> int:
        """A zone append: written at the write pointer, whose byte offset is returned."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; zeros past the write pointer (or EIO if the
        geometry says `read_past_wp="error"`)."""
        ...

    def flush(self) -> None:
        """Make every acknowledged write durable."""
        ...

    # -- zone management

    def open_zone(self, z: int) -> None:
        """Explicitly open (EXP_OPEN): never closed implicitly to make room."""
        ...

    def close_zone(self, z: int) -> None: ...

    def finish_zone(self, z: int) -> None:
        """Make the zone FULL; its unwritten capacity is given up."""
        ...

    def reset_zone(self, z: int) -> None:
        """Rewind the write pointer: the zone is EMPTY and its data gone."""
        ...

    def reset_all(self) -> None:
        """Reset every sequential zone that is not EMPTY, READONLY or OFFLINE."""
        ...

    def close_device(self) -> None:
        """Flush, then release every resource (files, handles); idempotent."""
        ...
