"""The data directory's layout, its mount lock, and how a command finds it from a path.

Layout (docs/FORMAT.md has the details):

    DATA_DIR/tierfs.toml      settings
    DATA_DIR/domain.json      the dedup domain: id key, secret, chunker (mode 0600)
    DATA_DIR/meta/            the LMDB environment
    DATA_DIR/hot/XX/S.seg     hot-tier segment files of chunk frames
    DATA_DIR/staging/XX/INO   per-inode staging files (XX = low byte of the inode number)
    DATA_DIR/run/control.sock the running daemon's control socket
    DATA_DIR/run/daemon.pid   its pid
    DATA_DIR/lock             flock()ed by the daemon for as long as it runs
    DATA_DIR/log/tierfs.log   the daemon's log

A path given to a command is either a data directory (it holds `tierfs.toml`) or a mount point;
a mount point is resolved through /proc/self/mountinfo, where tierfs mounts show the data
directory as their source (fstype `fuse.tierfs`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
from pathlib import Path

from tierfs.errors import ExitCode, TierfsError

FSTYPE = "fuse.tierfs"


@dataclasses.dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "tierfs.toml"

    @property
    def meta(self) -> Path:
        return self.root / "meta"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def hot(self) -> Path:
        return self.root / "hot"

    @property
    def cold(self) -> Path:
        """The emulated zone device (zones.img, zones.img.zones), when the cold tier uses one."""
        return self.root / "cold"

    @property
    def domain(self) -> Path:
        return self.root / "domain.json"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def control_socket(self) -> Path:
        return self.run / "control.sock"

    @property
    def pid_file(self) -> Path:
        return self.run / "daemon.pid"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "tierfs.log"

    def is_filesystem(self) -> bool:
        return self.config.exists() or self.meta.exists()

    def require(self) -> DataDir:
        if not self.root.is_dir():
            raise TierfsError(f"{self.root}: no such directory", ExitCode.NOT_A_FILESYSTEM)
        if not self.config.exists():
            raise TierfsError(
                f"{self.root}: not a tierfs data directory (no tierfs.toml)",
                ExitCode.NOT_A_FILESYSTEM,
            )
        return self

    def make_layout(self) -> None:
        for sub in (self.meta, self.staging, self.hot, self.run, self.log_dir):
            sub.mkdir(parents=True, exist_ok=True)


class MountLock:
    """An exclusive flock on DATA_DIR/lock: held by the daemon, released by the kernel on death."""

    def __init__(self, data_dir: DataDir) -> None:
        self.data_dir = data_dir
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.data_dir.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise TierfsError(
                    f"{self.data_dir.root}: already in use by a running tierfs (mounted?)",
                    ExitCode.BUSY,
                ) from None
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def is_locked(data_dir: DataDir) -> bool:
    """True while a daemon holds the data directory."""
    try:
        fd = os.open(data_dir.lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal); undo it."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_device(mountpoint: Path) -> str:
    """The MAJOR:MINOR of the filesystem mounted at `mountpoint`, from /proc/self/mountinfo.

    A FUSE daemon must not stat() its own mount point before it serves requests: the
    kernel would ask the daemon, which would be waiting for itself.
    """
    target = os.path.abspath(mountpoint)
    device = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if unescape_mountinfo(fields[4]) == target:
            device = fields[2]  # the last mount on a path is the visible one
    if device is None:
        raise OSError(errno.ENOENT, f"{target} is not a mount point")
    return device


def tierfs_mounts() -> dict[Path, Path]:
    """Mount point -> data directory, for every tierfs mount this process can see."""
    mounts: dict[Path, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2 or rfields[0] != FSTYPE:
            continue
        mounts[Path(unescape_mountinfo(fields[4]))] = Path(unescape_mountinfo(rfields[1]))
    return mounts


def resolve(path: str | Path) -> DataDir:
    """A data directory or a mount point -> the data directory."""
    p = Path(path).absolute()
    mounts = tierfs_mounts()
    if p in mounts:
        return DataDir(mounts[p]).require()
    if (p / "tierfs.toml").exists():
        return DataDir(p)
    if not p.exists():
        raise TierfsError(f"{p}: no such file or directory", ExitCode.NOT_A_FILESYSTEM)
    raise TierfsError(
        f"{p}: neither a tierfs data directory nor a tierfs mount point", ExitCode.NOT_A_FILESYSTEM
    )


def mountpoint_of(data_dir: DataDir) -> Path | None:
    root = data_dir.root.absolute()
    for mnt, src in tierfs_mounts().items():
        if src == root:
            return mnt
    return None


def _main(argv: list[str]) -> int:
    """`python -m tierfs.datadir --is-mounted DIR`: exit 0 when DIR is a live tierfs mount."""
    if len(argv) != 2 or argv[0] != "--is-mounted":
        return 2
    mnt = Path(argv[1]).absolute()
    if mnt not in tierfs_mounts() and Path(os.path.realpath(mnt)) not in tierfs_mounts():
        return 1
    try:
        os.stat(mnt)
    except OSError:
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
