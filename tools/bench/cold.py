"""`python -m tools.bench.cold`: the ZNS cold tier, measured on a real mount.

For each fill level of `--fills` (default 0.5 and 0.8), in turn, a fresh tierfs is made with an
emulated zoned device in the work directory (`tierfs mkfs --zone-device emulated:SIZE:ZONE`, a
sparse file on the same disk, never a tmpfs) sized so that `--size` of data fills that share of
its zone capacity, and mounted with `tierfs mount` (promote-on-read off, tierfs's default; the
benchmark checks it). Then:

1. **Migration throughput.** `--size` of random data (BLAKE3 output made before the clock) is
   written as files of 1 to 16 MiB, sealed (the `flush` control request), the daemon's chunk
   cache and the kernel's caches are dropped, and the `migrate` request of `tierfs migrate
   --now` is timed, followed by a `sync` request (the new chunk locations committed and
   durable), sent from this process so that starting the CLI is not counted. The rate is
   chunk data moved into zones (`migrated_bytes`) over that time, compared with a 1 MiB-write
   + fsync sequential file write of the same size through the pyfuse3 floor
   (tools/bench/passthrough.py) and into a plain directory, on the same disk in the same run.
   The table shows the first fill level's migration; the others' are in the notes.
2. **Cold reads against hot reads** (first fill level only). The same sealed files are read
   twice, from the hot tier before the migration and from the zones after it, each
   measurement after dropping the daemon's chunk cache (the `drop_cache` request) and the
   kernel's caches (drop_caches): every file in turn with 1 MiB reads (MB/s), then
   `--random-reads` 4 KiB preads at block-aligned offsets spread over all the files by their
   sizes (seeded: the same blocks in the same order both times; reads/s). The hot chunk data
   left after the migration (none expected) and the chunks promoted (none: promote-on-read is
   off) are checked, and sampled blocks are compared with the data written.
3. **Write amplification of reclaim** (every fill level). From there, rounds of churn: a random
   ~10 % of the files (seeded) are deleted and as many bytes of new files of 1 to 16 MiB
   written, sealed, migrated (`migrate --now`) and reclaimed (the `reclaim` request of `tierfs
   zones --reclaim`). The bytes appended to zones are the advance of the zones' write
   pointers, read from the daemon's zone report polled every POLL_SECONDS (a pointer that
   moved back was reset: what it shows then was written since the reset). Write
   amplification is those bytes over the chunk data migrated (`migrated_bytes` of `tierfs
   status`), over the whole run and over the churn rounds alone. The target (<= 2.0) is at
   50 % fill; other fills are reported. `--rounds` sets the rounds of every fill, or one
   per fill. A churn that cannot go on (the zones full and reclaim freeing nothing) stops
   there, and the report says so with the zones' garbage. `--min-garbage` sets
   `cold.min_garbage` (reclaim's victim threshold) in each tierfs.toml, to see how the policy
   changes the figures; by default every setting is tierfs's own.

Prints the tables and replaces the cold section of docs/benchmarks.md (appends it when there
is none). `python -m tools.bench.run` runs it too, after the other parts. Needs root (FUSE
`allow_other`, drop_caches); every mount it makes is unmounted and its work directory removed
on every exit path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import datetime
import itertools
import logging
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tierfs import config, control
from tierfs.datadir import DataDir
from tierfs.errors import TierfsError
from tools.bench import harness, report, system, workloads
from tools.bench.run import parse_size
from tools.bench.targets import REPO_ROOT, Floor, Native, Target, Tierfs

log = logging.getLogger("tools.bench.cold")

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000
SECTION = "cold"
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_SIZE = 1 * GIB
DEFAULT_ROUNDS = 30
DEFAULT_SEED = 4
DEFAULT_FILLS = (0.50, 0.80)
DEFAULT_RANDOM_READS = 20_000
CHURN = 0.10
FILE_MIN, FILE_MAX = 1 * MIB, 16 * MIB
ZONE_MAX, ZONE_MIN = 64 * MIB, 4 * MIB
MIN_ZONES = 32
POLL_SECONDS = 0.1
MIGRATION_SHARE = 0.60
WA_LIMIT = 2.0
WA_FILL = 0.50
LONG_TIMEOUT = 3600.0
MAX_STALLS = 100
SPOT_CHECKS = 64
COLD_FULL = "cold store full"
DEFAULT_MIN_GARBAGE: float = config.defaults("bench").get("cold", "min_garbage")

Zones = list[dict[str, Any]]


# -- options -------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _fill(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 0.85:
        raise argparse.ArgumentTypeError("a fill must be between 0.05 and 0.85")
    return value


def _fills(text: str) -> list[float]:
    return [_fill(part) for part in text.split(",")]


def _rounds(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",")]


EPILOG = """\
examples:
  python -m tools.bench.cold
      the default run (1 GiB at fills of 0.5 and 0.8), writing the cold section of
      docs/benchmarks.md; a few minutes
  python -m tools.bench.cold --size 128M --rounds 3 --random-reads 2000 --no-write
      a quick smoke run that prints the tables only
  python -m tools.bench.cold --fills 0.8 --rounds 30 --output /tmp/cold.md
      the 80% fill alone, with the full 30 rounds
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.cold",
        description="Measure the migration into zones, reads of cold against hot data, and the\n"
        "write amplification of reclaim at each fill level, on tierfs mounts with an\n"
        "emulated zoned device (needs root).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=DEFAULT_SIZE,
        help="data migrated and read, and the live volume of the churn (default 1G)",
    )
    parser.add_argument(
        "--fills",
        type=_fills,
        default=list(DEFAULT_FILLS),
        metavar="FILL[,FILL...]",
        help="shares of the zone capacity the live data fills, one fresh filesystem each "
        "(default 0.5,0.8; the WA target is at 0.5)",
    )
    parser.add_argument(
        "--rounds",
        type=_rounds,
        metavar="N[,N...]",
        default=[DEFAULT_ROUNDS],
        help=f"churn rounds of {CHURN * 100:.0f}%% of the files each, for every fill or one "
        f"per fill (default {DEFAULT_ROUNDS}: the live volume rewritten three times)",
    )
    parser.add_argument(
        "--random-reads",
        type=_positive,
        default=DEFAULT_RANDOM_READS,
        help=f"4 KiB random reads, hot and cold (default {DEFAULT_RANDOM_READS:,})",
    )
    parser.add_argument(
        "--min-garbage",
        type=float,
        help="set cold.min_garbage in tierfs.toml (the share of a zone that must be garbage "
        f"before reclaim relocates it; default: tierfs's, {DEFAULT_MIN_GARBAGE:g})",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="file sizes, deletes, random reads"
    )
    harness.add_common_options(parser, DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if len(args.rounds) == 1:
        args.rounds = args.rounds * len(args.fills)
    elif len(args.rounds) != len(args.fills):
        parser.error(f"--rounds: give one number, or one per fill ({len(args.fills)})")
    return args


# -- the device and the mount --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """The emulated zoned device: `nr_zones` zones of `zone` bytes (capacity = size)."""

    zone: int
    nr_zones: int

    @property
    def size(self) -> int:
        return self.zone * self.nr_zones

    @property
    def spec(self) -> str:
        return f"emulated:{self.size // MIB}M:{self.zone // MIB}M"

    @classmethod
    def for_data(cls, size: int, fill: float) -> Device:
        """Zones of up to 64 MiB, at least MIN_ZONES of them, `size` filling `fill` of them."""
        wanted = size / fill
        zone = ZONE_MAX
        while zone > ZONE_MIN and wanted / zone < MIN_ZONES:
            zone //= 2
        return cls(zone, max(MIN_ZONES, math.ceil(wanted / zone)))

    def describe(self) -> str:
        return f"`{self.spec}` ({self.nr_zones} zones of {_size(self.zone)})"


class ColdTierfs(Tierfs):
    """The tierfs target, made with a zone device; control requests with arguments."""

    def __init__(self, work_dir: Path, device: Device, min_garbage: float | None = None) -> None:
        super().__init__(work_dir)
        self.device = device
        self.min_garbage = min_garbage

    def start(self) -> None:
        if not (self.data / "tierfs.toml").exists():
            self.data.parent.mkdir(parents=True, exist_ok=True)
            cmd = self._cli(
                "mkfs", str(self.data), "--site", "bench", "--zone-device", self.device.spec
            )
            system.run_checked(cmd, "tierfs mkfs")
            if self.min_garbage is not None:
                values = dict(config.load(self.data).values)
                values[("cold", "min_garbage")] = self.min_garbage
                config.write(self.data, config.Config(values))
        if config.load(self.data).get("cold", "promote_on_read"):
            raise RuntimeError(
                f"{self.data}: cold.promote_on_read is on, so reads of cold data would not "
                "stay cold; the benchmark needs tierfs's default (off)"
            )
        super().start()

    def request(self, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        return control.request(DataDir(self.data).control_socket, cmd, timeout=timeout, **args)

    def cold_status(self) -> dict[str, Any]:
        cold: dict[str, Any] = self.request("status")["status"]["tiers"]["cold"]
        return cold

    def zones(self) -> Zones:
        zones: Zones = self.request("zones")["zones"]
        return zones


# -- bytes appended to zones -----------------------------------------------------------------


class ZoneMeter:
    """Bytes appended to the zones, from the write pointers of the daemon's zone report.

    Each sample compares every zone's write pointer with the last one seen: an advance was
    written (a FULL zone reports its capacity, so the unwritten tail of a zone finished early
    counts too); a pointer that moved back means the zone was reset since, and what it shows
    now was written after the reset. Samples are attributed to the step running when they
    are taken ("migrate", "reclaim", or "background" for the daemon's own reclaim pass every
    5 s); a poller thread samples every POLL_SECONDS so that a zone reset and written again
    is seen in between. `resets_seen` is checked against the daemon's `zones_reset` counter:
    a reset the polling missed would show there.
    """

    def __init__(self, fetch: Callable[[], Zones]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}
        self.written: Counter[str] = Counter()
        self.resets_seen = 0
        self.samples = 0
        self.tag = "background"
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        with self._lock:
            for zone in self._fetch():
                wp = zone["write_pointer"]
                if wp is None:  # READONLY or OFFLINE: nothing is written any more
                    continue
                last = self._last.get(zone["zone"])
                self._last[zone["zone"]] = wp
                if last is None:
                    continue
                if wp >= last:
                    self.written[self.tag] += wp - last
                else:
                    self.written[self.tag] += wp
                    self.resets_seen += 1
            self.samples += 1

    @property
    def total(self) -> int:
        return sum(self.written.values())

    def totals(self) -> Counter[str]:
        with self._lock:
            return Counter(self.written)

    @contextlib.contextmanager
    def step(self, tag: str) -> Iterator[None]:
        """Attribute what is written while the block runs to `tag`."""
        self.sample()
        with self._lock:
            self.tag = tag
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self.tag = "background"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="zone-meter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.sample()
            except Exception as exc:  # the main thread reports it
                self.error = exc
                return


# -- files -----------------------------------------------------------------------------------


def mixed_sizes(total: int, rng: random.Random) -> list[int]:
    """File sizes drawn uniformly from 1 to 16 MiB, adding up to `total` (the last one cut)."""
    sizes: list[int] = []
    left = total
    while left > 0:
        size = min(left, rng.randrange(FILE_MIN, FILE_MAX + 1))
        sizes.append(size)
        left -= size
    return sizes


@dataclasses.dataclass
class FileSet:
    """The files of the churn, by path, with their sizes."""

    root: Path
    sizes: dict[Path, int] = dataclasses.field(default_factory=dict)
    made: int = 0

    @property
    def live(self) -> int:
        return sum(self.sizes.values())

    def write(self, data: bytes, sizes: Sequence[int]) -> float:
        """Write files of `sizes`, back to back out of `data`, in 1 MiB writes; the seconds."""
        view = memoryview(data)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        started = time.perf_counter()
        pos = 0
        for size in sizes:
            path = self.root / f"f{self.made:06d}"
            self.made += 1
            fd = os.open(path, flags, 0o644)
            try:
                done = 0
                while done < size:
                    done += os.write(
                        fd, view[pos + done : pos + min(size, done + workloads.IO_SIZE)]
                    )
            finally:
                os.close(fd)
            self.sizes[path] = size
            pos += size
        return time.perf_counter() - started

    def delete(self, count: int, rng: random.Random) -> int:
        """Unlink `count` files picked at random; the bytes they held."""
        victims = rng.sample(sorted(self.sizes), min(count, len(self.sizes)))
        for path in victims:
            path.unlink()
        return sum(self.sizes.pop(path) for path in victims)


# -- measuring -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Migration:
    """The timed `migrate --now` of the initial fill, and the sequential writes it is judged by."""

    native_mbps: float
    floor_mbps: float
    seconds: float
    migrated_bytes: int
    migrated_chunks: int
    zone_bytes: int
    files: int

    @property
    def mbps(self) -> float:
        return self.migrated_bytes / MB / max(self.seconds, 1e-9)

    @property
    def share(self) -> float:
        return self.mbps / self.floor_mbps if self.floor_mbps else 0.0


@dataclasses.dataclass(frozen=True)
class Round:
    """What one stretch of the run migrated and wrote to zones (bytes, by step)."""

    label: str
    migrated: int
    written: Counter[str]
    zones_reset: int
    relocated_chunks: int
    seconds: float
    live_bytes: int
    empty_zones: int
    stalls: int = 0
    stuck: str = ""

    @property
    def total(self) -> int:
        return sum(self.written.values())

    @property
    def wa(self) -> float:
        return self.total / self.migrated if self.migrated else math.nan

    @staticmethod
    def combine(label: str, rounds: Sequence[Round]) -> Round:
        written: Counter[str] = Counter()
        for r in rounds:
            written.update(r.written)
        return Round(
            label,
            sum(r.migrated for r in rounds),
            written,
            sum(r.zones_reset for r in rounds),
            sum(r.relocated_chunks for r in rounds),
            sum(r.seconds for r in rounds),
            rounds[-1].live_bytes,
            rounds[-1].empty_zones,
            sum(r.stalls for r in rounds),
            next((r.stuck for r in rounds if r.stuck), ""),
        )


@dataclasses.dataclass(frozen=True)
class ReadFigures:
    """One tier's reads of the fill's files, each after every cache was dropped."""

    seq_bytes: int
    seq_seconds: float
    seq_loads: int  # the daemon's chunk cache misses during the sequential read
    random_reads: int
    random_seconds: float
    chunk_loads: int  # the daemon's chunk cache misses during the random reads

    @property
    def seq_mbps(self) -> float:
        return self.seq_bytes / MB / max(self.seq_seconds, 1e-9)

    @property
    def reads_per_second(self) -> float:
        return self.random_reads / max(self.random_seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class Reads:
    """The same files read from the hot tier (sealed, before the migration) and from zones."""

    hot: ReadFigures
    cold: ReadFigures
    files: int
    hot_before: int  # chunk data with a hot copy before the migration (bytes)
    hot_after: int  # ... and after it: what the cold reads could still find hot
    promoted: int  # chunks promoted back to the hot tier during the cold reads


@dataclasses.dataclass(frozen=True)
class FillRun:
    """The migration and the churn on one fresh filesystem, at one fill level."""

    fill: float
    rounds_planned: int
    device: Device
    migration: Migration
    fill_round: Round
    rounds: list[Round]
    capacity: int
    fill_live: int
    churned: int
    resets_seen: int
    resets_counted: int
    samples: int

    @property
    def at(self) -> str:
        return f"{self.fill:.0%} fill"

    @property
    def stopped(self) -> str:
        """Why the churn stopped before its last round ("" if it did not)."""
        return next((f"{r.label}: {r.stuck}" for r in self.rounds if r.stuck), "")

    @property
    def churn(self) -> Round | None:
        return Round.combine("churn", self.rounds) if self.rounds else None

    @property
    def whole(self) -> Round:
        return Round.combine("whole run", [self.fill_round, *self.rounds])


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One run of the cold-tier benchmark: one FillRun per fill level, in the order given."""

    size: int
    seed: int
    random_reads: int
    runs: list[FillRun]
    reads: Reads | None
    min_garbage: float
    machine: dict[str, str]
    date: str
    load_end: str

    @property
    def first(self) -> FillRun:
        """The run whose migration is in the table (and whose files were read)."""
        return self.runs[0]

    @property
    def target_run(self) -> FillRun | None:
        """The run at the fill the WA target is set for, if one was made."""
        return next((r for r in self.runs if math.isclose(r.fill, WA_FILL)), None)


def sequential_write(target: Target, data: bytes, size: int) -> float:
    """MB/s of one file of `size` bytes in 1 MiB writes + fsync, on a started target."""
    path = target.root / "sequential.bin"
    system.drop_caches()
    rate = workloads.seq_write(path, data, size)
    path.unlink()
    log.info("%s: sequential write %.1f MB/s", target.name, rate)
    return rate


def floor_writes(native: Native, floor: Floor, data: bytes, size: int) -> tuple[float, float]:
    """The plain directory's and the floor's sequential write rates (MB/s)."""
    native.start()
    native_mbps = sequential_write(native, data, size)
    floor.start()
    try:
        floor_mbps = sequential_write(floor, data, size)
    finally:
        floor.stop()
    return native_mbps, floor_mbps


def read_files(paths: Sequence[Path]) -> tuple[int, float]:
    """Every file in turn, opened and read to its end with 1 MiB reads into one reused buffer:
    the bytes read and the seconds."""
    buf = bytearray(workloads.IO_SIZE)
    total = 0
    started = time.perf_counter()
    for path in paths:
        total += workloads.read_through(path, buf)
    return total, time.perf_counter() - started


def random_picks(files: Sequence[tuple[Path, int]], count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (file index, offset) pairs: 4 KiB blocks drawn uniformly over all the files'
    whole blocks, so a file is picked in proportion to its size."""
    ends = list(itertools.accumulate(size // workloads.RANDOM_READ_SIZE for _, size in files))
    rng = random.Random(seed)
    picks = []
    for _ in range(count):
        block = rng.randrange(ends[-1])
        index = bisect.bisect_right(ends, block)
        first = ends[index - 1] if index else 0
        picks.append((index, (block - first) * workloads.RANDOM_READ_SIZE))
    return picks


def random_file_reads(files: Sequence[tuple[Path, int]], picks: Sequence[tuple[int, int]]) -> float:
    """The seconds of one 4 KiB pread per pick; the files are opened before the clock."""
    size = workloads.RANDOM_READ_SIZE
    buf = bytearray(size)
    fds = []
    try:
        for path, _ in files:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        started = time.perf_counter()
        for index, offset in picks:
            if os.preadv(fds[index], [buf], offset) != size:
                raise RuntimeError(f"{files[index][0]}: short read at {offset}")
        return time.perf_counter() - started
    finally:
        for fd in fds:
            os.close(fd)


def spot_check(files: Sequence[tuple[Path, int]], data: bytes, seed: int) -> None:
    """Compare SPOT_CHECKS random 4 KiB pieces of the files, written back to back out of
    `data`, with what was written (outside the timing): fast reads of wrong bytes would be
    worse than no figure."""
    starts = [0, *itertools.accumulate(size for _, size in files)]
    rng = random.Random(seed)
    for _ in range(SPOT_CHECKS):
        index = rng.randrange(len(files))
        path, size = files[index]
        offset = rng.randrange(max(1, size - workloads.RANDOM_READ_SIZE + 1))
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.read(workloads.RANDOM_READ_SIZE)
        at = starts[index] + offset
        if got != data[at : at + len(got)] or not got:
            raise RuntimeError(f"{path}: wrong bytes at offset {offset}")


class Bench:
    """The measurements on one mounted tierfs with a cold tier."""

    def __init__(self, fs: ColdTierfs, args: argparse.Namespace, rounds: int) -> None:
        self.fs = fs
        self.args = args
        self.rounds = rounds
        self.rng = random.Random(args.seed)
        self.files = FileSet(fs.root / "churn")
        self.meter = ZoneMeter(fs.zones)

    def data(self, size: int, what: str) -> bytes:
        return workloads.random_bytes(size, f"tierfs-bench cold {self.args.seed} {what}")

    def fill(
        self, data: bytes, native_mbps: float, floor_mbps: float, reads: bool
    ) -> tuple[Migration, Round, Reads | None]:
        """Write and seal the initial files, then time their migration; with `reads`, read
        them from the hot tier before the migration and from the zones after it."""
        self.files.root.mkdir()
        sizes = mixed_sizes(self.args.size, self.rng)
        seconds = self.files.write(data, sizes)
        files = list(self.files.sizes.items())
        log.info("wrote %d files (%s) in %.1f s", len(sizes), _size(self.args.size), seconds)
        self.fs.request("flush", timeout=LONG_TIMEOUT)
        hot_before = self.hot_bytes()
        hot = self.read_tier("hot", files) if reads else None
        self.fs.request("sync", timeout=LONG_TIMEOUT)
        self.fs.drop_data_cache()
        system.drop_caches()
        self.meter.sample()
        before = self.fs.cold_status()
        with self.meter.step("migrate"):
            started = time.perf_counter()
            answer = self.fs.request("migrate", timeout=LONG_TIMEOUT, now=True)
            self.fs.request("sync", timeout=LONG_TIMEOUT)
            elapsed = time.perf_counter() - started
        after = self.fs.cold_status()
        migration = Migration(
            native_mbps,
            floor_mbps,
            elapsed,
            answer["migrated_bytes"],
            answer["migrated_chunks"],
            self.meter.total,
            len(sizes),
        )
        log.info(
            "migrated %d chunks (%.0f MiB) in %.2f s: %.1f MB/s, %.0f%% of the floor's write",
            migration.migrated_chunks,
            migration.migrated_bytes / MIB,
            elapsed,
            migration.mbps,
            100 * migration.share,
        )
        fill_round = self._round("fill", before, after, self.meter.totals(), elapsed)
        if hot is None:
            return migration, fill_round, None
        hot_after = self.hot_bytes()
        cold = self.read_tier("cold", files)
        promoted = self.fs.cold_status()["promoted_chunks"] - after["promoted_chunks"]
        spot_check(files, data, self.args.seed)
        return migration, fill_round, Reads(hot, cold, len(files), hot_before, hot_after, promoted)

    def hot_bytes(self) -> int:
        """Chunk data that has a copy in the hot tier."""
        stored: int = self.fs.request("status")["status"]["tiers"]["hot"]["stored_bytes"]
        return stored

    def chunk_loads(self) -> int:
        """The daemon's chunk cache misses so far: about the chunks loaded from a tier (a
        read that waits for a chunk another read is loading counts a miss too)."""
        misses: int = self.fs.request("status")["status"]["cache"]["misses"]
        return misses

    def cold_caches(self) -> None:
        self.fs.drop_data_cache()
        system.drop_caches()

    def read_tier(self, tier: str, files: Sequence[tuple[Path, int]]) -> ReadFigures:
        """Every file with 1 MiB reads, then the random 4 KiB reads, each from cold caches."""
        picks = random_picks(files, self.args.random_reads, self.args.seed)
        self.cold_caches()
        loads = self.chunk_loads()
        seq_bytes, seq_seconds = read_files([path for path, _ in files])
        seq_loads = self.chunk_loads() - loads
        if seq_bytes != sum(size for _, size in files):
            raise RuntimeError(f"{tier} read: {seq_bytes} bytes, expected {self.args.size}")
        self.cold_caches()
        loads = self.chunk_loads()
        random_seconds = random_file_reads(files, picks)
        figures = ReadFigures(
            seq_bytes,
            seq_seconds,
            seq_loads,
            len(picks),
            random_seconds,
            self.chunk_loads() - loads,
        )
        log.info(
            "%s reads: sequential %.1f MB/s, random 4 KiB %.0f reads/s (%d chunk cache misses)",
            tier,
            figures.seq_mbps,
            figures.reads_per_second,
            figures.chunk_loads,
        )
        return figures

    def _round(
        self,
        label: str,
        before: dict[str, Any],
        after: dict[str, Any],
        written: Counter[str],
        seconds: float,
        stalls: int = 0,
        stuck: str = "",
    ) -> Round:
        return Round(
            label,
            after["migrated_bytes"] - before["migrated_bytes"],
            written,
            after["zones_reset"] - before["zones_reset"],
            after["relocated_chunks"] - before["relocated_chunks"],
            seconds,
            after["bytes"],
            after["zones_empty"],
            stalls,
            stuck,
        )

    def migrate(self) -> int:
        """`migrate --now`. When the zones are full (ColdFull: no EMPTY zone beyond the
        reserve), send `reclaim` and try again, as the daemon's own pass waits for reclaim;
        the number of such stalls. Raises Stuck when a reclaim frees nothing."""
        stalls = 0
        while True:
            try:
                with self.meter.step("migrate"):
                    self.fs.request("migrate", timeout=LONG_TIMEOUT, now=True)
                return stalls
            except TierfsError as exc:
                if COLD_FULL not in exc.message:
                    raise
                if stalls >= MAX_STALLS:
                    raise Stuck(f"still full after {stalls} reclaims", stalls) from exc
            stalls += 1
            before = self.fs.cold_status()
            with self.meter.step("reclaim"):
                self.fs.request("reclaim", timeout=LONG_TIMEOUT)
            after = self.fs.cold_status()
            if all(after[k] == before[k] for k in ("zones_reset", "relocated_chunks")):
                raise Stuck(
                    f"migrate --now: cold store full, and reclaim reset and relocated nothing "
                    f"({after['zones_empty']} empty zones, {_size(after['bytes'])} live; "
                    f"{_garbage(self.fs.zones())})",
                    stalls,
                )
            log.info(
                "cold store full: reclaim reset %d zones and relocated %d chunks; migrating on",
                after["zones_reset"] - before["zones_reset"],
                after["relocated_chunks"] - before["relocated_chunks"],
            )

    def churn_round(self, number: int) -> Round:
        """Delete ~CHURN of the files, write as many bytes anew, seal, migrate, reclaim."""
        before, written = self.fs.cold_status(), self.meter.totals()
        started = time.perf_counter()
        count = max(1, round(CHURN * len(self.files.sizes)))
        deleted = self.files.delete(count, self.rng)
        sizes = mixed_sizes(deleted, self.rng)
        data = self.data(deleted, f"round {number}")
        self.files.write(data, sizes)
        self.fs.request("flush", timeout=LONG_TIMEOUT)
        stuck = ""
        try:
            stalls = self.migrate()
        except Stuck as exc:
            log.error("round %d: %s", number, exc)
            stalls, stuck = exc.stalls, str(exc)
        else:
            with self.meter.step("reclaim"):
                self.fs.request("reclaim", timeout=LONG_TIMEOUT)
        elapsed = time.perf_counter() - started
        after = self.fs.cold_status()
        grown = self.meter.totals()
        grown.subtract(written)
        result = self._round(f"round {number}", before, after, +grown, elapsed, stalls, stuck)
        log.info(
            "round %d/%d: -%d +%d files (%s), migrated %s, zones written %s, %d resets, %d "
            "chunks relocated, %d empty zones, %d stalls, WA %.2f, %.1f s",
            number,
            self.rounds,
            count,
            len(sizes),
            _size(deleted),
            _size(result.migrated),
            _size(result.total),
            result.zones_reset,
            result.relocated_chunks,
            result.empty_zones,
            result.stalls,
            result.wa,
            elapsed,
        )
        return result


def _garbage(zones: Zones) -> str:
    """How much of the written zones is garbage, and the dirtiest zone's share (what
    reclaim compares with cold.min_garbage)."""
    written = [z for z in zones if z["write_pointer"]]
    if not written:
        return "no zone written"

    def share(zone: dict[str, Any]) -> float:
        used: int = zone["write_pointer"]
        live: int = zone["live_bytes"]
        return (used - live) / used

    worst = max(written, key=share)
    garbage = sum(z["write_pointer"] - z["live_bytes"] for z in written)
    return (
        f"{_size(garbage)} garbage in {len(written)} written zones, the dirtiest "
        f"{share(worst):.1%} garbage (zone {worst['zone']}, {worst['condition']})"
    )


class Stuck(Exception):
    """Migration cannot go on: the zones are full and reclaim frees nothing."""

    def __init__(self, message: str, stalls: int) -> None:
        super().__init__(message)
        self.stalls = stalls


def measure_fill(
    args: argparse.Namespace,
    fs: ColdTierfs,
    fill: float,
    rounds_planned: int,
    data: bytes,
    floor_rates: tuple[float, float],
    reads: bool,
) -> tuple[FillRun, Reads | None]:
    """The fill, its migration (and the reads, with `reads`), then the churn, on `fs`; the
    caller stops it."""
    bench = Bench(fs, args, rounds_planned)
    log.info("%.0f%% fill: tierfs with a zone device %s", 100 * fill, fs.device.spec)
    fs.start()
    try:
        migration, fill_round, read_figures = bench.fill(data, *floor_rates, reads)
        capacity = sum(z["capacity"] for z in fs.zones())
        fill_live = fs.cold_status()["bytes"]
        log.info("live after the fill: %.1f%% of the zone capacity", 100 * fill_live / capacity)
        resets_before = fs.cold_status()["zones_reset"]
        rounds: list[Round] = []
        bench.meter.start()
        try:
            for number in range(1, rounds_planned + 1):
                rounds.append(bench.churn_round(number))
                if bench.meter.error is not None:
                    raise RuntimeError(f"polling the zone report failed: {bench.meter.error}")
                if rounds[-1].stuck:
                    break
        finally:
            bench.meter.stop()
        bench.meter.sample()
        resets_counted = fs.cold_status()["zones_reset"] - resets_before
    except Exception:
        log.error("the daemon's log:\n%s", fs.log_tail())
        raise
    run = FillRun(
        fill=fill,
        rounds_planned=rounds_planned,
        device=fs.device,
        migration=migration,
        fill_round=fill_round,
        rounds=rounds,
        capacity=capacity,
        fill_live=fill_live,
        churned=sum(r.migrated for r in rounds),
        resets_seen=bench.meter.resets_seen,
        resets_counted=resets_counted,
        samples=bench.meter.samples,
    )
    return run, read_figures


def measure(
    args: argparse.Namespace,
    native: Native,
    floor: Floor,
    filesystems: Sequence[ColdTierfs],
    machine: dict[str, str],
) -> Outcome:
    """Everything, one fresh filesystem per fill level, each stopped and its directory
    removed before the next is made; the caller cleans up on every exit path."""
    log.info("generating %s of random data", _size(args.size))
    data = workloads.random_bytes(args.size, f"tierfs-bench cold {args.seed} fill")
    floor_rates = floor_writes(native, floor, data, args.size)
    runs: list[FillRun] = []
    reads: Reads | None = None
    for index, (fs, fill, rounds) in enumerate(
        zip(filesystems, args.fills, args.rounds, strict=True)
    ):
        try:
            run, figures = measure_fill(args, fs, fill, rounds, data, floor_rates, index == 0)
        finally:
            fs.stop()
        harness.remove_work_dir(fs.data.parent)
        runs.append(run)
        reads = figures if index == 0 else reads
    return Outcome(
        size=args.size,
        seed=args.seed,
        random_reads=args.random_reads,
        runs=runs,
        reads=reads,
        min_garbage=DEFAULT_MIN_GARBAGE if args.min_garbage is None else args.min_garbage,
        machine=machine,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        load_end=harness.load(),
    )


# -- signals and cleanup ---------------------------------------------------------------------


def cleanup(targets: Sequence[Target], work_dir: Path, previous: harness.Handlers) -> None:
    """Stop the targets, unmount whatever is left under the work dir and remove it; a second
    Ctrl-C must not cut this short. Then the signal handlers are what they were."""
    with harness.signals_ignored(previous):
        for target in targets:
            if isinstance(target, Floor):
                _end_floor_before_mount(target)
        for target in reversed(targets):
            try:
                target.stop()
            except Exception:
                log.exception("stopping %s failed", target.name)
        harness.unmount_and_remove(work_dir)


def _end_floor_before_mount(floor: Floor) -> None:
    """A floor daemon interrupted before its mount came up never exits by itself, and
    `Floor.stop` would wait a minute for it: ask it to end first (it unmounts if it has
    mounted meanwhile)."""
    proc = floor.proc
    if proc is not None and proc.poll() is None and not system.is_mounted(floor.mountpoint):
        proc.terminate()


def run(args: argparse.Namespace) -> Outcome:
    """The whole benchmark in a fresh work directory, removed again on every exit path."""
    parent = harness.work_parent(args.work_dir)
    previous = harness.catch_signals()
    work_dir = harness.make_work_dir(parent, "tierfs-bench-cold-")
    native, floor = Native(work_dir), Floor(work_dir)
    filesystems = [
        ColdTierfs(
            work_dir / f"fill{index}-{fill * 100:.0f}",
            Device.for_data(args.size, fill),
            args.min_garbage,
        )
        for index, fill in enumerate(args.fills)
    ]
    try:
        log.info("work directory %s", work_dir)
        if warning := system.busy_warning():
            log.warning("%s", warning)
        machine = {**system.machine(work_dir), **system.software(REPO_ROOT)}
        return measure(args, native, floor, filesystems, machine)
    finally:
        cleanup([native, floor, *filesystems], work_dir, previous)


# -- output ----------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= factor:
            if not n % factor:
                return f"{n // factor:,.0f} {unit}"
            value = n / factor
            return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"
    return f"{n:,.0f} B"


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}" if abs(n) >= 100 * MIB else f"{n / MIB:,.1f}"


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


MIGRATION_HEADER = ["Workload", "Unit", "Value", "vs floor", "vs native", "Target", "Met"]
READS_HEADER = ["Workload", "Unit", "Hot", "Cold", "Cold / hot", "Chunk cache misses, hot / cold"]
WA_HEADER = [
    "Stretch",
    "Rounds",
    "Migrated MiB",
    "Zones written MiB",
    "... migrate",
    "... reclaim",
    "... background",
    "Zones reset",
    "Chunks relocated",
    "Stalls (full)",
    "Live MiB at end",
    "Empty zones at end",
    "WA",
]


def _row(
    label: str, unit: str, value: str, floor: str = "-", native: str = "-", target: str = ""
) -> list[str]:
    return [label, unit, value, floor, native, target, ""]


def migration_rows(outcome: Outcome) -> list[list[str]]:
    run = outcome.first
    m = run.migration
    big = _size(outcome.size)
    per_chunk = m.zone_bytes / m.migrated_bytes if m.migrated_bytes else math.nan
    floor_native = m.floor_mbps / m.native_mbps if m.native_mbps else 0.0
    migration = _row(
        f"tierfs: migrate --now + sync, {m.files} files ({_size(m.migrated_bytes)} of chunks), "
        f"{run.at}",
        "MB/s",
        f"{m.mbps:,.0f}",
        _pct(m.share),
        _pct(m.mbps / m.native_mbps if m.native_mbps else 0.0),
        f">= {MIGRATION_SHARE:.0%} of floor",
    )
    migration[-1] = _met(m.share >= MIGRATION_SHARE)
    return [
        _row(f"Native: sequential write {big}, 1 MiB I/O, fsync", "MB/s", f"{m.native_mbps:,.0f}"),
        _row(
            f"Floor: sequential write {big}, 1 MiB I/O, fsync",
            "MB/s",
            f"{m.floor_mbps:,.0f}",
            native=_pct(floor_native),
        ),
        migration,
        _row(
            f"tierfs: the same, {m.migrated_chunks:,} chunks in {m.seconds:.2f} s",
            "chunks/s",
            f"{m.migrated_chunks / max(m.seconds, 1e-9):,.0f}",
        ),
        _row("tierfs: zone bytes written per chunk byte migrated", "ratio", f"{per_chunk:.3f}"),
    ]


def _ratio(cold: float, hot: float) -> str:
    return f"{cold / hot:.2f}" if hot else "-"


def reads_rows(outcome: Outcome) -> list[list[str]]:
    reads = outcome.reads
    if reads is None:
        return []
    hot, cold = reads.hot, reads.cold
    return [
        [
            f"Sequential read, {reads.files} files ({_size(hot.seq_bytes)}), 1 MiB I/O",
            "MB/s",
            f"{hot.seq_mbps:,.0f}",
            f"{cold.seq_mbps:,.0f}",
            _ratio(cold.seq_mbps, hot.seq_mbps),
            f"{hot.seq_loads:,} / {cold.seq_loads:,}",
        ],
        [
            f"Random reads, {hot.random_reads:,} x 4 KiB over the {reads.files} files",
            "reads/s",
            f"{hot.reads_per_second:,.0f}",
            f"{cold.reads_per_second:,.0f}",
            _ratio(cold.reads_per_second, hot.reads_per_second),
            f"{hot.chunk_loads:,} / {cold.chunk_loads:,}",
        ],
    ]


def _pct(ratio: float) -> str:
    return f"{math.floor(ratio * 100 + 1e-9)}%"


def _span(rounds: Sequence[Round]) -> str:
    first, last = rounds[0].label.split()[-1], rounds[-1].label.split()[-1]
    return first if first == last else f"{first}-{last}"


def _groups(rounds: Sequence[Round]) -> list[Round]:
    """The churn rounds in (up to) three stretches, to show whether WA settles."""
    if not rounds:
        return []
    per = math.ceil(len(rounds) / 3)
    parts = [rounds[start : start + per] for start in range(0, len(rounds), per)]
    return [Round.combine(_span(part), part) for part in parts]


def wa_rows(run: FillRun) -> list[list[str]]:
    stretches = [("fill", run.fill_round, "-")]
    stretches += [("churn", r, r.label) for r in _groups(run.rounds)]
    if run.rounds:
        span = _span(run.rounds)
        stretches.append(("churn, all rounds", Round.combine(span, run.rounds), span))
        stretches.append(("whole run", run.whole, f"fill + {span}"))
    return [
        [
            name,
            rounds,
            _mib(r.migrated),
            _mib(r.total),
            _mib(r.written["migrate"]),
            _mib(r.written["reclaim"]),
            _mib(r.written["background"]),
            f"{r.zones_reset:,}",
            f"{r.relocated_chunks:,}",
            f"{r.stalls:,}",
            _mib(r.live_bytes),
            f"{r.empty_zones}",
            "-" if math.isnan(r.wa) else f"{r.wa:.2f}",
        ]
        for name, r, rounds in stretches
    ]


def _wa_figures(run: FillRun) -> str:
    churn = run.churn
    steady = f"; churn rounds alone {churn.wa:.2f}" if churn is not None else ""
    return f"{run.whole.wa:.2f} at {run.at}{steady}"


def goals(outcome: Outcome) -> list[str]:
    m = outcome.first.migration
    lines = [
        f"- migration at least {MIGRATION_SHARE:.0%} of the floor's sequential write: "
        f"{'met' if m.share >= MIGRATION_SHARE else '**MISSED**'} "
        f"({m.mbps:,.0f} MB/s, {_pct(m.share)} of {m.floor_mbps:,.0f} MB/s)"
    ]
    target = outcome.target_run
    if target is None:
        verdict = f"not measured (no run at {WA_FILL:.0%} fill)"
    elif target.stopped:
        verdict = (
            f"**MISSED**: the churn stopped in round {len(target.rounds)} of "
            f"{target.rounds_planned}, the zones full and reclaim freeing nothing (see the "
            f"notes); over what ran, {_wa_figures(target)}"
        )
    else:
        met = "met" if target.whole.wa <= WA_LIMIT else "**MISSED**"
        verdict = f"{met} ({_wa_figures(target)})"
    lines.append(
        f"- write amplification at most {WA_LIMIT:.1f} at {WA_FILL:.0%} fill, over the whole "
        f"run: {verdict}"
    )
    for run in outcome.runs:
        if run is target:
            continue
        figures = _wa_figures(run)
        if run.stopped:
            figures = (
                f"**not measured: the churn stopped in round {len(run.rounds)} of "
                f"{run.rounds_planned}**, the zones full and reclaim freeing nothing (see the "
                f"notes); over what ran, {figures}"
            )
        lines.append(
            f"- write amplification at {run.at}, over the whole run (reported, no target): "
            f"{figures}"
        )
    return lines


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n:,} times"


def _busy(outcome: Outcome) -> str:
    return harness.busy_note(outcome.machine, outcome.load_end, "figures")


def read_notes(outcome: Outcome) -> list[str]:
    reads = outcome.reads
    if reads is None:
        return []
    left = (
        "none"
        if reads.hot_after == 0
        else f"**{_size(reads.hot_after)}: those cold reads partly came from the hot tier**"
    )
    promoted = (
        "none"
        if reads.promoted == 0
        else f"**{reads.promoted:,}: later reads may have come from the hot tier**"
    )
    return [
        f"Reads ({outcome.first.at}): chunk data with a hot copy was {_size(reads.hot_before)} "
        f"before the migration and {left} after it; chunks promoted during the cold reads: "
        f"{promoted}. {SPOT_CHECKS} sampled 4 KiB pieces matched the data written."
    ]


def run_notes(outcome: Outcome, run: FillRun) -> list[str]:
    """Each fill level's notes, headed by its fill."""
    at = run.at
    out = [
        f"{at}: live data after the fill: {_mib(run.fill_live)} MiB of records in "
        f"{_mib(run.capacity)} MiB of zone capacity ({run.fill_live / run.capacity:.1%}"
        "; records add a 64-byte header and padding to 4 KiB to each chunk frame).",
        f"{at}: churn: {_mib(run.churned)} MiB migrated in {len(run.rounds)} rounds, "
        f"{run.churned / max(run.fill_live, 1):.1f} times the live volume.",
    ]
    if run is not outcome.first:
        m = run.migration
        out.append(
            f"{at}: the migration of the fill (not in the table) ran at {m.mbps:,.0f} MB/s "
            f"({_pct(m.share)} of the floor's write)."
        )
    stalls = [r for r in run.rounds if r.stalls]
    if stalls:
        out.append(
            f"{at}: stalls: in {len(stalls)} of {len(run.rounds)} rounds `migrate --now` "
            f'failed with "{COLD_FULL}" (no EMPTY zone beyond the reserve), '
            f"{_times(sum(r.stalls for r in stalls))} in all; each time the benchmark sent "
            "`reclaim` and migrated again, as the daemon's own pass waits for reclaim. The "
            "zone writes of those `reclaim` requests are in the reclaim column; those of the "
            "reclaim the daemon runs itself inside `migrate` when it finds the zones full are "
            "in the migrate column."
        )
    churn = run.churn
    if churn is not None and not churn.relocated_chunks:
        out.append(
            f"{at}: reclaim relocated nothing during the churn: it was too short to use up the "
            "EMPTY zones (relocation starts below 4), so its WA shows only the record overhead. "
            f"Run the default {DEFAULT_ROUNDS} rounds for a steady state."
        )
    if run.stopped:
        out.append(
            f"{at}: **the churn stopped early, {run.stopped}.** Reclaim relocates only zones "
            f"at least {outcome.min_garbage:.0%} garbage (`cold.min_garbage`), and only while "
            "fewer than 4 zones are EMPTY; a migration leaves 2 EMPTY zones in reserve and "
            "checks that a whole batch (about `cold.batch_mb`, 64 MiB) fits before it writes "
            "any of it. When no zone is dirty enough, or the room beyond the reserve is less "
            "than a batch while 4 zones are EMPTY, neither can go on: a limit of tierfs's "
            "reclaim policy at this fill, which the benchmark reports rather than works "
            "around (`--min-garbage` lowers the threshold)."
        )
    if run.resets_seen == run.resets_counted:
        out.append(
            f"{at}: the zone report was sampled {run.samples:,} times during the churn; it "
            f"saw every one of the {run.resets_counted} zone resets the daemon counted."
        )
    else:
        out.append(
            f"{at}: **the zone report was sampled {run.samples:,} times during the churn and "
            f"saw {run.resets_seen} resets where the daemon counted {run.resets_counted}: a "
            "zone reset and written again between two samples makes the zone bytes written an "
            "undercount.**"
        )
    return out


def notes(outcome: Outcome) -> list[str]:
    out = [_busy(outcome), *read_notes(outcome)]
    for run in outcome.runs:
        out += run_notes(outcome, run)
    return out


def _devices(outcome: Outcome) -> str:
    return "; ".join(f"{run.at}: {run.device.describe()}" for run in outcome.runs)


def method(outcome: Outcome) -> list[str]:
    fills = " and ".join(run.at for run in outcome.runs)
    rounds = ", ".join(f"{run.rounds_planned} at {run.at}" for run in outcome.runs)
    m = outcome.first.migration
    return [
        f"**Devices:** one fresh tierfs per fill level ({fills}), each with an emulated zoned "
        f"device ({_devices(outcome)}) made by `tierfs mkfs --zone-device` as a sparse file in "
        "the tierfs data directory, on the disk of the work directory, sized so that `--size` "
        "of data fills that share of its zone capacity. "
        + (
            "Every setting is tierfs's default"
            if math.isclose(outcome.min_garbage, DEFAULT_MIN_GARBAGE)
            else f"`cold.min_garbage` is {outcome.min_garbage:g} (`--min-garbage`; tierfs's "
            f"default is {DEFAULT_MIN_GARBAGE:g}), every other setting tierfs's default"
        )
        + f" (promote-on-read off, 2 reserve zones, relocation of zones at least "
        f"{outcome.min_garbage:.0%} garbage when fewer than 4 are empty, the daemon's own "
        "migration and reclaim pass every 5 s).",
        f"**Migration:** {_size(outcome.size)} of random data (BLAKE3 output, made before any "
        "clock starts) written as files of 1 to 16 MiB (seeded), sealed with the `flush` "
        "control request, then the daemon's chunk cache and the kernel's caches dropped. The "
        "time is that of the `migrate` request `tierfs migrate --now` sends (it seals nothing "
        "more here and moves every chunk with a hot copy into zones; each batch is flushed to "
        "the device before its new locations are committed) plus a `sync` request (the commit "
        "durable), both sent from the benchmark process. MB/s is chunk data moved "
        "(`migrated_bytes`; the data is incompressible, so about the file bytes) per second; "
        f"MB is 10^6 bytes. The table is the first fill level's ({outcome.first.at}).",
        "**Sequential write (the yardstick):** one file of the same size and data, written "
        "with 1 MiB writes and fsync into a plain directory (native) and through the pyfuse3 "
        "floor of the main suite (`tools/bench/passthrough.py`), on the same disk in the same "
        "run, after `sync` and drop_caches.",
        f"**Reads, hot and cold ({outcome.first.at}):** the files of the fill, read once "
        "sealed but before the migration (every chunk in the hot tier) and once after it "
        "(every chunk only in zones), on the same mount. Before each of the four "
        "measurements the daemon's chunk cache is emptied (the `drop_cache` request) and the "
        "kernel's caches dropped (`sync`, drop_caches). Sequential: every file in turn, "
        "opened and read to its end with 1 MiB reads; MB/s of file bytes. Random: "
        f"{outcome.random_reads:,} preads of 4 KiB at block-aligned offsets drawn uniformly "
        "over all the files' blocks (seeded, so the same blocks in the same order hot and "
        "cold), the files opened before the clock; reads/s. A 4 KiB read loads its whole "
        f"chunk ({_size(m.migrated_bytes / max(m.migrated_chunks, 1))} on average) into the "
        "daemon's chunk cache (128 MiB by default); its misses are about the chunks loaded "
        "(a read that waits for a chunk another read, such as the kernel's readahead, is "
        "loading counts one too). "
        "Cold / hot is the ratio of the rates.",
        f"**Churn:** each round deletes {CHURN:.0%} of the files (a seeded random pick), "
        "writes as many bytes of new files of 1 to 16 MiB (new random data), and sends "
        "`flush`, `migrate` (`--now`) and `reclaim` (what `tierfs zones --reclaim` sends: two "
        "passes of resetting empty zones and relocating the dirtiest one, with a metadata "
        f"sync before each). Rounds: {rounds}.",
        "**Zones written:** the advance of every zone's write pointer in the daemon's zone "
        f"report (`tierfs zones --json`), polled every {POLL_SECONDS:g} s during the churn "
        "and read before and after each request; a pointer that moved back was reset, and "
        "what it shows then was written since. It counts record headers and padding, and a "
        "zone finished early (when the next record does not fit, or to free an active zone) "
        "counts its unwritten tail, as a FULL zone's pointer is its capacity: an upper bound "
        "of the bytes written, and exactly the capacity used until the next reset. Split by "
        "the request running when the pointer moved: migrate, reclaim, or background (the "
        "daemon's own reclaim pass).",
        "**Write amplification (WA):** zones written over chunk data migrated "
        "(`migrated_bytes` of `tierfs status --json`, tiers.cold), over the whole run (the "
        "fill included, as the issue defines it) and over the churn rounds alone. 1.00 means "
        f"no relocation and no overhead. The target (<= {WA_LIMIT:.1f}) is at "
        f"{WA_FILL:.0%} fill; other fills are reported.",
    ]


def _wa_sections(outcome: Outcome) -> str:
    return "\n\n".join(
        f"### Reclaim write amplification, {run.at}\n\n"
        + report.markdown_table(wa_rows(run), WA_HEADER)
        for run in outcome.runs
    )


def _reads_section(outcome: Outcome) -> str:
    if outcome.reads is None:
        return ""
    table = report.markdown_table(reads_rows(outcome), READS_HEADER)
    return f"### Reads: cold (zones) against hot\n\n{table}\n\n"


def section(outcome: Outcome, command: str) -> str:
    """The cold section of docs/benchmarks.md, between its markers."""
    machine = harness.machine_list(outcome.machine)
    begin, end = report.markers(SECTION)
    fills = ",".join(f"{fill:g}" for fill in DEFAULT_FILLS)
    n, reads = DEFAULT_ROUNDS, f"{DEFAULT_RANDOM_READS:,}"
    return f"""\
{begin}
## Cold tier: migration into zones, cold reads and reclaim

`python -m tools.bench.cold` (also run by `python -m tools.bench.run`) mounts a fresh tierfs
whose cold tier is an emulated zoned device, times the migration of its data into zones against
a plain sequential write, reads the data from the zones and, before the migration, from the hot
tier, then churns the files and measures the write amplification of zone reclaim, once per fill
level. Options: `--size` (default 1 GiB), `--fills` (default {fills}), `--rounds` (default {n}
per fill), `--random-reads` (default {reads}), `--min-garbage` (default: tierfs's), `--seed`,
`--work-dir`, `--output`, `--no-write`. It needs root.

- **Date:** {outcome.date}
- **Command:** `{command}`

{harness.bullets(method(outcome))}

### Machine

{report.markdown_list(machine)}

### Migration

{report.markdown_table(migration_rows(outcome), MIGRATION_HEADER)}

{_reads_section(outcome)}{_wa_sections(outcome)}

### Targets met

{chr(10).join(goals(outcome))}

### Notes

{harness.bullets(notes(outcome))}
{end}"""


def print_tables(outcome: Outcome) -> None:
    tables: list[report.TitledTable] = [
        ("Cold tier: migration", migration_rows(outcome), MIGRATION_HEADER)
    ]
    if outcome.reads is not None:
        tables.append(
            ("Cold tier: reads, cold (zones) against hot", reads_rows(outcome), READS_HEADER)
        )
    tables += [
        (f"Cold tier: reclaim write amplification, {run.at}", wa_rows(run), WA_HEADER)
        for run in outcome.runs
    ]
    report.print_report(tables, goals(outcome), notes(outcome))


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(
        argv,
        module="tools.bench.cold",
        parse_args=parse_args,
        run=run,
        print_tables=print_tables,
        section=section,
        name=SECTION,
        root_for="dropping caches and FUSE allow_other (as tierfs uses it)",
        cleaned_up="unmounted and cleaned up",
        logger=log,
    )


if __name__ == "__main__":
    sys.exit(main())
