"""The data-path workloads: what a target does with file contents once they are written.

The foundation workloads see tierfs only as a staging area. These follow the data on: sealed
into deduplicated, compressed chunks, read back from the hot tier, and read at random. Per
target, in a directory of its own:

1. random data (`size` unique bytes): write with fsync, then `seal` (tierfs: the flush
   request, which returns once every byte is a durable chunk in the hot tier); what it costs
   to store; a cold sequential read (remount, drop_caches); a re-read after the target's own
   cache and the kernel's are dropped; 4 KiB reads at random offsets, cold;
2. duplicate-heavy data (one DUP_BLOCK of random bytes, repeated): the same write and seal,
   its storage cost measured as the growth of the chunk store, and a cold sequential read.

Native and floor have nothing to seal and no cache of their own (see targets.py), so their
"until durable" figures are their fsync'd writes: what tierfs's full data path is judged by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tools.bench import system, workloads
from tools.bench.phases import Figures, Phases, make_cold, settle
from tools.bench.targets import Target

log = logging.getLogger(__name__)

DUP_BLOCK = 64 << 20
RANDOM_READ_SEED = 20_000
MIB = 1 << 20


@dataclass(frozen=True)
class Payloads:
    """The run's data, made once and shared by every target, so all write the same bytes."""

    size: int
    random: bytes
    block: bytes

    @classmethod
    def make(cls, size: int) -> Payloads:
        """`size` random bytes, and the block that repeated makes the duplicate-heavy file."""
        log.info("generating %d MiB of random data", size >> 20)
        return cls(
            size,
            workloads.random_bytes(size, "tierfs-bench random file"),
            workloads.random_bytes(cls.block_size(size), "tierfs-bench duplicate block"),
        )

    @staticmethod
    def block_size(size: int) -> int:
        """The repeated block: DUP_BLOCK, or the whole file (in full I/Os) when smaller."""
        return min(DUP_BLOCK, _round_up(size, workloads.IO_SIZE))

    @staticmethod
    def dup_limit(size: int) -> int:
        """The duplicate-heavy file's storage target: its unique block plus 6 MiB.

        That is the issue's 70 MiB for 16 x 64 MiB; it leaves room for the chunks that
        straddle the block boundaries, which differ from the ones inside a block.
        """
        return Payloads.block_size(size) + 6 * MIB


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def measure(
    target: Target, data: Payloads, random_reads: int, run: int, profile_dir: Path | None
) -> Figures:
    """One pass of the data-path workloads on a started target."""
    base = target.root / f"data{run}"
    base.mkdir()
    phases = Phases(target, run, profile_dir)
    _random_file(phases, base / "random.bin", data, random_reads)
    _duplicate_file(phases, base / "duplicate.bin", data)
    base.rmdir()
    return phases.figures


def _random_file(phases: Phases, path: Path, data: Payloads, random_reads: int) -> None:
    """The random file: nothing to deduplicate or compress, so every byte takes the full path.

    Its cost is measured from a sealed start, so that staged leftovers of earlier phases are
    not sealed (and counted) with it.
    """
    target, size = phases.target, data.size
    target.seal()
    before = target.space()
    settle()
    phases.write("rnd", path, data.random, size)
    phases.space("rnd", before)
    make_cold(target)
    phases.timed("rnd_read", lambda: workloads.seq_read(path, size))
    workloads.spot_check(path, data.random, size)
    target.drop_data_cache()
    system.drop_caches()
    phases.timed("rnd_reread", lambda: workloads.seq_read(path, size))
    make_cold(target)
    phases.timed(
        "rnd_random",
        lambda: workloads.random_reads(path, size, random_reads, RANDOM_READ_SEED),
    )
    path.unlink()


def _duplicate_file(phases: Phases, path: Path, data: Payloads) -> None:
    """The duplicate-heavy file, after the random one is gone."""
    target, size = phases.target, data.size
    target.seal()
    before = target.space()
    settle()
    phases.write("dup", path, data.block, size)
    phases.space("dup", before)
    make_cold(target)
    phases.timed("dup_read", lambda: workloads.seq_read(path, size))
    workloads.spot_check(path, data.block, size)
    path.unlink()
