"""Copying a snapshot's tree (or a part of it) out of a `Source` into a local directory.

What is restored: directories, regular files (holes stay holes: the file is sized with
`ftruncate` and only extents are written), symlinks, hard links (entries that share a
`link_id` are linked to the first one restored), FIFOs, sockets and device nodes (devices
need root), permission bits, owners (when run as root), mtimes (the tree keeps no atime: atime
is set to the mtime) and extended attributes. ctime cannot be set by anyone.

How, and why:

* **Streaming, in batches.** The tree is walked depth first; files are gathered into batches
  (at most `BATCH_FILES` files, `BATCH_BYTES` of data), so memory and open descriptors stay
  bounded whatever the snapshot's size. A batch's reads start as soon as it is full, while
  the walk goes on (at most `BATCHES_IN_FLIGHT` batches are being read). For a batch, the
  source turns the chunk ids into read jobs (upstream: one ranged GET per run of adjacent
  frames of a pack), which a thread pool runs; each worker writes the plaintext it got with
  `pwrite` into every file and offset that uses the chunk, so a chunk shared by many files
  is read once. The worker that writes a file's first piece creates it at its size:
  creating the batch's files before its reads start kept the store idle for as long as the
  creates took.
* **Resumable.** Data goes to `NAME.tierfs-partial`; once complete, the file gets its
  metadata and is renamed to NAME. A rerun skips a regular file that already has the
  snapshot's size and mtime (its metadata is applied again, which is cheap) and rewrites
  partial files from the start.
* **Verified.** The source checks every chunk and blob against its keyed content id. A chunk
  that fails makes the files that use it fail, each reported once with the chunk named;
  their partial files are removed and everything else is restored. The caller turns the
  failures into exit code 12 (a damaged chunk) or 10 (missing or unreachable).
* **Directories last.** A directory's mode and mtime are set after everything below it is
  written (post-order), so that a read-only directory can be filled and writing into it
  does not change its restored mtime.

Names in the tree are raw bytes; paths are handled as bytes end to end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tierfs.data.extents import Extent
from tierfs.errors import ExitCode, TierfsError
from tierfs.restore.region import Result
from tierfs.restore.source import Source
from tierfs.snap import tree as treemod
from tierfs.snap import treeformat as tf

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = b".tierfs-partial"
# A batch is planned as a whole: a pack's frames that fall into one batch are read in few
# GETs (the replicator packs chunks in the order the tree names them). Small enough that
# reads start early in a large tree (64 MiB against 1 GiB: 0.87 times the time on the restore
# benchmark); a pack shared by two batches is read by both, in parts.
BATCH_FILES = 10_000
BATCH_BYTES = 64 << 20
BATCHES_IN_FLIGHT = 2
MAX_OPEN = 128  # write descriptors kept open (files are written in pack order, not one by one)
USER_XATTR = b"user."
_WRITE_FLAGS = os.O_WRONLY | os.O_CLOEXEC


@dataclasses.dataclass
class Progress:
    """What is done so far; `total_bytes` is known for a whole snapshot only (0 otherwise)."""

    bytes_done: int = 0
    files_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    dirs: int = 0
    links: int = 0
    symlinks: int = 0
    others: int = 0
    total_bytes: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)


@dataclasses.dataclass
class Failure:
    """One path that could not be restored, and why."""

    path: str
    error: TierfsError


@dataclasses.dataclass
class ExtractResult:
    progress: Progress
    failures: list[Failure]
    warnings: list[str]

    @property
    def exit_code(self) -> ExitCode:
        """12 when any failure was a failed check, else 10 for missing data or I/O, else 0."""
        if not self.failures:
            return ExitCode.OK
        codes = {f.error.exit_code for f in self.failures}
        return ExitCode.VERIFY_FAILED if ExitCode.VERIFY_FAILED in codes else max(codes)


@dataclasses.dataclass(eq=False)
class _File:
    """A regular file being written in the current batch."""

    rel: bytes
    entry: tf.Entry
    final: bytes
    partial: bytes
    extents: list[Extent]
    pending: int = 0  # pieces not written yet
    error: TierfsError | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Batch:
    """A batch whose reads were started: its files, and the pool's futures of its jobs."""

    files: list[_File]
    futures: list[concurrent.futures.Future[None]]


@dataclasses.dataclass(frozen=True, slots=True)
class _Use:
    file: _File
    file_off: int
    chunk_off: int
    length: int


class Extractor:
    """One extraction of one tree into `dest` (see the module docstring)."""

    def __init__(
        self,
        source: Source,
        dest: Path,
        *,
        workers: int = 8,
        progress: Callable[[Progress], None] | None = None,
        on_failure: Callable[[Failure], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source
        self.dest = os.fsencode(dest.absolute())
        self.workers = workers
        self.report = progress or (lambda p: None)
        self.on_failure = on_failure or (lambda f: None)
        self.on_warning = on_warning or (lambda w: None)
        self.progress = Progress()
        self.failures: list[Failure] = []
        self.warnings: list[str] = []
        self.as_root = os.geteuid() == 0
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._batch: list[_File] = []
        self._in_flight: collections.deque[_Batch] = collections.deque()
        self._batch_bytes = 0
        self._links: dict[int, _File | bytes | None] = {}  # link_id -> first copy (path once done)
        self._later_links: list[tuple[bytes, int]] = []
        self._dirs: list[tuple[bytes, tf.Entry]] = []
        self._fds = _Fds(MAX_OPEN)

    # -- entry points

    def run(self, root_id: bytes, path: str = "", total_bytes: int = 0) -> ExtractResult:
        """Extract the subtree at `path` ("" for everything) of the tree `root_id`.

        A directory's contents go into DEST, which takes the directory's attributes; a
        file, symlink or other entry goes into DEST under its own name.
        """
        rel_path = os.fsencode(path).strip(b"/")
        top = self._find(root_id, rel_path)
        self.progress.total_bytes = total_bytes
        os.makedirs(self.dest, exist_ok=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        try:
            if top.type is tf.FileType.DIR:
                self._dirs.append((b"", top))
                for rel, entry in self._walk(top):
                    self._visit(rel, entry)
            else:
                self._visit(top.name, top)
            self._flush_batch()
            while self._in_flight:
                self._settle(self._in_flight.popleft())
        finally:
            # Ctrl-C: drop the queued reads instead of running them all before exiting.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._fds.close_all()
        self._make_later_links()
        self._finish_dirs()
        self.report(self.progress)
        return ExtractResult(self.progress, self.failures, self.warnings)

    def _find(self, root_id: bytes, rel_path: bytes) -> tf.Entry:
        """The entry at `rel_path` (b"" is the root directory)."""
        (entry,) = tf.decode_tree(self.source.fetch(root_id), tf.KIND_ROOT)
        walked = b""
        for name in (p for p in rel_path.split(b"/") if p):
            if entry.type is not tf.FileType.DIR:
                break
            children = tf.decode_tree(self.source.fetch(entry.tree_id), tf.KIND_DIR)
            found = next((c for c in children if c.name == name), None)
            if found is None:
                break
            entry, walked = found, walked + b"/" + name
        if walked.strip(b"/") != rel_path:
            raise TierfsError(
                f"no {os.fsdecode(rel_path)!r} in the snapshot (the path is relative to its root)",
                ExitCode.USAGE,
            )
        return entry

    # -- walking

    def _walk(self, top: tf.Entry) -> Iterator[tuple[bytes, tf.Entry]]:
        """(path relative to DEST, entry), parents before children, without recursion."""
        stack: list[tuple[bytes, tf.Entry]] = [(b"", top)]
        while stack:
            rel, entry = stack.pop()
            try:
                children = tf.decode_tree(self.source.fetch(entry.tree_id), tf.KIND_DIR)
            except TierfsError as exc:
                self._fail(rel + b"/", exc)
                continue
            self._prefetch(children)
            subdirs = []
            for child in children:
                child_rel = _join(rel, child.name)
                yield child_rel, child
                if child.type is tf.FileType.DIR:
                    subdirs.append((child_rel, child))
            stack.extend(reversed(subdirs))

    def _prefetch(self, children: list[tf.Entry]) -> None:
        """Read the subdirectories' and extent lists' blobs together: fewer requests."""
        ids = [c.tree_id for c in children if c.type is tf.FileType.DIR]
        ids += [r.blob_id for c in children for r in c.extent_lists]
        if len(ids) > 1:
            try:
                self.source.prefetch(ids)
            except TierfsError as exc:  # fetched (and reported) one by one later
                log.debug("prefetch failed: %s", exc)

    def _visit(self, rel: bytes, entry: tf.Entry) -> None:
        path = self._path(rel)
        try:
            if entry.type is tf.FileType.DIR:
                self._make_dir(path)
                self._dirs.append((rel, entry))
                self.progress.dirs += 1
            elif entry.type is tf.FileType.REG:
                self._file(rel, entry)
            elif entry.type is tf.FileType.SYMLINK:
                self._symlink(path, entry)
                self.progress.symlinks += 1
            else:
                self._special(path, entry)
                self.progress.others += 1
        except OSError as exc:
            self._fail(rel, TierfsError(f"cannot create: {exc.strerror}", ExitCode.IO))
        except TierfsError as exc:
            self._fail(rel, exc)

    def _path(self, rel: bytes) -> bytes:
        return _join(self.dest, rel) if rel else self.dest

    # -- regular files

    def _file(self, rel: bytes, entry: tf.Entry) -> None:
        if entry.link_id and entry.link_id in self._links:
            self._later_links.append((rel, entry.link_id))
            return
        final = self._path(rel)
        if _complete(final, entry):
            self._apply(final, entry, None)
            self.progress.files_skipped += 1
            if entry.link_id:
                self._links[entry.link_id] = final
            return
        _clear_for_file(final)
        extents = list(treemod.file_extents(self.source.fetch, entry))
        f = _File(rel, entry, final, _partial_name(final), extents)
        if entry.link_id:
            self._links[entry.link_id] = f
        self._batch.append(f)
        self._batch_bytes += _data_bytes(extents)
        if len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
            self._flush_batch()

    def _flush_batch(self) -> None:
        """Start writing the batch's files: every chunk read once, in pack order, by the
        pool; wait for the oldest batch when more than BATCHES_IN_FLIGHT are being read.

        A file is created at its size by the first write into it (holes are what is never
        written), or here when it has no data; a worker that writes a file's last piece
        finishes it (metadata, rename), so files complete, and count as done for a rerun,
        while the batch goes on."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        uses: dict[bytes, list[_Use]] = {}
        for f in batch:
            for x in f.extents:
                uses.setdefault(x.chunk_id, []).append(_Use(f, x.file_off, x.chunk_off, x.length))
                f.pending += 1
        for f in batch:
            if f.pending == 0:
                try:
                    _create_sized(f.partial, f.entry.size)
                except OSError as exc:
                    f.error = TierfsError(f"cannot write: {exc.strerror}", ExitCode.IO)
                self._finish_file(f)
        if not uses:
            return
        try:
            jobs = self.source.read_jobs(uses)
        except TierfsError as exc:  # the store cannot even be asked: those files fail
            jobs = [_failing(list(uses), exc)]
        futures = [self._pool.submit(self._run_job, job, uses) for job in jobs]
        self._in_flight.append(_Batch(batch, futures))
        while len(self._in_flight) > BATCHES_IN_FLIGHT:
            self._settle(self._in_flight.popleft())

    def _settle(self, started: _Batch) -> None:
        """Wait for a batch's reads; fail what no job answered for."""
        for future in concurrent.futures.as_completed(started.futures):
            future.result()
            self.report(self.progress)
        for f in started.files:  # a chunk no job answered for (a source's bug): never hang
            if f.pending:
                f.error = f.error or TierfsError("some chunks were never read", ExitCode.IO)
                f.pending = 0
                self._finish_file(f)

    def _run_job(self, job: Callable[[], list[Result]], uses: dict[bytes, list[_Use]]) -> None:
        """Worker: one read job, its chunks written wherever they are used."""
        try:
            results = job()
        except Exception as exc:  # a bug or an unexpected store error: fail, don't hang
            log.exception("read job failed")
            error = TierfsError(f"read failed: {exc}", ExitCode.IO)
            results = [(chunk_id, error) for chunk_id in uses]
        for chunk_id, result in results:
            for use in uses.get(chunk_id, ()):
                self._write(use, result)

    def _write(self, use: _Use, result: bytes | memoryview | TierfsError) -> None:
        """Worker: one piece of one file; the file's last piece finishes it."""
        f = use.file
        if isinstance(result, TierfsError):
            f.error = f.error or result
        elif f.error is None:
            data = memoryview(result)[use.chunk_off : use.chunk_off + use.length]
            if len(data) != use.length:
                f.error = TierfsError(
                    f"an extent reaches past the end of its chunk ({use.chunk_off}+{use.length})",
                    ExitCode.VERIFY_FAILED,
                )
            else:
                try:
                    self._fds.write(f.partial, data, use.file_off, f.entry.size)
                except OSError as exc:
                    f.error = TierfsError(f"cannot write: {exc.strerror}", ExitCode.IO)
        with self._lock:
            if f.error is None:
                self.progress.bytes_done += use.length
            f.pending -= 1
            last = f.pending == 0
        if last:
            self._finish_file(f)

    def _finish_file(self, f: _File) -> None:
        """Metadata, then the rename that marks the file complete; or clean up a failure."""
        self._fds.close(f.partial)
        if f.error is None:
            try:
                self._apply(f.partial, f.entry, None)
                os.rename(f.partial, f.final)
            except OSError as exc:
                f.error = TierfsError(f"cannot finish: {exc.strerror}", ExitCode.IO)
        with self._lock:
            if f.entry.link_id:
                self._links[f.entry.link_id] = f.final if f.error is None else None
            if f.error is None:
                self.progress.files_done += 1
                return
        _unlink_quietly(f.partial)
        self._fail(f.rel, f.error)

    # -- links, symlinks, specials, directories

    def _make_later_links(self) -> None:
        """The other names of hard-linked files, once their first copy is complete."""
        for rel, link_id in self._later_links:
            first = self._links.get(link_id)
            path = self._path(rel)
            if not isinstance(first, bytes):
                error = TierfsError("its hard-linked first name failed", ExitCode.IO)
                self._fail(rel, error)
                continue
            try:
                if _same_file(path, first):
                    continue
                _clear_for_file(path)
                os.link(first, path)
                self.progress.links += 1
            except OSError as exc:
                self._fail(rel, TierfsError(f"cannot link: {exc.strerror}", ExitCode.IO))

    def _make_dir(self, path: bytes) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise TierfsError("exists and is not a directory", ExitCode.IO) from None

    def _symlink(self, path: bytes, entry: tf.Entry) -> None:
        try:
            if os.readlink(path) == entry.target:
                self._apply(path, entry, None)
                return
        except OSError:
            pass
        _clear_for_file(path)
        os.symlink(entry.target, path)
        self._apply(path, entry, None)

    def _special(self, path: bytes, entry: tf.Entry) -> None:
        """A FIFO, socket or device node (devices need root: a warning otherwise)."""
        try:
            st = os.lstat(path)
            if stat.S_IFMT(st.st_mode) == entry.type.fmt and st.st_rdev == entry.rdev:
                self._apply(path, entry, None)
                return
        except FileNotFoundError:
            pass
        _clear_for_file(path)
        try:
            if entry.type is tf.FileType.FIFO:
                os.mkfifo(path, 0o600)
            else:
                os.mknod(path, entry.type.fmt | 0o600, entry.rdev)
        except PermissionError:
            self._warn(f"{_show(path)}: cannot create a {entry.type.name.lower()} (needs root)")
            return
        self._apply(path, entry, None)

    def _finish_dirs(self) -> None:
        """Directories' attributes, deepest first (writing into one changes its mtime)."""
        for rel, entry in sorted(self._dirs, key=lambda d: _depth(d[0]), reverse=True):
            try:
                self._apply(self._path(rel), entry, None)
            except OSError as exc:
                self._warn(f"{_show(self._path(rel))}: cannot set attributes: {exc.strerror}")

    # -- metadata

    def _apply(self, path: bytes, entry: tf.Entry, fd: int | None) -> None:
        """Owner (as root), mode (after chown, which clears setuid), xattrs, then times.

        Through `fd` when given (a file being written), else by path without following a
        symlink (a symlink's own owner and times; Linux has no symlink modes)."""
        is_link = entry.type is tf.FileType.SYMLINK
        times = (entry.mtime_ns, entry.mtime_ns)
        if fd is not None:
            if self.as_root:
                os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
            self._xattrs(path, fd, entry, follow=True)
            os.utime(fd, ns=times)
            return
        if self.as_root:
            os.chown(path, entry.uid, entry.gid, follow_symlinks=not is_link)
        if not is_link:
            os.chmod(path, entry.mode)
        self._xattrs(path, path, entry, follow=not is_link)
        os.utime(path, ns=times, follow_symlinks=not is_link)

    def _xattrs(self, path: bytes, target: int | bytes, entry: tf.Entry, follow: bool) -> None:
        """Set the entry's xattrs; drop `user.` ones it lacks (left from an earlier copy)."""
        wanted = dict(entry.xattrs)
        try:
            present = [os.fsencode(n) for n in _listxattr(target, follow)]
        except OSError:
            present = []
        for name in present:
            if name.startswith(USER_XATTR) and name not in wanted:
                try:
                    _removexattr(target, name, follow)
                except OSError as exc:
                    self._warn(f"{_show(path)}: cannot remove xattr {name!r}: {exc.strerror}")
        for name, value in entry.xattrs:
            try:
                _setxattr(target, name, value, follow)
            except OSError as exc:
                self._warn(f"{_show(path)}: cannot set xattr {os.fsdecode(name)}: {exc.strerror}")

    # -- reporting

    def _fail(self, rel: bytes, error: TierfsError) -> None:
        failure = Failure(_show(self._path(rel)), error)
        log.warning("restore failed for %s: %s", failure.path, error.message)
        with self._report_lock:  # workers report too
            self.failures.append(failure)
            self.progress.files_failed += 1
            self.on_failure(failure)

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        with self._report_lock:
            self.warnings.append(message)
            self.on_warning(message)


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _show(path: bytes) -> str:
    return path.decode(errors="replace")


def _data_bytes(extents: Iterator[Extent] | list[Extent] | tuple[Extent, ...]) -> int:
    return sum(x.length for x in extents)


def _partial_name(final: bytes) -> bytes:
    """`NAME.tierfs-partial`, or a hashed name when NAME is too long to take the suffix."""
    parent, _, name = final.rpartition(b"/")
    if len(name) + len(PARTIAL_SUFFIX) <= 255:
        return final + PARTIAL_SUFFIX
    digest = hashlib.sha256(name).hexdigest()[:32].encode()
    return parent + b"/.tierfs-partial-" + digest


def _complete(path: bytes, entry: tf.Entry) -> bool:
    """A regular file of the snapshot's size and mtime: done by an earlier run."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode) and st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns
    )


def _same_file(path: bytes, other: bytes) -> bool:
    try:
        a, b = os.lstat(path), os.lstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _clear_for_file(path: bytes) -> None:
    """Make room for a non-directory at `path`: remove a file there; refuse a directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise TierfsError("a directory is in the way", ExitCode.IO)
    os.unlink(path)


def _unlink_quietly(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", _show(path), exc)


def _create_sized(path: bytes, size: int) -> None:
    """An empty file of `size` bytes, all hole: only extents get written."""
    fd = os.open(path, _WRITE_FLAGS | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _failing(chunk_ids: list[bytes], error: TierfsError) -> Callable[[], list[Result]]:
    return lambda: [(c, error) for c in chunk_ids]


class _Fds:
    """Write descriptors by path, opened on demand, at most `max_open` kept (LRU).

    The first write to a path creates the file at its size (truncating what an earlier run
    left); it is reopened as it is after an eviction, until `close` says it is done. A
    descriptor is closed only when no thread is writing through it, so that its number
    cannot be reused under a pwrite."""

    def __init__(self, max_open: int) -> None:
        self._max = max_open
        self._fds: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._busy: collections.Counter[bytes] = collections.Counter()
        self._created: set[bytes] = set()
        self._lock = threading.Lock()

    def write(self, path: bytes, data: memoryview, offset: int, size: int) -> None:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = self._open(path, size)
            self._fds.move_to_end(path)
            self._busy[path] += 1
        try:
            _pwrite_all(fd, data, offset)
        finally:
            with self._lock:
                self._busy[path] -= 1
                if not self._busy[path]:
                    del self._busy[path]
                self._evict()

    def _open(self, path: bytes, size: int) -> int:
        if path in self._created:
            return os.open(path, _WRITE_FLAGS)
        fd = os.open(path, _WRITE_FLAGS | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        self._created.add(path)
        return fd

    def close(self, path: bytes) -> None:
        """The file is done (finished or failed): its descriptor goes, if no write holds it."""
        with self._lock:
            self._created.discard(path)
            fd = self._fds.pop(path, None) if path not in self._busy else None
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), collections.OrderedDict()
        for fd in fds:
            os.close(fd)

    def _evict(self) -> None:
        idle = [p for p in self._fds if p not in self._busy]
        for path in idle[: max(0, len(self._fds) - self._max)]:
            os.close(self._fds.pop(path))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _depth(rel: bytes) -> int:
    return rel.count(b"/") + 1 if rel else 0


def _listxattr(target: int | bytes, follow: bool) -> list[str]:
    if isinstance(target, int):
        return os.listxattr(target)
    return os.listxattr(target, follow_symlinks=follow)


def _setxattr(target: int | bytes, name: bytes, value: bytes, follow: bool) -> None:
    if isinstance(target, int):
        os.setxattr(target, name, value)
    else:
        os.setxattr(target, name, value, follow_symlinks=follow)


def _removexattr(target: int | bytes, name: bytes, follow: bool) -> None:
    if isinstance(target, int):
        os.removexattr(target, name)
    else:
        os.removexattr(target, name, follow_symlinks=follow)
