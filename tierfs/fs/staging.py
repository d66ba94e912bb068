"""Staging: the mutable, NVMe-resident bytes of files, one sparse file per inode.

Writes land here first. Each inode's staged ranges (the byte ranges that hold data written
since they were last sealed) are tracked in memory and written to the index with every group
commit, so a remount after a crash knows what is staged. Until the data path seals ranges into
chunks, every byte of a file lives in its staging file.

Staging files are named by inode number, and inode numbers are never reused, so a staging file
can never hold another file's bytes; files without an owning inode are removed at mount.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tierfs.crashpoints import crash_point
from tierfs.fs.ranges import RangeSet
from tierfs.osutil import bucketed_files, punch_hole

log = logging.getLogger(__name__)


class Staging:
    """Per-inode staging files under DATA_DIR/staging, with a shared fd per open inode."""

    def __init__(self, root: Path, reserve_bytes: int, max_bytes: int = 0) -> None:
        self.root = root
        self._root_str = str(root)
        self.reserve_bytes = reserve_bytes
        self.max_bytes = max_bytes
        self._total_checked = (0.0, 0)
        self._free_cache = (0.0, 0)
        self._fds: dict[int, int] = {}
        self._users: dict[int, int] = {}
        self.ranges: dict[int, RangeSet] = {}
        self.changed: set[int] = set()
        self.unsynced_dirs: set[Path] = set()
        self.unlinked_dirs: set[Path] = set()  # fsynced at unmount, see unlink_files
        self.unsynced_files: set[int] = set()
        self.dirty_since: dict[int, float] = {}
        self.touched: dict[int, list[RangeSet]] = {}
        self._deferred: dict[int, list[tuple[int, int, int]]] = {}
        self.generation: dict[int, int] = {}
        self.streams: dict[int, tuple[int, int]] = {}

    def path(self, ino: int, generation: int | None = None) -> Path:
        return Path(self.path_str(ino, generation))

    def path_str(self, ino: int, generation: int | None = None) -> str:
        """The staging file of an inode's current (or given) generation, as a string."""
        gen = self.generation.get(ino, 0) if generation is None else generation
        name = f"{ino:016x}" if gen == 0 else f"{ino:016x}.{gen}"
        return f"{self._root_str}/{ino & 0xFF:02x}/{name}"

    # -- fd management

    def acquire(self, ino: int) -> None:
        """An open handle uses the inode's staging file (opened at its first write)."""
        self._users[ino] = self._users.get(ino, 0) + 1

    def release(self, ino: int) -> None:
        """An open handle is done with the inode (a no-op for inodes that have no staging)."""
        if ino not in self._users:
            return
        users = self._users[ino] - 1
        if users:
            self._users[ino] = users
            return
        del self._users[ino]
        self.streams.pop(ino, None)
        fd = self._fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def _write_fd(self, ino: int) -> int:
        """The shared fd of an open inode's staging file, created on first use.

        Opening lazily means a file that is only read (or never written) costs no staging
        file at all.
        """
        fd = self._fds.get(ino)
        if fd is None:
            fd = self._fds[ino] = self._open(ino)
        return fd

    def _open(self, ino: int) -> int:
        """Open (creating if needed) the staging file: one syscall in the common case.

        Its directory is fsynced with the next sync either way; that costs one directory
        fsync per sync, and saves a failed open per created file.
        """
        path = self.path_str(ino)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.unsynced_dirs.add(self.root)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.unsynced_dirs.add(self.root / f"{ino & 0xFF:02x}")
        return fd

    def fd(self, ino: int) -> int | None:
        return self._fds.get(ino)

    # -- data

    def write(self, ino: int, offset: int, data: bytes) -> int:
        fd = self._write_fd(ino)
        self._check_space(len(data))
        written = os.pwrite(fd, data, offset)
        self._mark(ino, offset, offset + written)
        self._follow_stream(ino, offset, offset + written)
        self.unsynced_files.add(ino)
        return written

    def _follow_stream(self, ino: int, start: int, end: int) -> None:
        """Track each open file's current run of back-to-back writes: the sealer seals a
        long run behind its writer instead of waiting for the close."""
        run = self.streams.get(ino)
        self.streams[ino] = (run[0] if run is not None and run[1] == start else start, end)

    def write_unmarked(self, ino: int, offset: int, data: bytes | memoryview) -> None:
        """Write bytes that are not staged yet (compaction marks them once durable).

        A punch still pending from an earlier seal of the same range must not reach them
        between this write and the mark (the compaction awaits its fsync in between), so it
        is cancelled now, as a write's would be."""
        fd = self._write_fd(ino)
        self._check_space(len(data))
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            pos += os.pwrite(fd, view[pos:], offset + pos)
        self.unsynced_files.add(ino)
        self._cancel_punches(ino, offset, offset + len(data))

    def mark(self, ino: int, start: int, end: int) -> None:
        self._mark(ino, start, end)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(ino)
        if fd is not None:
            return os.pread(fd, size, offset)
        try:
            with open(self.path(ino), "rb") as f:
                return os.pread(f.fileno(), size, offset)
        except FileNotFoundError:
            return b""

    def truncate(self, ino: int, size: int, commit: int, shrink: bool) -> None:
        """The file is cut at `size`: its staged bytes beyond are forgotten.

        A crash before the commit that records the new size brings the old size back, so
        the old bytes must still be there, untouched by anything written after the cut. A
        shrinking cut therefore moves the file to a new staging generation (copying the
        staged bytes below `size`, none for the usual O_TRUNC); the old generation's file
        is removed once the cut is durable. A growing cut only frees blocks later.
        """
        if shrink and self._exists(ino):
            self._new_generation(ino, size, commit)
        else:
            self.defer_punch(commit, ino, size, 1 << 62)
        ranges = self.ranges.setdefault(ino, RangeSet())
        ranges.truncate(size)
        if not ranges:
            self.dirty_since.pop(ino, None)
        self._touch(ino, size, 1 << 63)
        self.changed.add(ino)
        self.unsynced_files.add(ino)

    def watch(self, ino: int) -> RangeSet:
        """Record from now on which bytes of `ino` change (the sealer's rounds in flight use
        this not to install chunks of bytes that were rewritten under them)."""
        touched = RangeSet()
        self.touched.setdefault(ino, []).append(touched)
        return touched

    def unwatch(self, ino: int, touched: RangeSet) -> None:
        watchers = [w for w in self.touched.get(ino, ()) if w is not touched]
        if watchers:
            self.touched[ino] = watchers
        else:
            self.touched.pop(ino, None)

    def _touch(self, ino: int, start: int, end: int) -> None:
        for touched in self.touched.get(ino, ()):
            touched.add(start, end)

    def _mark(self, ino: int, start: int, end: int) -> None:
        ranges = self.ranges.get(ino)
        if ranges is None:
            ranges = self.ranges[ino] = RangeSet()
        ranges.add(start, end)
        self.changed.add(ino)
        if ino not in self.dirty_since:
            self.dirty_since[ino] = time.monotonic()
        self._touch(ino, start, end)
        self._cancel_punches(ino, start, end)

    def unstage(self, ino: int, start: int, end: int) -> None:
        """[start, end) is sealed: it no longer lives in staging."""
        ranges = self.ranges.get(ino)
        if ranges is None:
            return
        ranges.remove(start, end)
        self.changed.add(ino)
        if not ranges:
            self.dirty_since.pop(ino, None)

    def _exists(self, ino: int) -> bool:
        return ino in self._fds or os.path.exists(self.path_str(ino))

    def _new_generation(self, ino: int, keep_below: int, commit: int) -> None:
        old_gen = self.generation.get(ino, 0)
        new_gen = old_gen + 1
        old_fd = self._fds.get(ino)
        src = old_fd if old_fd is not None else os.open(self.path_str(ino), os.O_RDONLY)
        new_path = self.path_str(ino, new_gen)
        dst = os.open(new_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            copied = 0
            for a, b in self.ranges.get(ino, RangeSet()).intersect(0, keep_below):
                _copy_range(src, dst, a, b - a)
                copied += b - a
            if copied:
                # The old file goes once the cut is durable; the copy must be by then.
                os.fsync(dst)
                self._fsync_dir(self.root / f"{ino & 0xFF:02x}")
        except BaseException:
            os.close(dst)
            raise
        finally:
            if old_fd is None:
                os.close(src)
        if old_fd is not None:
            os.close(old_fd)
            self._fds[ino] = dst
        else:
            os.close(dst)
        self.generation[ino] = new_gen
        self._deferred[ino] = [item for item in self._deferred.get(ino, []) if item[2] < 0] + [
            (commit, old_gen, _REMOVE_GENERATION)
        ]
        self.unsynced_dirs.add(self.root / f"{ino & 0xFF:02x}")

    def punch_pending(self, ino: int) -> bool:
        """Whether sealed bytes of `ino` wait for a durable commit to be punched."""
        return any(b >= 0 for _, _, b in self._deferred.get(ino, ()))

    def defer_punch(self, commit: int, ino: int, start: int, end: int) -> None:
        """Free [start, end) of the staging file once commit `commit` is durable."""
        self._deferred.setdefault(ino, []).append((commit, start, end))

    def _cancel_punches(self, ino: int, start: int, end: int) -> None:
        """New bytes were written to [start, end): no earlier punch may ever reach them.

        An earlier seal's punch can only run once that seal is durable, but the bytes
        written since belong to a later state: punching them before *that* is durable
        would lose them (e.g. fsynced, then sealed again, then killed before the commit).
        """
        items = self._deferred.get(ino)
        if not items or not any(b >= 0 and a < end and b > start for _, a, b in items):
            return
        kept = []
        for commit, a, b in items:
            if b < 0 or b <= start or a >= end:
                kept.append((commit, a, b))
                continue
            if a < start:
                kept.append((commit, a, start))
            if b > end:
                kept.append((commit, end, b))
        self._deferred[ino] = kept

    def release_durable(self, durable_commits: int) -> list[str]:
        """Carry out deferred punches whose commit is durable (trio thread), and return the
        staging files whose removal is now due, for `unlink_files`.

        Bytes staged again since are kept and adjacent ranges are punched as one (so blocks
        straddling two sealed chunks go too). An inode a seal round is reading may be
        punched too: a round reads only ranges that are still staged, and those are never
        punched. Punching a file that is being streamed soon after its bytes are sealed
        drops their dirty pages before the kernel writes them back, so they reach the disk
        once, as chunks.
        """
        unlinks: list[str] = []
        ready_inos = [
            ino
            for ino, items in self._deferred.items()
            if any(c < durable_commits for c, _, _ in items)
        ]
        if ready_inos:
            crash_point("punch-before")
        for ino in ready_inos:
            items = self._deferred.pop(ino)
            ready = [(a, b) for c, a, b in items if c < durable_commits]
            later = [(c, a, b) for c, a, b in items if c >= durable_commits]
            if later:
                self._deferred[ino] = later
            for gen, b in ready:
                if b == _REMOVE_GENERATION:
                    unlinks.append(self.path_str(ino, gen))
            removals = [gen for gen, b in ready if b == _REMOVE_FILE]
            if removals:
                unlinks.append(self.path_str(ino, removals[0]))
                self.generation.pop(ino, None)
                continue
            self._punch_unstaged(ino, RangeSet([(a, b) for a, b in ready if b >= 0]))
        return unlinks

    @classmethod
    def unlink_files(cls, paths: list[str]) -> set[Path]:
        """Remove staging files release_durable handed out; their buckets, which the trio
        thread keeps in `unlinked_dirs`. Runs in a worker thread: after many deletions these
        are thousands of unlinks, which must not stall the FUSE loop.

        The buckets are fsynced only at unmount, before the index is marked clean (a clean
        index skips the scan for stray files), not with the next fsync: a removal that a
        crash undoes leaves a file whose inode is gone or whose generation is not the
        committed one, and the recovery of an unclean mount removes exactly those. (Fsyncing
        the 256 buckets after 10,000 deletions cost the next application fsync 0.6 s.)
        Their names are never used again (an inode number, a generation)."""
        return {Path(os.path.dirname(path)) for path in paths if cls._unlink(path)}

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _unlink(path: str) -> bool:
        """Remove a staging file; False if there was none (it is opened lazily)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def _punch_unstaged(self, ino: int, todo: RangeSet) -> None:
        for a, b in todo.as_list():
            for x, y in self.ranges.get(ino, RangeSet()).intersect(a, b):
                todo.remove(x, y)
        fd = self._fds.get(ino)
        own = fd is None
        try:
            if own:
                fd = os.open(self.path_str(ino), os.O_RDWR | os.O_CLOEXEC)
            assert fd is not None
            size = os.fstat(fd).st_size
            for a, b in todo.as_list():
                if a < size:
                    punch_hole(fd, a, min(b, size) - a)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("inode %d: could not free staging bytes: %s", ino, exc)
        finally:
            if own and fd is not None:
                os.close(fd)

    def recent_total(self, max_age: float = 0.1) -> int:
        """staged_total(), recomputed at most every `max_age` seconds: it sums over every
        dirty inode, and writes and the sealer's schedule ask for it often."""
        when, total = self._total_checked
        now = time.monotonic()
        if now - when > max_age:
            total = self.staged_total()
            self._total_checked = (now, total)
        return total

    def staged_total(self) -> int:
        return sum(self.ranges[i].total() for i in self.dirty_since if i in self.ranges)

    def _check_space(self, size: int) -> None:
        if self.max_bytes > 0 and self.recent_total() + size > self.max_bytes:
            raise OSError(errno.ENOSPC, "staging limit reached")
        if self.reserve_bytes <= 0:
            return
        if self._free_space() - size < self.reserve_bytes:
            raise OSError(errno.ENOSPC, "staging reserve reached")
        self._free_cache = (self._free_cache[0], self._free_cache[1] - size)

    def _free_space(self) -> int:
        """Free bytes on the data directory's disk: statvfs at most every 0.1 s, and the
        bytes written since subtracted, so that a burst of writes cannot overshoot."""
        when, free = self._free_cache
        now = time.monotonic()
        if now - when > 0.1:
            st = os.statvfs(self.root)
            free = st.f_bavail * st.f_frsize
            self._free_cache = (now, free)
        return free

    def remove(self, ino: int, commit: int, generation: int) -> None:
        """Drop an inode's staged bytes; its file (of `generation`) goes once the deletion
        is durable."""
        self._deferred.setdefault(ino, []).append((commit, generation, _REMOVE_FILE))
        self.ranges.pop(ino, None)
        self.dirty_since.pop(ino, None)
        self.streams.pop(ino, None)
        self._touch(ino, 0, 1 << 63)
        self.changed.add(ino)
        self.unsynced_files.discard(ino)

    def allocated_bytes(self, ino: int) -> int:
        fd = self._fds.get(ino)
        try:
            st = os.fstat(fd) if fd is not None else os.stat(self.path(ino))
        except FileNotFoundError:
            return 0
        return st.st_blocks * 512

    # -- durability

    def take_sync_work(self, ino: int | None = None) -> SyncWork:
        """What must be fsynced to make `ino` (or every inode) durable; run it in a thread.

        Taken on the trio thread so that the bookkeeping sets are never touched by a worker;
        the work holds its own fds, so a concurrent close cannot pull one from under it.
        """
        inos = [ino] if ino is not None else list(self.unsynced_files)
        fds: list[int] = []
        paths: list[Path] = []
        for i in inos:
            if i not in self.unsynced_files:
                continue
            self.unsynced_files.discard(i)
            fd = self._fds.get(i)
            if fd is not None:
                fds.append(os.dup(fd))
            else:
                # Opened one at a time by the worker: a sync of every file written since
                # the last one (100,000 small files) must not hold an fd for each.
                paths.append(self.path(i))
        dirs = sorted(self.unsynced_dirs, key=lambda p: len(p.parts), reverse=True)
        self.unsynced_dirs.clear()
        return SyncWork(fds, dirs, paths)

    def take_changed(self) -> dict[int, list[tuple[int, int]] | None]:
        """Ranges of inodes changed since the last call, for the group commit (None: none)."""
        out: dict[int, list[tuple[int, int]] | None] = {}
        for ino in self.changed:
            ranges = self.ranges.get(ino)
            out[ino] = ranges.as_list() if ranges else None
        self.changed.clear()
        return out

    def all_files(self) -> Iterator[tuple[int, int, Path]]:
        """(inode, generation, path) of every staging file on disk (inode -1: not ours)."""
        for f in bucketed_files(self.root):
            ino_text, _, gen_text = f.name.partition(".")
            try:
                yield int(ino_text, 16), int(gen_text or "0"), f
            except ValueError:
                yield -1, 0, f

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._users.clear()


_REMOVE_FILE = -1
_REMOVE_GENERATION = -2


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy [offset, offset+length) between files at the same offset (in the kernel)."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
        if n == 0:
            break
        done += n


class SyncWork:
    """fsyncs of staging files and their directories, owned fds included (worker thread)."""

    def __init__(self, fds: list[int], dirs: list[Path], paths: list[Path] | None = None) -> None:
        self.fds = fds
        self.dirs = dirs
        self.paths = paths or []

    def run(self) -> None:
        try:
            for fd in self.fds:
                os.fsync(fd)
        finally:
            for fd in self.fds:
                os.close(fd)
        for path in self.paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # sealed and removed, or replaced by a new generation
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in self.dirs:
            try:
                dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
