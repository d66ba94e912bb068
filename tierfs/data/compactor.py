"""Compaction: re-chunk files whose extents have become fragmented by small overwrites.

Partial overwrites seal only their new bytes, so a file rewritten piecemeal ends up with many
small extents: reads touch many chunks and dedup against other copies of the same content
suffers. A fragmented file (more than `compact_min_extents` extents and more than
`compact_ratio` times the extents its size needs) has its sealed bytes copied back into
staging, where the sealer cuts them afresh; the old chunks lose their references.

The copy is taken while no seal round is in flight and checked on the trio thread against the extent
map just before it is written, so that bytes written or sealed meanwhile always win.
"""

from __future__ import annotations

import logging
import time

import trio

from tierfs.crashpoints import crash_point
from tierfs.data.extents import Extent
from tierfs.data.reader import ChunkPiece, FileReader
from tierfs.data.sealer import Sealer

log = logging.getLogger(__name__)


class Compactor:
    def __init__(
        self, sealer: Sealer, reader: FileReader, min_extents: int, ratio: float, avg_chunk: int
    ) -> None:
        self.sealer = sealer
        self.reader = reader
        self.ns = sealer.ns
        self.min_extents = min_extents
        self.ratio = ratio
        self.avg_chunk = avg_chunk
        self.compacted = 0

    def is_fragmented(self, ino: int) -> bool:
        inode = self.ns.store.get_inode(ino)
        if inode is None or not inode.is_reg or inode.nlink == 0:
            return False
        count = self.sealer.extents.count(ino)
        needed = max(1, inode.data_bytes // self.avg_chunk)
        return count > self.min_extents and count > self.ratio * needed

    async def run(self) -> None:
        """Look at the files the sealer touched partially, and compact fragmented ones."""
        while True:
            await trio.sleep(1.0)
            candidates = self.sealer.partial_inodes
            self.sealer.partial_inodes = set()
            for ino in candidates:
                try:
                    if self.is_fragmented(ino):
                        await self.compact(ino)
                except Exception:
                    log.exception("inode %d: compaction failed; the file is unchanged", ino)

    async def compact(self, ino: int) -> None:
        """Copy the file's sealed bytes back into staging, for the sealer to cut afresh.

        The copy is made durable (fsync) before any of it is marked as staged: staged ranges
        commit with the next group commit, and they must never point at bytes a power loss
        could take, while the extents they shadow held durable data.
        """
        async with self.sealer.exclusive():
            extents = list(self.sealer.extents.overlapping(ino, 0, 1 << 63))
            plaintexts = await self._load(ino, extents)
            self.ns.staging.acquire(ino)
            try:
                written = self._copy(ino, extents, plaintexts)
                async with self.sealer.durability.sync_lock:
                    work = self.ns.staging.take_sync_work(ino)
                    await trio.to_thread.run_sync(work.run, limiter=self.sealer.io_limiter)
                copied = self._mark(ino, written)
            finally:
                self.ns.staging.release(ino)
        crash_point("compact-after-restage")
        self.ns.closed_at[ino] = time.monotonic() - 3600
        self.compacted += 1
        log.info("inode %d: compacting %d extents (%d bytes restaged)", ino, len(extents), copied)

    async def _load(self, ino: int, extents: list[Extent]) -> dict[bytes, bytes | memoryview]:
        out: dict[bytes, bytes | memoryview] = {}
        for ext in extents:
            if ext.chunk_id in out:
                continue
            record = self.sealer.chunks.get(ext.chunk_id)
            hot = record.hot_location() if record else None
            if record is None or hot is None:
                continue
            piece = ChunkPiece(0, 0, ext.chunk_id, 0, hot[0], hot[1], record.frame_len)
            with self.sealer.chunks.pin(hot[0], hot[1]):
                out[ext.chunk_id] = await self.reader.chunk_data(ino, piece)
        return out

    def _current(self, ino: int) -> set[Extent]:
        return set(self.sealer.extents.overlapping(ino, 0, 1 << 63))

    def _copy(
        self, ino: int, extents: list[Extent], plaintexts: dict[bytes, bytes | memoryview]
    ) -> list[Extent]:
        """Write still-current, unstaged extents' bytes into the staging file (no await)."""
        current = self._current(ino)
        staged = self.ns.staged_ranges(ino)
        written = []
        for ext in extents:
            data = plaintexts.get(ext.chunk_id)
            if data is None or ext not in current or staged.intersect(ext.file_off, ext.end):
                continue
            chunk_bytes = data[ext.chunk_off : ext.chunk_off + ext.length]
            self.ns.staging.write_unmarked(ino, ext.file_off, chunk_bytes)
            written.append(ext)
        return written

    def _mark(self, ino: int, written: list[Extent]) -> int:
        """Mark the durable copies as staged, where nothing changed them meanwhile."""
        current = self._current(ino)
        staged = self.ns.staged_ranges(ino)
        copied = 0
        for ext in written:
            if ext not in current or staged.intersect(ext.file_off, ext.end):
                continue
            self.ns.staging.mark(ino, ext.file_off, ext.end)
            copied += ext.length
        return copied
