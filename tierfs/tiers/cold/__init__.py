"""The cold store: chunk frames kept as records in the zones of a `ZonedDevice`.

A storage library, not wired into the filesystem: the caller (the daemon's cold tier) owns
the index (which chunk is at which `Location`), commits, durability and readers; this package
owns the device. Modules:

* `record`: the zone record format (header, checksum, padding), `Location`, and the scanner
  that walks a zone without the index.
* `zones`: `ZoneAllocator`, strictly sequential appends per lifetime class, a reserve of
  EMPTY zones for reclaim, finishing zones instead of blocking at the active limit.
* `reader`: `read_record`, `read_chunk` and `scan_zone`.
* `reclaim`: `ZoneUsage` (live bytes, pins, commit epochs), `Reclaimer` (empty zones,
  victims, relocation, safe reset).
* `errors`: `RecordError` (a `FrameError`) and `ColdError` (a `TierfsError`) and its kinds.

How the caller uses it. Migration: `locs = allocator.append_batch(klass, frames)` (worker
thread; the records are durable on return; with `partial=True`, the records that fit, which
may be fewer), then one operation that points each chunk at its new location and frees its
hot frame (freed once that commit is durable), `usage.add(loc, klass)` for each, and
`allocator.settle(locs)`. Reads: look up the location and `usage.pin(zone)` in the same
synchronous step, then `read_chunk` in a worker thread. Reclaim: after durable commits,
`reclaimer.reset_empty(durable_commits)`; when `pick_victims(need=...)` names zones (`need`:
the bytes of records a blocked append still waits for, else 0), scan each victim,
skip it unless `worth_relocating(victim, entries)`, `relocate(victim, live)`, commit each
move whose chunk is still at the old location (`usage.move`), settle the new locations (and
those of moves not committed), and reset the victim once `reset` allows it.

Crash table (library level). "Device" is what the zones hold, "index" what the caller has
committed. The rule that makes every row safe: **live bytes come only from committed
locations**; records beyond the last committed location of a zone (an append whose commit
never happened) are garbage, counted in no zone's live bytes, and the allocator appends after
them at the write pointer. A zone is reset only when no committed location points into it,
that commit is durable, and no reader pins it.

=============================  ===================================  ==========================
Crash point / moment           Device / index                       Recovery
=============================  ===================================  ==========================
migration: kill during the     Some records written, not flushed:   Nothing to do. Each zone
append (before the flush)      the emulator's persisted write       resumes at the device's
                               pointer is the last flushed one, a   write pointer (open zones
                               drive's may be anywhere past it.     come back CLOSED). The
                               Index: chunk still hot.              chunk is still hot and
                                                                    migrates again later.
`cold-after-append`            Records durable past every           As above: the records are
                               committed location. Index: chunk     garbage; the zone is reset
                               still hot, hot frame intact.         when its live bytes reach
                                                                    0 (or relocated).
migration commit made, not     Power cut: the index reverts to the  As above. The hot frame
durable                        hot location.                        was not freed: frees wait
                                                                    for a durable commit.
migration commit durable       Index: chunk in the zone; hot frame  The caller's pending frees
                               maybe not freed yet.                 finish the hot free.
append fails part way          Records before the failure durable;  The caller committed
(`AppendError`)                a torn record below the write        `written` or nothing; the
                               pointer; the zone finished (or it    torn record is garbage
                               went READONLY/OFFLINE).              (a scan reports it as a
                                                                    damaged span).
reclaim: kill during           Copies (some or all) durable in a    Copies are garbage; the
relocation, or                 relocation zone; the victim          victim is intact and is
`reclaim-after-relocate`       untouched. Index: chunks in the      picked again.
                               victim.
moves committed, not durable   Power cut: index back at the         The victim was not reset:
                               victim.                              reset waits for the
                                                                    commit to be durable.
`reclaim-before-reset`         Moves (or frees) durable; the zone   `ZoneUsage.rebuild` gives
                               still holds its old, dead records.   the zone 0 live bytes;
                                                                    `reset_empty` resets it.
kill during or after a reset   The zone is EMPTY, or not reset yet  Nothing, or as the row
                               (a zone reset is atomic).            above.
=============================  ===================================  ==========================

After a restart the in-memory state starts empty: no pins, no unsettled appends, no pending
epochs; `ZoneUsage` is rebuilt from the durable index before any reset.
"""

from __future__ import annotations

from tierfs.tiers.cold.errors import (
    AppendError,
    ColdError,
    ColdFull,
    RecordError,
    ZoneBusy,
    ZoneOffline,
)
from tierfs.tiers.cold.reader import read_chunk, read_record, scan_zone
from tierfs.tiers.cold.reclaim import Move, Reclaimer, Relocation, ZoneUsage
from tierfs.tiers.cold.record import Location, RecordHeader, ScanEntry
from tierfs.tiers.cold.zones import Lifetime, ZoneAllocator

__all__ = [
    "AppendError",
    "ColdError",
    "ColdFull",
    "Lifetime",
    "Location",
    "Move",
    "Reclaimer",
    "RecordError",
    "RecordHeader",
    "Relocation",
    "ScanEntry",
    "ZoneAllocator",
    "ZoneBusy",
    "ZoneOffline",
    "ZoneUsage",
    "read_chunk",
    "read_record",
    "scan_zone",
]
