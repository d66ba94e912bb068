"""The three things measured: the native directory, the pyfuse3 floor, and tierfs.

Each target owns a directory under the work dir, exposes `root` (where the workloads run),
and can be started, remounted (for cold figures) and stopped. `stop` is idempotent and never
raises, because it runs on every exit path, Ctrl-C included, and must leave no mount behind.

The data-path workloads also ask each target to make written data durable in its final form
(`seal`), to forget its own data cache (`drop_data_cache`) and what it stores (`space`).
Native and floor data is final once fsync returns and they keep no cache of their own, so
for them these do nothing; tierfs answers through its control socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

from tierfs import control
from tierfs.datadir import DataDir
from tools.bench import system

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0
FLUSH_TIMEOUT = 3600.0

# What `space` reports: the tierfs status figures that say how much a file cost to store.
Space = dict[str, float]


class Target(Protocol):
    name: str

    @property
    def root(self) -> Path:
        """Where the workloads create their files."""
        ...

    def start(self) -> None: ...

    def remount(self) -> None: ...

    def stop(self) -> None: ...

    def seal(self) -> None:
        """Return once written data is durable in its final form."""
        ...

    def drop_data_cache(self) -> None:
        """Forget data the target caches itself (the kernel's caches are dropped apart)."""
        ...

    def space(self) -> Space | None:
        """What the stored data costs (None: the target does not say)."""
        ...

    def daemon_pid(self) -> int | None:
        """The process serving the mount, for profiling (None: there is none)."""
        ...


class _NoDataPath:
    """Data is final once fsync returns, no cache of its own, no stored-size accounting."""

    def seal(self) -> None:
        """Nothing to do: fsync already made the data durable as it will stay."""

    def drop_data_cache(self) -> None:
        """Nothing to drop: the page cache is all there is, and it is dropped apart."""

    def space(self) -> Space | None:
        return None


class Native(_NoDataPath):
    """The plain directory, on the same filesystem as the FUSE targets' backing directories."""

    name = "native"

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir / "native"

    @property
    def root(self) -> Path:
        return self.dir

    def start(self) -> None:
        self.dir.mkdir(exist_ok=True)

    def remount(self) -> None:
        """Nothing to remount: dropping the caches is what makes the native figures cold."""

    def stop(self) -> None:
        """Nothing to unmount."""

    def daemon_pid(self) -> int | None:
        return None


class Floor(_NoDataPath):
    """tools.bench.passthrough in its own process, passing through a directory."""

    name = "floor"

    def __init__(self, work_dir: Path) -> None:
        self.source = work_dir / "floor-src"
        self.mountpoint = work_dir / "floor-mnt"
        self.log_file = work_dir / "floor.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> Path:
        return self.mountpoint

    def start(self) -> None:
        self.source.mkdir(exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "tools.bench.passthrough", str(self.source)]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.log_file, "ab") as out:
            # A session of its own: a Ctrl-C meant for the runner must not kill the daemon
            # under a mount; the runner unmounts it instead.
            self.proc = subprocess.Popen(
                [*cmd, str(self.mountpoint)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )
        system.wait_for(self._ready, MOUNT_TIMEOUT, f"the floor mount at {self.mountpoint}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"floor daemon exited with {self.proc.returncode}:\n{tail}")
        return system.is_mounted(self.mountpoint)

    def remount(self) -> None:
        self.stop()
        self.start()

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        if system.is_mounted(self.mountpoint):
            system.fusermount_unmount(self.mountpoint)
        if self.proc is not None:
            _reap(self.proc)
            self.proc = None
        if system.is_mounted(self.mountpoint):
            system.fusermount_unmount(self.mountpoint, lazy=True)


class Tierfs:
    """A fresh tierfs (mkfs'd once), mounted and unmounted with the `tierfs` CLI."""

    name = "tierfs"

    def __init__(self, work_dir: Path) -> None:
        self.data = work_dir / "tierfs-data"
        self.mountpoint = work_dir / "tierfs-mnt"

    @property
    def root(self) -> Path:
        return self.mountpoint

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tierfs", *args]

    def start(self) -> None:
        if not (self.data / "tierfs.toml").exists():
            system.run_checked(self._cli("mkfs", str(self.data), "--site", "bench"), "tierfs mkfs")
        self.mountpoint.mkdir(exist_ok=True)
        system.run_checked(self._cli("mount", str(self.data), str(self.mountpoint)), "tierfs mount")

    def remount(self) -> None:
        self.stop()
        self.start()

    def _request(self, cmd: str, timeout: float = 30.0) -> dict[str, Any]:
        return control.request(DataDir(self.data).control_socket, cmd, timeout=timeout)

    def seal(self) -> None:
        """The request `tierfs flush` sends: seal everything, return once it is durable.

        Made from this process, so the figure does not include starting a Python CLI.
        """
        self._request("flush", timeout=FLUSH_TIMEOUT)

    def drop_data_cache(self) -> None:
        """Empty the daemon's cache of decompressed chunks (the control request)."""
        self._request("drop_cache")

    def space(self) -> Space | None:
        """Chunk and tier sizes from `tierfs status` (bytes, and the two ratios)."""
        doc = self._request("status")["status"]
        chunks, tiers = doc["chunks"], doc["tiers"]
        return {
            "stored_bytes": chunks["stored_bytes"],
            "unique_bytes": chunks["unique_bytes"],
            "dedup_ratio": chunks["dedup_ratio"],
            "compression_ratio": chunks["compression_ratio"],
            "hot_bytes": tiers["hot"]["bytes"],
            "staging_bytes": tiers["staging"]["bytes"],
        }

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log, to say why a command or request failed."""
        out = []
        for name in ("tierfs.log", "daemon.stderr"):
            with contextlib.suppress(OSError):
                text = (DataDir(self.data).log_dir / name).read_text(errors="replace")
                out += [f"--- {name}", *text.splitlines()[-lines:]]
        return "\n".join(out)

    def daemon_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(DataDir(self.data).pid_file.read_text())
        return None

    def stop(self) -> None:
        """`tierfs umount` (it syncs first); if that fails, unmount and end the daemon by pid."""
        if system.is_mounted(self.mountpoint):
            try:
                system.run_checked(self._cli("umount", str(self.mountpoint)), "tierfs umount")
            except RuntimeError as exc:
                log.warning("%s", exc)
                system.fusermount_unmount(self.mountpoint, lazy=True)
        self._end_daemon()

    def _end_daemon(self) -> None:
        """A daemon left running after its unmount (it failed) is ended by its pid file."""
        pid_file = self.data / "run" / "daemon.pid"
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pid_file.read_text())
            if _alive(pid):
                log.warning("tierfs daemon %d still running after unmount; terminating it", pid)
                os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    system.wait_for(lambda: not _alive(pid), EXIT_TIMEOUT, f"daemon {pid}")
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.lower()
    return ""


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a daemon we started to exit after its unmount; end it if it will not."""
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("daemon %d did not exit after unmount; terminating it", proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build(names: list[str], work_dir: Path) -> list[Target]:
    """The targets named, in the canonical order native, floor, tierfs."""
    makers: dict[str, type[Native] | type[Floor] | type[Tierfs]] = {
        "native": Native,
        "floor": Floor,
        "tierfs": Tierfs,
    }
    return [makers[name](work_dir) for name in makers if name in names]
