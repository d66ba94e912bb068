"""Running timed phases on a target: cold starts, clean starts, figures, and profiles."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.bench import profiling, system, workloads
from tools.bench.targets import Space, Target

log = logging.getLogger(__name__)

MIB = 1 << 20

Figures = dict[str, float]


def make_cold(target: Target) -> None:
    """Remount (FUSE targets) and drop the kernel's caches, so the next phase reads the disk."""
    target.remount()
    system.drop_caches()


def settle() -> None:
    """Start a writing phase from clean, dropped caches, independent of the phases before it.

    Without this, creates that follow another target's deletes are much slower on ext4
    without a journal (as on the reference machine): it skips inodes freed in the last
    dirty_expire interval (30 s) while their inode-table blocks are cached, scanning for each
    one; dropping the caches ends the scan. Which target ran before must not matter.
    """
    system.drop_caches()


@dataclass
class Phases:
    """The phases of one target: each figure is logged, and profiled when asked."""

    target: Target
    run: int = 0
    profile_dir: Path | None = None
    figures: Figures = field(default_factory=dict)

    def _profiled(self, key: str) -> contextlib.AbstractContextManager[None]:
        """py-spy on the daemon for one phase, into PROFILE_DIR/TARGET-runN-KEY.txt."""
        name = f"{self.target.name}-run{self.run}-{key}"
        return profiling.sampled(self.target.daemon_pid(), self.profile_dir, name)

    def timed(self, key: str, fn: Callable[[], float]) -> float:
        """Run one timed phase; its figure is stored under `key`."""
        with self._profiled(key):
            self.figures[key] = value = fn()
        log.info("%s %s: %.1f", self.target.name, key, value)
        return value

    def write(self, prefix: str, path: Path, data: bytes, size: int) -> None:
        """Write then seal: the application's MB/s, MB/s until durable, seconds of sealing."""
        with self._profiled(f"{prefix}_write"):
            times = workloads.write_file(path, data, size, self.target.seal)
        self.figures[f"{prefix}_write"] = size / workloads.MB / max(times.fsynced, 1e-9)
        self.figures[f"{prefix}_durable"] = size / workloads.MB / max(times.durable, 1e-9)
        self.figures[f"{prefix}_seal_s"] = times.durable - times.fsynced
        log.info(
            "%s %s write: %.1f MB/s to fsync, %.1f MB/s until durable (%.2f s sealing)",
            self.target.name,
            prefix,
            self.figures[f"{prefix}_write"],
            self.figures[f"{prefix}_durable"],
            self.figures[f"{prefix}_seal_s"],
        )

    def space(self, prefix: str, before: Space | None) -> None:
        """Record what the target stores; stored and unique bytes as what this file added.

        Earlier phases (the foundation's files, the random file) may leave chunks behind
        until their frees are durable, so the file's own cost is the growth since `before`.
        """
        now = self.target.space()
        if now is None:
            return
        grown = {"stored_bytes", "unique_bytes"} if before is not None else set()
        for name, value in now.items():
            base = before[name] if before is not None and name in grown else 0.0
            self.figures[f"{prefix}_{name}"] = value - base
        stored = self.figures[f"{prefix}_stored_bytes"]
        log.info("%s %s: %.1f MiB stored", self.target.name, prefix, stored / MIB)
