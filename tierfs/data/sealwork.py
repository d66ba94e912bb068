"""The sealer's units of work and the steps that run in worker threads.

A `Batch` is what one seal round carries through the pipeline: the staged ranges it took
(`Job`s), the chunks they were cut into (`Piece`s), the frames of the new ones (`Encoded`)
and where those landed (`Placed`). Cutting, naming and encoding are pure functions of the
batch that run in worker threads; everything that touches the index stays on the trio
thread in `sealer.py`. Cutting is sequential (where a chunk ends depends on where the one
before it began); naming and encoding work on independent pieces, so the sealer splits
them over the CPU limiter's threads (`split_by_bytes`).

The staged bytes of a batch are read into an arena, one buffer reused across rounds:
allocating 64 MiB of fresh memory per round (zeroed and faulted in page by page) cost more
than cutting, naming and framing the same bytes together. Arenas are anonymous mmaps, not
bytearrays: a bytearray is zero-filled with the GIL held (65 MiB stalled the FUSE loop for
tens of milliseconds in the first rounds after a mount), while an mmap's pages are faulted
in by the pread that fills them, in a worker thread without the GIL.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from tierfs.data import frame
from tierfs.data.chunker import Chunker
from tierfs.fs.ranges import RangeSet
from tierfs.osutil import anonymous_memory

_ZEROS = bytes(1 << 20)


@dataclass
class Piece:
    """One chunk's worth of a staged range: where it sits in the file and its bytes."""

    file_off: int
    length: int
    chunk_id: bytes = b""
    data: bytes | memoryview = b""


@dataclass
class Job:
    """The ranges of one inode taken by a round, and the pieces they were cut into."""

    ino: int
    fixed: bool
    generation: int
    ranges: list[tuple[int, int, bool]]  # (start, end, ends the staged range)
    touched: RangeSet = field(default_factory=RangeSet)  # written since the take
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


@dataclass
class Batch:
    """One seal round on its way through the pipeline."""

    jobs: list[Job]
    arena: mmap.mmap | None  # made by the cutting worker when the pool has none to give
    new_ids: set[bytes] = field(default_factory=set)
    frames: list[Encoded] = field(default_factory=list)
    prepare_time: float = 0.0

    def pieces(self) -> list[Piece]:
        return [piece for job in self.jobs for piece in job.pieces]

    def pieces_to_store(self) -> list[Piece]:
        """One piece per chunk id the batch stores anew, in file order."""
        seen: set[bytes] = set()
        out = []
        for piece in self.pieces():
            if piece.chunk_id in self.new_ids and piece.chunk_id not in seen:
                seen.add(piece.chunk_id)
                out.append(piece)
        return out

    def drop_data(self) -> None:
        """Forget every view of the arena, so that it can be handed to the next round."""
        for job in self.jobs:
            job.pieces = [Piece(p.file_off, p.length, p.chunk_id) for p in job.pieces]
        self.frames = []


class ArenaPool:
    """Read buffers of one size, handed from round to round (trio thread only)."""

    def __init__(self, size: int, keep: int = 2) -> None:
        self.size = size
        self.keep = keep
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap | None:
        return self._free.pop() if self._free else None

    def give(self, arena: mmap.mmap | None) -> None:
        if arena is not None and len(arena) == self.size and len(self._free) < self.keep:
            self._free.append(arena)


def cut_batch(
    batch: Batch, chunker: Chunker, staging_path: Callable[[int, int], str], arena_size: int
) -> None:
    """Worker thread: read each job's staged bytes and cut them into pieces (not named yet).

    A range that does not end its staged run leaves its last chunk for a later round, so
    that a run split across rounds is cut where FastCDC would have cut it whole.
    """
    if batch.arena is None:
        batch.arena = anonymous_memory(arena_size)
    arena = memoryview(batch.arena)
    used = 0
    for job in batch.jobs:
        try:
            fd = os.open(staging_path(job.ino, job.generation), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            for start, end, final in job.ranges:
                size = end - start
                if used + size <= len(arena):
                    buf = arena[used : used + size]
                    used += size
                else:
                    buf = memoryview(anonymous_memory(size))
                _pread_into(fd, buf, start)
                cuts = list(chunker.cut(buf, job.fixed, start))
                if not final and len(cuts) > 1:
                    cuts.pop()
                for off, length in cuts:
                    job.pieces.append(Piece(start + off, length, data=buf[off : off + length]))
        finally:
            os.close(fd)


def name_pieces(pieces: list[Piece], chunker: Chunker) -> list[None]:
    """Worker thread: each piece's content id."""
    for piece in pieces:
        piece.chunk_id = chunker.content_id(piece.data)
    return []


def encode_pieces(pieces: list[Piece], level: int) -> list[Encoded]:
    """Worker thread: the frame (as parts) of each piece, in order."""
    out = []
    for piece in pieces:
        parts, codec = frame.encode_parts(piece.chunk_id, piece.data, level)
        size = sum(len(p) for p in parts)
        out.append(Encoded(piece.chunk_id, parts, size, piece.length, codec))
    return out


def split_by_bytes(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """`pieces` in at most `parts` consecutive runs of about equal bytes (none empty)."""
    total = sum(p.length for p in pieces)
    runs: list[list[Piece]] = [[]]
    share, done = total / max(parts, 1), 0
    for piece in pieces:
        if runs[-1] and done >= share * len(runs) and len(runs) < parts:
            runs.append([])
        runs[-1].append(piece)
        done += piece.length
    return [run for run in runs if run]


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `offset` of `fd`; bytes past the end of the file read as zeros (the
    buffer is reused, so they must be cleared)."""
    size = len(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    while done < size:
        step = min(size - done, len(_ZEROS))
        buf[done : done + step] = _ZEROS[:step]
        done += step
