"""Reading file data: staged bytes, then sealed extents, then zeros for holes.

A read is planned on the trio thread in one go (staged bytes are copied right away, extents
are resolved to chunk locations), so that no write, seal or truncate can interleave with the
plan. Chunk plaintext then comes from the cache or from the tier in a worker thread; the
frame's location stays pinned meanwhile so that a concurrent free cannot punch it.

A chunk with no local copy (evicted: its frame is durable upstream) is fetched from the
regional store, within `regional.read_timeout`; a local copy that fails its check or cannot
be read is fetched from there too (a repair). Either way the fetched frame is handed to
`keep`, which rewrites it into the hot tier in the background, never on the read's path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from tierfs.data import frame
from tierfs.data.cache import ChunkCache
from tierfs.data.chunkstore import ChunkIndex
from tierfs.data.extents import ExtentMap
from tierfs.data.readthrough import SPAN, ReadThrough, SpanClaim
from tierfs.fs.namespace import FsError, Namespace
from tierfs.meta.records import TIER_COLD, TIER_HOT, ChunkRecord
from tierfs.tiers.cold.errors import ColdError
from tierfs.tiers.hot import HotStore
from tierfs.upstream.fetch import Fetched

if TYPE_CHECKING:
    from tierfs.data.coldtier import ColdTier

log = logging.getLogger(__name__)

PREFETCH_MIN = 1 << 20
PREFETCH_MAX = 8 << 20
# Reading evicted data, the window reaches further: each fetch is a GET of up to a SPAN, and
# a few of them in flight keep the store busy while the reader consumes.
REGION_PREFETCH_MAX = 32 << 20
LOADS_IN_FLIGHT = 16
# Prefetched chunks whose frames lie back to back in one hot segment (a file sealed in order)
# are read with one pread of up to RUN_MAX bytes: one thread hop and one syscall instead of
# one per chunk. A gap of up to RUN_GAP (alignment padding between two seal rounds) is read
# along.
RUN_MAX = 4 << 20
RUN_GAP = 4096
TIER_REGION = 3  # a piece read from the regional store (never stored in a chunk record)


@dataclass(frozen=True)
class ChunkPiece:
    """`length` bytes at `chunk_off` of a chunk, landing at `buf_off` of the read buffer."""

    buf_off: int
    length: int
    chunk_id: bytes
    chunk_off: int
    seg: int  # the hot segment, or the cold zone
    frame_off: int  # the frame's offset in the segment, or the record's in the zone
    frame_len: int
    tier: int = TIER_HOT


class FileReader:
    def __init__(
        self,
        ns: Namespace,
        chunks: ChunkIndex,
        extents: ExtentMap,
        hot: HotStore,
        cache: ChunkCache,
        cpu_limiter: trio.CapacityLimiter,
    ) -> None:
        self.ns = ns
        self.chunks = chunks
        self.extents = extents
        self.hot = hot
        self.cache = cache
        self.cpu_limiter = cpu_limiter
        self._loading: dict[bytes, trio.Event] = {}
        self._last_end: dict[int, int] = {}
        self._window: dict[int, tuple[int, int]] = {}  # ino -> (window, prefetched up to)
        self._load_limiter = trio.CapacityLimiter(LOADS_IN_FLIGHT)
        self.prefetch: trio.Nursery | None = None
        self.cold: ColdTier | None = None
        self.region: ReadThrough | None = None
        self.checksum_errors = 0
        self.io_errors = 0

    async def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """The bytes of [offset, offset+size), assembled with one copy (`_assemble`):
        pyfuse3 takes any buffer, so a range that one staged run or one chunk covers whole
        is handed over as it is, with no copy at all."""
        inode = self.ns.inode(ino)
        if offset >= inode.size or size <= 0:
            return b""
        size = min(size, inode.size - offset)
        staged, cached, pieces = self._plan(ino, offset, size)
        parts = cached + [(a - offset, self.ns.staging.read(ino, a, b - a)) for a, b in staged]
        # A read from the start counts as sequential too: whole-file readers (cp, rsync,
        # tar) are the common case, and an evicted file then arrives in few GETs.
        sequential = self._last_end.get(ino) == offset or offset == 0
        self._last_end[ino] = offset + size
        if len(self._last_end) > 4096:
            self._window.pop(next(iter(self._last_end)), None)
            self._last_end.pop(next(iter(self._last_end)))
        if not sequential or offset == 0:  # offset 0: a new pass starts a new window
            self._window.pop(ino, None)
        if sequential and (pieces or cached):
            remote = any(p.tier == TIER_REGION for p in pieces)
            limit = REGION_PREFETCH_MAX if remote else PREFETCH_MAX
            self._prefetch(ino, offset, offset + size, inode.size, limit)
        if pieces:
            parts += await self._fill(ino, pieces, SPAN if sequential else 0)
        self.ns.touch_atime(ino, inode)
        return _assemble(size, parts)

    def _prefetch(self, ino: int, read_start: int, end: int, file_size: int, limit: int) -> None:
        """Start loading the chunks of a sequential read and those just past it, so that
        the reader finds them in the cache instead of waiting for a load per chunk (a
        request is at most 1 MiB, a chunk about 300 KiB). Only for reads that
        began where the previous read of the file ended, or at its start: random readers
        would pay for chunks never used.

        The window starts at PREFETCH_MIN and doubles with each sequential read that
        needed a chunk, up to `limit` (PREFETCH_MAX, or REGION_PREFETCH_MAX while the read
        needs evicted chunks), so that several loads keep the disk or the store busy while
        the reader consumes; only the part not yet scheduled is looked up, and only once
        less than half a window is: each look-up then schedules half a window or more (a
        few runs) instead of one request's worth, so the trio thread makes about a quarter
        of the extent scans and thread hops (the claims, one per chunk, stay as many). Each
        load is claimed here, in file order, before its task runs (`_claim`), so that
        neither the read nor another task starts the same load."""
        if self.prefetch is None:
            return
        window, done = self._window.get(ino, (PREFETCH_MIN // 2, read_start))
        window = min(window * 2, limit)
        start, stop = max(read_start, done), min(file_size, end + window)
        if done >= min(file_size, end + window // 2):
            self._window[ino] = (window, done)  # half a window or more is on its way
            return
        self._window[ino] = (window, max(done, stop))
        if start >= stop:
            return
        claims = []
        for ext in self.extents.overlapping(ino, start, stop):
            claimed = self._claim(ext.chunk_id)
            if claimed is not None:
                claims.append(claimed)
        for run in _hot_runs(claims):
            if len(run) > 1:
                self.prefetch.start_soon(self._prefetch_run, ino, run)
            else:
                self.prefetch.start_soon(self._prefetch_one, ino, *run[0])

    def _claim(self, chunk_id: bytes) -> Claimed | None:
        """Mark a chunk as loading (and claim its span, when only the region has it), unless
        it is cached, loading, or coming with a span in flight; what its load needs."""
        if chunk_id in self._loading or self.cache.contains(chunk_id):
            return None
        record = self.chunks.get(chunk_id)
        where = self._where(chunk_id, record) if record else None
        if record is None or where is None:
            return None
        tier, seg, off = where
        claim = None
        if tier == TIER_REGION:
            assert self.region is not None
            if self.region.in_span(chunk_id) is not None:
                return None
            claim = self.region.claim(chunk_id, SPAN)
        piece = ChunkPiece(0, 0, chunk_id, 0, seg, off, record.frame_len, tier)
        event = self._loading[chunk_id] = trio.Event()
        return piece, event, claim

    async def _prefetch_one(
        self, ino: int, piece: ChunkPiece, event: trio.Event, claim: SpanClaim | None
    ) -> None:
        """Load one claimed chunk ahead of a reader. Failures are already logged and
        counted, and the read that needs the chunk reports them; nothing may escape into
        the daemon's nursery."""
        try:
            with self._pin(piece):
                data = await self._load_piece(ino, piece, SPAN, claim)
            self.cache.put(piece.chunk_id, data)
        except FsError:
            return
        except Exception:
            log.exception("inode %d: prefetch of chunk %s failed", ino, piece.chunk_id.hex()[:16])
        finally:
            self._loaded(piece.chunk_id, event)
            if claim is not None:
                assert self.region is not None
                self.region.release(claim)

    async def _prefetch_run(self, ino: int, run: list[Claimed]) -> None:
        """Load claimed hot chunks whose frames lie back to back, with one read. A frame
        that fails its check is not cached: the read that needs it loads it alone, which
        counts, logs and repairs the failure."""
        pieces = [piece for piece, _, _ in run]
        try:
            with contextlib.ExitStack() as pins:
                for piece in pieces:
                    pins.enter_context(self._pin(piece))
                datas = await trio.to_thread.run_sync(
                    self._load_run, pieces, limiter=self._load_limiter
                )
            for piece, data in zip(pieces, datas, strict=True):
                if data is not None:
                    self.cache.put(piece.chunk_id, data)
            if self.cold is not None:
                self.cold.note_read(pieces[0].seg)
        except Exception as exc:
            log.warning("inode %d: prefetch of %d chunks failed: %s", ino, len(run), exc)
        finally:
            for piece, event, _ in run:
                self._loaded(piece.chunk_id, event)

    def _load_run(self, pieces: list[ChunkPiece]) -> list[bytes | memoryview | None]:
        """Worker thread: one pread over the frames of `pieces` (one segment, in order);
        each frame's plaintext, or None where the frame fails its check."""
        base = pieces[0].frame_off
        raw = memoryview(self.hot.read(pieces[0].seg, base, _frame_end(pieces[-1]) - base))
        out: list[bytes | memoryview | None] = []
        for p in pieces:
            try:
                start = p.frame_off - base
                out.append(frame.decode(raw[start : start + p.frame_len], p.chunk_id))
            except frame.FrameError:
                out.append(None)
        return out

    def _plan(
        self, ino: int, offset: int, size: int
    ) -> tuple[list[tuple[int, int]], list[tuple[int, bytes | memoryview]], list[ChunkPiece]]:
        """The staged ranges within [offset, offset+size), to be copied before any await;
        for the rest (holes have none), the bytes of chunks in the cache, taken now (a view:
        no record lookup, no pin), and the pieces of the chunks still to load."""
        end = offset + size
        staged = self.ns.staged_ranges(ino).intersect(offset, end)
        pos = offset
        gaps: list[tuple[int, int]] = []
        for a, b in staged:
            if a > pos:
                gaps.append((pos, a))
            pos = b
        if pos < end:
            gaps.append((pos, end))
        pieces = []
        ready: list[tuple[int, bytes | memoryview]] = []
        for a, b in gaps:
            for ext in self.extents.overlapping(ino, a, b):
                lo, hi = max(a, ext.file_off), min(b, ext.end)
                chunk_off = ext.chunk_off + lo - ext.file_off
                cached = self.cache.get(ext.chunk_id)
                if cached is not None:
                    ready.append((lo - offset, memoryview(cached)[chunk_off : chunk_off + hi - lo]))
                    continue
                record = self.chunks.get(ext.chunk_id)
                where = self._where(ext.chunk_id, record) if record else None
                if record is None or where is None:
                    log.error("inode %d: chunk %s has no stored copy", ino, ext.chunk_id.hex()[:16])
                    self.io_errors += 1
                    raise FsError(errno.EIO)
                tier, seg, off = where
                pieces.append(
                    ChunkPiece(
                        lo - offset,
                        hi - lo,
                        ext.chunk_id,
                        chunk_off,
                        seg,
                        off,
                        record.frame_len,
                        tier,
                    )
                )
        return staged, ready, pieces

    async def _fill(
        self, ino: int, pieces: list[ChunkPiece], span: int = 0
    ) -> list[tuple[int, bytes | memoryview]]:
        """Each piece's bytes (a view of its chunk's plaintext) with its offset in the read."""
        out: list[tuple[int, bytes | memoryview]] = []
        with contextlib.ExitStack() as pins:
            for p in pieces:
                pins.enter_context(self._pin(p))
            for p in pieces:
                data = memoryview(await self.chunk_data(ino, p, span))
                out.append((p.buf_off, data[p.chunk_off : p.chunk_off + p.length]))
        return out

    async def chunk_data(self, ino: int, p: ChunkPiece, span: int = 0) -> bytes | memoryview:
        """A chunk's plaintext from the cache, or loaded once however many readers wait;
        `span`: a chunk only upstream comes with the frames after it (sequential readers)."""
        while True:
            data = self.cache.get(p.chunk_id)
            if data is not None:
                return data
            pending = self._loading.get(p.chunk_id)
            if pending is None:
                break
            await pending.wait()
        event = self._loading[p.chunk_id] = trio.Event()
        try:
            data = await self._load_piece(ino, p, span)
        finally:
            self._loaded(p.chunk_id, event)
        self.cache.put(p.chunk_id, data)
        return data

    def _loaded(self, chunk_id: bytes, event: trio.Event) -> None:
        if self._loading.get(chunk_id) is event:
            del self._loading[chunk_id]
        event.set()

    async def _load_piece(
        self, ino: int, p: ChunkPiece, span: int, claim: SpanClaim | None = None
    ) -> bytes | memoryview:
        if p.tier == TIER_REGION:
            return await self._from_region(ino, p, span, claim)
        return await self._load_local(ino, p)

    async def _from_region(
        self, ino: int, p: ChunkPiece, span: int, claim: SpanClaim | None
    ) -> bytes | memoryview:
        """An evicted chunk: from a span in flight that brings it along, else fetched (with
        the span claimed for it, if any)."""
        assert self.region is not None
        pending = self.region.in_span(p.chunk_id) if claim is None else None
        if pending is not None:
            await pending.wait()
            cached = self.cache.get(p.chunk_id)
            if cached is not None:
                return cached
        return await self.region.fetch(ino, p.chunk_id, span=span, claim=claim)

    def take_extra(self, chunk_id: bytes, fetched: Fetched) -> bool:
        """A frame a span brought along: cached (and offered to the keeper) if the chunk is
        evicted here and not cached yet; frames of other chunks are dropped."""
        record = self.chunks.get(chunk_id)
        if record is None or record.locations or self.cache.contains(chunk_id):
            return False
        self.cache.put(chunk_id, fetched.plaintext)
        if self.region is not None and self.region.keep is not None:
            self.region.keep(chunk_id, fetched.frame, None)
        return True

    async def _load_local(self, ino: int, p: ChunkPiece) -> bytes | memoryview:
        """The plaintext from the local copy; a copy that fails its check or cannot be read
        is fetched from the region instead when it is there (a repair), else `EIO`."""
        try:
            data = await trio.to_thread.run_sync(self._load, p, limiter=self._load_limiter)
        except frame.FrameError as exc:
            self.checksum_errors += 1
            log.error("inode %d: chunk %s failed its check: %s", ino, p.chunk_id.hex()[:16], exc)
            return await self._repair(ino, p)
        except (OSError, ColdError) as exc:
            self.io_errors += 1
            log.error("inode %d: chunk %s unreadable: %s", ino, p.chunk_id.hex()[:16], exc)
            return await self._repair(ino, p)
        if self.cold is not None:
            if p.tier == TIER_HOT:
                self.cold.note_read(p.seg)
            else:
                self.cold.note_cold_read(p.chunk_id, p.seg, p.frame_off)
        return data

    async def _repair(self, ino: int, p: ChunkPiece) -> bytes | memoryview:
        if self.region is None or self.region.where(p.chunk_id) is None:
            raise FsError(errno.EIO)
        return await self.region.fetch(ino, p.chunk_id, (p.tier, p.seg, p.frame_off))

    async def load_chunk(self, chunk_id: bytes) -> bytes | memoryview:
        """A whole chunk's plaintext by id (snapshot tree blobs), wherever its copy is."""
        record = self.chunks.get(chunk_id)
        where = self._where(chunk_id, record) if record else None
        if record is None or where is None:
            raise FsError(errno.EIO)
        tier, seg, off = where
        piece = ChunkPiece(0, record.raw_len, chunk_id, 0, seg, off, record.frame_len, tier)
        with self._pin(piece):
            return await self.chunk_data(0, piece)

    def _where(self, chunk_id: bytes, record: ChunkRecord) -> tuple[int, int, int] | None:
        """(tier, segment or zone, offset) of the copy to read: hot first, then cold, then
        the region's (evicted)."""
        hot = record.hot_location()
        if hot is not None:
            return TIER_HOT, hot[0], hot[1]
        cold = record.cold_location()
        if cold is not None and self.cold is not None:
            return TIER_COLD, cold[0], cold[1]
        if self.region is not None and self.region.where(chunk_id) is not None:
            return TIER_REGION, 0, 0
        return None

    def _pin(self, p: ChunkPiece) -> contextlib.AbstractContextManager[None]:
        """Keep the copy where it is while it loads: no punch of the frame, no reset of
        the zone."""
        if p.tier == TIER_COLD:
            assert self.cold is not None
            return self.cold.pin(p.seg)
        if p.tier == TIER_REGION:
            return contextlib.nullcontext()
        return self.chunks.pin(p.seg, p.frame_off)

    def _load(self, p: ChunkPiece) -> bytes | memoryview:
        if p.tier == TIER_COLD:
            assert self.cold is not None
            return self.cold.read(p.seg, p.frame_off, p.frame_len, p.chunk_id)
        raw = self.hot.read(p.seg, p.frame_off, p.frame_len)
        return frame.decode(raw, p.chunk_id)


Claimed = tuple[ChunkPiece, trio.Event, SpanClaim | None]


def _frame_end(piece: ChunkPiece) -> int:
    return piece.frame_off + piece.frame_len


def _hot_runs(claims: list[Claimed]) -> list[list[Claimed]]:
    """Claims in order, grouped into runs of hot frames that follow each other in one
    segment (at most RUN_MAX bytes, gaps of at most RUN_GAP); anything else alone."""
    runs: list[list[Claimed]] = []
    for claim in claims:
        piece = claim[0]
        last = runs[-1][-1][0] if runs else None
        if (
            last is not None
            and piece.tier == TIER_HOT
            and last.tier == TIER_HOT
            and piece.seg == last.seg
            and 0 <= piece.frame_off - _frame_end(last) <= RUN_GAP
            and _frame_end(piece) - runs[-1][0][0].frame_off <= RUN_MAX
        ):
            runs[-1].append(claim)
        else:
            runs.append([claim])
    return runs


def _assemble(size: int, parts: list[tuple[int, bytes | memoryview]]) -> bytes | memoryview:
    """`size` bytes from (offset, bytes) parts that do not overlap; what no part covers
    (holes, a staging file shorter than its range) reads as zeros. One part that covers
    everything is returned as it is; otherwise one join, with no zero-filled buffer first."""
    parts.sort(key=lambda part: part[0])
    if len(parts) == 1 and parts[0][0] == 0 and len(parts[0][1]) == size:
        return parts[0][1]
    out: list[bytes | memoryview] = []
    pos = 0
    for off, data in parts:
        if off > pos:
            out.append(bytes(off - pos))
        out.append(data)
        pos = off + len(data)
    if pos < size:
        out.append(bytes(size - pos))
    return b"".join(out)
