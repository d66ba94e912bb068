"""Zone reclaim: live-byte accounting, empty zones, victims, relocation and reset.

Who owns what. The caller's index (LMDB) is the truth: a record is live exactly when a
committed index entry points at its location. `ZoneUsage` is the in-memory mirror the
caller keeps of it (rebuilt at mount from (zone, live bytes, class) rows, then updated as
operations join the group), plus the two things that decide when a zone may be reset:

* **pins**: `usage.pin(zone)` is held by every reader of a location in the zone, taken in the
  same synchronous step (no await between) as the index lookup that produced the location,
  and released when the read is done. A pinned zone is never reset: `reset` refuses it.
* **epochs**: `usage.remove(location, commit)` records the number of the commit that drops
  the reference (`MetaStore.commits` when the operation joined the group, as chunk frees
  do). A zone is reset only once every such commit is durable (`commit < durable_commits`):
  otherwise a power cut could bring back an index that points into a reset zone.

So the rule "never reset while a reader may still be reading the old location" holds: a
reader either looked the location up before the commit that moved or dropped it (and then
pins the zone until done), or after (and then never sees the old location).

A zone is reset **at once** when nothing lives in it (`empty_zones` / `reset_empty`). When
free zones fall below a low mark, the zones with the most garbage are **relocated**: their
live records are read (checksums checked) and appended, in order, to the relocation stream
of their class (which may use the allocator's reserve of EMPTY zones), and the caller commits
the moves (compare-and-swap: only for chunks still at the old location); once that commit is
durable and no reader pins the victim, the victim is empty and is reset. A READONLY zone
cannot be reset; it is drained (relocated) whatever the free space, and then left alone.
A zone a stream is filling is never a victim (an empty one is reset like any other, and
the stream moves on to a new zone); a zone with unsettled appends is neither a victim nor
reset.

Which zones, and how many. Relocating a zone costs a write of its live bytes and gives back
its garbage, so normally only zones with at least `min_garbage` of garbage are victims, one
per pass, and only below the low mark (`low_mark`: the reserve and two more zones; a higher
mark keeps more zones EMPTY, which leaves less room for garbage to gather in the others and
costs relocations: at 80% fill, one more zone raised the write amplification from about 3.0
to 3.3). When the caller is *blocked* (a fresh append of `need` bytes found no room:
`pick_victims(need=...)`), waiting for such zones could be forever (at a high fill garbage
spreads thinly, and a batch may need more zones than the low mark keeps EMPTY), so reclaim
hurries: it takes the zones with the most garbage whatever their share, as many as the EMPTY
zones and the relocation streams can take in one pass, until the garbage they give back
makes room for the append and brings the EMPTY zones back to the low mark, counting the
zones awaiting their reset as EMPTY (`shortfall`).

A victim must give space back: a scan that finds no dead record in it (only the unwritten
end that a record did not fit, which the relocation stream leaves as well) passes it over
(`worth_relocating`), as does a relocation that leaves records it could not move: such a
zone is not picked again until its used or live bytes change, so one bad zone (a READONLY
one that cannot be drained whole, say) never takes every pass.

Crash safety: see the table in `tierfs/tiers/cold/__init__.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

from tierfs.crashpoints import crash_point
from tierfs.tiers.cold.errors import AppendError, ColdError, RecordError, ZoneBusy
from tierfs.tiers.cold.reader import read_record
from tierfs.tiers.cold.record import Location, ScanEntry
from tierfs.tiers.cold.zones import ZoneAllocator
from tierfs.tiers.zns.model import Cond

log = logging.getLogger(__name__)

DEFAULT_MIN_GARBAGE = 0.25
DEFAULT_RELOCATE_BATCH = 16 << 20
LOW_MARK_ABOVE_RESERVE = 2
"""The default low mark: reclaim relocates while fewer EMPTY zones than the reserve and these
are left."""

ReadFn = Callable[[bytes, Location], bytes]
"""read(chunk id, location) -> the chunk frame (checked), for relocation."""


@dataclasses.dataclass
class ZoneUsage:
    """Live bytes, class and pins per zone (trio thread; mirrors the caller's index)."""

    live: dict[int, int] = dataclasses.field(default_factory=dict)
    klass: dict[int, int] = dataclasses.field(default_factory=dict)
    pins: Counter[int] = dataclasses.field(default_factory=Counter)
    released: dict[int, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def rebuild(cls, rows: Iterable[tuple[int, int, int]]) -> ZoneUsage:
        """From (zone, live bytes, class) rows of the committed index; several rows of one
        zone add up (one row per record works). Call it once the index is durable (after
        mount recovery), before any reset."""
        usage = cls()
        for zone, live, klass in rows:
            usage.live[zone] = usage.live.get(zone, 0) + live
            usage.klass[zone] = klass
        return usage

    def add(self, location: Location, klass: int) -> None:
        """A committed location now points at a record (migration, or a relocation move)."""
        self.live[location.zone] = self.live.get(location.zone, 0) + location.length
        self.klass[location.zone] = klass

    def remove(self, location: Location, commit: int) -> None:
        """The operation of commit number `commit` drops the reference to `location`."""
        left = self.live.get(location.zone, 0) - location.length
        if left < 0:
            log.warning("zone %d: live bytes would go negative; set to 0", location.zone)
        self.live[location.zone] = max(0, left)
        self.released[location.zone] = max(self.released.get(location.zone, -1), commit)

    def move(self, old: Location, new: Location, commit: int) -> None:
        """A relocation move was committed (in the operation of `commit`)."""
        self.add(new, self.klass.get(old.zone, 0))
        self.remove(old, commit)

    def live_bytes(self, zone: int) -> int:
        return self.live.get(zone, 0)

    @contextlib.contextmanager
    def pin(self, zone: int) -> Iterator[None]:
        """Keep `zone` from being reset while a read of it runs."""
        self.pins[zone] += 1
        try:
            yield
        finally:
            self.pins[zone] -= 1
            if self.pins[zone] <= 0:
                del self.pins[zone]

    def quiet(self, zone: int, durable_commits: int) -> bool:
        """No reader pins the zone, and every commit that dropped a reference is durable."""
        return not self.pins[zone] and self.released.get(zone, -1) < durable_commits

    def forget(self, zone: int) -> None:
        """The zone was reset: nothing of it is left to account for."""
        self.live.pop(zone, None)
        self.klass.pop(zone, None)
        self.released.pop(zone, None)


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """One relocated record: the caller commits `chunk_id: old -> new` if the chunk is
    still at `old`."""

    chunk_id: bytes
    old: Location
    new: Location


@dataclasses.dataclass
class Relocation:
    """What `relocate` did: the moves to commit, the records it could not read (the caller
    repairs or drops them; until then the victim keeps live bytes and is not reset), and the
    error that stopped it early, if any."""

    victim: int
    moves: list[Move]
    unreadable: list[tuple[bytes, Location, str]]
    error: ColdError | None = None


class Reclaimer:
    """Reclaim over one allocator and its usage table."""

    def __init__(
        self,
        allocator: ZoneAllocator,
        usage: ZoneUsage,
        *,
        low_mark: int | None = None,
        min_garbage: float = DEFAULT_MIN_GARBAGE,
        batch_bytes: int = DEFAULT_RELOCATE_BATCH,
    ) -> None:
        self.allocator = allocator
        self.usage = usage
        self.low_mark = allocator.reserve + LOW_MARK_ABOVE_RESERVE if low_mark is None else low_mark
        self.min_garbage = min_garbage
        self.batch_bytes = batch_bytes
        self.passed: dict[int, tuple[int, int]] = {}
        """Zones not to pick while their (used, live) bytes stay as noted: relocated
        already (what is still live there could not be moved), or not worth relocating."""

    # -- accounting

    def garbage(self, zone: int) -> int:
        """Bytes of the zone that hold nothing live (dead records, padding, uncommitted
        appends, and a finished zone's unwritten capacity): what a reset gives back."""
        return max(0, self.allocator.zones[zone].used - self.usage.live_bytes(zone))

    def _settled(self, zone: int) -> bool:
        """No append to the zone waits for its commit."""
        return not self.allocator.unsettled[zone]

    def _victim_ok(self, zone: int) -> bool:
        """Settled, not being filled by a stream (relocating it would chase its tail), and
        not passed over."""
        return (
            self._settled(zone)
            and zone not in self.allocator.writing()
            and not self._passed_over(zone)
        )

    def _passed_over(self, zone: int) -> bool:
        noted = self.passed.get(zone)
        return noted is not None and noted == (
            self.allocator.zones[zone].used,
            self.usage.live_bytes(zone),
        )

    def _awaiting_reset(self) -> list[int]:
        """Zones that hold data but nothing live: `reset_empty` gives them back once their
        last commit is durable and no reader pins them."""
        return [
            z
            for z in self.allocator.zones
            if self._resettable_state(z) and self.usage.live_bytes(z) == 0 and self._settled(z)
        ]

    def shortfall(self, need: int) -> int:
        """For a blocked fresh append of `need` bytes: the garbage reclaim should give back
        so that, once the zones awaiting their reset are EMPTY, the EMPTY zones beyond the
        reserve hold those bytes and reach the low mark (0 or less: the resets will do).
        Room comes in whole zones: a fresh stream opens an EMPTY zone when its own is full."""
        if need <= 0:
            return 0
        capacity = max((s.capacity for s in self.allocator.zones.values()), default=0)
        if not capacity:
            return 0
        wanted = max(-(-need // capacity), self.low_mark - self.allocator.reserve)
        empty = len(self.allocator.free_zones()) + len(self._awaiting_reset())
        return (wanted - max(0, empty - self.allocator.reserve)) * capacity

    def _resettable_state(self, zone: int) -> bool:
        state = self.allocator.zones[zone]
        return state.used > 0 and (state.cond == Cond.FULL or state.cond.is_active)

    # -- empty zones

    def empty_zones(self, durable_commits: int) -> list[int]:
        """Zones that hold data but nothing live, and may be reset now."""
        return [
            z
            for z in self.allocator.zones
            if self._resettable_state(z)
            and self.usage.live_bytes(z) == 0
            and self._settled(z)
            and self.usage.quiet(z, durable_commits)
        ]

    def reset_empty(self, durable_commits: int) -> list[int]:
        """Reset every zone `empty_zones` names (worker thread); returns them."""
        done = []
        for z in self.empty_zones(durable_commits):
            self.reset(z, durable_commits)
            done.append(z)
        return done

    # -- victims and relocation

    def pick_victims(self, limit: int = 1, *, need: int = 0) -> list[int]:
        """Zones whose live records should be relocated, best first.

        `need`: bytes that a fresh append of the caller waits for (it raised `ColdFull`),
        0 if none does. While the zones awaiting their reset would not make that room
        (`shortfall`), reclaim hurries (`urgent_victims`; `limit` does not apply).

        Otherwise, READONLY zones that still hold live records come first, always (they are
        drained). Then, only while fewer than `low_mark` EMPTY zones are left: FULL or CLOSED
        zones not being written, with live records and at least `min_garbage` of their used
        bytes garbage, most garbage first (zones with nothing live are reset, not
        relocated). Zones passed over (see `passed`) are not picked."""
        short = self.shortfall(need)
        if short > 0:
            return self.urgent_victims(short)
        zones = self.allocator.zones
        drain = sorted(
            (
                z
                for z, s in zones.items()
                if s.cond == Cond.READONLY and self.usage.live_bytes(z) and self._victim_ok(z)
            ),
            key=self.usage.live_bytes,
        )
        victims = list(drain)
        if len(self.allocator.free_zones()) < self.low_mark:
            candidates = [
                z
                for z in zones
                if self._resettable_state(z)
                and self.usage.live_bytes(z) > 0
                and self._victim_ok(z)
                and self.garbage(z) >= self.min_garbage * zones[z].used
                and self.garbage(z) > 0
            ]
            victims += sorted(candidates, key=lambda z: (-self.garbage(z), z))
        return victims[:limit]

    def urgent_victims(self, short: int) -> list[int]:
        """For a blocked append that lacks `short` bytes: FULL or CLOSED zones not being
        written, with live records and any garbage, most garbage first, until their garbage
        covers `short`; only as many as the EMPTY zones (the reserve included) and the
        relocation streams' zones can take whole in one pass. READONLY zones wait: draining
        one gives nothing back."""
        zones = self.allocator.zones
        room = sum(zones[z].capacity for z in self.allocator.free_zones())
        room += sum(zones[z].room for (_, moved), z in self.allocator.streams.items() if moved)
        candidates = sorted(
            (
                z
                for z in zones
                if self._resettable_state(z)
                and self.usage.live_bytes(z) > 0
                and self._victim_ok(z)
                and self.garbage(z) > 0
            ),
            key=lambda z: (-self.garbage(z), z),
        )
        victims = []
        for z in candidates:
            if short <= 0:
                break
            live = self.usage.live_bytes(z)
            if live <= room:
                victims.append(z)
                room -= live
                short -= self.garbage(z)
        return victims

    def worth_relocating(self, victim: int, entries: Sequence[ScanEntry]) -> bool:
        """Whether relocating `victim` gives space back, judged from a scan of it (`entries`,
        from `scan_zone`). READONLY zones are drained whatever. Others must hold dead records
        (written bytes beyond the live ones), or more unwritten capacity than their largest
        record (a zone finished early): the end of a zone that the next record did not fit
        is no gain, since the relocation stream leaves such ends as well. A zone not worth
        it is passed over until its used or live bytes change."""
        state = self.allocator.zones[victim]
        if state.cond == Cond.READONLY:
            return True
        written = max((e.offset + e.length for e in entries), default=0)
        largest = max((e.length for e in entries), default=0)
        live = self.usage.live_bytes(victim)
        if written > live or state.used - written > largest:
            return True
        self.passed[victim] = (state.used, live)
        log.info(
            "zone %d: not relocated: no dead records (%d of %d bytes written, all live)",
            victim,
            written,
            state.used,
        )
        return False

    def relocate(
        self,
        victim: int,
        live: Sequence[tuple[bytes, Location]],
        read_fn: ReadFn | None = None,
    ) -> Relocation:
        """Copy the live records of `victim` ((chunk id, location) pairs from the caller's
        index) to the relocation stream of its class, in offset order (worker thread).

        Each record is read with its checks (`read_fn`, by default `read_record`); one that
        fails is listed in `unreadable`, not copied. The copies are durable when this
        returns; the caller commits the moves (compare-and-swap), settles the new locations,
        then resets the victim once `reset` allows it."""
        if victim in self.allocator.writing():
            self.allocator.finish(victim)
        live_before = self.usage.live_bytes(victim)
        read = read_fn or (lambda cid, loc: read_record(self.allocator.device, loc, cid))
        klass = self._class_of(victim)
        result = Relocation(victim, [], [])
        group: list[tuple[bytes, Location, bytes]] = []
        group_bytes = 0
        for chunk_id, loc in sorted(live, key=lambda item: item[1].offset):
            if loc.zone != victim:
                raise ValueError(f"location in zone {loc.zone} given to relocate zone {victim}")
            try:
                chunk_frame = read(chunk_id, loc)
            except (RecordError, ColdError, OSError) as exc:
                log.error(
                    "zone %d: chunk %s unreadable for relocation: %s",
                    victim,
                    chunk_id.hex()[:16],
                    exc,
                )
                result.unreadable.append((chunk_id, loc, str(exc)))
                continue
            group.append((chunk_id, loc, chunk_frame))
            group_bytes += len(chunk_frame)
            if group_bytes >= self.batch_bytes:
                if not self._copy(klass, group, result):
                    break
                group, group_bytes = [], 0
        else:
            self._copy(klass, group, result)
        if result.moves:
            crash_point("reclaim-after-relocate")
        if result.error is None:
            # Once the moves are committed, whatever is still live here could not be moved:
            # pass the zone over until that changes.
            moved = sum(m.old.length for m in result.moves)
            self.passed[victim] = (self.allocator.zones[victim].used, live_before - moved)
        log.info(
            "zone %d: relocated %d records (%d unreadable)%s",
            victim,
            len(result.moves),
            len(result.unreadable),
            f", stopped: {result.error}" if result.error else "",
        )
        return result

    def _class_of(self, zone: int) -> int:
        klass = self.usage.klass.get(zone)
        if klass is None:
            klass = self.allocator.zone_class(zone)
        return 0 if klass is None else klass

    def _copy(
        self, klass: int, group: list[tuple[bytes, Location, bytes]], result: Relocation
    ) -> bool:
        """Append one group of frames as relocated records; False if reclaim must stop."""
        if not group:
            return True
        try:
            new = self.allocator.append_batch(klass, [f for _, _, f in group], relocated=True)
        except AppendError as exc:
            new, result.error = exc.written, exc
        except ColdError as exc:
            new, result.error = [], exc
        # `new` is the group's prefix that was written (all of it unless the append failed).
        result.moves += [
            Move(cid, old, loc) for (cid, old, _), loc in zip(group, new, strict=False)
        ]
        return result.error is None

    # -- reset

    def reset(self, zone: int, durable_commits: int) -> None:
        """Reset `zone` if that is safe now, else raise `ZoneBusy` (worker thread).

        Safe means: nothing live in it by the usage table, every commit that dropped a
        reference durable, no reader pinning it, no unsettled append. A zone a stream is
        filling may be reset too (all its records dead): the stream opens a new zone next."""
        why = self._unsafe(zone, durable_commits)
        if why:
            raise ZoneBusy(f"zone {zone} not reset: {why}")
        crash_point("reclaim-before-reset")
        self.allocator.reset(zone)
        self.usage.forget(zone)
        self.passed.pop(zone, None)

    def _unsafe(self, zone: int, durable_commits: int) -> str | None:
        if self.usage.live_bytes(zone):
            return f"{self.usage.live_bytes(zone)} live bytes"
        if self.usage.pins[zone]:
            return f"pinned by {self.usage.pins[zone]} readers"
        if self.usage.released.get(zone, -1) >= durable_commits:
            return "the commit that emptied it is not durable yet"
        if self.allocator.unsettled[zone]:
            return "an append to it is not settled"
        return None

    def lost_zones(self) -> list[int]:
        """OFFLINE zones that the usage table says hold live records: their chunks are lost
        locally (report them; restore from a later tier)."""
        return [
            z
            for z, s in self.allocator.zones.items()
            if s.cond == Cond.OFFLINE and self.usage.live_bytes(z)
        ]
