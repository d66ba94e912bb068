"""The hot tier: chunk frames appended to segment files on the data directory.

Why segments and not a file per chunk: a small file must not cost extra disk creates, so many
frames share one append-only file (DATA_DIR/hot/XX/SSSSSSSSSSSSSSSS.seg, at most
`segment_bytes` long). A freed frame's whole 4 KiB blocks are punched out at once
(fallocate PUNCH_HOLE), so space returns without rewriting the segment; a segment with no
live frame left is deleted.

Ownership: the index (DB_SEGMENTS) says how far each segment is committed (`end`); bytes
beyond it are leftovers of an append whose commit never happened and are cut at mount.
Appends and syncs run in worker threads under the sealer's lock (one appender at a time);
the bookkeeping (`tail`) is only read and written by the trio thread.

Large appends bypass the page cache (O_DIRECT, from one reused aligned buffer): a seal round
writes its frames once and never reads them back soon, and on this class of machine filling
the page cache costs the writer more CPU (page allocation, copying, writeback) than the disk
costs time. Such an append starts at a 4 KiB boundary and is padded with zeros to the next
one; small appends (a few files' worth) go through the page cache, unpadded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from tierfs.osutil import anonymous_memory, bucketed_files, punch_hole

log = logging.getLogger(__name__)

MAX_OPEN_SEGMENTS = 64
ALIGN = 4096  # direct I/O alignment: a multiple of any disk's logical block size
DIRECT_MIN = 1 << 20  # appends at least this large bypass the page cache


class HotStore:
    """Segment files under DATA_DIR/hot."""

    def __init__(self, root: Path, segment_bytes: int = 64 << 20) -> None:
        self.root = root
        self.segment_bytes = segment_bytes
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._fd_lock = threading.Lock()
        self._busy: dict[int, int] = {}
        self.active: int | None = None
        self.tail = 0
        self.direct = True  # cleared for good once the filesystem refuses O_DIRECT
        self._direct_buf: mmap.mmap | None = None

    def path(self, seg: int) -> Path:
        return self.root / f"{seg & 0xFF:02x}" / f"{seg:016x}.seg"

    # -- file handles (shared by worker threads)

    @contextlib.contextmanager
    def _using(self, seg: int, create: bool = False) -> Iterator[int]:
        """A cached fd of a segment, kept open while in use.

        The cache holds at most MAX_OPEN_SEGMENTS fds; an fd is only ever closed when no
        thread is using it, so that its number cannot be reused under a pread or a punch.
        """
        with self._fd_lock:
            fd = self._fds.get(seg)
            if fd is None:
                path = self.path(seg)
                flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
                if create:
                    path.parent.mkdir(parents=True, exist_ok=True)
                fd = self._fds[seg] = os.open(path, flags, 0o600)
            self._fds.move_to_end(seg)
            self._busy[seg] = self._busy.get(seg, 0) + 1
        try:
            yield fd
        finally:
            with self._fd_lock:
                self._busy[seg] -= 1
                if not self._busy[seg]:
                    del self._busy[seg]
                self._evict()

    def _evict(self) -> None:
        """Close the least recently used idle fds beyond the cap (lock held)."""
        idle = [s for s in self._fds if s not in self._busy and s != self.active]
        for seg in idle[: max(0, len(self._fds) - MAX_OPEN_SEGMENTS)]:
            os.close(self._fds.pop(seg))

    def _forget_fd(self, seg: int) -> None:
        with self._fd_lock:
            fd = self._fds.pop(seg, None) if seg not in self._busy else None
        if fd is not None:
            os.close(fd)

    # -- appending (worker thread, one appender at a time)

    def needs_new_segment(self, size: int) -> bool:
        end = self.place(size) + size
        return self.active is None or (self.tail > 0 and end > self.segment_bytes)

    def place(self, size: int) -> int:
        """Where an append of `size` bytes to the active segment starts: at the tail, or
        for a direct append at the next 4 KiB boundary (the gap holds no frame)."""
        if self.direct and size >= DIRECT_MIN:
            return _align_up(self.tail)
        return self.tail

    def start_segment(self, seg: int) -> None:
        """Make `seg` the active segment (its id was allocated in the index)."""
        self.active = seg
        self.tail = 0

    def resume(self, seg: int, end: int) -> None:
        """Continue appending to `seg` at its committed end (at mount)."""
        self.active = seg
        self.tail = end

    def append(self, seg: int, offset: int, parts: list[bytes | memoryview]) -> int:
        """Write `parts` back to back at `offset` of segment `seg` and fdatasync it; the
        segment's new end (past the padding of a direct append)."""
        size = sum(len(p) for p in parts)
        if self.direct and size >= DIRECT_MIN and offset % ALIGN == 0:
            end = self._append_direct(seg, offset, parts, size)
            if end is not None:
                return end
        with self._using(seg, create=True) as fd:
            _pwritev_all(fd, parts, offset)
            os.fdatasync(fd)
        return offset + size

    def _append_direct(
        self, seg: int, offset: int, parts: list[bytes | memoryview], size: int
    ) -> int | None:
        """The parts copied into the aligned buffer, zero-padded to ALIGN, written with
        O_DIRECT; None when the filesystem refuses direct I/O (then never tried again)."""
        padded = _align_up(size)
        buf = self._aligned_buffer(padded)
        _gather(buf, parts)
        buf[size:padded] = bytes(padded - size)
        path = self.path(seg)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("the hot tier's filesystem refuses O_DIRECT; appends use the page cache")
            self.direct = False
            return None
        try:
            view = memoryview(buf)
            done = 0
            while done < padded:
                done += os.pwrite(fd, view[done:padded], offset + done)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return offset + padded

    def _aligned_buffer(self, size: int) -> mmap.mmap:
        """The reused page-aligned buffer of direct appends, grown to `size` when needed."""
        if self._direct_buf is None or len(self._direct_buf) < size:
            if self._direct_buf is not None:
                self._direct_buf.close()
            self._direct_buf = anonymous_memory(_align_up(size, 1 << 20))
        return self._direct_buf

    def sync_new_segment_dirs(self, seg: int) -> None:
        """fsync the directories that name a new segment, so the file survives power loss."""
        for d in (self.path(seg).parent, self.root):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- reading and freeing

    def read(self, seg: int, offset: int, length: int) -> bytes:
        """The bytes of one frame (worker thread)."""
        with self._using(seg) as fd:
            return os.pread(fd, length, offset)

    def punch(self, seg: int, offset: int, length: int) -> None:
        """Give back the whole blocks of a dead frame (worker thread)."""
        try:
            with self._using(seg) as fd:
                punch_hole(fd, offset, length)
        except FileNotFoundError:
            return

    def give_back(self, seg: int, offset: int, length: int) -> None:
        """Free one dead frame, or (length -1) a whole empty segment; failures are logged."""
        try:
            if length < 0:
                self.delete(seg)
            else:
                self.punch(seg, offset, length)
        except OSError as exc:
            log.warning("segment %d: could not free %d bytes: %s", seg, length, exc)

    def delete(self, seg: int) -> None:
        self._forget_fd(seg)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(seg))

    def cut_to(self, seg: int, end: int) -> bool:
        """Cut a segment to its committed end; True if it was longer (crash leftover)."""
        path = self.path(seg)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size <= end:
            return False
        os.truncate(path, end)
        return True

    def all_segments(self) -> Iterator[tuple[int, Path]]:
        """(segment id, path) of every segment file (id -1: a file that is not ours)."""
        for f in bucketed_files(self.root):
            try:
                yield int(f.stem, 16), f
            except ValueError:
                yield -1, f

    def allocated_bytes(self) -> int:
        total = 0
        for _, path in self.all_segments():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_blocks * 512
        return total

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._direct_buf is not None:
            self._direct_buf.close()
            self._direct_buf = None


IOV_BATCH = 512


def _align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def _gather(buf: mmap.mmap, parts: list[bytes | memoryview]) -> None:
    """Copy `parts` back to back into `buf` without holding the GIL for the bulk of it.

    A slice assignment copies with the GIL held: 64 MiB of a seal round would stall the
    FUSE loop for tens of milliseconds. ctypes.memmove releases the GIL; it needs the
    source's address, which ctypes gives for writable buffers (raw payloads are views of
    the sealer's arena) and for bytes objects; anything else is copied by assignment.
    """
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    pos = 0
    for part in parts:
        view = memoryview(part).cast("B")
        n = len(view)
        if not n:
            continue
        if not view.readonly:
            ctypes.memmove(base + pos, ctypes.addressof(ctypes.c_char.from_buffer(view)), n)
        elif isinstance(part, bytes):
            ctypes.memmove(base + pos, part, n)
        else:
            buf[pos : pos + n] = view
        pos += n


def _pwritev_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """pwritev every part at `offset`, resuming after short writes."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        batch = views[:IOV_BATCH]
        done = os.pwritev(fd, batch, offset)
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if done:
            views[0] = views[0][done:]
