"""Reading records back: by location (the index's), or by scanning a zone (no index).

Reads work on any zone that holds data, READONLY ones included (a zone that went read-only
keeps serving reads while reclaim drains it). An OFFLINE zone fails with `ZoneOffline`
(errno EIO): its records are lost locally, and the caller reports them and restores them
from a later tier. A record that fails its checks raises `RecordError` (a `FrameError`).

Functions here are synchronous: run them in a worker thread. They only read, so they may run
alongside an append on backends whose reads are plain `pread`s (the emulator, zonefs).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator

from tierfs.data import frame
from tierfs.tiers.cold.errors import RecordError, ZoneOffline
from tierfs.tiers.cold.record import Location, ScanEntry, decode, scan
from tierfs.tiers.zns.device import ZonedDevice
from tierfs.tiers.zns.model import SECTOR, Cond

log = logging.getLogger(__name__)


def read_record(device: ZonedDevice, location: Location, chunk_id: bytes | None = None) -> bytes:
    """The chunk frame stored at `location`, after checking the record's zone offset,
    length, checksum and (if given) chunk id."""
    _check_location(device, location)
    raw = _read(device, location.zone, location.offset, location.length)
    header, chunk_frame = decode(raw, zone_offset=location.offset, expected_id=chunk_id)
    if header.record_len(device.geometry.lba_size) != location.length:
        raise RecordError(
            f"zone {location.zone} offset {location.offset}: record of "
            f"{header.record_len(device.geometry.lba_size)} bytes, the location says "
            f"{location.length}"
        )
    return chunk_frame


def read_chunk(device: ZonedDevice, location: Location, chunk_id: bytes) -> bytes | memoryview:
    """The plaintext of chunk `chunk_id` at `location` (record, then frame checks)."""
    return frame.decode(read_record(device, location, chunk_id), chunk_id)


def _check_location(device: ZonedDevice, location: Location) -> None:
    """A location the device cannot hold is a corrupt index entry, not an I/O error."""
    lba = device.geometry.lba_size
    z = location.zone
    if not 0 <= z < device.nr_zones() or device.is_conventional(z):
        raise RecordError(f"location names zone {z}, which holds no records")
    capacity = device.zone_end(z) - device.zone_start(z)
    if (
        location.offset % lba
        or location.length % lba
        or location.length <= 0
        or location.offset + location.length > capacity
    ):
        raise RecordError(
            f"zone {z}: location {location.offset}+{location.length} is not a record's place"
        )


def _read(device: ZonedDevice, z: int, offset: int, length: int) -> bytes:
    """Read within zone `z`; an EIO from an OFFLINE zone becomes `ZoneOffline`."""
    try:
        return device.read(device.zone_start(z) + offset, length)
    except OSError as exc:
        if exc.errno == errno.EIO and zone_cond(device, z) == Cond.OFFLINE:
            log.error("zone %d is offline: read of offset %d failed", z, offset)
            raise ZoneOffline(z) from None
        raise


def zone_cond(device: ZonedDevice, z: int) -> Cond:
    return device.zone(z).cond


def scan_zone(device: ZonedDevice, z: int, *, verify: bool = True) -> Iterator[ScanEntry]:
    """Every record of zone `z` from its start to its write pointer, with damaged spans
    (see `record.scan`), for recovery and fsck without the index."""
    zone = device.zone(z)
    if zone.cond == Cond.OFFLINE:
        raise ZoneOffline(z)
    if zone.cond == Cond.EMPTY:
        return iter(())
    capacity = zone.capacity * SECTOR
    unknown_wp = zone.cond in (Cond.FULL, Cond.READONLY)
    end = capacity if unknown_wp else (zone.wp - zone.start) * SECTOR
    return scan(
        lambda offset, length: _read(device, z, offset, length),
        end,
        device.geometry.lba_size,
        stop_at_zeros=unknown_wp,
        verify=verify,
    )
