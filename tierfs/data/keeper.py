"""Keeping what the region gave back: frames fetched by reads, rewritten into the hot tier.

A read of an evicted chunk, or a repair of a damaged local copy, hands the fetched frame here
(`offer`, on the trio thread, no I/O). A background task appends the queued frames to the
hot tier in turn with the sealer (`Sealer.append_frames`) and one operation points each
chunk at its new frame, if the chunk still needs it: an evicted chunk that still has no copy
(`evict.keep_fetched`, and only below the high watermark, or it would be evicted again at
once), a damaged copy that is still the chunk's (always: the damaged copy is dropped, and
above the high watermark only dropped). A frame nothing took is freed again.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from tierfs.data.chunkstore import ChunkIndex
from tierfs.data.evictor import Evictor
from tierfs.data.readthrough import Location
from tierfs.data.sealwork import Placed
from tierfs.meta.store import MetaStore

log = logging.getLogger(__name__)

QUEUE_MAX_BYTES = 64 << 20
BATCH_BYTES = 16 << 20

AppendFrames = Callable[[list[bytes], Callable[[Any, list[Placed]], None]], Awaitable[None]]


@dataclasses.dataclass
class KeepCounters:
    kept_chunks: int = 0
    repaired_copies: int = 0
    dropped_offers: int = 0


@dataclasses.dataclass(frozen=True)
class Offer:
    chunk_id: bytes
    frame: bytes
    damaged: Location | None


class Keeper:
    def __init__(
        self,
        store: MetaStore,
        chunks: ChunkIndex,
        evictor: Evictor,
        append_frames: AppendFrames,
        keep_fetched: bool,
    ) -> None:
        self.store = store
        self.chunks = chunks
        self.evictor = evictor
        self.append_frames = append_frames
        self.keep_fetched = keep_fetched
        self.counters = KeepCounters()
        self._queue: dict[bytes, Offer] = {}
        self._queued_bytes = 0
        self._wake = trio.Event()

    def offer(self, chunk_id: bytes, frame: bytes, damaged: Location | None) -> None:
        """A frame fetched from the region (trio thread, from the reader). Bounded: past
        `QUEUE_MAX_BYTES` an evicted chunk's frame is not kept (the next read fetches it
        again); a repair always queues, it replaces a damaged copy."""
        if damaged is None and not self.keep_fetched:
            return
        if chunk_id in self._queue:
            return
        if damaged is None and self._queued_bytes + len(frame) > QUEUE_MAX_BYTES:
            self.counters.dropped_offers += 1
            return
        self._queue[chunk_id] = Offer(chunk_id, frame, damaged)
        self._queued_bytes += len(frame)
        self._wake.set()

    def room(self) -> bool:
        """Whether the queue can take more fetched frames without dropping any (the
        prefetcher waits otherwise)."""
        return self._queued_bytes < QUEUE_MAX_BYTES // 2

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                try:
                    await self._write(self._take())
                except OSError as exc:
                    log.warning("fetched chunks not kept locally: %s", exc)
                    if exc.errno != errno.ENOSPC:
                        raise
                except Exception:
                    log.exception("keeping fetched chunks failed; they are fetched again")

    def _take(self) -> list[Offer]:
        batch: list[Offer] = []
        size = 0
        while self._queue and size < BATCH_BYTES:
            offer = self._queue.pop(next(iter(self._queue)))
            self._queued_bytes -= len(offer.frame)
            batch.append(offer)
            size += len(offer.frame)
        return batch

    async def _write(self, batch: list[Offer]) -> None:
        """Append the frames worth keeping; drop damaged copies when above the high
        watermark instead (the region has the chunk)."""
        if self.evictor.over_high():
            with self.store.op() as tx:
                for offer in batch:
                    if offer.damaged is not None:
                        self._drop_damaged(tx, offer)
            return
        frames = [o.frame for o in batch]
        await self.append_frames(frames, lambda tx, placed: self._install(tx, batch, placed))

    def _install(self, tx: Any, batch: list[Offer], placed: list[Placed]) -> None:
        for offer, p in zip(batch, placed, strict=True):
            record = self.chunks.get(offer.chunk_id, tx)
            wanted = record is not None and (
                offer.damaged in record.locations
                if offer.damaged is not None
                else not record.locations
            )
            if record is None or not wanted:
                self.chunks.queue_free(tx, p.seg, p.offset, p.frame_len)
                continue
            self.chunks.replace_copy(tx, offer.chunk_id, record, offer.damaged, p.seg, p.offset)
            if offer.damaged is None:
                self.counters.kept_chunks += 1
            else:
                self.counters.repaired_copies += 1

    def _drop_damaged(self, tx: Any, offer: Offer) -> None:
        record = self.chunks.get(offer.chunk_id, tx)
        if record is None or offer.damaged not in record.locations:
            return
        self.chunks.drop_copies(tx, offer.chunk_id, record, [offer.damaged])
        self.counters.repaired_copies += 1
