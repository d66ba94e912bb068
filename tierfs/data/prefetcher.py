"""Background prefetch: bringing evicted data back while the local disks have room.

A site rebuilt by `tierfs restore site` starts with every chunk evicted: reads fetch what they
need, and this task fetches the rest (`evict.prefetch`), a few chunks at a time, while local
usage stays below the low watermark, so that the site does not depend on the store for long.
Fetched frames go through the keeper like those of reads. It never evicts anything and stops
once no chunk is left without a local copy (or the disk is at the low watermark; it resumes
when usage falls below it again).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import trio

from tierfs.data.evictor import Evictor
from tierfs.data.keeper import Keeper
from tierfs.data.readthrough import ReadThrough
from tierfs.fs.namespace import FsError
from tierfs.meta.records import FLAG_TREE, ChunkRecord
from tierfs.meta.store import MetaStore

log = logging.getLogger(__name__)

SCAN_SLICE = 4096
BATCH = 64
IN_FLIGHT = 4
IDLE_WAIT = 30.0


@dataclasses.dataclass
class PrefetchCounters:
    prefetched_chunks: int = 0
    prefetch_done: bool = False


class Prefetcher:
    def __init__(
        self, store: MetaStore, region: ReadThrough, keeper: Keeper, evictor: Evictor
    ) -> None:
        self.store = store
        self.region = region
        self.keeper = keeper
        self.evictor = evictor
        self.counters = PrefetchCounters()
        self._after = b""

    async def run(self) -> None:
        """Fetch evicted chunks in batches while there is room; a failing store pauses it."""
        found, last_pass = 0, None
        while True:
            if self.evictor.local_bytes() >= self.evictor.low_target() or not self.keeper.room():
                await trio.sleep(1.0)
                continue
            batch = self._next_batch()
            found += len(batch)
            if batch and not await self._fetch(batch):
                log.warning("prefetch paused: the regional store fails; retrying later")
                await trio.sleep(IDLE_WAIT)
            if not self._after:  # a pass over the whole index ended
                if not found:
                    self.counters.prefetch_done = True
                    log.info("prefetch: every chunk has a local copy")
                    return
                # Let the keeper install this pass's frames; a pass that finds as many
                # evicted chunks as the last one means they are not kept (the hot tier is
                # full): wait longer instead of fetching them again and again.
                stuck = last_pass is not None and found >= last_pass
                await trio.sleep(IDLE_WAIT if stuck else 1.0)
                found, last_pass = 0, found
            await trio.lowlevel.checkpoint()

    def _next_batch(self) -> list[bytes]:
        """Up to BATCH evicted data chunks after the last key seen (no await: one read of
        the index); `_after` becomes b"" at the end of the index."""
        found: list[bytes] = []
        with self.store.tx.cursor(db=self.store.chunks) as cur:
            positioned = cur.set_range(self._after) if self._after else cur.first()
            if positioned and self._after and bytes(cur.key()) == self._after:
                positioned = cur.next()
            seen = 0
            while positioned and len(found) < BATCH and seen < SCAN_SLICE:
                key = bytes(cur.key())
                if _evicted(ChunkRecord.decode(bytes(cur.value()))):
                    found.append(key)
                self._after = key
                seen += 1
                positioned = cur.next()
            if not positioned:
                self._after = b""
        return found

    async def _fetch(self, batch: list[bytes]) -> bool:
        """Fetch a batch, IN_FLIGHT at a time; False if any fetch failed (each is logged)."""
        limiter = trio.CapacityLimiter(IN_FLIGHT)
        failed = False

        async def one(chunk_id: bytes) -> None:
            nonlocal failed
            async with limiter:
                try:
                    await self.region.fetch(0, chunk_id)
                except FsError:
                    failed = True
                    return
                self.counters.prefetched_chunks += 1

        async with trio.open_nursery() as nursery:
            for chunk_id in batch:
                nursery.start_soon(one, chunk_id)
        return not failed


def _evicted(record: ChunkRecord) -> bool:
    return not record.locations and not record.flags & FLAG_TREE


def status(prefetcher: Prefetcher | None) -> dict[str, Any]:
    if prefetcher is None:
        return {}
    return dataclasses.asdict(prefetcher.counters)
