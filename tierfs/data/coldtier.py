"""The cold tier in the filesystem: migration of cold chunks into zones, and zone reclaim.

The storage itself is the `tierfs.tiers.cold` library (records, allocator, reclaim rules);
this module is its caller: it owns the index side (chunk locations, DB_ZONES live bytes),
decides what is cold, and runs the two background jobs.

Migration moves whole hot segments: every live chunk of a segment whose last access is older
than `cold.cold_after` (or, above `cold.hot_high_pct` of the hot tier's room, the least
recently used segments until it is back under `cold.hot_low_pct`). Access is tracked
coarsely, per segment and in memory: the segment file's mtime (its last append) and the last
chunk load from it since mount; a mount counts as an access, so nothing migrates by age in
the first `cold_after` after a mount. Chunks go in the order of their hot copies, in batches:
a batch's frames are read from the hot tier (pinned, checked) while the batch before is
appended to zones and flushed, then one operation points each chunk that is still where it
was at its record and frees its hot frame (given back once that commit is durable).

Reclaim: zones with nothing live are reset once the commit that emptied them is durable and
no reader pins them; when EMPTY zones run low, the zones with the most garbage have their
live records relocated and are reset on a later pass. All device work runs in worker threads
under `device_lock` (the allocator is not thread-safe); the index work on the trio thread.

When the zones have no room beyond the reserve for a migration batch, the batch writes what
fits, and the rest waits: migration records the bytes it waits for (`need`), runs a reclaim
pass, which then hurries (relocates the zones with the most garbage, whatever their share,
until the garbage they give back makes room for the rest and brings the EMPTY zones back to
the low mark: `Reclaimer.shortfall`), tries once more and, if nothing fits yet,
raises `ColdFull`: the victims are reset once their moves are durable (the next pass, or at
once after a sync), and the next migration goes on. `need` is cleared by the first migration
that finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from tierfs.data import frame
from tierfs.data.chunkstore import ChunkIndex
from tierfs.meta import schema
from tierfs.meta.records import TIER_COLD, TIER_HOT, ChunkRecord, SegmentRecord, ZoneRecord
from tierfs.meta.store import MetaStore
from tierfs.tiers.cold.errors import AppendError, ColdError, ColdFull, RecordError
from tierfs.tiers.cold.reader import read_chunk, read_record, scan_zone
from tierfs.tiers.cold.reclaim import Reclaimer, ZoneUsage
from tierfs.tiers.cold.record import Location, record_len
from tierfs.tiers.cold.zones import Lifetime, ZoneAllocator
from tierfs.tiers.hot import HotStore
from tierfs.tiers.zns.device import ZonedDevice
from tierfs.tiers.zns.model import SECTOR, Cond
from tierfs.trioutil import Emit, pipeline

log = logging.getLogger(__name__)

SCAN_SLICE = 4096  # chunk records looked at per step of a migration scan (no await inside)
COLLECT_MAX = 65536  # chunk records a migration sorts into hot order at a time (~16 GiB)
PROMOTE_QUEUE_MAX = 4096
PROMOTE_BATCH = 256
ReadBatch = tuple[list[tuple[bytes, ChunkRecord]], list[bytes | None]]
AppendHot = Callable[[list[bytes], Callable[[Any, list[Any]], None]], Awaitable[None]]


@dataclasses.dataclass
class ColdPolicy:
    cold_after: float = 86400.0
    hot_high_pct: int = 85
    hot_low_pct: int = 70
    batch_bytes: int = 64 << 20
    reserve_zones: int = 2
    min_garbage: float = 0.25
    interval: float = 5.0
    promote_on_read: bool = False
    hot_room: int = 0  # bytes the hot tier may use (hot.max_mb, else the data directory's size)


@dataclasses.dataclass
class ColdCounters:
    migrated_chunks: int = 0
    migrated_bytes: int = 0
    relocated_chunks: int = 0
    promoted_chunks: int = 0
    zones_reset: int = 0
    migration_read_errors: int = 0


class ColdTier:
    def __init__(
        self,
        store: MetaStore,
        chunks: ChunkIndex,
        hot: HotStore,
        device: ZonedDevice,
        policy: ColdPolicy,
        io_limiter: trio.CapacityLimiter,
    ) -> None:
        self.store = store
        self.chunks = chunks
        self.hot = hot
        self.device = device
        self.policy = policy
        self.io_limiter = io_limiter
        self.lba = device.geometry.lba_size
        self.allocator = ZoneAllocator(device, reserve=policy.reserve_zones)
        self.usage = ZoneUsage.rebuild(self._zone_rows())
        self.reclaimer = Reclaimer(self.allocator, self.usage, min_garbage=policy.min_garbage)
        self.need = 0
        """Bytes of records a blocked migration waits for (0: none waits): reclaim hurries."""
        self.device_lock = trio.Lock()
        self.migrate_lock = trio.Lock()
        self.segment_reads: dict[int, float] = {}
        self.mounted_at = time.time()
        self.counters = ColdCounters()
        self.promote_queue: dict[bytes, tuple[int, int]] = {}
        self.append_hot: AppendHot | None = None
        chunks.cold_free = self._on_free

    # -- the index side ----------------------------------------------------------------

    def _zone_rows(self) -> Iterator[tuple[int, int, int]]:
        with self.store.tx.cursor(db=self.store.zones) as cur:
            for key, value in cur:
                record = ZoneRecord.decode(bytes(value))
                yield schema.key_ino(bytes(key)), record.live_bytes, record.klass

    def _zone_delta(self, tx: Any, zone: int, klass: int, delta: int) -> None:
        key = schema.ino_key(zone)
        raw = tx.get(key, db=self.store.zones)
        record = ZoneRecord.decode(bytes(raw)) if raw is not None else ZoneRecord(klass, 0)
        record.live_bytes += delta
        if record.live_bytes <= 0:
            tx.delete(key, db=self.store.zones)
        else:
            tx.put(key, record.encode(), db=self.store.zones)

    def location(self, zone: int, offset: int, frame_len: int) -> Location:
        return Location(zone, offset, record_len(frame_len, self.lba))

    def _on_free(self, tx: Any, zone: int, offset: int, frame_len: int) -> None:
        """A chunk record with a cold copy was deleted (in operation `tx`)."""
        loc = self.location(zone, offset, frame_len)
        self._zone_delta(tx, zone, 0, -loc.length)
        self.usage.remove(loc, self.store.commits)

    # -- reads -------------------------------------------------------------------------

    def note_read(self, seg: int) -> None:
        """A chunk was loaded from hot segment `seg`: the segment is not cold."""
        self.segment_reads[seg] = time.time()

    def note_cold_read(self, chunk_id: bytes, zone: int, offset: int) -> None:
        """A chunk was loaded from a zone: with `promote_on_read`, queue it for the hot tier
        (bounded; promotion is a background copy, never on the read's path)."""
        if self.policy.promote_on_read and len(self.promote_queue) < PROMOTE_QUEUE_MAX:
            self.promote_queue[chunk_id] = (zone, offset)

    def pin(self, zone: int) -> contextlib.AbstractContextManager[None]:
        return self.usage.pin(zone)

    def read_frame(self, zone: int, offset: int, frame_len: int, chunk_id: bytes) -> bytes:
        """A chunk's frame, checked, from its zone record (worker thread; for packs)."""
        return read_record(self.device, self.location(zone, offset, frame_len), chunk_id)

    def read(self, zone: int, offset: int, frame_len: int, chunk_id: bytes) -> bytes | memoryview:
        """A chunk's plaintext from its zone record (worker thread)."""
        return read_chunk(self.device, self.location(zone, offset, frame_len), chunk_id)

    # -- the background job ------------------------------------------------------------

    async def run(self) -> None:
        """Migrate what is due and reclaim zones, every `interval` seconds; a failing pass
        is logged and retried, it never stops the mount."""
        while True:
            await trio.sleep(self.policy.interval)
            for step in (self._migrate_due, self.promote, self.reclaim):
                try:
                    await step()
                except ColdFull as exc:
                    log.warning("cold tier full, migration waits for reclaim: %s", exc)
                except Exception:
                    log.exception("cold tier pass failed; it is retried")

    async def _migrate_due(self) -> None:
        await self.migrate(self.due_segments(), Lifetime.LONG)
        await self.migrate(self._pressure_segments(), Lifetime.SHORT)

    def _segments(self) -> dict[int, SegmentRecord]:
        out = {}
        with self.store.tx.cursor(db=self.store.segments) as cur:
            for key, value in cur:
                out[schema.key_ino(bytes(key))] = SegmentRecord.decode(bytes(value))
        return out

    def last_access(self, seg: int) -> float:
        try:
            written = os.stat(self.hot.path(seg)).st_mtime
        except FileNotFoundError:
            written = 0.0
        return max(written, self.segment_reads.get(seg, self.mounted_at))

    def due_segments(self) -> set[int]:
        """Segments (the active one too) not accessed for `cold_after`."""
        limit = time.time() - self.policy.cold_after
        return {
            seg
            for seg, rec in self._segments().items()
            if rec.live_frames and self.last_access(seg) < limit
        }

    def _pressure_segments(self) -> set[int]:
        """Above the high watermark: least recently used segments down to the low one."""
        room = self.policy.hot_room
        segments = self._segments()
        used = sum(rec.live_bytes for rec in segments.values())
        if not room or used * 100 <= room * self.policy.hot_high_pct:
            return set()
        target = used - room * self.policy.hot_low_pct // 100
        picked: set[int] = set()
        for seg in sorted(segments, key=self.last_access):
            if target <= 0:
                break
            if seg == self.hot.active or not segments[seg].live_frames:
                continue
            picked.add(seg)
            target -= segments[seg].live_bytes
        return picked

    # -- migration ---------------------------------------------------------------------

    async def migrate(self, segments: set[int] | None, klass: int) -> None:
        """Migrate the chunks whose hot copy is in `segments` (None: every segment).

        Chunks go in the order of their hot copies (segment, then offset): the frames are
        read sequentially, and what was written together lands together in the zones, where
        it will most likely be read and deleted together too.

        Raises `ColdFull` when a batch still finds no room after a reclaim pass (see the
        module docstring); what was migrated before stays migrated."""
        if segments is not None and not segments:
            self.need = 0
            return
        async with self.migrate_lock:
            await pipeline(
                functools.partial(self._read_batches, segments),
                functools.partial(self._store_batch, klass),
            )
            self.need = 0

    async def _read_batches(self, segments: set[int] | None, emit: Emit[ReadBatch]) -> None:
        """The producer half of a migration: each batch's frames, read while the batch
        before is appended to the zones (reading and writing overlap on the disk)."""
        after = b""
        while True:
            found, after = await self._collect(after, segments)
            for batch in self._batches(found):
                batch = self._still_hot(batch)
                if batch:
                    await emit((batch, await self._read_batch(batch)))
            if not after:
                return

    async def _collect(
        self, after: bytes, segments: set[int] | None
    ) -> tuple[list[tuple[bytes, ChunkRecord]], bytes]:
        """Up to `COLLECT_MAX` chunk records after key `after` with a hot copy in
        `segments`, sorted by hot location; and the key to continue from (b"": the end)."""
        found: list[tuple[bytes, ChunkRecord]] = []
        while len(found) < COLLECT_MAX:
            more, after = self._scan_slice(after, segments)
            found.extend(more)
            if not after:
                break
            await trio.lowlevel.checkpoint()
        found.sort(key=_hot_order)
        return found, after

    def _scan_slice(
        self, after: bytes, segments: set[int] | None
    ) -> tuple[list[tuple[bytes, ChunkRecord]], bytes]:
        """The chunk records of the next slice after key `after` with a hot copy in
        `segments`; and the key to continue from (b"" at the end)."""
        records, after = self.chunks.scan(after, SCAN_SLICE)
        found = []
        for key, record in records:
            hot = record.hot_location()
            if hot is not None and (segments is None or hot[0] in segments):
                found.append((key, record))
        return found, after

    def _batches(
        self, found: list[tuple[bytes, ChunkRecord]]
    ) -> Iterator[list[tuple[bytes, ChunkRecord]]]:
        """`found` in runs of about `batch_bytes` of frames."""
        batch: list[tuple[bytes, ChunkRecord]] = []
        size = 0
        for item in found:
            batch.append(item)
            size += item[1].frame_len
            if size >= self.policy.batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    async def _read_batch(self, batch: list[tuple[bytes, ChunkRecord]]) -> list[bytes | None]:
        """The batch's hot frames (pinned while they are read): see `_read_frames`."""
        with contextlib.ExitStack() as pins:
            for _, record in batch:
                hot = record.hot_location()
                assert hot is not None
                pins.enter_context(self.chunks.pin(hot[0], hot[1]))
            return await trio.to_thread.run_sync(self._read_frames, batch, limiter=self.io_limiter)

    async def _store_batch(self, klass: int, read: ReadBatch) -> None:
        """Append the frames read to zones; the chunks still where they were read from now
        live there (`_install`). A batch that finds no room waits for a reclaim pass once."""
        batch, frames = read
        pending = [(item, f) for item, f in zip(batch, frames, strict=True) if f is not None]
        reclaimed = False
        while pending:
            failed = False
            async with self.device_lock:
                try:
                    locations = await trio.to_thread.run_sync(
                        functools.partial(
                            self.allocator.append_batch,
                            klass,
                            [f for _, f in pending],
                            partial=True,
                        ),
                        limiter=self.io_limiter,
                    )
                except ColdFull:
                    if reclaimed:
                        raise
                    locations = []
                except AppendError as exc:
                    log.error("cold tier: append failed part way: %s", exc)
                    locations, failed = exc.written, True
            written = [item for item, _ in pending][: len(locations)]
            self._install(written, locations, klass)
            self.allocator.settle(locations)
            pending = pending[len(locations) :]
            if failed or not pending:
                return  # after a failure, the rest stays hot and migrates later
            # No room for the rest beyond the reserve: reclaim hurries, then try again.
            rest = sum(record_len(len(f), self.lba) for _, f in pending)
            self.need = rest
            log.info(
                "cold tier: no room for %d chunks (%d bytes) beyond the reserve; reclaiming",
                len(pending),
                rest,
            )
            await self.reclaim()
            reclaimed = True

    def _still_hot(self, batch: list[tuple[bytes, ChunkRecord]]) -> list[tuple[bytes, ChunkRecord]]:
        """The chunks of `batch` still at the hot location they were collected at (earlier
        batches awaited meanwhile: a chunk may have been freed, or moved by promotion)."""
        out = []
        for chunk_id, was in batch:
            record = self.chunks.get(chunk_id)
            if record is not None and record.hot_location() == was.hot_location():
                out.append((chunk_id, record))
        return out

    def _read_frames(self, batch: list[tuple[bytes, ChunkRecord]]) -> list[bytes | None]:
        """Worker thread: each chunk's hot frame, checked; None for one that fails (it stays
        hot, its read reports the error)."""
        out: list[bytes | None] = []
        for chunk_id, record in batch:
            hot = record.hot_location()
            assert hot is not None
            try:
                data = self.hot.read(hot[0], hot[1], record.frame_len)
                frame.decode(data, chunk_id)
            except (OSError, frame.FrameError) as exc:
                log.error(
                    "chunk %s: not migrated, hot copy unreadable: %s", chunk_id.hex()[:16], exc
                )
                self.counters.migration_read_errors += 1
                out.append(None)
                continue
            out.append(data)
        return out

    def _install(
        self, items: list[tuple[bytes, ChunkRecord]], locations: list[Location], klass: int
    ) -> None:
        """One operation: each chunk still at its hot location now lives in its zone record;
        its hot frame is freed once this is durable. Records of chunks that changed or went
        meanwhile stay garbage in their zone."""
        added = []
        with self.store.op() as tx:
            for (chunk_id, was), loc in zip(items, locations, strict=True):
                record = self.chunks.get(chunk_id, tx)
                hot = record.hot_location() if record is not None else None
                if record is None or hot is None or hot != was.hot_location():
                    continue
                record.locations = [x for x in record.locations if x[0] != TIER_HOT]
                record.locations.append((TIER_COLD, loc.zone, loc.offset))
                self.chunks.put(tx, chunk_id, record)
                self.chunks.free_frame(tx, hot[0], hot[1], record.frame_len)
                self._zone_delta(tx, loc.zone, klass, loc.length)
                added.append((loc, record.frame_len))
        for loc, frame_len in added:
            self.usage.add(loc, klass)
            self.counters.migrated_chunks += 1
            self.counters.migrated_bytes += frame_len
        if added:
            log.info("cold tier: %d chunks migrated to zones", len(added))

    # -- promotion ---------------------------------------------------------------------

    async def promote(self) -> None:
        """Copy the queued hot-again chunks back to the hot tier: their frames are read from
        their records (zones pinned), appended to a hot segment in turn with the sealer, and
        one operation moves each chunk still at that record to its new frame; the record
        becomes garbage once that is durable."""
        if not self.promote_queue or self.append_hot is None:
            return
        queued = list(self.promote_queue.items())[:PROMOTE_BATCH]
        for chunk_id, _ in queued:
            del self.promote_queue[chunk_id]
        items = []
        zones = set()
        for chunk_id, (zone, offset) in queued:
            record = self.chunks.get(chunk_id)
            if record is not None and record.cold_location() == (zone, offset):
                items.append((chunk_id, record))
                zones.add(zone)
        if not items:
            return
        with contextlib.ExitStack() as pins:
            for zone in zones:
                pins.enter_context(self.usage.pin(zone))
            frames = await trio.to_thread.run_sync(
                self._read_records, items, limiter=self.io_limiter
            )
        readable = [(item, f) for item, f in zip(items, frames, strict=True) if f is not None]
        if readable:
            await self.append_hot(
                [f for _, f in readable],
                lambda tx, placed: self._install_promoted(tx, [i for i, _ in readable], placed),
            )

    def _read_records(self, items: list[tuple[bytes, ChunkRecord]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for chunk_id, record in items:
            where = record.cold_location()
            assert where is not None
            try:
                loc = self.location(where[0], where[1], record.frame_len)
                out.append(read_record(self.device, loc, chunk_id))
            except (ColdError, RecordError, OSError) as exc:
                log.warning("chunk %s: not promoted: %s", chunk_id.hex()[:16], exc)
                out.append(None)
        return out

    def _install_promoted(
        self, tx: Any, items: list[tuple[bytes, ChunkRecord]], placed: list[Any]
    ) -> None:
        """In the sealer's operation: chunks still at their record now live in their new
        hot frame; a frame whose chunk moved or went meanwhile is freed again."""
        for (chunk_id, was), p in zip(items, placed, strict=True):
            record = self.chunks.get(chunk_id, tx)
            cold = record.cold_location() if record is not None else None
            if record is None or cold is None or cold != was.cold_location():
                self.chunks.queue_free(tx, p.seg, p.offset, p.frame_len)
                continue
            loc = self.location(cold[0], cold[1], record.frame_len)
            record.locations = [x for x in record.locations if x[0] != TIER_COLD]
            record.locations.append((TIER_HOT, p.seg, p.offset))
            self.chunks.put(tx, chunk_id, record)
            self.chunks.add_segment_frame(tx, p.seg, record.frame_len)
            self._zone_delta(tx, loc.zone, 0, -loc.length)
            self.usage.remove(loc, self.store.commits)
            self.counters.promoted_chunks += 1

    # -- reclaim -----------------------------------------------------------------------

    async def reclaim(self) -> None:
        async with self.device_lock:
            reset = await trio.to_thread.run_sync(
                self.reclaimer.reset_empty, self.store.durable_commits, limiter=self.io_limiter
            )
        self.counters.zones_reset += len(reset)
        for victim in self.reclaimer.pick_victims(need=self.need):
            await self._relocate(victim)

    async def _relocate(self, victim: int) -> None:
        async with self.device_lock:
            entries = await trio.to_thread.run_sync(
                lambda: list(scan_zone(self.device, victim)), limiter=self.io_limiter
            )
            if not self.reclaimer.worth_relocating(victim, entries):
                return
            live = self._live_records(victim, entries)
            relocation = await trio.to_thread.run_sync(
                self.reclaimer.relocate, victim, live, limiter=self.io_limiter
            )
        moved = []
        with self.store.op() as tx:
            klass = self.usage.klass.get(victim, 0)
            for move in relocation.moves:
                record = self.chunks.get(move.chunk_id, tx)
                if record is None or record.cold_location() != (victim, move.old.offset):
                    continue
                record.locations = [x for x in record.locations if x[0] != TIER_COLD]
                record.locations.append((TIER_COLD, move.new.zone, move.new.offset))
                self.chunks.put(tx, move.chunk_id, record)
                self._zone_delta(tx, victim, klass, -move.old.length)
                self._zone_delta(tx, move.new.zone, klass, move.new.length)
                moved.append(move)
        for move in moved:
            self.usage.move(move.old, move.new, self.store.commits)
        self.allocator.settle([m.new for m in relocation.moves])
        self.counters.relocated_chunks += len(moved)

    def _live_records(self, zone: int, entries: list[Any]) -> list[tuple[bytes, Location]]:
        """The records of `zone` that the index points at."""
        live = []
        for entry in entries:
            header = entry.header
            if header is None:
                continue
            record = self.chunks.get(header.chunk_id)
            if record is not None and record.cold_location() == (zone, entry.offset):
                live.append((header.chunk_id, Location(zone, entry.offset, entry.length)))
        return live

    # -- reports -----------------------------------------------------------------------

    def zones_report(self) -> list[dict[str, Any]]:
        """Every sequential zone: condition, write pointer, capacity, live bytes, class."""
        out = []
        for z in range(self.device.nr_zones()):
            if self.device.is_conventional(z):
                continue
            zone = self.device.zone(z)
            capacity = zone.capacity * SECTOR
            if zone.cond in (Cond.READONLY, Cond.OFFLINE):
                wp = None
            elif zone.cond == Cond.FULL:
                wp = capacity
            else:
                wp = (zone.wp - zone.start) * SECTOR
            out.append(
                {
                    "zone": z,
                    "condition": zone.cond.name.lower(),
                    "write_pointer": wp,
                    "capacity": capacity,
                    "live_bytes": self.usage.live_bytes(z),
                    "class": _class_name(self.usage.klass.get(z, self.allocator.zone_class(z))),
                }
            )
        return out

    def status(self) -> dict[str, int]:
        zones = self.zones_report()
        return {
            "bytes": sum(z["live_bytes"] for z in zones),
            "zones": len(zones),
            "zones_empty": sum(1 for z in zones if z["condition"] == "empty"),
            "written_bytes": sum(z["write_pointer"] or 0 for z in zones),
            **dataclasses.asdict(self.counters),
        }

    def close(self) -> None:
        with contextlib.suppress(OSError, ColdError):
            self.device.close_device()


def _hot_order(item: tuple[bytes, ChunkRecord]) -> tuple[int, int]:
    hot = item[1].hot_location()
    assert hot is not None
    return hot


def _class_name(klass: int | None) -> str:
    if klass is None:
        return "-"
    try:
        return Lifetime(klass).name.lower()
    except ValueError:
        return str(klass)
