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

from tierfs.data.chunkstore import ChunkIndex
from tierfs.data.evictor import Evictor
from tierfs.data.keeper import Keeper
from tierfs.data.readthrough import ReadThrough
from tierfs.fs.namespace import FsError
from tierfs.meta.records import FLAG_TREE, ChunkRecord

log = logging.getLogger(__name__)

SCAN_SLICE = 128  # chunk records looked at per batch: at most this many fetches queued
IN_FLIGHT = 4
IDLE_WAIT = 30.0


@dataclasses.dataclass
class PrefetchCounters:
    prefetched_chunks: int = 0
    prefetch_done: bool = False


class Prefetcher:
    def __init__(
        self, chunks: ChunkIndex, region: ReadThrough, keeper: Keeper, evictor: Evictor
    ) -> None:
        self.chunks = chunks
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
        """The evicted data chunks of the next slice of the index after the last key seen;
        `_after` becomes b"" at the end of the index."""
        records, self._after = self.chunks.scan(self._after, SCAN_SLICE)
        return [key for key, record in records if _evicted(record)]

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
