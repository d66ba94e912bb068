"""Read-through: the reader's way to the regional store, for evicted and damaged chunks.

The FUSE loop never waits on the network: a fetch runs in a worker thread (under its own
limiter, so local loads are never queued behind slow GETs) and the read gives up with `EIO`
after `regional.read_timeout` seconds, logging why. Nothing is remembered of a failure, so
reads work again as soon as the store answers. Concurrent reads of one chunk share a fetch
through the reader's `_loading` events.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable

import trio

from tierfs.errors import TierfsError
from tierfs.fs.namespace import FsError
from tierfs.upstream.fetch import ChunkDamaged, Fetched, RegionReader
from tierfs.upstream.state import UpstreamRecord, UpstreamState

log = logging.getLogger(__name__)

FETCHES_IN_FLIGHT = 8

Location = tuple[int, int, int]  # (tier, segment or zone, offset), as in ChunkRecord
Keep = Callable[[bytes, bytes, Location | None], None]
"""`keep(chunk_id, frame, damaged)`: a frame fetched from the region, to rewrite locally in
place of no copy (an evicted chunk) or of the `damaged` local copy (a repair)."""


@dataclasses.dataclass
class ReadThroughCounters:
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    repairs: int = 0
    timeouts: int = 0
    failures: int = 0
    damaged: int = 0


class ReadThrough:
    """Fetches chunks the index says are durable upstream (trio side)."""

    def __init__(self, upstream: UpstreamState, region: RegionReader, timeout: float) -> None:
        self.upstream = upstream
        self.region = region
        self.timeout = timeout
        self.keep: Keep | None = None
        self.counters = ReadThroughCounters()
        self._limiter = trio.CapacityLimiter(FETCHES_IN_FLIGHT)

    def where(self, chunk_id: bytes) -> UpstreamRecord | None:
        """The region's copy of a chunk, if the index knows of one."""
        return self.upstream.get(chunk_id)

    async def fetch(
        self, ino: int, chunk_id: bytes, damaged: Location | None = None
    ) -> bytes | memoryview:
        """The plaintext of `chunk_id` from the region; `damaged` names the local copy this
        replaces (a repair). Any failure is `EIO` for the read, logged with its reason."""
        where = self.where(chunk_id)
        if where is None:
            log.error("inode %d: chunk %s has no copy, local or upstream", ino, chunk_id.hex()[:16])
            self.counters.failures += 1
            raise FsError(errno.EIO)
        got = await self._get(ino, chunk_id, where)
        self.counters.fetched_chunks += 1
        self.counters.fetched_bytes += len(got.frame)
        if damaged is not None:
            self.counters.repairs += 1
            log.warning(
                "inode %d: chunk %s repaired from %s (local copy %s was bad)",
                ino,
                chunk_id.hex()[:16],
                where.pack,
                damaged,
            )
        if self.keep is not None:
            self.keep(chunk_id, got.frame, damaged)
        return got.plaintext

    async def _get(self, ino: int, chunk_id: bytes, where: UpstreamRecord) -> Fetched:
        name = chunk_id.hex()[:16]
        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(
                    self.region.fetch,
                    chunk_id,
                    where,
                    limiter=self._limiter,
                    abandon_on_cancel=True,
                )
        except trio.TooSlowError:
            self.counters.timeouts += 1
            log.error(
                "inode %d: chunk %s: the regional store did not answer within %g s (%s)",
                ino,
                name,
                self.timeout,
                where.pack,
            )
        except ChunkDamaged as exc:
            self.counters.damaged += 1
            log.error("inode %d: %s", ino, exc.message)
        except TierfsError as exc:
            self.counters.failures += 1
            log.error("inode %d: chunk %s: regional store: %s", ino, name, exc.message)
        except OSError as exc:
            self.counters.failures += 1
            log.error("inode %d: chunk %s: regional store: %s", ino, name, exc)
        raise FsError(errno.EIO)
