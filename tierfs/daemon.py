"""The mount daemon: one trio process serving FUSE plus its background tasks.

Start-up order matters and reads like the design:
lock the data directory -> load the config -> open the index -> recover crash leftovers ->
mount FUSE -> report ready -> serve (FUSE, committer, control socket) -> final commit ->
release the lock. `tierfs mount` runs this in a freshly started process (never a fork of a
process that has already set up trio or LMDB) and waits for the ready report.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from tierfs import config as config_mod
from tierfs import control, status
from tierfs.crashpoints import crash_point
from tierfs.datadir import FSTYPE, DataDir, MountLock
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.durability import Durability
from tierfs.fs.namespace import Namespace
from tierfs.fs.operations import TierfsOperations
from tierfs.fs.recovery import mark_clean, recover
from tierfs.fs.staging import Staging
from tierfs.meta.store import MetaStore

log = logging.getLogger(__name__)

READY_FD_ENV = "TIERFS_READY_FD"


@dataclass
class Daemon:
    data_dir: DataDir
    mountpoint: Path
    config: config_mod.Config
    store: MetaStore
    ns: Namespace
    durability: Durability
    ops: TierfsOperations

    async def handle_status(self, request: dict[str, Any]) -> dict[str, Any]:
        self.durability.commit()
        extra = {
            "mountpoint": str(self.mountpoint),
            "pid": os.getpid(),
            "metadata": {"commits": self.store.commits, "fsyncs": self.durability.fsyncs},
            "open_files": len(self.ops.handles),
        }
        return {"status": status.collect(self.data_dir, self.store, self.store.tx, True, extra)}

    async def handle_sync(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.durability.sync(None)
        return {}

    async def handle_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "mountpoint": str(self.mountpoint)}


def setup_logging(data_dir: DataDir, level: str, to_stderr: bool, site: str) -> None:
    data_dir.log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [site={site}] %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler: logging.Handler = logging.handlers.RotatingFileHandler(
        data_dir.log_file, maxBytes=16 << 20, backupCount=4
    )
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)


def fuse_options(data_dir: DataDir, config: config_mod.Config, extra: list[str]) -> set[str]:
    """FUSE mount options: ours, the config's, then the operator's -o (which win)."""
    options = set(pyfuse3.default_options)
    options |= {f"fsname={data_dir.root}", f"subtype={FSTYPE.split('.', 1)[1]}"}
    allow_other = config.get("mount", "allow_other") and os.geteuid() == 0
    for opt in extra:
        if opt == "noallow_other":
            allow_other = False
        elif opt == "allow_other":
            allow_other = True
        elif opt:
            options.add(opt)
    if allow_other:
        options.add("allow_other")
    return options


def open_daemon(data_dir: DataDir, mountpoint: Path, config: config_mod.Config) -> Daemon:
    store = MetaStore.open(
        data_dir.meta, preallocate_bytes=config.get("metadata", "preallocate_mb") << 20
    )
    staging = Staging(data_dir.staging, config.get("staging", "reserve_mb") << 20)
    ns = Namespace(store, staging, config.get("mount", "atime"))
    recover(ns)
    durability = Durability(
        ns,
        store,
        config.get("metadata", "commit_interval"),
        config.get("metadata", "max_batch_ops"),
        trio.CapacityLimiter(4),
    )
    ops = TierfsOperations(
        ns,
        durability,
        str(data_dir.root),
        config.get("mount", "attr_timeout"),
        config.get("mount", "entry_timeout"),
    )
    return Daemon(data_dir, mountpoint, config, store, ns, durability, ops)


def run(data_dir: DataDir, mountpoint: Path, options: list[str], foreground: bool) -> None:
    """Mount and serve until unmounted or signalled. Raises TierfsError before ready."""
    ready_fd = int(os.environ.pop(READY_FD_ENV, "-1"))
    lock = MountLock(data_dir)
    lock.acquire()
    mounted = False
    daemon: Daemon | None = None
    try:
        config = config_mod.load(data_dir.root)
        to_stderr = foreground and ready_fd < 0
        setup_logging(data_dir, config.get("log", "level"), to_stderr, config.site)
        _check_mountpoint(mountpoint)
        daemon = open_daemon(data_dir, mountpoint, config)
        opts = fuse_options(data_dir, config, options)
        try:
            pyfuse3.init(daemon.ops, str(mountpoint), opts)
        except RuntimeError as exc:
            raise TierfsError(
                f"{mountpoint}: FUSE mount failed: {exc}", ExitCode.MOUNT_FAILED
            ) from None
        mounted = True
        data_dir.pid_file.write_text(f"{os.getpid()}\n")
        log.info("mounted %s at %s (options %s)", data_dir.root, mountpoint, ",".join(sorted(opts)))
        trio.run(_serve, daemon, ready_fd)
    except TierfsError as exc:
        if ready_fd >= 0:
            _report(ready_fd, f"ERR {int(exc.exit_code)} {exc.message}")
            ready_fd = -1
        raise
    finally:
        if ready_fd >= 0:
            os.close(ready_fd)
        _shutdown(daemon, mounted)
        lock.release()


async def _serve(daemon: Daemon, ready_fd: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            control.serve,
            daemon.data_dir.control_socket,
            {
                "status": daemon.handle_status,
                "sync": daemon.handle_sync,
                "ping": daemon.handle_ping,
            },
        )
        nursery.start_soon(daemon.durability.run)
        nursery.start_soon(_signals)
        if ready_fd >= 0:
            _report(ready_fd, "OK")
            os.close(ready_fd)
        _notify_systemd("READY=1")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()


def _shutdown(daemon: Daemon | None, mounted: bool) -> None:
    """Make everything durable, unmount if still mounted, and close the index."""
    if daemon is not None:
        try:
            crash_point("shutdown-before-final-commit")
            daemon.ns.staging.take_sync_work().run()
            mark_clean(daemon.ns) if not daemon.ops.handles else None
            daemon.durability.commit()
            daemon.ns.staging.close()
            daemon.store.close()
        except Exception:
            log.exception("final commit failed; the next mount recovers")
    if mounted:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
    with contextlib.suppress(FileNotFoundError):
        if daemon is not None:
            daemon.data_dir.pid_file.unlink()
    log.info("daemon stopped")


def _check_mountpoint(mountpoint: Path) -> None:
    try:
        if not mountpoint.is_dir():
            raise TierfsError(
                f"{mountpoint}: mount point is not a directory", ExitCode.MOUNT_FAILED
            )
    except OSError as exc:
        raise TierfsError(
            f"{mountpoint}: unusable mount point ({exc.strerror}); a dead mount? "
            f"try 'fusermount3 -u -z {mountpoint}'",
            ExitCode.MOUNT_FAILED,
        ) from None
    if os.path.ismount(mountpoint):
        raise TierfsError(f"{mountpoint}: something is already mounted there", ExitCode.BUSY)


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, line.encode() + b"\n")


def _notify_systemd(state: str) -> None:
    """sd_notify without a dependency: a datagram to $NOTIFY_SOCKET, if systemd set one."""
    import socket

    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())
