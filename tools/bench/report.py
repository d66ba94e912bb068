"""Turning measurements into the printed table and docs/benchmarks.md."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TARGETS = ("native", "floor", "tierfs")
TARGET_SHARE_OF_FLOOR = 0.80
MISSING = "-"

# target -> metric key -> one value per repeat
Results = Mapping[str, Mapping[str, Sequence[float]]]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str


def median(results: Results, target: str, key: str) -> float | None:
    """The figure reported for a target: the median over the repeats (None: not measured)."""
    values = results.get(target, {}).get(key)
    return statistics.median(values) if values else None


def _value(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return MISSING
    return f"{value / base:.0%}"


def _verdict(tierfs: float | None, floor: float | None) -> str:
    if tierfs is None or not floor:
        return MISSING
    return "yes" if tierfs >= TARGET_SHARE_OF_FLOOR * floor else "NO"


HEADER = [
    "Workload",
    "Unit",
    "native",
    "floor",
    "tierfs",
    "floor/native",
    "tierfs/native",
    "tierfs/floor",
    f"tierfs >= {TARGET_SHARE_OF_FLOOR:.0%} floor",
]


def rows(metrics: Sequence[Metric], results: Results) -> list[list[str]]:
    """One row per metric: the three medians, their ratios, and the target verdict."""
    out = []
    for m in metrics:
        native, floor, tierfs = (median(results, t, m.key) for t in TARGETS)
        out.append(
            [
                m.label,
                m.unit,
                _value(native),
                _value(floor),
                _value(tierfs),
                _ratio(floor, native),
                _ratio(tierfs, native),
                _ratio(tierfs, floor),
                _verdict(tierfs, floor),
            ]
        )
    return out


def misses(metrics: Sequence[Metric], results: Results) -> list[str]:
    """Labels of the tierfs figures below the target share of the floor."""
    out = []
    for m in metrics:
        floor, tierfs = median(results, "floor", m.key), median(results, "tierfs", m.key)
        if floor and tierfs is not None and tierfs < TARGET_SHARE_OF_FLOOR * floor:
            out.append(f"{m.label}: {tierfs / floor:.0%} of the floor")
    return out


def text_table(table: Sequence[Sequence[str]]) -> str:
    """Aligned columns for the terminal: text left, numbers right."""
    all_rows = [HEADER, *table]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(HEADER))]

    def line(cells: Sequence[str]) -> str:
        first = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        rest = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(first + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(HEADER), rule, *(line(r) for r in table)])


def markdown_table(table: Sequence[Sequence[str]]) -> str:
    align = ["---", "---"] + ["---:"] * (len(HEADER) - 2)
    lines = [HEADER, align, *table]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def markdown_list(items: Mapping[str, str]) -> str:
    return "\n".join(f"- **{key}:** {value}" for key, value in items.items())


@dataclass(frozen=True)
class Run:
    """Everything docs/benchmarks.md says about one benchmark run."""

    command: str
    date: str
    machine: Mapping[str, str]
    settings: Mapping[str, str]
    table: Sequence[Sequence[str]]
    missed: Sequence[str]


METHOD = """\
Three targets are measured in one run, on the same machine and the same filesystem:

- **native**: a plain directory next to the tierfs data directory.
- **floor**: `tools/bench/passthrough.py`, a minimal pyfuse3 + trio passthrough of a plain
  directory that makes each syscall directly on the trio thread. It is what any Python FUSE
  filesystem pays before doing real work. It mounts with tierfs's own FUSE options (it calls
  `tierfs.daemon.fuse_options`; only the subtype differs: `default_permissions`, `allow_other`
  when root) and answers with tierfs's default attribute and entry timeouts (60 s); like tierfs
  it has no writeback cache and does not keep the page cache across opens. It has no xattr
  handlers: its first getxattr answers ENOSYS and the kernel stops asking, whereas tierfs gets
  a getxattr("security.capability") with every write(2).
- **tierfs**: a fresh `tierfs mkfs`, mounted with `tierfs mount` and default settings.

Workloads, all from one Python process making plain `os` calls:

- **Sequential write**: one file written with 1 MiB writes, then fsync; the time includes the
  fsync.
- **Sequential read**: the same file read back with 1 MiB reads, cold.
- **Create**: a tree of directories of 100 files each; mkdir each directory, then
  create + write 4 KiB + close each file. Rates count files; directory operations are in the
  time.
- **Stat**: stat() of every file by path, cold.
- **Read**: open + read 4 KiB + close of every file, cold.
- **Delete**: unlink every file, then rmdir the directories.

Cold means: the FUSE target is unmounted and mounted again, then `sync` and
`echo 3 > /proc/sys/vm/drop_caches` (native: only the latter). The write and create phases
also start after `sync` and drop_caches, so that no phase depends on what ran before it: on
ext4 without a journal, creating files shortly (within dirty_expire, 30 s) after many deletes
is several times slower while the freed inodes' table blocks are cached, because the inode
allocator scans past recently deleted inodes. MB is 10^6 bytes. Each figure is the median over
the repeats. The target is that every tierfs figure is at least 80 % of the floor measured in
the same run.
"""


def document(run: Run) -> str:
    """docs/benchmarks.md: how to run the suite, what it measures, and the latest figures."""
    missed = "\n".join(f"- {m}" for m in run.missed) or "- none"
    return f"""\
# Benchmarks

`make bench` (or `python -m tools.bench.run`) measures tierfs against the directory underneath
it and against the Python FUSE floor, prints the table below and rewrites this file. Options:
`--size` (default 1 GiB), `--files` (default 10000), `--only native|floor|tierfs` (repeatable),
`--work-dir` (a fresh temporary directory is made there; default under /var/tmp, never a
tmpfs), `--repeat N` (report the median). It needs root (FUSE `allow_other`, drop_caches)
and unmounts and removes everything it made, also on failure or Ctrl-C.

## Method

{METHOD}
## Latest run

- **Date:** {run.date}
- **Command:** `{run.command}`
{markdown_list(run.settings)}

### Machine

{markdown_list(run.machine)}

### Results

{markdown_table(run.table)}

tierfs figures below {TARGET_SHARE_OF_FLOOR:.0%} of the floor:

{missed}
"""
