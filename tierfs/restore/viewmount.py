"""`tierfs restore mount`: one snapshot as a read-only FUSE mount, data fetched on demand.

The process (`run`) opens the `Source` (a data directory or a regional store), picks and
verifies the snapshot, then serves a `SnapshotView` of its tree through `ViewOperations`
until it is unmounted or signalled. Data comes from `Source.fetch`, which blocks (disk or
network): it runs in worker threads under a limiter (`FETCHES_IN_FLIGHT`), so the FUSE
loop never waits on the network. The view keeps decoded directories, extent lists and
`chunk_cache_mb` of chunk plaintext in memory; the source keeps its own blob cache.

**How `tierfs umount` finds it.** `tierfs umount` knows a mount by its mountinfo entry
(fstype `fuse.tierfs`, source = a data directory), asks that directory's control socket to
`sync`, unmounts with `fusermount3 -u`, then waits for the directory's lock to be released.
A view has no data directory, so it makes a private run directory (`RUN_PREFIX` in the
temporary directory) that has just that shape: `lock` (flocked by the view process for its
life) and `run/control.sock` (answering `ping`, `sync` and `status`). The mount's source
(`fsname`) is that run directory, its subtype `tierfs`, so `tierfs umount MNT` works
unchanged; `fusermount3 -u MNT` works too. The run directory is removed at exit. Other
commands given the mount point (`status`, `snapshot`) say it is not a data directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from tierfs import control
from tierfs.daemon import READY_FD_ENV, ReadyPipe, check_mountpoint, unmount_on_signals
from tierfs.datadir import DataDir, MountLock
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.namespace import FsError
from tierfs.fs.operations import fuse_errors
from tierfs.restore.view import VIEW_SPAN, SnapshotView

log = logging.getLogger(__name__)

FETCHES_IN_FLIGHT = 8
CHUNK_CACHE_BYTES = 64 << 20  # chunk plaintext kept by the view: a chunk serves many reads
VIEW_BASE = (1 << 62) + VIEW_SPAN  # as the views of `.snapshots`; the root is FUSE's 1
RUN_PREFIX = "tierfs-restore-"


class ViewOperations(pyfuse3.Operations):
    """pyfuse3 handlers over one `SnapshotView` whose root is the mount's root (inode 1)."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, view: SnapshotView) -> None:
        super().__init__()
        self.view = view
        self.handles: dict[int, int] = {}
        self._next_fh = 1

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        if name == b".." and parent_inode == self.view.root_ino:
            name = b"."
        return await self.view.lookup_or_negative(parent_inode, name)

    @fuse_errors
    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.view.forget(ino, n)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return await self.view.getattr(inode)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.view.readlink(inode)

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        await self.view.opendir(inode)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for name, attrs, cookie in await self.view.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, attrs, cookie):
                self.view.forget(attrs.st_ino, 0)  # numbered for nothing
                break
            self.view.add_lookup(attrs.st_ino)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        await self.view.open(inode, flags)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = inode
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:  # type: ignore[override]
        return await self.view.read(self.handles[fh], off, size)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return await self.view.getxattr(inode, name)
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.view.listxattr(inode)

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        return self.view.statfs()

    # Every change: the mount is read-only (`ro` makes the kernel refuse most of them first).

    async def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = symlink = link = unlink = rmdir = rename = _refuse
    create = write = setxattr = removexattr = _refuse


def thread_fetch(fetch: Callable[[bytes], bytes], limit: int = FETCHES_IN_FLIGHT) -> Any:
    """An async fetch that runs a blocking `fetch` in worker threads, `limit` at a time."""
    limiter = trio.CapacityLimiter(limit)

    async def fetch_async(chunk_id: bytes) -> bytes:
        return await trio.to_thread.run_sync(fetch, chunk_id, limiter=limiter)

    return fetch_async


def make_run_dir() -> DataDir:
    """A private directory with the shape `tierfs umount` expects of a data directory."""
    root = Path(tempfile.mkdtemp(prefix=RUN_PREFIX))
    (root / "run").mkdir()
    return DataDir(root)


def fuse_options(run_dir: DataDir, extra: list[str]) -> set[str]:
    """Read-only, named after the run directory, `allow_other` when root mounts."""
    options = set(pyfuse3.default_options) | {"ro", f"fsname={run_dir.root}", "subtype=tierfs"}
    allow_other = os.geteuid() == 0
    for opt in extra:
        if opt == "noallow_other":
            allow_other = False
        elif opt in ("rw", "ro"):
            continue  # always read-only
        elif opt:
            options.add(opt)
    if allow_other:
        options.add("allow_other")
    return options


def setup_logging() -> None:
    """Log to stderr: the terminal with --foreground, the log file in the background."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)


def run(
    open_view: Callable[[], tuple[SnapshotView, Callable[[], None], str]],
    mountpoint: Path,
    options: list[str],
) -> None:
    """Mount the view `open_view()` gives (view, close function, description) at
    `mountpoint` and serve it until unmounted or signalled. Raises TierfsError before
    ready; the ready pipe (`TIERFS_READY_FD`) gets `OK` or `ERR CODE MESSAGE`."""
    ready = ReadyPipe(int(os.environ.pop(READY_FD_ENV, "-1")))
    setup_logging()
    run_dir = make_run_dir()
    lock = MountLock(run_dir)
    mounted = False
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        lock.acquire()
        check_mountpoint(mountpoint)
        view, close, what = open_view()
        ops = ViewOperations(view)
        opts = fuse_options(run_dir, options)
        try:
            pyfuse3.init(ops, str(mountpoint), opts)
        except RuntimeError as exc:
            raise TierfsError(
                f"{mountpoint}: FUSE mount failed: {exc}", ExitCode.MOUNT_FAILED
            ) from None
        mounted = True
        log.info("mounted %s read-only at %s (run directory %s)", what, mountpoint, run_dir.root)
        trio.run(_serve, view, run_dir, mountpoint, ready)
    except TierfsError as exc:
        log.error("restore mount failed: %s", exc.message)
        ready.report(f"ERR {int(exc.exit_code)} {exc.message}")
        raise
    except Exception as exc:
        log.exception("restore mount failed")
        ready.report(f"ERR {int(ExitCode.INTERNAL)} internal error: {exc!r}")
        raise
    finally:
        ready.close()
        if mounted:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
        with contextlib.suppress(Exception):
            close()
        lock.release()
        shutil.rmtree(run_dir.root, ignore_errors=True)
        log.info("restore view at %s stopped", mountpoint)


async def _serve(view: SnapshotView, run_dir: DataDir, mountpoint: Path, ready: ReadyPipe) -> None:
    async def nothing(request: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def ping(request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "mountpoint": str(mountpoint), "restore_view": True}

    handlers = {"ping": ping, "status": ping, "sync": nothing}
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, run_dir.control_socket, handlers)
        view.nursery = nursery  # read-ahead of sequential readers
        nursery.start_soon(unmount_on_signals)
        nursery.start_soon(_when_serving, mountpoint, ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _when_serving(mountpoint: Path, ready: ReadyPipe) -> None:
    """Report ready once the kernel has our INIT answer (a stat from a worker returns)."""
    with contextlib.suppress(OSError):
        await trio.to_thread.run_sync(os.stat, mountpoint)
    ready.report("OK")
