"""Shared fixtures: data directories, real FUSE mounts that always unmount, the CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

from tierfs.datadir import tierfs_mounts

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("long", deadline=None, print_blob=True, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TIERFS = [sys.executable, "-m", "tierfs"]
FUSE_REASON = "needs /dev/fuse and fusermount3 (FUSE is not available on this machine)"


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


requires_fuse = pytest.mark.skipif(not fuse_available(), reason=FUSE_REASON)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run long soak and scale tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_cli(
    *args: str | Path, check: bool = True, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `tierfs ARGS` in a fresh process, as an operator would."""
    result = subprocess.run(
        [*TIERFS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else os.environ.copy(),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"tierfs {' '.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass
class Mount:
    """A tierfs data directory and its mount point; `mount()`/`umount()` are idempotent."""

    data: Path
    mnt: Path
    env: dict[str, str] = field(default_factory=lambda: os.environ.copy())

    def mount(self, *options: str) -> None:
        args: list[str | Path] = ["mount", self.data, self.mnt]
        if options:
            args += ["-o", ",".join(options)]
        run_cli(*args, env=self.env)

    def umount(self) -> None:
        if self.is_mounted():
            run_cli("umount", self.mnt)

    def is_mounted(self) -> bool:
        return self.mnt.absolute() in tierfs_mounts()

    def daemon_pid(self) -> int:
        return int((self.data / "run" / "daemon.pid").read_text())

    def kill9(self) -> None:
        """kill -9 the daemon, then detach the dead mount as an operator would."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for_exit(pid)
        force_unmount(self.mnt)

    def remount(self) -> None:
        self.umount()
        self.mount()


def wait_for_exit(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if _is_zombie(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not exit")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def force_unmount(mnt: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    run_cli("mkfs", data, "--site", "test-site")
    return data


@pytest.fixture
def fs(tmp_path: Path, data_dir: Path) -> Iterator[Mount]:
    """A mounted tierfs; always unmounted afterwards, even when the test fails or kills it."""
    if not fuse_available():
        pytest.skip(FUSE_REASON)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(data_dir, mnt)
    m.mount()
    try:
        yield m
    finally:
        cleanup_mount(m)


def cleanup_mount(m: Mount) -> None:
    if m.is_mounted():
        try:
            m.umount()
        except (AssertionError, subprocess.TimeoutExpired):
            force_unmount(m.mnt)
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = m.daemon_pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
