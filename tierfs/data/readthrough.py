"""Read-through: the reader's way to the regional store, for evicted and damaged chunks.

The FUSE loop never waits on the network: a fetch runs in a worker thread (under its own
limiter, so local loads are never queued behind slow GETs) and the read gives up with `EIO`
after `regional.read_timeout` seconds, logging why. Nothing is remembered of a failure, so
reads work again as soon as the store answers. Concurrent reads of one chunk share a fetch
through the reader's `_loading` events.

A sequential reader asks for a *span*: its chunk and the frames after it in the same pack,
up to `SPAN` bytes, in one ranged GET (the replicator packs a file's chunks back to back).
The frames after it go to `extra`, which caches those the index has evicted. A fetch whose
frame lies inside a span in flight waits for that span instead of asking again. Spans are
claimed (`claim`) on the trio thread before the task that fetches them runs, in the order of
the file: trio runs new tasks in no set order, and a prefetch that started its spans from
the window's last chunk backwards fetched every chunk of the window as a span of its own.
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
# Bytes of a pack a sequential reader fetches at once: with the default 8 MiB packs, the rest
# of the pack. Measured on the restore benchmark: 4 MiB 200-250 MB/s, 8 MiB 220-270, 16 MiB
# 250-290. At most FETCHES_IN_FLIGHT spans are held at once.
SPAN = 16 << 20

Location = tuple[int, int, int]  # (tier, segment or zone, offset), as in ChunkRecord
Keep = Callable[[bytes, bytes, Location | None], None]
"""`keep(chunk_id, frame, damaged)`: a frame fetched from the region, to rewrite locally in
place of no copy (an evicted chunk) or of the `damaged` local copy (a repair)."""
Extra = Callable[[bytes, Fetched], bool]
"""`extra(chunk_id, fetched)`: a frame a span brought along; True if it was wanted."""


@dataclasses.dataclass
class ReadThroughCounters:
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    repairs: int = 0
    timeouts: int = 0
    failures: int = 0
    damaged: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class SpanClaim:
    """A span registered as in flight: `[start, end)` of `where.pack`, `done` once over."""

    chunk_id: bytes
    where: UpstreamRecord
    start: int
    end: int
    done: trio.Event


class ReadThrough:
    """Fetches chunks the index says are durable upstream (trio side)."""

    def __init__(self, upstream: UpstreamState, region: RegionReader, timeout: float) -> None:
        self.upstream = upstream
        self.region = region
        self.timeout = timeout
        self.keep: Keep | None = None
        self.extra: Extra | None = None
        self.counters = ReadThroughCounters()
        self._limiter = trio.CapacityLimiter(FETCHES_IN_FLIGHT)
        self._spans: dict[str, list[SpanClaim]] = {}

    def where(self, chunk_id: bytes) -> UpstreamRecord | None:
        """The region's copy of a chunk, if the index knows of one."""
        return self.upstream.get(chunk_id)

    def in_span(self, chunk_id: bytes) -> trio.Event | None:
        """The event of a span in flight that will bring `chunk_id` along, if any."""
        where = self.where(chunk_id)
        if where is None:
            return None
        for claim in self._spans.get(where.pack, ()):
            if claim.start <= where.offset and where.offset + where.length <= claim.end:
                return claim.done
        return None

    def claim(self, chunk_id: bytes, span: int) -> SpanClaim | None:
        """Register now the span `fetch` will get for `chunk_id` (None: no span to get: the
        chunk is not upstream, or `span` is no longer than its frame)."""
        where = self.where(chunk_id)
        if where is None or span <= where.length or self.extra is None:
            return None
        claim = SpanClaim(chunk_id, where, where.offset, where.offset + span, trio.Event())
        self._spans.setdefault(where.pack, []).append(claim)
        return claim

    def release(self, claim: SpanClaim) -> None:
        """The claim's span is no longer in flight: fetched, failed, or never started (its
        task was cancelled first). Readers waiting for it look in the cache, and fetch
        what is not there themselves."""
        spans = self._spans.get(claim.where.pack, [])
        if claim in spans:
            spans.remove(claim)
            if not spans:
                del self._spans[claim.where.pack]
        claim.done.set()

    async def fetch(
        self,
        ino: int,
        chunk_id: bytes,
        damaged: Location | None = None,
        span: int = 0,
        claim: SpanClaim | None = None,
    ) -> bytes | memoryview:
        """The plaintext of `chunk_id` from the region (with `span`, or the span `claim`ed
        for it, the frames after it too, see the module docstring); `damaged` names the
        local copy this replaces (a repair). Any failure is `EIO` for the read, logged with
        its reason."""
        if claim is None and damaged is None:
            claim = self.claim(chunk_id, span)
        where = claim.where if claim is not None else self.where(chunk_id)
        if where is None:
            log.error("inode %d: chunk %s has no copy, local or upstream", ino, chunk_id.hex()[:16])
            self.counters.failures += 1
            raise FsError(errno.EIO)
        got = await (self._get_span(ino, claim) if claim else self._get_one(ino, chunk_id, where))
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

    async def _get_one(self, ino: int, chunk_id: bytes, where: UpstreamRecord) -> Fetched:
        return (await self._get(ino, chunk_id, where, 0))[0]

    async def _get_span(self, ino: int, claim: SpanClaim) -> Fetched:
        """The claimed chunk's frame; the frames after it in the span handed to `extra`."""
        assert self.extra is not None
        try:
            got, extras = await self._get(ino, claim.chunk_id, claim.where, claim.end - claim.start)
        finally:
            self.release(claim)
        for extra_id, fetched in extras:
            if self.extra(extra_id, fetched):
                self.counters.fetched_chunks += 1
                self.counters.fetched_bytes += len(fetched.frame)
        return got

    async def _get(
        self, ino: int, chunk_id: bytes, where: UpstreamRecord, span: int
    ) -> tuple[Fetched, list[tuple[bytes, Fetched]]]:
        name = chunk_id.hex()[:16]
        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(
                    self.region.fetch_span,
                    chunk_id,
                    where,
                    span,
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
