"""The sealer: staged ranges become immutable, deduplicated, compressed chunks.

One round seals a batch of inodes (at most `seal.batch_mb` of staged data):

1. take (trio): the staged ranges to seal; writes to them from now on are recorded as
   "touched" so that the round does not install data that changed under it;
2. cut (worker): read the staged bytes, cut them (FastCDC, or fixed blocks), name each chunk;
3. dedup (trio): chunks the index already has are not stored again;
4. encode (worker): zstd + frame the new chunks;
5. append (worker): write the frames to the active hot segment and fdatasync it;
6. install (trio, one operation): chunk records, extents for every piece not touched meanwhile,
   segment end; the sealed ranges leave staging. The group commit makes it durable later;
7. release (trio, after that commit is durable): punch the sealed bytes out of staging files
   and the frames of freed chunks out of segments.

Rounds run one at a time (`lock`). A range still being written is held back until it has
been quiet for `seal.quiet_period` after close, or dirty for `seal.max_dirty_age`; staging
above `seal.staging_high_mb` seals the oldest data first; `flush()` seals everything now.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field

import trio

from tierfs.crashpoints import crash_point
from tierfs.data import frame
from tierfs.data.chunker import Chunker
from tierfs.data.chunkstore import ChunkIndex, PendingFree
from tierfs.data.extents import Extent, ExtentMap
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.durability import Durability
from tierfs.fs.namespace import Namespace
from tierfs.fs.operations import Activity
from tierfs.fs.ranges import RangeSet
from tierfs.meta import schema
from tierfs.meta.records import FLAG_FIXED_CHUNKING, TIER_HOT, ChunkRecord, SegmentRecord
from tierfs.tiers.hot import HotStore

log = logging.getLogger(__name__)

TICK = 0.2
RETRY_DELAY = 2.0


@dataclass
class SealPolicy:
    quiet_period: float = 2.0
    max_dirty_age: float = 300.0
    staging_high_bytes: int = 1 << 30
    batch_bytes: int = 64 << 20
    zstd_level: int = 3
    hot_max_bytes: int = 0
    idle_delay: float = 0.5


@dataclass
class Piece:
    file_off: int
    length: int
    chunk_id: bytes = b""
    data: bytes | memoryview = b""


@dataclass
class Job:
    ino: int
    fixed: bool
    generation: int
    ranges: list[tuple[int, int, bool]]  # (start, end, ends the staged range)
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class Encoded:
    chunk_id: bytes
    parts: list[bytes | memoryview]
    frame_len: int
    raw_len: int
    codec: int


@dataclass
class Placed:
    chunk_id: bytes
    seg: int
    offset: int
    frame_len: int
    raw_len: int
    codec: int


class Sealer:
    def __init__(
        self,
        ns: Namespace,
        chunks: ChunkIndex,
        extents: ExtentMap,
        hot: HotStore,
        chunker: Chunker,
        durability: Durability,
        policy: SealPolicy,
        cpu_limiter: trio.CapacityLimiter,
        io_limiter: trio.CapacityLimiter,
    ) -> None:
        self.ns = ns
        self.store = ns.store
        self.staging = ns.staging
        self.chunks = chunks
        self.extents = extents
        self.hot = hot
        self.chunker = chunker
        self.durability = durability
        self.policy = policy
        self.cpu_limiter = cpu_limiter
        self.io_limiter = io_limiter
        self.lock = trio.Lock()
        self.activity = Activity()
        self.partial_inodes: set[int] = set()
        self.rounds = 0
        self.sealed_bytes = 0
        self.failures = 0

    # -- scheduling

    async def run(self) -> None:
        """The sealer task. A failing round is logged and retried; it never stops the mount."""
        while True:
            try:
                due = self.due()
                if due and not await self.seal_round(due):
                    await trio.sleep(RETRY_DELAY)
                await self.release_space()
            except Exception:
                self.failures += 1
                log.exception("sealer round failed; staged data is kept and retried")
                await trio.sleep(5)
            if not due:
                await trio.sleep(TICK)

    def due(self) -> list[int]:
        """Inodes whose staged data should be sealed now, oldest first.

        Closed files are sealed once quiet and while applications leave the filesystem
        idle for `idle_delay`: sealing competes with them for the same two cores. Age and
        staging pressure seal regardless.
        """
        now = time.monotonic()
        p = self.policy
        idle = self.activity.idle_for() >= p.idle_delay
        if not idle and not self._pressure():
            return self._aged(now)
        out = []
        for ino, since in self.staging.dirty_since.items():
            if now - since >= p.max_dirty_age:
                out.append((since, ino))
            elif idle and ino not in self.ns.opens:
                closed = self.ns.closed_at.get(ino, since)
                if now - closed >= p.quiet_period:
                    out.append((since, ino))
        if (
            not out
            and self.staging.dirty_since
            and self.staging.staged_total() > p.staging_high_bytes
        ):
            out = [(since, ino) for ino, since in self.staging.dirty_since.items()]
        return [ino for _, ino in sorted(out)]

    def _aged(self, now: float) -> list[int]:
        """Inodes dirty for max_dirty_age. dirty_since is filled in time order (an entry is
        added when an inode first becomes dirty), so the scan stops at the first young one."""
        out = []
        for ino, since in self.staging.dirty_since.items():
            if now - since < self.policy.max_dirty_age:
                break
            out.append(ino)
        return out

    def _pressure(self) -> bool:
        return self.staging.recent_total(max_age=1.0) > self.policy.staging_high_bytes

    async def flush(self) -> None:
        """Seal every staged byte and make it durable (tierfs flush, snapshots)."""
        while self.staging.dirty_since:
            before = self.staging.staged_total()
            order = sorted(self.staging.dirty_since, key=self.staging.dirty_since.__getitem__)
            await self.seal_round(order)
            if self.staging.dirty_since and self.staging.staged_total() >= before:
                raise TierfsError(
                    f"sealing makes no progress ({before:,} bytes staged); see the log",
                    ExitCode.IO,
                )
        await self.durability.sync(None)
        await self.release_space()

    # -- one round

    async def seal_round(self, inos: list[int]) -> bool:
        """Seal what can be sealed of `inos`; False when the round failed (and kept it all)."""
        async with self.lock:
            jobs = self._take(inos)
            log.debug("seal round for %s: %d jobs", inos[:8], len(jobs))
            if not jobs:
                return True
            try:
                await trio.to_thread.run_sync(self._cut, jobs, limiter=self.cpu_limiter)
                new = self._dedup(jobs)
                frames = await trio.to_thread.run_sync(self._encode, new, limiter=self.cpu_limiter)
                placed = await self._append(frames)
                crash_point("seal-after-append")
                self._install(jobs, placed)
                crash_point("seal-after-install")
                self.rounds += 1
                log.debug(
                    "seal round %d: %d files, %d chunks, %d new",
                    self.rounds,
                    len(jobs),
                    sum(len(j.pieces) for j in jobs),
                    len(placed),
                )
                return True
            except OSError as exc:
                self.failures += 1
                log.warning("seal round failed, data stays staged: %s", exc)
                return False
            finally:
                for job in jobs:
                    self.staging.touched.pop(job.ino, None)

    def _take(self, inos: list[int]) -> list[Job]:
        budget = self.policy.batch_bytes
        jobs = []
        for ino in inos:
            if budget <= 0:
                break
            inode = self.store.get_inode(ino)
            ranges = self.staging.ranges.get(ino)
            if inode is None or not ranges:
                self.staging.dirty_since.pop(ino, None)
                continue
            picked = []
            for start, end in ranges.as_list():
                end = min(end, inode.size)
                if start >= end or budget <= 0:
                    continue
                take = min(end - start, max(budget, self.chunker.max_size))
                picked.append((start, start + take, start + take == end))
                budget -= take
            if picked:
                fixed = bool(inode.flags & FLAG_FIXED_CHUNKING)
                generation = self.staging.generation.get(ino, 0)
                jobs.append(Job(ino, fixed, generation, picked))
                self.staging.touched[ino] = RangeSet()
        return jobs

    def _cut(self, jobs: list[Job]) -> None:
        """Worker thread: read staged bytes, cut, and name the chunks."""
        for job in jobs:
            try:
                path = self.staging.path_str(job.ino, job.generation)
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                for start, end, final in job.ranges:
                    data = _pread_all(fd, start, end - start)
                    cuts = list(self.chunker.cut(data, job.fixed, start))
                    if not final and len(cuts) > 1:
                        cuts.pop()
                    view = memoryview(data)
                    for off, length in cuts:
                        piece = view[off : off + length]
                        job.pieces.append(
                            Piece(start + off, length, self.chunker.content_id(piece), piece)
                        )
            finally:
                os.close(fd)

    def _dedup(self, jobs: list[Job]) -> dict[bytes, bytes | memoryview]:
        new: dict[bytes, bytes | memoryview] = {}
        for job in jobs:
            for piece in job.pieces:
                if piece.chunk_id not in new and self.chunks.get(piece.chunk_id) is None:
                    new[piece.chunk_id] = piece.data
        return new

    def _encode(self, new: dict[bytes, bytes | memoryview]) -> list[Encoded]:
        """Worker thread: each new chunk's frame (as parts), plaintext length and codec."""
        out = []
        for chunk_id, data in new.items():
            parts, codec = frame.encode_parts(chunk_id, data, self.policy.zstd_level)
            out.append(Encoded(chunk_id, parts, sum(len(p) for p in parts), len(data), codec))
        return out

    async def _append(self, frames: list[Encoded]) -> list[Placed]:
        if not frames:
            return []
        total = sum(f.frame_len for f in frames)
        limit = self.policy.hot_max_bytes
        if limit and self.chunks.stats().stored_bytes + total > limit:
            raise OSError(errno.ENOSPC, f"hot tier limit of {limit >> 20} MiB reached")
        new_segment = self.hot.needs_new_segment(total)
        if new_segment:
            self._start_segment()
        seg, offset = self.hot.active, self.hot.tail
        assert seg is not None
        parts = [part for f in frames for part in f.parts]
        await trio.to_thread.run_sync(self.hot.append, seg, offset, parts, limiter=self.io_limiter)
        if new_segment:
            await trio.to_thread.run_sync(
                self.hot.sync_new_segment_dirs, seg, limiter=self.io_limiter
            )
        placed = []
        pos = offset
        for f in frames:
            placed.append(Placed(f.chunk_id, seg, pos, f.frame_len, f.raw_len, f.codec))
            pos += f.frame_len
        self.hot.tail = pos
        return placed

    def _start_segment(self) -> None:
        """Allocate a new segment id and record it (end 0) before anything is written."""
        with self.store.op() as tx:
            if self.hot.active is not None:
                self.chunks.retire_segment(tx, self.hot.active)
            seg = self.store.next_counter(tx, schema.K_NEXT_SEGMENT)
            self.chunks.put_segment(tx, seg, SegmentRecord(True, 0, 0, 0))
        self.hot.start_segment(seg)

    def _install(self, jobs: list[Job], placed: list[Placed]) -> None:
        """One operation: chunk records, extents, segment end; sealed ranges leave staging.

        Staging is told only once the operation has committed into the group: if it fails,
        it leaves no trace in the index, and the ranges must stay staged.
        """
        sealed: list[tuple[int, int, int]] = []
        with self.store.op() as tx:
            for p in placed:
                record = ChunkRecord(
                    0, p.raw_len, p.frame_len, p.codec, [(TIER_HOT, p.seg, p.offset)]
                )
                self.chunks.insert(tx, p.chunk_id, record)
            if placed:
                seg = self.chunks.segment(placed[0].seg, tx)
                if seg is not None:
                    seg.end = self.hot.tail
                    self.chunks.put_segment(tx, placed[0].seg, seg)
            for job in jobs:
                sealed += self._install_job(tx, job)
            for p in placed:
                self.chunks.drop_unused(tx, p.chunk_id)
        for ino, start, end in sealed:
            self.staging.unstage(ino, start, end)
            self.staging.defer_punch(self.store.commits, ino, start, end)
            self.sealed_bytes += end - start

    def _install_job(self, tx: object, job: Job) -> list[tuple[int, int, int]]:
        """Extents for the job's untouched pieces; returns the (ino, start, end) sealed."""
        sealed: list[tuple[int, int, int]] = []
        inode = self.store.get_inode(job.ino, tx)
        if inode is None:
            return sealed
        touched = self.staging.touched.get(job.ino, RangeSet())
        for piece in job.pieces:
            if not piece.chunk_id or self.chunks.get(piece.chunk_id, tx) is None:
                continue
            valid = RangeSet([(piece.file_off, min(piece.file_off + piece.length, inode.size))])
            for a, b in touched.intersect(piece.file_off, piece.file_off + piece.length):
                valid.remove(a, b)
            for x, y in valid.as_list():
                # The bytes may be the very chunk of the extents they replace (rewritten with
                # the same content): hold a reference, or clearing those drops the chunk.
                self.chunks.add_ref(tx, piece.chunk_id)
                removed = self.extents.clear(tx, job.ino, x, y)
                ext = Extent(x, y - x, piece.chunk_id, x - piece.file_off)
                self.extents.insert(tx, job.ino, ext)
                self.chunks.release(tx, piece.chunk_id)
                inode.data_bytes += (y - x) - removed
                sealed.append((job.ino, x, y))
        if sum(b - a for a, b, _ in job.ranges) < inode.size:
            self.partial_inodes.add(job.ino)
        self.store.put_inode(tx, inode)
        return sealed

    # -- giving space back after durable commits

    async def release_space(self) -> None:
        frees = self.chunks.take_durable_frees(self.store.durable_commits)
        if frees:
            await trio.to_thread.run_sync(self.free_frames, frees, limiter=self.io_limiter)
            self.chunks.forget_frees(frees)

    def free_durable_now(self) -> None:
        """At unmount: give back every freed frame whose commit is durable."""
        frees = self.chunks.take_durable_frees(self.store.durable_commits)
        self.free_frames(frees)
        self.chunks.forget_frees(frees)

    def free_frames(self, frees: list[PendingFree]) -> None:
        """Punch dead frames and delete empty segments (worker thread, or at unmount)."""
        for f in frees:
            self.hot.give_back(f.seg, f.offset, f.length)


def _pread_all(fd: int, offset: int, size: int) -> bytearray:
    """`size` bytes at `offset` read into one buffer (zeros past the end of the file)."""
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return buf
