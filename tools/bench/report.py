"""Turning measurements into the printed tables and docs/benchmarks.md."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TARGETS = ("native", "floor", "tierfs")
TARGET_SHARE_OF_FLOOR = 0.80
MISSING = "-"
MIB = 1 << 20

# target -> metric key -> one value per repeat
Results = Mapping[str, Mapping[str, Sequence[float]]]


@dataclass(frozen=True)
class Metric:
    """One reported figure and the target tierfs must reach for it.

    `share`: tierfs must reach this share of the floor's `versus` figure (default: the same
    metric; `versus_label` names it in the table). `limit`: tierfs must stay at or below it
    (in `unit`). Neither: reported only. Figures are divided by `scale` for display (bytes
    shown as MiB); `ratios` is False where comparing targets by ratio means nothing (seconds
    of sealing, stored bytes).
    """

    key: str
    label: str
    unit: str
    share: float | None = TARGET_SHARE_OF_FLOOR
    versus: str | None = None
    versus_label: str = ""
    limit: float | None = None
    scale: float = 1.0
    ratios: bool = True

    def target_text(self) -> str:
        if self.limit is not None:
            return f"<= {self.limit:,.0f} {self.unit}"
        if self.share is None:
            return ""
        return f">= {self.share:.0%} of floor {self.versus_label}".rstrip()


def median(results: Results, target: str, key: str) -> float | None:
    """The figure reported for a target: the median over the repeats (None: not measured)."""
    values = results.get(target, {}).get(key)
    return statistics.median(values) if values else None


def shown(results: Results, target: str, metric: Metric) -> float | None:
    """The median in display units."""
    value = median(results, target, metric.key)
    return None if value is None else value / metric.scale


def _value(value: float | None) -> str:
    if value is None:
        return MISSING
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def _percent(ratio: float) -> str:
    """Rounded down, so that a figure just under its target never shows the target's %."""
    return f"{math.floor(ratio * 100 + 1e-9)}%"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return MISSING
    return _percent(value / base)


def widest_spread(results: Results, target: str, metrics: Sequence[Metric]) -> tuple[str, float]:
    """The figure of `target` whose repeats differ most: its label and fastest/slowest."""
    figures = results.get(target, {})
    spreads = [
        (max(values) / min(values), m.label)
        for m in metrics
        if len(values := figures.get(m.key, ())) > 1 and min(values) > 0
    ]
    if not spreads:
        return "", 1.0
    ratio, key = max(spreads)
    return key, ratio


def verdict(metric: Metric, results: Results) -> bool | None:
    """Whether tierfs meets the metric's target (None: no target, or not measured)."""
    tierfs = shown(results, "tierfs", metric)
    if tierfs is None:
        return None
    if metric.limit is not None:
        return tierfs <= metric.limit
    floor = median(results, "floor", metric.versus or metric.key)
    if metric.share is None or not floor:
        return None
    return tierfs * metric.scale >= metric.share * floor


def _met(value: bool | None) -> str:
    return MISSING if value is None else ("yes" if value else "NO")


HEADER = [
    "Workload",
    "Unit",
    "native",
    "floor",
    "tierfs",
    "floor/native",
    "tierfs/native",
    "tierfs/floor",
    "Target",
    "Met",
]


def rows(metrics: Sequence[Metric], results: Results) -> list[list[str]]:
    """One row per metric: the three medians, their ratios, the target and the verdict."""
    out = []
    for m in metrics:
        native, floor, tierfs = (shown(results, t, m) for t in TARGETS)
        ratios = [
            _ratio(floor, native),
            _ratio(tierfs, native),
            _ratio(tierfs, floor),
        ]
        out.append(
            [
                m.label,
                m.unit,
                _value(native),
                _value(floor),
                _value(tierfs),
                *(ratios if m.ratios else [MISSING] * 3),
                m.target_text(),
                _met(verdict(m, results)),
            ]
        )
    return out


def misses(metrics: Sequence[Metric], results: Results) -> list[str]:
    """The tierfs figures that miss their target, each with how far it got."""
    out = []
    for m in metrics:
        if verdict(m, results) is not False:
            continue
        tierfs = shown(results, "tierfs", m)
        floor = median(results, "floor", m.versus or m.key)
        if m.limit is None and tierfs is not None and floor:
            share = _percent(tierfs * m.scale / floor)
            out.append(f"{m.label}: {share} of the floor{_per_repeat(m, results)}")
        else:
            out.append(f"{m.label}: {_value(tierfs)} {m.unit}")
    return out


def _per_repeat(metric: Metric, results: Results) -> str:
    """tierfs over the floor within each repeat: whether a miss holds in every repeat or
    comes from one disturbed by other work (the two targets run about a minute apart)."""
    tierfs = results.get("tierfs", {}).get(metric.key, ())
    floor = results.get("floor", {}).get(metric.versus or metric.key, ())
    if len(tierfs) < 2 or len(tierfs) != len(floor):
        return ""
    shares = [_percent(t / f) for t, f in zip(tierfs, floor, strict=True) if f]
    return f" (per repeat: {', '.join(shares)})"


@dataclass(frozen=True)
class Goal:
    """One of the issue's targets, met when every figure it names meets its own target."""

    text: str
    keys: tuple[str, ...]


def goal_rows(goals: Sequence[Goal], metrics: Sequence[Metric], results: Results) -> list[str]:
    """A markdown list: each goal, met or not, with the figures that decide it."""
    by_key = {m.key: m for m in metrics}
    lines = []
    for goal in goals:
        decided = [(by_key[k], verdict(by_key[k], results)) for k in goal.keys if k in by_key]
        known = [v for _, v in decided if v is not None]
        state = "not measured" if not known else ("met" if all(known) else "**MISSED**")
        details = ", ".join(_goal_detail(m, results) for m, _ in decided)
        lines.append(f"- {goal.text}: {state} ({details})")
    return lines


def _goal_detail(metric: Metric, results: Results) -> str:
    tierfs = shown(results, "tierfs", metric)
    floor = median(results, "floor", metric.versus or metric.key)
    if metric.limit is None and tierfs is not None and floor:
        return f"{metric.label}: {_percent(tierfs * metric.scale / floor)}"
    return f"{metric.label}: {_value(tierfs)} {metric.unit}"


def text_table(table: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    """Aligned columns for the terminal: text left, numbers right."""
    all_rows = [header, *table]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        rest = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(first + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in table)])


TitledTable = tuple[str, Sequence[Sequence[str]], Sequence[str]]  # title, rows, header


def print_report(tables: Sequence[TitledTable], goals: Sequence[str], notes: Sequence[str]) -> None:
    """A benchmark's terminal output: each table under its title, then the targets' verdicts
    and the notes (the same content as its section of docs/benchmarks.md)."""
    for title, table, header in tables:
        print(title)
        print(text_table(table, header))
        print()
    print("\n".join(goals))
    print()
    print("\n".join(f"- {line}" for line in notes))


def markdown_table(table: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    lines = [header, align, *table]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def markdown_list(items: Mapping[str, str]) -> str:
    return "\n".join(f"- **{key}:** {value}" for key, value in items.items())


SPACE_HEADER = ["File", "Logical", "Stored", "Unique", "Dedup", "Compression", "Hot tier"]


def space_rows(results: Results, files: Mapping[str, str], size: int) -> list[list[str]]:
    """tierfs's status after each file's flush: the file's stored and unique MiB, the ratios,
    and the hot tier's allocated MiB. Empty when tierfs was not measured."""
    out = []
    for prefix, name in files.items():
        stored = median(results, "tierfs", f"{prefix}_stored_bytes")
        if stored is None:
            continue
        unique = median(results, "tierfs", f"{prefix}_unique_bytes") or 0.0
        dedup = median(results, "tierfs", f"{prefix}_dedup_ratio") or 0.0
        packed = median(results, "tierfs", f"{prefix}_compression_ratio") or 0.0
        hot = median(results, "tierfs", f"{prefix}_hot_bytes") or 0.0
        out.append(
            [
                name,
                f"{size / MIB:,.0f} MiB",
                f"{stored / MIB:,.1f} MiB",
                f"{unique / MIB:,.1f} MiB",
                f"{dedup:.2f}",
                f"{packed:.2f}",
                f"{hot / MIB:,.1f} MiB",
            ]
        )
    return out


@dataclass(frozen=True)
class Table:
    """A titled results table, with the text under it."""

    title: str
    table: Sequence[Sequence[str]]
    header: Sequence[str] = tuple(HEADER)
    note: str = ""


@dataclass(frozen=True)
class Run:
    """Everything docs/benchmarks.md says about one benchmark run."""

    command: str
    date: str
    machine: Mapping[str, str]
    settings: Mapping[str, str]
    tables: Sequence[Table]
    goals: Sequence[str]
    missed: Sequence[str]
    notes: Sequence[str]


# Sections of docs/benchmarks.md that `run` does not measure: the chunking micro-benchmark's
# (rewritten by tools.bench.chunking) and a hand-written analysis of the misses. `run`
# rewrites the file around them and keeps them as they are.
KEPT_SECTIONS = ("analysis", "chunking")


def markers(name: str) -> tuple[str, str]:
    """The HTML comments that delimit a kept section."""
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def _pattern(name: str) -> re.Pattern[str]:
    begin, end = markers(name)
    return re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)


def kept_section(document_text: str, name: str) -> str:
    """The named section of an existing docs/benchmarks.md, markers included ("" if none)."""
    match = _pattern(name).search(document_text)
    return match.group(0) if match else ""


def with_section(document_text: str, name: str, section: str) -> str:
    """The document with the named section replaced by `section`, or `section` appended."""
    pattern = _pattern(name)
    if pattern.search(document_text):
        return pattern.sub(lambda _: section, document_text)
    return document_text.rstrip("\n") + "\n\n" + section + "\n"


METHOD = """\
Three targets are measured in one run, on the same machine and the same filesystem:

- **native**: a plain directory next to the tierfs data directory.
- **floor**: `tools/bench/passthrough.py`, a minimal pyfuse3 + trio passthrough of a plain
  directory that makes each syscall directly on the trio thread. It is what any Python FUSE
  filesystem pays before doing real work. It mounts with tierfs's own FUSE options (it calls
  `tierfs.daemon.fuse_options`; only the subtype differs: `default_permissions`, `allow_other`
  when root) and answers with tierfs's default attribute and entry timeouts (60 s); like tierfs
  it has no writeback cache and does not keep the page cache across opens. It passes extended
  attributes through, so that like tierfs it is asked for `security.capability` with every
  write(2).
- **tierfs**: a fresh `tierfs mkfs`, mounted with `tierfs mount` and default settings.

All workloads run in one Python process making plain `os` calls. Random data is BLAKE3
output made before the clock starts: no two blocks alike, so tierfs can neither deduplicate
nor compress it. MB is 10^6 bytes. For each repeat, each target runs the foundation
workloads and then the data-path workloads, in the same mount.

### Foundation workloads

- **Sequential write**: one file of random data written with 1 MiB writes, then fsync; the
  time includes the fsync. This is what the application waits for (`dd bs=1M conv=fsync`);
  tierfs seals such a stream behind the writer (`seal.stream_behind_mb`, 64 MiB), so by the
  fsync most of it is in chunks and the rest is staged.
- **Sequential read**: the same file read back with 1 MiB reads, cold. tierfs reads it mostly
  from chunks in the hot tier (what was sealed behind the writer), the tail from staging.
- **Create**: a tree of directories of 100 files each; mkdir each directory, then
  create + write 4 KiB + close each file. Rates count files; directory operations are in the
  time.
- **Stat**: stat() of every file by path, cold.
- **Read**: open + read 4 KiB + close of every file, cold.
- **Delete**: unlink every file, then rmdir the directories.

### Data-path workloads

- **Write until durable**: the time from opening the file until the data is durable in its
  final form: for native and floor when fsync returns; for tierfs when the `flush` control
  request returns, i.e. every byte is sealed into deduplicated, compressed chunks that are
  durable in the hot tier. The request is the one `tierfs flush` sends, made from the
  benchmark process so that starting the CLI is not counted. The same run gives the
  application-visible rate (until fsync) and the seconds spent sealing after it.
- **Sequential read, sealed, cold**: the sealed file read with 1 MiB reads after a remount and
  drop_caches: tierfs reads, checks and (when compressed) decompresses chunks from hot-tier
  segments.
- **Re-read after drop_cache**: the same read without a remount, after the daemon's
  decompressed-chunk cache is emptied (the `drop_cache` control request) and drop_caches.
- **Random 4 KiB reads, cold**: preads of 4 KiB at aligned offsets drawn from a fixed seed
  (the same for every target) over the sealed file, after a remount and drop_caches.
- **Duplicate-heavy file**: a 64 MiB block of random data written 16 times (1 GiB), written,
  sealed and read the same way. Its storage cost is how much `tierfs status` chunks
  `stored_bytes` grew while it was written and flushed.
- After each read, 64 random 4 KiB blocks are compared with the data written (outside the
  timing), so a fast but wrong data path cannot pass.

Cold means: the FUSE target is unmounted and mounted again, then `sync` and
`echo 3 > /proc/sys/vm/drop_caches` (native: only the latter). Writing phases also start after
`sync` and drop_caches, so that no phase depends on what ran before it: on ext4 without a
journal, creating files shortly (within dirty_expire, 30 s) after many deletes is several
times slower while the freed inodes' table blocks are cached, because the inode allocator
scans past recently deleted inodes. Each figure is the median over the repeats.

### Targets

Every foundation figure at least 80 % of the floor measured in the same run (the 10,000-file
figures included); the application-visible sequential write at least 80 % of the floor's;
write until sealed at least 50 % of the floor's sequential write; the sequential read of
sealed data at least 80 % of the floor's read (the re-read after drop_cache included); the
duplicate-heavy file stored in at most 70 MiB (its 64 MiB of unique data plus 6 MiB). Random
reads have no target yet; they are reported against the floor.

### Reading the figures

- Ratios are rounded down, so a figure shown at the target's percentage may still miss it
  by a fraction of a percent.
- The random data is incompressible (tierfs stores its chunks raw; the compression ratio is
  1.00), and the duplicate-heavy file gains from deduplication only.
- The daemon's chunk cache (128 MiB by default) holds the duplicate-heavy file's 64 MiB of
  unique chunks, so after its first 64 MiB that read is served from memory: it measures the
  read path's own cost per request, without disk reads.
- A 4 KiB read of sealed data needs its whole chunk (about 316 KiB with the default
  chunker), read and checked: random reads of data not in the chunk cache move about 80
  times the bytes the application asked for.
- drop_caches empties the guest's caches only. On a virtual machine whose disk is a file on
  the host, the host may still hold recently read data, so one "cold" read can run twice as
  fast as the same read a minute earlier (see the floor's read and re-read).
"""

INTRO = """\
`make bench` (or `python -m tools.bench.run`) measures tierfs against the directory underneath
it and against the Python FUSE floor, prints the tables below and rewrites this file; then it
runs the chunking micro-benchmark (`python -m tools.bench.chunking`, no FUSE; run alone, or
with `--skip foundation --skip datapath`, it rewrites only its own section).

Options: `--size` (default 1 GiB), `--files` (default 10000), `--random-reads` (default
20000), `--only native|floor|tierfs` (repeatable), `--skip foundation|datapath|chunking`
(repeatable), `--work-dir` (a fresh temporary directory is made there; default under
/var/tmp, never a tmpfs), `--repeat N` (default 3; the median is reported), `--profile DIR`
(py-spy profiles of the FUSE daemons, one file per phase; sampling slows them down).

It needs root (FUSE `allow_other`, drop_caches) and unmounts and removes everything it made,
also on failure or Ctrl-C. A default run takes about six minutes on the machine below. The
analysis section is written by hand and kept by every run; the chunking section is
rewritten whenever the chunking benchmark runs.
"""


def _table_section(table: Table) -> str:
    note = f"\n\n{table.note}" if table.note else ""
    return f"### {table.title}\n\n{markdown_table(table.table, table.header)}{note}\n"


def document(run: Run, kept: Sequence[str]) -> str:
    """docs/benchmarks.md: how to run the suite, what it measures, the latest figures, and
    the `kept` sections (in order) after them."""
    missed = "\n".join(f"- {m}" for m in run.missed) or "- none"
    notes = "\n".join(f"- {n}" for n in run.notes) or "- none"
    tables = "\n".join(_table_section(t) for t in run.tables)
    goals = "\n".join(run.goals) or "- none measured"
    tail = "".join(f"\n{section}\n" for section in kept if section)
    return f"""\
# Benchmarks

{INTRO}
## Method

{METHOD}
## Latest run

- **Date:** {run.date}
- **Command:** `{run.command}`
{markdown_list(run.settings)}

### Machine

{markdown_list(run.machine)}

{tables}
### Targets met

{goals}

tierfs figures that miss their target:

{missed}

### Notes

{notes}
{tail}"""
