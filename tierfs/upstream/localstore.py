"""The `file://` object store: one file per object under a directory.

Object names map one-to-one onto relative paths (`packs/ab/abcd` is `ROOT/packs/ab/abcd`), so
the directory is a plain mirror of what a bucket would hold and can be copied to one (or
back) with ordinary S3 tools. Fan-out is the job of the naming scheme, which is the same for
every backend; this module adds no hidden layout.

A name is written once: the bytes go to a temp file (`.tmp-PID-RANDOM`, a dot-name that no
object name can have) in the object's directory, which is fsynced and then hard-linked to the
name. `link()` fails with EEXIST instead of replacing, which `rename()` would do silently; on
EEXIST the existing content is compared. The directory is fsynced before `put` returns, and
so is each new directory's parent, so a put that returned survives a power cut. A crash
leaves at most a temp file, never a partial object under a name (`remove_stale_temps` cleans
them).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from tierfs.upstream.objectstore import (
    ObjectExists,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    ObjectTooLarge,
    StoreRefused,
    StoreSettings,
    StoreUnavailable,
    check_name,
    check_range,
    valid_name,
)

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700
_COMPARE_BLOCK = 1 << 20
_REFUSED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class LocalStore(ObjectStore):
    """Objects as files under `root` (see the module docstring)."""

    def __init__(self, root: Path, settings: StoreSettings, *, create: bool = False) -> None:
        self.root = root
        self.url = root.as_uri()
        self._max_bytes = settings.max_object_bytes
        # Directories whose entry in their parent is known to be durable.
        self._durable_dirs: set[Path] = set()
        if create:
            self._create_root()

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        if len(data) > self._max_bytes:
            raise ObjectTooLarge(self.url, name, len(data), self._max_bytes)
        try:
            self._make_durable_dirs(path.parent)
            tmp = _write_temp(path.parent, data)
            try:
                self._link(tmp, path, name, data)
            finally:
                _unlink_quietly(tmp)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self._os_error("put", name, exc) from exc

    def get(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(name)
        first, stop = check_range(start, end)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                last = size if stop is None else min(stop, size)
                return _pread_all(f.fileno(), first, last - first) if last > first else b""
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(name) from None
        except OSError as exc:
            raise self._os_error("get", name, exc) from exc

    def head(self, name: str) -> int | None:
        path = self._path(name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._check_root()
            return None
        except OSError as exc:
            raise self._os_error("head", name, exc) from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str = "") -> Iterator[str]:
        base = prefix.rpartition("/")[0]
        if base and not valid_name(base):
            return  # no valid name starts with it; never walk outside the root
        self._check_root()
        try:
            for name in _walk(self.root / base, base):
                if name.startswith(prefix):
                    yield name
        except OSError as exc:
            raise self._os_error("list", f"{prefix}*", exc) from exc

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._check_root()
            return
        except OSError as exc:
            raise self._os_error("delete", name, exc) from exc
        try:
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self._os_error("delete", name, exc) from exc

    def remove_stale_temps(self, max_age: float) -> int:
        """Remove temp files older than `max_age` seconds, left by puts that crashed.

        Only for recovery: a temp file younger than any put can take is still being written.
        """
        cutoff = time.time() - max_age
        removed = 0
        for directory, _dirs, files in os.walk(self.root):
            for file in files:
                path = Path(directory) / file
                if file.startswith(TEMP_PREFIX) and _mtime(path) < cutoff:
                    _unlink_quietly(path)
                    removed += 1
        if removed:
            log.info("regional store %s: removed %d stale temp files", self.url, removed)
        return removed

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _link(self, tmp: Path, path: Path, name: str, data: bytes) -> None:
        """Give the fsynced temp file its name, unless the name is taken."""
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not _same_content(path, data):
                raise ObjectExists(self.url, name, f"{len(data)} bytes differ") from None
            log.debug("regional store %s: %s already stored, identical", self.url, name)

    def _make_durable_dirs(self, directory: Path) -> None:
        """Create the missing directories down to `directory`, each entry made durable.

        Fsyncing the parent also when the directory already exists covers another thread
        that created it but has not fsynced yet; the cache keeps that to once per directory.
        """
        if directory in self._durable_dirs:
            return
        self._check_root()
        current = self.root
        for part in directory.relative_to(self.root).parts:
            child = current / part
            if child not in self._durable_dirs:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(child, DIR_MODE)
                _fsync_dir(current)
                self._durable_dirs.add(child)
            current = child

    def _create_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            _fsync_dir(self.root.parent)
        except OSError as exc:
            raise self._os_error("create", str(self.root), exc) from exc
        log.info("regional store %s: directory ready", self.url)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailable(
                f"regional store {self.url}: directory {self.root} is missing (not mounted?)"
            )

    def _missing(self, name: str) -> ObjectStoreError:
        self._check_root()
        return ObjectMissing(self.url, name)

    def _os_error(self, op: str, name: str, exc: OSError) -> ObjectStoreError:
        message = f"regional store {self.url}: {op} {name}: {exc.strerror or exc}"
        log.warning("%s", message)
        if exc.errno == errno.ENOENT:  # a directory removed behind our back: make it again
            self._durable_dirs.clear()
        if exc.errno in _REFUSED_ERRNOS:
            return StoreRefused(message)
        if exc.errno == errno.ENOENT and not self.root.is_dir():
            return StoreUnavailable(message)
        return ObjectStoreError(message)


def shares_filesystem(store_path: Path, data_dir: Path) -> bool:
    """Whether a local store lives on the same filesystem as the data directory.

    Then it protects against mistakes (a deleted file) but not against the loss of the disk,
    and `status` warns. Compares `st_dev` of the nearest existing ancestors, so a store
    directory not created yet is judged by where it would be. Btrfs subvolumes have their own
    `st_dev` and so count as separate (the warning errs on the quiet side there).
    """
    return _device(store_path) == _device(data_dir)


def _device(path: Path) -> int:
    current = path.absolute()
    while True:
        try:
            return os.stat(current).st_dev
        except FileNotFoundError:
            if current.parent == current:
                raise
            current = current.parent


def _walk(directory: Path, rel: str) -> Iterator[str]:
    """Object names under `directory` (whose name is `rel`), directory by directory, each in
    name order; temp files and foreign names are skipped."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        if not valid_name(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), name)
        elif entry.is_file(follow_symlinks=False):
            yield name


def _write_temp(directory: Path, data: bytes) -> Path:
    """Write `data` to a new fsynced temp file in `directory` and return its path."""
    tmp = directory / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _same_content(path: Path, data: bytes) -> bool:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != len(data):
            return False
        view = memoryview(data)
        for offset in range(0, len(data), _COMPARE_BLOCK):
            if f.read(_COMPARE_BLOCK) != view[offset : offset + _COMPARE_BLOCK]:
                return False
    return True


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
        length -= len(part)
    return b"".join(parts)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temp file %s: %s", path, exc)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
