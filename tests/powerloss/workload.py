"""File operations on a mounted filesystem, each recorded in the model so that a crash at any
moment (even in the middle of one) leaves a state the model allows.

The rule of every operation: what the crash may keep is added to the model *before* the system
call (the new bytes, the new name, the possible absence), what became certain is recorded only
*after* it returned (fsync: the bytes are durable; fsync of the directory: the names are).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from tests.conftest import run_cli

from .model import FileModel, Model, pattern

P = ParamSpec("P")
R = TypeVar("R")

# What a process sees once the FUSE daemon behind a mount is gone.
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})

KiB = 1024
MiB = 1024 * KiB
MAX_FILE_SIZE = 256 * KiB
MAX_FILES = 40
COMPACTION_TIMEOUT = 20.0


class FilesystemGone(Exception):
    """The filesystem stopped answering: its daemon died (or the power was cut)."""


class Client:
    """Runs operations against `directory` and records them in `model`.

    `power_cut` is set by whoever cuts the power: after that, any error (a dead disk makes
    tierfs answer EIO) means the filesystem is gone, not that it misbehaved.
    """

    def __init__(self, directory: Path, model: Model, power_cut: threading.Event) -> None:
        self.dir = directory
        self.model = model
        self.power_cut = power_cut

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno in DEAD_MOUNT_ERRNOS or self.power_cut.is_set():
                raise FilesystemGone(str(exc)) from exc
            raise

    def path(self, f: FileModel) -> Path:
        assert f.name is not None, f"{f.key} has no name"
        return self.dir / f.name

    # -- operations -------------------------------------------------------------------------

    def create(self, prefix: str) -> FileModel:
        f = self.model.new_file(prefix)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        f.fd = self.call(os.open, self.path(f), flags, 0o644)
        f.ino = self.call(os.fstat, f.fd).st_ino
        return f

    def write(self, f: FileModel, size: int) -> None:
        """Append `size` bytes of the file's pattern."""
        gen = f.current
        offset = len(gen.data)
        chunk = pattern(f.key, gen.number, offset, size)
        gen.data += chunk
        fd = self.handle(f)
        done = 0
        while done < size:
            # A write cut short (by a daemon that died under it) reports what it did write;
            # the rest then fails with the error.
            done += self.call(os.pwrite, fd, chunk[done:], offset + done)

    def rewrite(self, f: FileModel, offset: int, size: int) -> None:
        """Write bytes the file already holds once more, in place. The content stays the same
        (so every crash state is known), but tierfs stages the range again over what it had
        sealed: extents split, partial seals, compaction."""
        data = bytes(f.current.data[offset : offset + size])
        fd = self.handle(f)
        done = 0
        while done < len(data):
            done += self.call(os.pwrite, fd, data[done:], offset + done)

    def fsync(self, f: FileModel) -> None:
        length = len(f.current.data)
        self.call(os.fsync, self.handle(f))
        f.current.durable = length
        f.durable_generation = len(f.generations) - 1

    def fsync_dir(self) -> None:
        fd = self.call(os.open, self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.call(os.fsync, fd)
        finally:
            os.close(fd)
        self.model.directory_synced()

    def rename(self, f: FileModel, new: str) -> None:
        """Rename to `new`, replacing the file there if any (or that may be there)."""
        displaced = [
            g
            for g in self.model.files
            if g is not f and (g.name == new or (g.uncertain and new in g.locations))
        ]
        f.locations.add(new)
        for g in displaced:
            g.locations.add(None)
        self.call(os.rename, self.path(f), self.dir / new)
        f.name = new
        for g in displaced:
            if g.name == new:
                g.name = None

    def unlink(self, f: FileModel) -> None:
        f.locations.add(None)
        self.call(os.unlink, self.path(f))
        f.name = None

    def truncate(self, f: FileModel) -> None:
        """Open with O_TRUNC (the handle replaces the file's open one): a new generation."""
        f.new_generation()
        fd = self.call(os.open, self.path(f), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        old, f.fd = f.fd, fd
        if old is not None:
            self.call(os.close, old)

    def close(self, f: FileModel) -> None:
        if f.fd is not None:
            fd, f.fd = f.fd, None
            self.call(os.close, fd)

    def close_all(self) -> None:
        """After a crash: drop every handle (closing a dead mount's file may fail)."""
        for f in self.model.files:
            if f.fd is not None:
                fd, f.fd = f.fd, None
                try:
                    os.close(fd)
                except OSError as exc:
                    if exc.errno not in DEAD_MOUNT_ERRNOS:
                        raise

    # -- tierfs control requests ------------------------------------------------------------

    def seal_all(self) -> None:
        """`tierfs flush`: seal every staged byte into chunks now."""
        self.tierfs("flush", self.dir)

    def migrate_all(self) -> None:
        """`tierfs migrate --now`: every chunk with a hot copy goes to the cold tier."""
        self.tierfs("migrate", self.dir, "--now")

    def snapshot(self) -> str:
        """`tierfs snapshot create`: returns the new snapshot's id."""
        return self.tierfs("snapshot", "create", self.dir).stdout.strip()

    def sync_upstream(self) -> None:
        """`tierfs sync --wait`: every snapshot sent to the regional store."""
        self.tierfs("sync", self.dir, "--wait", "--timeout", "60")

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.tierfs("snapshot", "delete", self.dir, snapshot_id)

    def wait_for_reaping(self) -> None:
        """Until the daemon has reaped what deleted snapshots held."""
        deadline = time.monotonic() + COMPACTION_TIMEOUT
        while self.daemon_status()["snapshots"]["dead_trees"]:
            assert time.monotonic() < deadline, f"no reaping in {COMPACTION_TIMEOUT:g}s"
            time.sleep(0.1)

    def reclaim(self) -> None:
        """`tierfs zones --reclaim`: reset empty zones, relocate the live records of dirty ones."""
        self.tierfs("zones", self.dir, "--reclaim")

    def wait_for_compaction(self) -> None:
        """Until the daemon has compacted a file since it was mounted."""
        deadline = time.monotonic() + COMPACTION_TIMEOUT
        while self.daemon_status()["seal"]["compactions"] < 1:
            assert time.monotonic() < deadline, f"no compaction in {COMPACTION_TIMEOUT:g}s"
            time.sleep(0.1)

    def daemon_status(self) -> dict[str, Any]:
        """The daemon's status document (a status read from the disk has no `seal` part)."""
        doc: dict[str, Any] = json.loads(self.tierfs("status", self.dir, "--json").stdout)
        if "seal" not in doc and self._mount_dies():
            raise FilesystemGone("the daemon did not answer status")
        return doc

    def tierfs(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """Run a tierfs command; its failure because the daemon died means the filesystem is
        gone, any other failure is the test's."""
        result = run_cli(*args, check=False)
        if result.returncode == 0:
            return result
        if self.power_cut.is_set() or self._mount_dies():
            raise FilesystemGone(result.stderr.strip())
        raise AssertionError(f"tierfs {args[0]} exited {result.returncode}: {result.stderr}")

    def _mount_dies(self, timeout: float = 5.0) -> bool:
        """Whether the mount is dead, or dies within `timeout` (a command can notice the dying
        daemon a moment before the kernel does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.statvfs(self.dir)  # always asks the daemon (stat may be answered by a cache)
            except OSError as exc:
                if exc.errno in DEAD_MOUNT_ERRNOS:
                    return True
                raise
            time.sleep(0.05)
        return False

    def handle(self, f: FileModel) -> int:
        """The file's open handle, opened for writing if it has none."""
        if f.fd is None:
            f.fd = self.call(os.open, self.path(f), os.O_WRONLY | os.O_CLOEXEC)
        return f.fd


def run_until_gone(work: Callable[[], None]) -> bool:
    """Run `work`; True if it finished, False if the filesystem went away under it."""
    try:
        work()
    except FilesystemGone:
        return False
    return True


# -- the scripted workload of the crash-point tests ----------------------------------------


@dataclass
class Durables:
    """The durable files `before_crash` leaves for `reach_every_point` to change."""

    keep: FileModel
    victim: FileModel
    moved: FileModel
    replaced: FileModel


def before_crash(c: Client) -> Durables:
    """Durable files (some to be unlinked, renamed or replaced later), a file unlinked while
    open (an orphan at the crash), and a file never fsynced."""
    d = Durables(*(c.create(prefix) for prefix in ("keep", "victim", "moved", "replaced")))
    for f, size in (
        (d.keep, 40 * KiB),
        (d.victim, 24 * KiB),
        (d.moved, 8 * KiB),
        (d.replaced, 30 * KiB),
    ):
        c.write(f, size)
        c.write(f, 1000)
        c.fsync(f)
        c.close(f)
    c.fsync_dir()
    orphan = c.create("orphan")
    c.write(orphan, 20 * KiB)
    c.fsync(orphan)
    c.unlink(orphan)
    c.fsync_dir()
    loose = c.create("loose")
    c.write(loose, 50 * KiB)
    return d


def reach_every_point(c: Client, durables: Durables) -> None:
    """Reaches every crash point of the daemon that a client can reach, in this order:
    write-after-staging, rename-after, fsync-after-data, commit-before, commit-after,
    fsync-after-commit, punch-before (once the unlink is durable, soon after that first
    fsync), unlink-open-after, seal-after-append, seal-after-install, compact-after-restage
    (with commits only on fsync, the first commit is the first fsync's), cold-after-append,
    reclaim-after-relocate, reclaim-before-reset, snapshot-after-capture, snapshot-after-install,
    upload-after-pack, upload-before-manifest, reap-after-tree. Before the first
    commit it unlinks, truncates and renames durable files, so a crash there must bring back
    their fsynced bytes. Compaction needs `seal.compact_min_extents = 1` and
    `seal.compact_ratio = 1.0`; relocation needs a small zone device (`COLD_SMALL`) whose
    reserve leaves fewer free zones than reclaim's low mark once the data migrated."""
    c.unlink(durables.victim)
    c.truncate(durables.keep)
    c.write(durables.keep, 4 * KiB)
    c.rename(durables.moved, c.model.fresh_name(durables.moved))
    synced = c.create("synced")
    for size in (64 * KiB, 64 * KiB, 3000):
        c.write(synced, size)
    c.fsync(synced)
    c.fsync_dir()
    orphan = c.create("orphan")
    c.write(orphan, 12 * KiB)
    c.fsync(orphan)
    c.unlink(orphan)
    c.fsync_dir()
    tmp = c.create("tmp")
    c.write(tmp, 10 * KiB)
    c.fsync(tmp)
    c.close(tmp)
    assert durables.replaced.name is not None
    c.rename(tmp, durables.replaced.name)
    c.fsync_dir()
    loose = c.create("loose")
    c.write(loose, 33 * KiB)
    c.seal_all()
    c.rewrite(synced, 1000, 100)
    c.close(synced)
    c.seal_all()
    c.wait_for_compaction()
    reach_cold_points(c)
    reach_snapshot_points(c)


def reach_cold_points(c: Client) -> None:
    """Two files' chunks migrate mixed together (in chunk id order) into 4 MiB zones; with
    one deleted, the full zones are mostly garbage: reclaim relocates their live records
    and, once that is durable, resets them."""
    doomed, kept = c.create("doomed"), c.create("kept")
    for f in (doomed, kept):
        c.write(f, 4 * MiB)
        c.fsync(f)
        c.close(f)
    c.seal_all()
    c.migrate_all()
    c.unlink(doomed)
    c.fsync_dir()
    c.reclaim()


def reach_snapshot_points(c: Client) -> None:
    """A snapshot while a file is being deleted (its chunks are held until the tree is
    stored), a second one, both sent to the regional store (packs, then the manifest), then
    the first deleted: its tree blobs are reaped."""
    held = c.create("held")
    c.write(held, 300 * KiB)
    c.fsync(held)
    c.close(held)
    first = c.snapshot()
    c.unlink(held)
    c.fsync_dir()
    c.snapshot()
    c.sync_upstream()
    c.delete_snapshot(first)
    c.wait_for_reaping()


# -- the random workload --------------------------------------------------------------------


class RandomWorkload:
    """Random operations until the filesystem goes away or `max_ops` ran.

    The sequence depends only on the seed of `rng`; where a kill lands in it depends on timing.
    """

    def __init__(self, client: Client, rng: random.Random, max_ops: int = 5000) -> None:
        self.c = client
        self.rng = rng
        self.max_ops = max_ops

    def run(self) -> None:
        ops: list[tuple[int, Callable[[], None]]] = [
            (6, self.create),
            (8, self.append),
            (4, self.fsync),
            (2, self.fsync_dir),
            (2, self.rename),
            (1, self.replace),
            (2, self.unlink),
            (1, self.unlink_open),
            (1, self.truncate),
            (2, self.rewrite),
            (2, self.close),
        ]
        weights = [w for w, _ in ops]
        for _ in range(self.max_ops):
            op = self.rng.choices([fn for _, fn in ops], weights)[0]
            op()

    def _size(self) -> int:
        return self.rng.choice([1, 100, 4095, 4096, 10_000, 64 * KiB, 100_000])

    def _pick(self) -> FileModel | None:
        present = self.c.model.present()
        return self.rng.choice(present) if present else None

    def create(self) -> None:
        if len(self.c.model.present()) >= MAX_FILES:
            self.unlink()
            return
        f = self.c.create("r")
        self.c.write(f, self._size())

    def append(self) -> None:
        f = self._pick()
        if f is not None and len(f.current.data) < MAX_FILE_SIZE:
            self.c.write(f, self._size())

    def fsync(self) -> None:
        f = self._pick()
        if f is not None:
            self.c.fsync(f)

    def fsync_dir(self) -> None:
        self.c.fsync_dir()

    def rename(self) -> None:
        f = self._pick()
        if f is not None:
            self.c.rename(f, self.c.model.fresh_name(f))

    def replace(self) -> None:
        src, dst = self._pick(), self._pick()
        if src is not None and dst is not None and src is not dst:
            assert dst.name is not None
            self.c.rename(src, dst.name)

    def unlink(self) -> None:
        f = self._pick()
        if f is not None:
            self.c.close(f)
            self.c.unlink(f)

    def unlink_open(self) -> None:
        f = self._pick()
        if f is not None:
            self.c.handle(f)
            self.c.unlink(f)

    def truncate(self) -> None:
        f = self._pick()
        if f is not None:
            self.c.truncate(f)
            self.c.write(f, self._size())

    def rewrite(self) -> None:
        f = self._pick()
        if f is not None and f.current.data:
            offset = self.rng.randrange(len(f.current.data))
            self.c.rewrite(f, offset, self._size())

    def close(self) -> None:
        f = self._pick()
        if f is not None:
            self.c.close(f)
