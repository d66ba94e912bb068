"""The sealer: staged ranges become immutable, deduplicated, compressed chunks.

One round seals a batch of inodes (at most `seal.batch_mb` of staged data) in two stages:

prepare (under `prepare_lock`, one round at a time)
  1. take (trio): staged ranges not already in a round in flight; writes to them from now
     on are recorded ("watched") so that the round does not install data that changed;
  2. cut (worker): read the staged bytes into a reused arena, cut them (FastCDC, or fixed
     blocks); then name each chunk (workers: the pieces are split over the CPU limiter's
     threads);
  3. dedup (trio): chunks the index already has, or a round in flight is storing, are not
     stored again;
  4. encode (workers, split the same way): zstd + frame the new chunks;

store (in round order; the next round prepares meanwhile, so two cores work)
  5. append (worker): write the frames to the active hot segment (large rounds with
     O_DIRECT) and fdatasync it;
  6. install (trio, one operation): chunk records, extents for every piece not touched
     meanwhile, segment end; the sealed ranges leave staging. The group commit makes it
     durable later;
  7. release (trio, after that commit is durable): punch the sealed bytes out of staging
     files and the frames of freed chunks out of segments.

At most PIPELINE_DEPTH rounds are in flight (`_slots`). A range still being written is held
back until it has been quiet for `seal.quiet_period` after close, or dirty for
`seal.max_dirty_age`; staging above `seal.staging_high_mb` seals the oldest data first;
`flush()` seals everything now. `exclusive()` waits until no round is in flight (compaction).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from tierfs.crashpoints import crash_point
from tierfs.data import frame
from tierfs.data.chunker import Chunker
from tierfs.data.chunkstore import ChunkIndex, PendingFree
from tierfs.data.extents import Extent, ExtentMap
from tierfs.data.sealwork import (
    ArenaPool,
    Batch,
    Encoded,
    Job,
    Piece,
    Placed,
    cut_batch,
    encode_pieces,
    name_pieces,
    split_by_bytes,
)
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.durability import Durability
from tierfs.fs.namespace import Namespace
from tierfs.fs.operations import Activity
from tierfs.fs.ranges import RangeSet
from tierfs.meta import schema
from tierfs.meta.records import FLAG_FIXED_CHUNKING, TIER_HOT, ChunkRecord, SegmentRecord
from tierfs.tiers.hot import HotStore

log = logging.getLogger(__name__)

T = TypeVar("T")

TICK = 0.2
RETRY_DELAY = 2.0
PIPELINE_DEPTH = 2


@dataclass
class SealPolicy:
    quiet_period: float = 2.0
    max_dirty_age: float = 300.0
    staging_high_bytes: int = 1 << 30
    batch_bytes: int = 64 << 20
    stream_behind_bytes: int = 0
    zstd_level: int = 3
    hot_max_bytes: int = 0
    idle_delay: float = 0.5


class Outcome(enum.Enum):
    SEALED = "sealed"  # handed on (or, inline, stored and installed)
    NOTHING = "nothing"  # nothing of the inodes could be taken
    FAILED = "failed"  # the round failed; its data stays staged


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
        self.prepare_lock = trio.Lock()
        self.activity = Activity()
        self.partial_inodes: set[int] = set()
        self.rounds = 0
        self.sealed_bytes = 0
        self.failures = 0
        self._slots = trio.Semaphore(PIPELINE_DEPTH)
        self._last_stored = trio.Event()
        self._last_stored.set()
        self._inflight: dict[int, RangeSet] = {}
        self._inflight_new: set[bytes] = set()
        self._arenas = ArenaPool(policy.batch_bytes + chunker.max_size)
        self._store_failed = False

    # -- scheduling

    async def run(self) -> None:
        """The sealer task. A failing round is logged and retried; it never stops the mount."""
        async with trio.open_nursery() as nursery:
            while True:
                outcome = Outcome.NOTHING
                try:
                    due = self.due()
                    behind = self.behind_writers()
                    due += [ino for ino in behind if ino not in due]
                    if due:
                        outcome = await self.seal_round(due, nursery, behind)
                    await self.release_space()
                except Exception:
                    self.failures += 1
                    log.exception("sealer round failed; staged data is kept and retried")
                    await trio.sleep(5)
                if outcome is Outcome.FAILED or self._store_failed:
                    self._store_failed = False
                    await trio.sleep(RETRY_DELAY)
                elif outcome is Outcome.NOTHING:
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

    def behind_writers(self) -> dict[int, int]:
        """Open files written sequentially with at least `stream_behind_bytes` staged behind
        their writer, each with its write position: a long stream is sealed as it goes,
        which spreads the work over the write and keeps staging small, instead of all of
        it waiting for the close."""
        least = self.policy.stream_behind_bytes
        if not least:
            return {}
        out = {}
        for ino, (_, end) in self.staging.streams.items():
            ranges = self.staging.ranges.get(ino)
            if ranges and sum(b - a for a, b in self._untaken(ino, ranges, end)) >= least:
                out[ino] = end
        return out

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

    async def flush(self, durable: bool = True) -> None:
        """Seal every staged byte and, unless `durable` is False (a snapshot, which commits
        on its own), make it durable (tierfs flush)."""
        while self.staging.dirty_since:
            before = self.staging.staged_total()
            await self.seal_pass()
            if self.staging.dirty_since and self.staging.staged_total() >= before:
                raise TierfsError(
                    f"sealing makes no progress ({before:,} bytes staged); see the log",
                    ExitCode.IO,
                )
        if durable:
            await self.durability.sync(None)
        await self.release_space()

    async def seal_pass(self, budget: int | None = None) -> None:
        """Seal rounds until nothing is left to seal or, with a `budget`, once that many
        bytes were sealed: a snapshot's pre-copy pass must end even while writers keep
        dirtying files."""
        await self._last_stored.wait()
        start = self.sealed_bytes
        async with trio.open_nursery() as nursery:
            outcome = Outcome.SEALED
            while outcome is Outcome.SEALED and (
                budget is None or self.sealed_bytes - start < budget
            ):
                dirty = self.staging.dirty_since
                order = sorted(dirty, key=dirty.__getitem__)
                outcome = await self.seal_round(order, nursery)
        await self._last_stored.wait()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """No round runs while the caller holds this (compaction rewrites extents)."""
        async with self.prepare_lock:
            await self._last_stored.wait()
            yield

    # -- one round

    async def seal_round(
        self,
        inos: list[int],
        nursery: trio.Nursery | None = None,
        behind: dict[int, int] | None = None,
    ) -> Outcome:
        """Seal what can be sealed of `inos` (of those in `behind`, only what lies before
        the given write position).

        With a nursery the round's store stage runs there and this returns once the round
        is prepared, so that the caller can prepare the next one meanwhile.
        """
        await self._slots.acquire()
        handed = False
        try:
            async with self.prepare_lock:
                batch = self._take(inos, behind or {})
                if batch is None:
                    return Outcome.NOTHING
                if not await self._prepare(batch):
                    self._finish(batch)
                    return Outcome.FAILED
                previous, stored = self._last_stored, trio.Event()
                self._last_stored = stored
            handed = True
        finally:
            if not handed:
                self._slots.release()
        if nursery is not None:
            nursery.start_soon(self._store, batch, previous, stored)
            return Outcome.SEALED
        return Outcome.SEALED if await self._store(batch, previous, stored) else Outcome.FAILED

    async def _prepare(self, batch: Batch) -> bool:
        """Cut, dedup and encode a taken batch; False (logged) when reading staging failed."""
        started = time.monotonic()
        try:
            await trio.to_thread.run_sync(
                cut_batch,
                batch,
                self.chunker,
                self.staging.path_str,
                self._arenas.size,
                limiter=self.cpu_limiter,
            )
            await self._in_parallel(name_pieces, batch.pieces(), self.chunker)
            self._narrow_inflight(batch)
            self._dedup(batch)
            level = self.policy.zstd_level
            batch.frames = await self._in_parallel(encode_pieces, batch.pieces_to_store(), level)
            batch.prepare_time = time.monotonic() - started
            return True
        except OSError as exc:
            self.failures += 1
            log.warning("seal round failed, data stays staged: %s", exc)
            return False

    async def _in_parallel(
        self, work: Callable[[list[Piece], Any], list[T]], pieces: list[Piece], arg: Any
    ) -> list[T]:
        """`work(run, arg)` over runs of `pieces` in as many worker threads as the CPU
        limiter allows, results in piece order: naming and encoding a round take most of
        its time, and after an fsync the trio thread leaves a core idle for them."""
        runs = split_by_bytes(pieces, int(self.cpu_limiter.total_tokens))
        results: list[list[T]] = [[] for _ in runs]

        async def one(i: int) -> None:
            results[i] = await trio.to_thread.run_sync(work, runs[i], arg, limiter=self.cpu_limiter)

        async with trio.open_nursery() as nursery:
            for i in range(len(runs)):
                nursery.start_soon(one, i)
        return [item for result in results for item in result]

    async def _store(self, batch: Batch, previous: trio.Event, stored: trio.Event) -> bool:
        """Append and install a prepared batch, after the round before it (store stage)."""
        try:
            await previous.wait()
            started = time.monotonic()
            placed = await self._append(batch.frames)
            crash_point("seal-after-append")
            appended = time.monotonic()
            self._install(batch.jobs, placed)
            crash_point("seal-after-install")
            self.rounds += 1
            log.debug(
                "seal round %d: %d files, %d chunks, %d new; prepared in %.3f s, "
                "appended in %.3f s, installed in %.3f s",
                self.rounds,
                len(batch.jobs),
                sum(len(j.pieces) for j in batch.jobs),
                len(placed),
                batch.prepare_time,
                appended - started,
                time.monotonic() - appended,
            )
            return True
        except OSError as exc:
            self.failures += 1
            self._store_failed = True
            log.warning("seal round failed, data stays staged: %s", exc)
            return False
        except Exception:
            self.failures += 1
            self._store_failed = True
            log.exception("seal round failed; staged data is kept and retried")
            return False
        finally:
            self._finish(batch)
            stored.set()
            self._slots.release()

    def _take(self, inos: list[int], behind: dict[int, int]) -> Batch | None:
        """The staged ranges of `inos` (up to the batch budget) that no round has yet."""
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
            limit = min(inode.size, behind.get(ino, inode.size))
            for start, end in self._untaken(ino, ranges, limit):
                if budget <= 0:
                    break
                take = min(end - start, max(budget, self.chunker.max_size))
                picked.append((start, start + take, start + take == end))
                budget -= take
            if picked:
                fixed = bool(inode.flags & FLAG_FIXED_CHUNKING)
                generation = self.staging.generation.get(ino, 0)
                jobs.append(Job(ino, fixed, generation, picked))
        if not jobs:
            return None
        for job in jobs:
            job.touched = self.staging.watch(job.ino)
            taken = self._inflight.setdefault(job.ino, RangeSet())
            for start, end, _ in job.ranges:
                taken.add(start, end)
        return Batch(jobs, self._arenas.take())

    def _untaken(self, ino: int, ranges: RangeSet, size: int) -> list[tuple[int, int]]:
        """Staged ranges below `size` that no round in flight has taken."""
        free = RangeSet(ranges.intersect(0, size))
        for start, end in self._inflight.get(ino, RangeSet()).as_list():
            free.remove(start, end)
        return free.as_list()

    def _narrow_inflight(self, batch: Batch) -> None:
        """After the cut a round holds only the bytes of its pieces: the tail it left for
        later (a run split across rounds) can be taken by the next round at once."""
        for job in batch.jobs:
            taken = self._inflight.get(job.ino)
            if taken is None:
                continue
            for start, end, _ in job.ranges:
                taken.remove(start, end)
            kept = RangeSet([(p.file_off, p.file_off + p.length) for p in job.pieces])
            for start, end in kept.as_list():
                taken.add(start, end)
            job.ranges = [(start, end, True) for start, end in kept.as_list()]

    def _dedup(self, batch: Batch) -> None:
        """Chunk ids the batch must store: neither indexed nor being stored by a round."""
        for job in batch.jobs:
            for piece in job.pieces:
                cid = piece.chunk_id
                if cid in batch.new_ids or cid in self._inflight_new:
                    continue
                if self.chunks.get(cid) is None:
                    batch.new_ids.add(cid)
        self._inflight_new |= batch.new_ids

    def _finish(self, batch: Batch) -> None:
        """The round is over (installed or failed): its ranges, chunk ids and watches go,
        and its arena is handed to the next round."""
        for job in batch.jobs:
            taken = self._inflight.get(job.ino)
            if taken is not None:
                for start, end, _ in job.ranges:
                    taken.remove(start, end)
                if not taken:
                    del self._inflight[job.ino]
            self.staging.unwatch(job.ino, job.touched)
        self._inflight_new -= batch.new_ids
        batch.drop_data()
        self._arenas.give(batch.arena)

    async def append_frames(
        self, frames: list[bytes], install: Callable[[Any, list[Placed]], None]
    ) -> None:
        """Append whole chunk frames to the hot tier (promotion from the cold tier), in turn
        with the seal rounds' store stages; then one operation records the segment's new end
        and runs `install(tx, placed)`, which must account for every frame."""
        await self._slots.acquire()
        previous, stored = self._last_stored, trio.Event()
        self._last_stored = stored
        try:
            await previous.wait()
            encoded = []
            for data in frames:
                info = frame.parse_header(data)
                encoded.append(Encoded(info.chunk_id, [data], len(data), info.raw_len, info.codec))
            placed = await self._append(encoded)
            with self.store.op() as tx:
                if placed:
                    seg = self.chunks.segment(placed[0].seg, tx)
                    if seg is not None:
                        seg.end = self.hot.tail
                        self.chunks.put_segment(tx, placed[0].seg, seg)
                install(tx, placed)
        finally:
            stored.set()
            self._slots.release()

    async def _append(self, frames: list[Encoded]) -> list[Placed]:
        if not frames:
            return []
        total = sum(f.frame_len for f in frames)
        limit = self.policy.hot_max_bytes
        if limit and self.chunks.hot_live_bytes() + total > limit:
            raise OSError(errno.ENOSPC, f"hot tier limit of {limit >> 20} MiB reached")
        new_segment = self.hot.needs_new_segment(total)
        if new_segment:
            self._start_segment()
        seg, offset = self.hot.active, self.hot.place(total)
        assert seg is not None
        parts = [part for f in frames for part in f.parts]
        end = await trio.to_thread.run_sync(
            self.hot.append, seg, offset, parts, limiter=self.io_limiter
        )
        if new_segment:
            await trio.to_thread.run_sync(
                self.hot.sync_new_segment_dirs, seg, limiter=self.io_limiter
            )
        placed = []
        pos = offset
        for f in frames:
            placed.append(Placed(f.chunk_id, seg, pos, f.frame_len, f.raw_len, f.codec))
            pos += f.frame_len
        self.hot.tail = end
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
            fresh = []
            for p in placed:
                if self.chunks.get(p.chunk_id, tx) is not None:
                    # Stored meanwhile by another writer of chunks (a snapshot's tree blob
                    # with the same bytes): keep that record, give this copy back.
                    self.chunks.queue_free(tx, p.seg, p.offset, p.frame_len)
                    continue
                record = ChunkRecord(
                    0, p.raw_len, p.frame_len, p.codec, [(TIER_HOT, p.seg, p.offset)]
                )
                self.chunks.insert(tx, p.chunk_id, record)
                fresh.append(p)
            if placed:
                seg = self.chunks.segment(placed[0].seg, tx)
                if seg is not None:
                    seg.end = self.hot.tail
                    self.chunks.put_segment(tx, placed[0].seg, seg)
            for job in jobs:
                sealed += self._install_job(tx, job)
            for p in fresh:
                self.chunks.drop_unused(tx, p.chunk_id)
        merged: dict[int, RangeSet] = {}
        for ino, start, end in sealed:
            merged.setdefault(ino, RangeSet()).add(start, end)
        for ino, ranges in merged.items():
            for start, end in ranges.as_list():
                self.staging.unstage(ino, start, end)
                self.staging.defer_punch(self.store.commits, ino, start, end)
                self.sealed_bytes += end - start

    def _install_job(self, tx: object, job: Job) -> list[tuple[int, int, int]]:
        """Extents for the job's untouched pieces; returns the (ino, start, end) sealed."""
        sealed: list[tuple[int, int, int]] = []
        inode = self.store.get_inode(job.ino, tx)
        if inode is None:
            return sealed
        touched = job.touched
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
        """Punch dead frames and delete empty segments (worker thread, or at unmount).

        A segment deleted in the same batch needs no punches first (a migration frees a
        whole segment's frames one by one)."""
        deleted = {f.seg for f in frees if f.length < 0}
        for f in frees:
            if f.length >= 0 and f.seg in deleted:
                continue
            self.hot.give_back(f.seg, f.offset, f.length)
