"""Host plumbing of the benchmark: mounts, page cache, subprocesses, and the machine's make-up."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tierfs.datadir import unescape_mountinfo

log = logging.getLogger(__name__)

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, reduced to what the benchmark needs."""

    point: Path
    fstype: str
    source: str
    options: str


def mounts() -> list[Mount]:
    """Every mount this process can see, in mount order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 6 or len(rfields) < 2:
            continue
        both = f"{fields[5]},{rfields[2] if len(rfields) > 2 else ''}".split(",")
        options = ",".join(dict.fromkeys(o for o in both if o))
        out.append(
            Mount(
                Path(unescape_mountinfo(fields[4])),
                rfields[0],
                unescape_mountinfo(rfields[1]),
                options,
            )
        )
    return out


def is_mounted(path: Path) -> bool:
    """True if something is mounted exactly at `path` (never touches the path itself,
    so a dead FUSE mount does not hang or fail the check)."""
    return any(m.point == path for m in mounts())


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first (the order to unmount them in)."""
    found = [m.point for m in mounts() if m.point == path or path in m.point.parents]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def mount_of(path: Path) -> Mount:
    """The mount that holds `path` (the longest mount point that is a prefix of it)."""
    real = Path(os.path.realpath(path))
    candidates = [m for m in mounts() if m.point == real or m.point in real.parents]
    return max(candidates, key=lambda m: len(m.point.parts))


def is_memory_backed(path: Path) -> bool:
    """True for tmpfs and the like, where "disk" figures would only measure memory."""
    return mount_of(path).fstype in MEMORY_FILESYSTEMS


def drop_caches() -> None:
    """Write back dirty data, then drop page cache, dentries and inodes (cold caches)."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def fusermount_unmount(mountpoint: Path, lazy: bool = False) -> bool:
    """Unmount a FUSE mount as its daemon would be told to; True on success."""
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.warning("%s: %s", " ".join(cmd), result.stderr.strip() or "failed")
    return result.returncode == 0


def run_checked(cmd: Sequence[str], what: str) -> None:
    """Run a helper command; on failure raise with its output, which says why."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {output}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _read_first(path: Path, prefix: str) -> str:
    """The value of the first `prefix: value` line of a /proc file ("" if absent)."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return ""


def _disk_of(source: str) -> str:
    """A short description of the block device behind a mount source like /dev/vda1."""
    name = Path(source).name
    block = Path("/sys/class/block") / name
    if not block.exists():
        return source
    if (block / "partition").exists():
        block = block.resolve().parent
    details = []
    with contextlib.suppress(OSError, ValueError):
        sectors = int((block / "size").read_text())
        details.append(f"{sectors * 512 / 2**30:.0f} GiB")
    with contextlib.suppress(OSError):
        rotational = (block / "queue" / "rotational").read_text().strip() == "1"
        details.append("reports rotational" if rotational else "non-rotational")
    with contextlib.suppress(OSError):
        details.append((block / "device" / "model").read_text().strip())
    return f"{source} ({', '.join(d for d in details if d)})"


def machine(work_dir: Path) -> dict[str, str]:
    """What the figures depend on: CPUs, memory, kernel, the work dir's disk, Python."""
    mem_kib = int(_read_first(Path("/proc/meminfo"), "MemTotal").split()[0] or 0)
    cpu = _read_first(Path("/proc/cpuinfo"), "model name") or platform.processor()
    work = mount_of(work_dir)
    return {
        "CPUs (nproc)": f"{len(os.sched_getaffinity(0))} ({cpu})",
        "Memory": f"{mem_kib / 2**20:.1f} GiB",
        "Kernel": f"{platform.system()} {platform.release()}",
        "Work dir": str(work_dir),
        "Work dir filesystem": f"{work.fstype} on {_disk_of(work.source)}, mounted at "
        f"{work.point} ({work.options})",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def busy_warning() -> str | None:
    """A warning when other work competes for the CPUs, which skews every figure."""
    load = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0))
    if load < 0.5 * cpus:
        return None
    return f"load average {load:.2f} on {cpus} CPUs: other work is running; figures will be noisy"


def _command_output(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """First line of a command's output, or "" when it is missing or fails."""
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, check=False, cwd=cwd)
    except OSError:
        return ""
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines and result.returncode == 0 else ""


def software(repo: Path) -> dict[str, str]:
    """Versions the figures depend on: the tierfs commit, pyfuse3, trio and libfuse."""
    import pyfuse3
    import trio

    commit = _command_output(["git", "rev-parse", "--short", "HEAD"], cwd=repo)
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    fuse = _command_output(["fusermount3", "-V"])
    return {
        "tierfs": f"commit {commit or 'unknown'}{' + uncommitted changes' if dirty else ''}",
        "FUSE": f"pyfuse3 {pyfuse3.__version__}, trio {trio.__version__}, {fuse or 'fusermount3'}",
    }
