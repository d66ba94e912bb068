"""Zone allocation: strictly sequential appends of records, per lifetime class.

How zones are chosen (after ZenFS and btrfs, zns.md A.5):

* **Streams.** Records go to a *stream* keyed by (lifetime class, relocated): each stream
  fills one zone at a time, at its write pointer, so data that should leave together (be
  evicted upstream, or die) shares zones, and survivors of a reclaim are not mixed with fresh
  data. A zone holds the records of one stream only.
* **Reserve.** `reserve` EMPTY zones are kept back: only relocation (reclaim) may open them,
  so that reclaim can always make progress when fresh appends have filled the device. A fresh
  append that would need one raises `ColdFull` before writing anything (or, asked for a
  `partial` append, writes the records that fit and leaves the rest to the caller).
* **Active limit.** When the device's active-zone limit is reached, the allocator FINISHES
  the fullest active zone (least capacity left) instead of blocking, as ZenFS and btrfs do;
  its stream moves on to a new zone next time. The open limit needs nothing: writes open
  zones implicitly, and the device closes an implicitly open zone to make room.
* **Batches.** `append_batch` writes its records back to back, in writes of at most `max_io`
  bytes, then flushes the device once before it returns, so the caller may commit the
  locations. A record never spans zones: when the next record does not fit a zone, that zone
  is finished and the batch continues in the stream's next zone.
* **Failures.** A write error part way leaves a torn record below the write pointer. The
  allocator re-reads the zone's state (the write pointer moved to where the device stopped),
  flushes what was written before, finishes the zone so that nothing follows the torn record
  (a READONLY or OFFLINE zone is just dropped), and raises `AppendError` with the locations of
  the records written whole, which are durable.
* **Restart.** State comes from the device's zone report. Open zones come back CLOSED after
  a power cycle; each stream resumes at the write pointer of its zone, found from the first
  record's header (class and relocation flag). A second CLOSED zone of a stream stays idle
  until its stream needs a zone again; one whose first record cannot be read stays idle for
  good. Idle zones are the first to be finished when an active zone is needed.
* **Settling.** Locations returned by an append belong to the caller only once it commits
  them. Until the caller calls `settle()` for them (after committing, or giving up), their
  zones are *unsettled*, and reclaim neither resets nor relocates them: a zone filled by an
  append in flight would otherwise count no live bytes and look empty.

Records beyond the last location a caller committed (an append whose commit never happened,
before or after a crash) are garbage: live bytes come only from committed locations, and
the zone's write pointer simply moves on past them. The allocator does not need to know the
committed ends.

The allocator does I/O and is synchronous: run it in a worker thread, one call at a time
(appends, finishes and resets of one store are serialised by the caller).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
from collections import Counter
from collections.abc import Sequence

from tierfs.crashpoints import crash_point
from tierfs.tiers.cold.errors import AppendError, ColdError, ColdFull, RecordError
from tierfs.tiers.cold.record import (
    FLAG_RELOCATED,
    Location,
    decode,
    encode,
    frame_info,
    parse_header,
    record_len,
)
from tierfs.tiers.zns.device import ZonedDevice
from tierfs.tiers.zns.model import SECTOR, Cond

log = logging.getLogger(__name__)


class Lifetime(enum.IntEnum):
    """Lifetime classes (a record stores any class 0..255; these are the named ones).

    Records of one class share zones, so that they leave together: whole zones of SHORT data
    are evicted upstream, LONG data stays for local retention."""

    DEFAULT = 0
    SHORT = 1
    LONG = 2


StreamKey = tuple[int, bool]
"""(lifetime class, relocated): the records that share zones."""

DEFAULT_RESERVE = 2
DEFAULT_MAX_IO = 2 << 20


@dataclasses.dataclass
class ZoneState:
    """The allocator's view of one sequential zone: condition, bytes used from its start
    (the write pointer; the capacity for FULL, READONLY and OFFLINE zones, whose write
    pointer means nothing) and capacity."""

    cond: Cond
    used: int
    capacity: int

    @property
    def room(self) -> int:
        return self.capacity - self.used if self.cond.is_active or self.cond == Cond.EMPTY else 0


class ZoneAllocator:
    """Appends records to the zones of `device`, stream by stream."""

    def __init__(
        self,
        device: ZonedDevice,
        *,
        reserve: int = DEFAULT_RESERVE,
        max_io: int = DEFAULT_MAX_IO,
    ) -> None:
        if reserve < 0:
            raise ValueError("reserve cannot be negative")
        self.device = device
        self.lba = device.geometry.lba_size
        self.reserve = reserve
        self.max_io = max(max_io, self.lba)
        self.zones: dict[int, ZoneState] = {}
        self.streams: dict[StreamKey, int] = {}
        self.keys: dict[int, StreamKey | None] = {}
        self.unsettled: Counter[int] = Counter()
        self.reload()

    # -- state

    def reload(self) -> None:
        """Rebuild zone states and streams from the device's report (at startup)."""
        self.zones = {
            z: self._state_of(z)
            for z in range(self.device.nr_zones())
            if not self.device.is_conventional(z)
        }
        self.streams, self.keys = {}, {}
        active = [z for z, s in self.zones.items() if s.cond.is_active]
        for z in sorted(active, key=lambda z: -self.zones[z].used):
            key = self.keys[z] = self._key_from_device(z)
            if key is not None and key not in self.streams:
                self.streams[key] = z
        if self.zones:
            free = len(self.free_zones())
            log.info(
                "cold store: %d zones, %d free, %d active (%d streams resumed)",
                len(self.zones),
                free,
                len(active),
                len(self.streams),
            )

    def _state_of(self, z: int) -> ZoneState:
        zone = self.device.zone(z)
        capacity = zone.capacity * SECTOR
        if zone.cond in (Cond.FULL, Cond.READONLY, Cond.OFFLINE):
            used = capacity
        else:
            used = (zone.wp - zone.start) * SECTOR
        return ZoneState(zone.cond, used, capacity)

    def refresh(self, z: int) -> ZoneState:
        """Re-read zone `z` from the device (after an error, or when a read found it offline)."""
        state = self.zones[z] = self._state_of(z)
        return state

    def _key_from_device(self, z: int) -> StreamKey | None:
        """The stream of an active zone, from its first record (None if unreadable)."""
        start = self.device.zone_start(z)
        try:
            header = parse_header(self.device.read(start, self.lba), zone_offset=0)
            length = header.record_len(self.lba)
            if length > self.zones[z].used:
                raise RecordError("first record runs past the write pointer")
            decode(self.device.read(start, length), zone_offset=0)
        except (RecordError, OSError) as exc:
            log.warning("zone %d: first record unreadable (%s); the zone is left idle", z, exc)
            return None
        return header.klass, bool(header.flags & FLAG_RELOCATED)

    def free_zones(self) -> list[int]:
        """EMPTY zones, lowest first."""
        return [z for z, s in self.zones.items() if s.cond == Cond.EMPTY]

    def writing(self) -> set[int]:
        """Zones that a stream is filling: never reclaim victims."""
        return set(self.streams.values())

    def zone_class(self, z: int) -> int | None:
        """The lifetime class of a zone's records, if known to the allocator."""
        key = self.keys.get(z)
        if key is None and z in self.zones and self.zones[z].used:
            key = self.keys[z] = self._key_from_device(z)
        return None if key is None else key[0]

    def settle(self, locations: Sequence[Location]) -> None:
        """The caller has committed (or given up) these locations: reclaim may now consider
        their zones again."""
        for loc in locations:
            self.unsettled[loc.zone] -= 1
            if self.unsettled[loc.zone] <= 0:
                del self.unsettled[loc.zone]

    # -- appending

    def append_batch(
        self,
        klass: int,
        frames: Sequence[bytes | memoryview],
        *,
        relocated: bool = False,
        partial: bool = False,
    ) -> list[Location]:
        """Append one record per chunk frame to the stream of `klass`, flush, and return the
        records' locations in order (worker thread).

        `relocated` marks records copied by reclaim: they go to their own stream and may use
        the reserve. Raises `ColdFull` (nothing written) when the batch would need more free
        zones than it may take; with `partial`, only when not even its first record fits:
        otherwise the records that fit (a prefix of the batch) are written and their
        locations returned, fewer than the frames given. Raises `AppendError` when the device
        fails part way (the records written whole before are durable and listed in it), and
        `ValueError` for a frame that is not a frame or a record larger than a zone. Every
        location returned (or listed in an `AppendError`) must be `settle`d by the caller."""
        key: StreamKey = (klass, relocated)
        if not 0 <= klass <= 0xFF:
            raise ValueError(f"lifetime class {klass} does not fit a byte")
        sizes = [record_len(frame_info(f).frame_len, self.lba) for f in frames]
        fit = self._fitting(key, sizes)
        if fit < len(sizes) and (fit == 0 or not partial):
            beyond = "" if relocated else f" beyond the reserve of {self.reserve}"
            raise ColdFull(
                f"cold store full: no EMPTY zone for class {klass}{beyond} (reclaim or evict first)"
            )
        frames, sizes = frames[:fit], sizes[:fit]
        flags = FLAG_RELOCATED if relocated else 0
        batch = _Batch()
        try:
            for chunk_frame, size in zip(frames, sizes, strict=True):
                z = self._zone_for(key, size, batch)
                offset = self.zones[z].used + batch.queued
                record = encode(
                    chunk_frame, klass=klass, zone_offset=offset, lba=self.lba, flags=flags
                )
                batch.queue(record, Location(z, offset, size))
                if batch.queued >= self.max_io:
                    self._write_pending(batch)
            self._write_pending(batch)
        except ColdError as exc:
            if isinstance(exc, AppendError) or not batch.written:
                raise
            self._flush(batch.written)
            self.unsettled.update(loc.zone for loc in batch.written)
            raise AppendError(
                f"append stopped after {len(batch.written)} records: {exc}",
                batch.written[-1].zone,
                batch.written,
                exc.errno,
            ) from exc
        self._flush(batch.written)
        self.unsettled.update(loc.zone for loc in batch.written)
        if batch.written and not relocated:
            crash_point("cold-after-append")
        if batch.written:
            log.debug(
                "cold store: %d records of class %d%s appended in zones %s",
                len(batch.written),
                klass,
                " (relocated)" if relocated else "",
                sorted({loc.zone for loc in batch.written}),
            )
        return batch.written

    def _fitting(self, key: StreamKey, sizes: list[int]) -> int:
        """How many of the records, from the first, the stream can take now (no write):
        its zone's room, then the EMPTY zones it may open (fresh appends leave `reserve`
        EMPTY zones untouched)."""
        largest = max((s.capacity for s in self.zones.values()), default=0)
        for size in sizes:
            if size > largest:
                raise ValueError(f"a record of {size} bytes does not fit a zone of {largest}")
        current = self._current(key)
        rooms = [self.zones[z].capacity for z in self._usable_free(key)]
        room = self.zones[current].room if current is not None else 0
        for count, size in enumerate(sizes):
            while size > room:
                if not rooms:
                    return count
                room = rooms.pop(0)
            room -= size
        return len(sizes)

    def _usable_free(self, key: StreamKey) -> list[int]:
        """The EMPTY zones a stream may open: all for relocation, all but the reserve
        otherwise."""
        free = self.free_zones()
        return free if key[1] else free[: max(0, len(free) - self.reserve)]

    def _current(self, key: StreamKey) -> int | None:
        """The stream's zone; a stream without one adopts an idle zone of its own key."""
        z = self.streams.get(key)
        if z is None:
            writing = self.writing()
            idle = [
                z
                for z, k in self.keys.items()
                if k == key and z not in writing and self.zones[z].cond.is_active
            ]
            if idle:
                z = self.streams[key] = max(idle, key=lambda z: self.zones[z].used)
        return z

    def _zone_for(self, key: StreamKey, size: int, batch: _Batch) -> int:
        """The zone the next record of `size` bytes goes to. When it does not fit the
        stream's zone, what is queued is written, that zone finished, and a new one opened."""
        z = self._current(key)
        while z is None or self.zones[z].room - batch.queued < size:
            self._write_pending(batch)
            if z is not None:
                self._finish(z, "the next record does not fit")
            z = self._open_new(key)
        return z

    def _open_new(self, key: StreamKey) -> int:
        """Give the stream an EMPTY zone, finishing the fullest active zone first if the
        device's active limit is reached."""
        free = self._usable_free(key)
        if not free:
            raise ColdFull(f"cold store full: no EMPTY zone for class {key[0]}")
        limit = self.device.max_active
        if limit and self.device.counts()[1] >= limit:
            self._finish_fullest("the active zone limit is reached")
        z = free[0]
        self.streams[key] = z
        self.keys[z] = key
        log.debug("zone %d: opened for class %d%s", z, key[0], " (relocated)" if key[1] else "")
        return z

    def _finish_fullest(self, why: str, exclude: int | None = None) -> bool:
        """Finish the active zone with the least room left (idle ones before those a stream
        is filling), to free an active zone rather than wait for one. False if there is
        none to finish."""
        candidates = [z for z, s in self.zones.items() if s.cond.is_active and z != exclude]
        if not candidates:
            return False
        writing = self.writing()
        z = min(candidates, key=lambda z: (z in writing, self.zones[z].room, z))
        self._finish(z, why)
        return True

    def _finish(self, z: int, why: str) -> None:
        """FINISH zone `z` (its remaining capacity is given up) and take it off its stream.

        A failure is logged, not raised: the zone is then READONLY or OFFLINE (re-read from
        the device) and no longer written either way."""
        self._drop_stream(z)
        if self.zones[z].cond == Cond.FULL:
            return
        try:
            self.device.finish_zone(z)
            log.info("zone %d: finished (%s)", z, why)
        except OSError as exc:
            log.warning("zone %d: finish failed: %s", z, exc)
        self.refresh(z)

    def _drop_stream(self, z: int) -> None:
        for key, zone in list(self.streams.items()):
            if zone == z:
                del self.streams[key]

    def _write_pending(self, batch: _Batch) -> None:
        """Write the queued records (all of one zone, back to back) in one write."""
        if not batch.pending:
            return
        z = batch.pending[0][1].zone
        offset = batch.pending[0][1].offset
        data = b"".join(record for record, _ in batch.pending)
        try:
            self._write_at(z, offset, data)
        except OSError as exc:
            self._failed(z, exc, batch)
        state = self.zones[z]
        state.used = offset + len(data)
        state.cond = Cond.FULL if state.used == state.capacity else Cond.IMP_OPEN
        if state.cond == Cond.FULL:
            self._drop_stream(z)
        batch.written += [loc for _, loc in batch.pending]
        batch.pending, batch.queued = [], 0

    def _write_at(self, z: int, offset: int, data: bytes) -> None:
        """One write at the write pointer. If the device refuses it for want of an active or
        open zone (a limit the allocator's view missed), finish the fullest other zone and
        retry once rather than fail."""
        at = self.device.zone_start(z) + offset
        try:
            self.device.write(at, data)
        except OSError as exc:
            if exc.errno not in (errno.EOVERFLOW, errno.ETOOMANYREFS):
                raise
            log.info("zone %d: %s; finishing a zone to make room", z, exc.strerror)
            if not self._finish_fullest("the device refused to open another zone", exclude=z):
                raise
            self.device.write(at, data)

    def _failed(self, z: int, exc: OSError, batch: _Batch) -> None:
        """A write to zone `z` failed part way: keep what was written whole, make it durable,
        close the zone to further appends, and raise AppendError."""
        state = self.refresh(z)
        end = state.used if state.cond.is_active or state.cond == Cond.FULL else 0
        whole = [loc for _, loc in batch.pending if loc.offset + loc.length <= end]
        if state.cond in (Cond.READONLY, Cond.OFFLINE):
            self._drop_stream(z)
            log.error("zone %d went %s during an append: %s", z, state.cond.name, exc)
        else:
            self._finish(z, f"a write failed: {exc}")
        written = batch.written + whole
        try:
            self._flush(written)
        except ColdError:
            written = []
        self.unsettled.update(loc.zone for loc in written)
        raise AppendError(
            f"zone {z}: append failed after {len(written)} records: {exc}",
            z,
            written,
            exc.errno or errno.EIO,
        ) from exc

    def _flush(self, written: list[Location]) -> None:
        """Make the batch durable (the device's flush), before the caller commits it."""
        if not written:
            return
        try:
            self.device.flush()
        except OSError as exc:
            zones = sorted({loc.zone for loc in written})
            for z in zones:
                self.refresh(z)
            raise AppendError(
                f"zones {zones}: flush failed: {exc}", zones[0], [], exc.errno or errno.EIO
            ) from exc

    # -- zone management for reclaim

    def finish(self, z: int) -> None:
        """Finish a zone on request (for example before it is drained or evicted whole)."""
        self._finish(z, "requested")

    def reset(self, z: int) -> None:
        """Reset zone `z` (EMPTY again, data gone). Safety checks are the caller's
        (`Reclaimer.reset`); READONLY and OFFLINE zones cannot be reset."""
        state = self.zones[z]
        if state.cond in (Cond.READONLY, Cond.OFFLINE):
            raise ColdError(f"zone {z} is {state.cond.name}: it cannot be reset")
        self._drop_stream(z)
        try:
            self.device.reset_zone(z)
        except OSError as exc:
            state = self.refresh(z)
            raise ColdError(f"zone {z} ({state.cond.name}): reset failed: {exc}") from exc
        self.keys.pop(z, None)
        self.refresh(z)
        log.info("zone %d: reset", z)


@dataclasses.dataclass
class _Batch:
    """An append in progress: records written so far, and records queued for one zone."""

    written: list[Location] = dataclasses.field(default_factory=list)
    pending: list[tuple[bytes, Location]] = dataclasses.field(default_factory=list)
    queued: int = 0
    """Bytes of the pending records."""

    def queue(self, record: bytes, location: Location) -> None:
        self.pending.append((record, location))
        self.queued += len(record)
