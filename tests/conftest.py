"""Shared fixtures: data directories, real FUSE mounts that always unmount, the CLI."""

from __future__ import annotations

import contextlib
import json
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
# The default schedules (nightly at 02:00) must not take snapshots in the middle of a test
# that counts them; tests of schedules mount with an environment of their own.
os.environ["TIERFS_SCHEDULES"] = "off"
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
    sealing: bool = False

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


def assert_mostly_sealed(m: Mount) -> None:
    """With the aggressive policy, most file data must have gone through the sealer."""
    if not m.sealing:
        return
    doc = json.loads(run_cli("status", m.mnt, "--json").stdout)
    sealed = doc["chunks"]["referenced_bytes"]
    staged = doc["tiers"]["staging"]["staged_bytes"]
    assert sealed > 0 and sealed >= staged, f"{sealed} bytes sealed, {staged} still staged"


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


def configure(data: Path, **settings: object) -> None:
    """Change settings in DATA/tierfs.toml: configure(d, seal__quiet_period=0.0)."""
    path = data / "tierfs.toml"
    lines = path.read_text().splitlines()
    for name, value in settings.items():
        section, key = name.split("__")
        current, done = None, False
        for i, line in enumerate(lines):
            if line.startswith("["):
                current = line.strip("[]")
            elif current == section and line.startswith(f"{key} = "):
                lines[i] = f"{key} = {_toml(value)}"
                done = True
        assert done, f"no setting {section}.{key}"
    path.write_text("\n".join(lines) + "\n")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


AGGRESSIVE_SEAL = {
    "seal__quiet_period": 0.0,
    "seal__idle_delay": 0.0,
    "seal__max_dirty_age": 0.2,
    "seal__batch_mb": 8,
}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    run_cli("mkfs", data, "--site", "test-site")
    return data


@pytest.fixture
def sealing_data_dir(data_dir: Path) -> Path:
    """A data directory whose sealer seals everything almost as soon as it is written."""
    configure(data_dir, **AGGRESSIVE_SEAL)
    return data_dir


@contextlib.contextmanager
def mounted(tmp_path: Path, data: Path) -> Iterator[Mount]:
    """Mount `data`; always unmount afterwards, even when the test fails or kills it."""
    if not fuse_available():
        pytest.skip(FUSE_REASON)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    m = Mount(data, mnt)
    m.mount()
    try:
        yield m
    finally:
        cleanup_mount(m)


@pytest.fixture
def fs(tmp_path: Path, data_dir: Path) -> Iterator[Mount]:
    """A mounted tierfs with the default settings."""
    with mounted(tmp_path, data_dir) as m:
        yield m


@pytest.fixture(params=["default", "sealing"])
def any_fs(request: pytest.FixtureRequest, tmp_path: Path, data_dir: Path) -> Iterator[Mount]:
    """Mounted twice over: with the default seal policy, and sealing almost at once."""
    if request.param == "sealing":
        configure(data_dir, **AGGRESSIVE_SEAL)
    with mounted(tmp_path, data_dir) as m:
        m.sealing = request.param == "sealing"
        yield m


@pytest.fixture
def sealing_fs(tmp_path: Path, sealing_data_dir: Path) -> Iterator[Mount]:
    with mounted(tmp_path, sealing_data_dir) as m:
        yield m


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


# The session-wide S3 server fixture (SeaweedFS).
pytest_plugins = ["tests.s3server"]
