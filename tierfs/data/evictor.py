"""Eviction: dropping the local copies of chunks that are durable upstream.

Edge disks are small. When local usage (hot segments' live frames plus cold zones' live
records) passes `evict.high_pct` of the local capacity, the copies of chunks the region holds
are dropped, coldest first, down to `evict.low_pct`; `tierfs evict` forces it for everything
or for some files. A chunk is evicted only if the index has its `upstream` record (its frame
is in a pack whose PUT returned, or in another site's pack read back and verified), and never
a snapshot tree blob (trees stay local: they are small and every snapshot, fsck and send
walks them). An evicted chunk keeps its record, references and counters, with no location:
readers fetch it from the region (`data/readthrough.py`).

Order: whole cold zones first (the coldest data by construction), zones whose every live
record can go before the others and by lifetime class, so that eviction empties zones for
reclaim instead of leaving scattered garbage; then hot segments, least recently used first.
Dropping a copy is an index change only: a hot frame's space is punched once the change is
durable (the `frees` machinery, which also waits for pinned reads), a zone is reset by
reclaim once nothing in it is live.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from tierfs.data.chunkstore import ChunkIndex
from tierfs.data.extents import ExtentMap
from tierfs.meta.records import FLAG_TREE, TIER_COLD, TIER_HOT, ChunkRecord
from tierfs.meta.store import MetaStore
from tierfs.upstream.state import UPLOADED, UpstreamState

if TYPE_CHECKING:
    from tierfs.data.coldtier import ColdTier

log = logging.getLogger(__name__)

SCAN_SLICE = 4096
OP_CHUNKS = 1024

Unit = tuple[int, int]  # (tier, zone or segment): what is evicted together


@dataclasses.dataclass(frozen=True)
class EvictPolicy:
    high_pct: int
    low_pct: int
    capacity: int  # bytes of local room (hot + cold); see Evictor.capacity
    interval: float


@dataclasses.dataclass
class EvictCounters:
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    passes: int = 0


@dataclasses.dataclass
class EvictResult:
    """What one eviction did, and what it had to leave (not upstream yet)."""

    chunks: int = 0
    bytes: int = 0
    kept_chunks: int = 0
    kept_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Candidate:
    chunk_id: bytes
    unit: Unit
    frame_len: int


class Evictor:
    def __init__(
        self,
        store: MetaStore,
        chunks: ChunkIndex,
        extents: ExtentMap,
        upstream: UpstreamState,
        cold: ColdTier | None,
        policy: EvictPolicy,
        last_access: Callable[[int], float],
    ) -> None:
        self.store = store
        self.chunks = chunks
        self.extents = extents
        self.upstream = upstream
        self.cold = cold
        self.policy = policy
        self.last_access = last_access
        self.counters = EvictCounters()
        self.lock = trio.Lock()

    # -- usage

    def local_bytes(self) -> int:
        """Bytes of local chunk copies: live hot frames and live cold records."""
        cold = sum(self.cold.usage.live.values()) if self.cold is not None else 0
        return self.chunks.hot_live_bytes() + cold

    def over_high(self) -> bool:
        return self.local_bytes() * 100 > self.policy.capacity * self.policy.high_pct

    def low_target(self) -> int:
        return self.policy.capacity * self.policy.low_pct // 100

    # -- the background job

    async def run(self) -> None:
        """Above the high watermark, evict down to the low one; every `interval` seconds.
        A failing pass is logged and retried; it never stops the mount."""
        while True:
            await trio.sleep(self.policy.interval)
            try:
                if self.over_high():
                    await self.evict_to(self.low_target())
            except Exception:
                log.exception("eviction pass failed; it is retried")

    # -- eviction

    async def evict_to(self, target: int) -> EvictResult:
        """Evict whole units, coldest first, until local usage is at most `target`."""
        async with self.lock:
            self.counters.passes += 1
            result = EvictResult()
            candidates, kept = await self._scan(lambda record, chunk_id: True)
            # Measured once (it sums every segment record), then lowered by what each unit
            # gives back, in the same units: frame bytes in hot, record bytes in cold.
            left = self.local_bytes()
            for unit in self._order(candidates):
                if left <= target:
                    break
                left -= await self._drop(candidates[unit], result)
            result.kept_chunks, result.kept_bytes = kept
            log.info(
                "evicted %d chunks (%d bytes) down to %d local bytes (target %d)",
                result.chunks,
                result.bytes,
                self.local_bytes(),
                target,
            )
            return result

    async def evict_files(self, inodes: Iterable[int] | None) -> EvictResult:
        """Evict every chunk (`inodes` None) or those the files' extents use."""
        wanted: set[bytes] | None = None
        if inodes is not None:
            wanted = {ext.chunk_id for ino in inodes for ext in self._extents(ino)}
        async with self.lock:
            self.counters.passes += 1
            result = EvictResult()
            candidates, kept = await self._scan(
                lambda record, chunk_id: wanted is None or chunk_id in wanted
            )
            for unit in self._order(candidates):
                await self._drop(candidates[unit], result)
            result.kept_chunks, result.kept_bytes = kept
            return result

    def _extents(self, ino: int) -> list[Any]:
        return list(self.extents.overlapping(ino, 0, 1 << 63))

    async def _scan(
        self, wanted: Callable[[ChunkRecord, bytes], bool]
    ) -> tuple[dict[Unit, list[Candidate]], tuple[int, int]]:
        """The evictable chunks grouped by unit, and (count, bytes) of the wanted ones that
        must stay because they are not upstream yet. Scanned in slices with no await inside
        one (a slice reads one transaction), so FUSE requests run in between."""
        units: dict[Unit, list[Candidate]] = {}
        kept = [0, 0]
        after = b""
        while True:
            after = self._scan_slice(after, wanted, units, kept)
            if not after:
                return units, (kept[0], kept[1])
            await trio.lowlevel.checkpoint()

    def _scan_slice(
        self,
        after: bytes,
        wanted: Callable[[ChunkRecord, bytes], bool],
        units: dict[Unit, list[Candidate]],
        kept: list[int],
    ) -> bytes:
        records, after = self.chunks.scan(after, SCAN_SLICE)
        for key, record in records:
            if not record.locations or record.flags & FLAG_TREE or not wanted(record, key):
                continue
            if self._upstream(key):
                tier, a, _ = record.locations[0]
                units.setdefault((tier, a), []).append(Candidate(key, (tier, a), record.frame_len))
            else:
                kept[0] += 1
                kept[1] += record.frame_len
        return after

    def _upstream(self, chunk_id: bytes, tx: Any = None) -> bool:
        record = self.upstream.get(chunk_id, tx)
        return record is not None and bool(record.flags & UPLOADED)

    def _order(self, units: dict[Unit, list[Candidate]]) -> list[Unit]:
        """Cold zones first: those that eviction empties, then by lifetime class and zone;
        then hot segments, least recently used first."""
        cold = [u for u in units if u[0] == TIER_COLD]
        hot = [u for u in units if u[0] == TIER_HOT]

        def zone_key(unit: Unit) -> tuple[bool, int, int]:
            assert self.cold is not None
            live = self.cold.usage.live_bytes(unit[1])
            freed = sum(self.cold.location(0, 0, c.frame_len).length for c in units[unit])
            return (freed < live, self.cold.usage.klass.get(unit[1], 0), unit[1])

        cold.sort(key=zone_key if self.cold is not None else None)
        hot.sort(key=lambda u: self.last_access(u[1]))
        return cold + hot

    async def _drop(self, candidates: list[Candidate], result: EvictResult) -> int:
        """Drop the candidates still evictable; the local bytes (as `local_bytes` counts
        them) given back."""
        freed = 0
        for start in range(0, len(candidates), OP_CHUNKS):
            with self.store.op() as tx:
                for c in candidates[start : start + OP_CHUNKS]:
                    record = self._drop_one(tx, c.chunk_id)
                    if record is not None:
                        result.chunks += 1
                        result.bytes += record.frame_len
                        freed += self._local_size(record)
            await trio.lowlevel.checkpoint()
        return freed

    def _drop_one(self, tx: Any, chunk_id: bytes) -> ChunkRecord | None:
        """Drop a chunk's local copies if it is still evictable (rechecked in this
        operation: the scan's view may be stale); its record as it was, or None."""
        record = self.chunks.get(chunk_id, tx)
        if record is None or not record.locations or record.flags & FLAG_TREE:
            return None
        if not self._upstream(chunk_id, tx):
            return None
        was = dataclasses.replace(record, locations=list(record.locations))
        self.chunks.drop_copies(tx, chunk_id, record)
        self.counters.evicted_chunks += 1
        self.counters.evicted_bytes += record.frame_len
        return was

    def _local_size(self, record: ChunkRecord) -> int:
        """Bytes of `local_bytes` the record's copies take: the frame in a hot segment,
        the padded record in a zone."""
        total = 0
        for tier, a, b in record.locations:
            if tier == TIER_COLD and self.cold is not None:
                total += self.cold.location(a, b, record.frame_len).length
            elif tier == TIER_HOT:
                total += record.frame_len
        return total


def segment_mtime(hot_path: Callable[[int], os.PathLike[str] | str]) -> Callable[[int], float]:
    """Last access of a hot segment without a cold tier: its file's modification time."""

    def last_access(seg: int) -> float:
        try:
            return os.stat(hot_path(seg)).st_mtime
        except FileNotFoundError:
            return 0.0

    return last_access
