"""`python -m tools.bench.run`: benchmark tierfs against native and the pyfuse3 floor.

Prints the result tables on stdout (progress goes to the log on stderr) and rewrites
docs/benchmarks.md; then runs the chunking micro-benchmark, which needs no mount, the
cold-tier benchmark (tools/bench/cold.py, a mount of its own) and the delta-send benchmark
(tools/bench/delta.py, a mount and an S3 server of its own, at its own default size). Every
mount it makes is unmounted and its work directory removed on every exit path, Ctrl-C and
SIGTERM included.
docs/benchmarks.md describes the method.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tools.bench import chunking, datapath, harness, profiling, report, system, workloads
from tools.bench.phases import Figures, Phases, make_cold, settle
from tools.bench.targets import REPO_ROOT, Target, build

if TYPE_CHECKING:  # imported where used: tools.bench.cold and .delta import this module
    from tools.bench import cold, delta

log = logging.getLogger("tools.bench")

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
PARTS = ("foundation", "datapath", "chunking", "cold", "delta")
WRITE_SEAL_SHARE = 0.50

Results = dict[str, dict[str, list[float]]]


def parse_size(text: str) -> int:
    """Bytes from "1G", "512MiB", "1.5g" or "4096" (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 512M, 4096)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.run",
        description="Benchmark tierfs against the native directory and the pyfuse3 floor.",
    )
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="sequential file size")
    parser.add_argument("--files", type=_positive, default=10_000, help="number of small files")
    parser.add_argument(
        "--random-reads", type=_positive, default=20_000, help="4 KiB random reads per target"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=PARTS,
        help="leave out a part of the suite (repeatable)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=report.TARGETS,
        help="measure only this target (repeatable; default: all three)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where to make the temporary work directory (default: /var/tmp or /work)",
    )
    parser.add_argument(
        "--repeat", type=_positive, default=3, help="runs of the FUSE parts; the median is shown"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown report")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of the FUSE daemons per phase into DIR (slows them)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def foundation_metrics(size: int, files: int) -> list[report.Metric]:
    """The foundation figures, labelled with this run's sizes; all must reach 80% of floor."""
    big = _human(size)
    return [
        report.Metric("seq_write", f"Sequential write {big}, 1 MiB I/O, fsync", "MB/s"),
        report.Metric("seq_read", f"Sequential read {big}, 1 MiB I/O, cold", "MB/s"),
        report.Metric("create", f"Create {files:,} x 4 KiB files", "files/s"),
        report.Metric("stat", f"Stat {files:,} files, cold", "files/s"),
        report.Metric("read", f"Read {files:,} x 4 KiB files, cold", "files/s"),
        report.Metric("delete", f"Delete {files:,} files", "files/s"),
    ]


def datapath_metrics(size: int, reads: int, dup_limit: int) -> list[report.Metric]:
    """The data-path figures and their targets (see docs/benchmarks.md, "Targets")."""
    big, mib = _human(size), float(1 << 20)
    return [
        report.Metric("rnd_write", f"Random {big}: write + fsync (app-visible)", "MB/s"),
        report.Metric(
            "rnd_durable",
            f"Random {big}: write until durable (sealed)",
            "MB/s",
            share=WRITE_SEAL_SHARE,
            versus="rnd_write",
            versus_label="write",
        ),
        report.Metric("rnd_seal_s", "Random: sealing after fsync", "s", share=None, ratios=False),
        report.Metric("rnd_read", "Random: sequential read, sealed, cold", "MB/s"),
        report.Metric("rnd_reread", "Random: re-read after drop_cache + drop_caches", "MB/s"),
        report.Metric(
            "rnd_random", f"Random: {reads:,} x 4 KiB random reads, cold", "reads/s", share=None
        ),
        report.Metric(
            "rnd_stored_bytes",
            "Random: stored after flush",
            "MiB",
            scale=mib,
            share=None,
            ratios=False,
        ),
        report.Metric("dup_write", f"Duplicate-heavy {big}: write + fsync", "MB/s"),
        report.Metric(
            "dup_durable",
            "Duplicate-heavy: write until durable (sealed)",
            "MB/s",
            share=WRITE_SEAL_SHARE,
            versus="dup_write",
            versus_label="write",
        ),
        report.Metric(
            "dup_seal_s", "Duplicate-heavy: sealing after fsync", "s", share=None, ratios=False
        ),
        report.Metric("dup_read", "Duplicate-heavy: sequential read, sealed, cold", "MB/s"),
        report.Metric(
            "dup_stored_bytes",
            "Duplicate-heavy: stored after flush",
            "MiB",
            limit=dup_limit / mib,
            scale=mib,
            share=None,
            ratios=False,
        ),
    ]


def goals(files: int, dup_limit: int) -> list[report.Goal]:
    """The issue's targets, each decided by the figures it names."""
    return [
        report.Goal(
            "every foundation figure >= 80% of the floor",
            ("seq_write", "seq_read", "create", "stat", "read", "delete"),
        ),
        report.Goal(
            f"the {files:,}-file workloads >= 80% of the floor",
            ("create", "stat", "read", "delete"),
        ),
        report.Goal(
            "application-visible sequential write >= 80% of the floor",
            ("seq_write", "rnd_write", "dup_write"),
        ),
        report.Goal(
            "write until sealed >= 50% of the floor's write", ("rnd_durable", "dup_durable")
        ),
        report.Goal(
            "sequential read of sealed data >= 80% of the floor",
            ("rnd_read", "rnd_reread", "dup_read"),
        ),
        report.Goal(
            f"duplicate-heavy file stored in <= {dup_limit >> 20} MiB", ("dup_stored_bytes",)
        ),
    ]


def _human(size: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} B"


# -- measuring -------------------------------------------------------------------------------


def measure_foundation(
    target: Target, data: datapath.Payloads, files: int, run: int, profile: Path | None
) -> Figures:
    """One pass of the foundation workloads on a started target, in a directory of its own."""
    base = target.root / f"run{run}"
    base.mkdir()
    big = base / "sequential.bin"
    tree = workloads.Tree.under(base, files)
    phases = Phases(target, run, profile)
    settle()
    phases.timed("seq_write", lambda: workloads.seq_write(big, data.random, data.size))
    make_cold(target)
    phases.timed("seq_read", lambda: workloads.seq_read(big, data.size))
    big.unlink()
    settle()
    phases.timed("create", lambda: workloads.create_files(tree))
    make_cold(target)
    phases.timed("stat", lambda: workloads.stat_files(tree))
    make_cold(target)
    phases.timed("read", lambda: workloads.read_files(tree))
    phases.timed("delete", lambda: workloads.delete_files(tree))
    base.rmdir()
    return phases.figures


def measure(target: Target, data: datapath.Payloads, args: argparse.Namespace, run: int) -> Figures:
    """One pass of every FUSE-side part of the suite that was not skipped."""
    figures: Figures = {}
    if "foundation" not in args.skip:
        figures |= measure_foundation(target, data, args.files, run, args.profile)
    if "datapath" not in args.skip:
        figures |= datapath.measure(target, data, args.random_reads, run, args.profile)
    return figures


def run_all(targets: Sequence[Target], args: argparse.Namespace) -> tuple[Results, dict[str, str]]:
    """Every target, `repeat` times; also the mount options each FUSE target really got."""
    results: Results = {t.name: {} for t in targets}
    options: dict[str, str] = {}
    data = datapath.Payloads.make(args.size)
    for target in targets:
        log.info("starting %s", target.name)
        target.start()
        if system.is_mounted(target.root):
            options[target.name] = system.mount_of(target.root).options
    for run in range(args.repeat):
        for target in targets:
            log.info("run %d/%d: %s", run + 1, args.repeat, target.name)
            for key, value in measure(target, data, args, run).items():
                results[target.name].setdefault(key, []).append(value)
    return results, options


# -- signals and cleanup ------------------------------------------------------------------------


def stop_all(targets: Sequence[Target], work_dir: Path) -> None:
    """Unmount everything and remove the work dir; a second Ctrl-C must not cut this short."""
    harness.ignore_signals()
    for target in reversed(targets):
        try:
            target.stop()
        except Exception:
            log.exception("stopping %s failed", target.name)
    harness.unmount_and_remove(work_dir)


# -- output -----------------------------------------------------------------------------------


def tables(args: argparse.Namespace, results: Results, dup_limit: int) -> list[report.Table]:
    """The result tables of the parts that ran."""
    out = []
    if "foundation" not in args.skip:
        rows = report.rows(foundation_metrics(args.size, args.files), results)
        out.append(report.Table("Foundation", rows))
    if "datapath" not in args.skip:
        metrics = datapath_metrics(args.size, args.random_reads, dup_limit)
        out.append(report.Table("Data path", report.rows(metrics, results), note=DATAPATH_NOTE))
        files = {"rnd": "Random", "dup": "Duplicate-heavy"}
        space = report.space_rows(results, files, args.size)
        if space:
            out.append(report.Table("tierfs space after each flush", space, report.SPACE_HEADER))
    return out


DATAPATH_NOTE = """\
For native and floor the data is durable once fsync returns, so their "until durable" rate
is their write rate and their sealing time is only the close. Stored sizes are what `tierfs
status` chunks `stored_bytes` grew by while the file was written and flushed."""


def notes(args: argparse.Namespace, load_at_start: str, results: Results) -> list[str]:
    """What a reader must know to trust (or discount) this run's figures."""
    cpus = len(os.sched_getaffinity(0))
    now = os.getloadavg()
    end = " ".join(f"{x:.2f}" for x in now)
    busy = max(now[0], float(load_at_start.split()[0])) >= 0.5 * cpus
    verdict = (
        "other work competed for the same cores and disk, so figures can move by tens of "
        "percent between runs"
        if busy
        else "the machine was otherwise quiet"
    )
    load = f"Load average {load_at_start} at the start and {end} at the end, on {cpus} CPUs"
    out = [f"{load}: {verdict}."]
    if args.repeat > 1:
        rates = [m for m in _all_metrics(args) if m.ratios]
        spreads = [report.widest_spread(results, name, rates) for name in results]
        described = [
            f"{name} {ratio:.2f}x ({key})"
            for name, (key, ratio) in zip(results, spreads, strict=True)
            if key
        ]
        out.append(
            f"{args.repeat} repeats; the widest spread between the fastest and the slowest "
            f"repeat of one figure: {', '.join(described)}."
        )
    else:
        out.append("One repeat: each figure is a single measurement.")
    if args.profile is not None:
        out.append(
            f"py-spy sampled the daemons during every phase (profiles in {args.profile}): "
            "sampling slows them down, so these figures are not comparable with other runs."
        )
    return out


def _all_metrics(args: argparse.Namespace) -> list[report.Metric]:
    dup_limit = datapath.Payloads.dup_limit(args.size)
    return [
        *foundation_metrics(args.size, args.files),
        *datapath_metrics(args.size, args.random_reads, dup_limit),
    ]


def write_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    results: Results,
    options: dict[str, str],
    machine: dict[str, str],
    kept: Sequence[str],
) -> None:
    """Print the tables (the runner's only stdout) and rewrite the markdown report."""
    dup_limit = datapath.Payloads.dup_limit(args.size)
    all_metrics = _all_metrics(args)
    missed = report.misses(all_metrics, results)
    goal_lines = report.goal_rows(goals(args.files, dup_limit), all_metrics, results)
    result_tables = tables(args, results, dup_limit)
    for t in result_tables:
        print(f"{t.title}\n{report.text_table(t.table, t.header)}\n")
    print("\n".join(goal_lines))
    settings = {
        "Sizes": f"{_human(args.size)} sequential files, {args.files:,} small files, "
        f"{args.random_reads:,} random reads",
        "Repeats": f"{args.repeat} (median shown)",
        **{f"FUSE options ({name})": opts for name, opts in options.items()},
    }
    run = report.Run(
        command=harness.command("tools.bench.run", argv),
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        machine=machine,
        settings=settings,
        tables=result_tables,
        goals=goal_lines,
        missed=missed,
        notes=notes(args, machine["Load average at start"], results),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report.document(run, kept))
    log.info("wrote %s", args.output)


COLD_SECTION = "cold"  # tools.bench.cold.SECTION
DELTA_SECTION = "delta"  # tools.bench.delta.SECTION
RESTORE_SECTION = "restore"  # tools.bench.restore: run on its own, kept here
RESTORE_SITE_SECTION = "restore-site"  # tools.bench.restore_site's figures, kept here


def kept_sections(
    args: argparse.Namespace,
    chunking_section: str | None,
    cold_section: str | None = None,
    delta_section: str | None = None,
) -> list[str]:
    """The sections this run does not write, from the current report; the chunking, cold
    and delta sections replaced when their benchmarks ran (the restore section is only
    kept: `python -m tools.bench.restore` writes it)."""
    names = [
        *report.KEPT_SECTIONS,
        COLD_SECTION,
        DELTA_SECTION,
        RESTORE_SECTION,
        RESTORE_SITE_SECTION,
    ]
    old = args.output.read_text() if args.output.exists() else ""
    kept = {name: report.kept_section(old, name) for name in names}
    if chunking_section is not None:
        kept[chunking.SECTION] = chunking_section
    if cold_section is not None:
        kept[COLD_SECTION] = cold_section
    if delta_section is not None:
        kept[DELTA_SECTION] = delta_section
    return [kept[name] for name in names]


def run_chunking(args: argparse.Namespace) -> chunking.Outcome | None:
    """The chunking micro-benchmark, unless skipped or interrupted (its old section stays)."""
    if "chunking" in args.skip:
        return None
    try:
        return chunking.run()
    except KeyboardInterrupt:
        log.error("interrupted during the chunking benchmark; keeping its old section")
        return None


def _size_arg(size: int) -> str:
    """`size` as a --size argument (1G rather than 1073741824)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def cold_argv(args: argparse.Namespace) -> list[str]:
    """The cold-tier benchmark's arguments: this run's size, work dir and output."""
    argv = ["--size", _size_arg(args.size), "--output", str(args.output)]
    return argv + (["--work-dir", str(args.work_dir)] if args.work_dir else [])


def run_cold(args: argparse.Namespace) -> cold.Outcome | None:
    """The cold-tier benchmark, unless skipped; interrupted or failed, its old section stays
    (it unmounts and cleans up after itself either way)."""
    if "cold" in args.skip:
        return None
    from tools.bench import cold

    try:
        return cold.run(cold.parse_args(cold_argv(args)))
    except KeyboardInterrupt:
        log.error("interrupted during the cold-tier benchmark; keeping its old section")
    except Exception:
        log.exception("the cold-tier benchmark failed; keeping its old section")
    return None


def delta_argv(args: argparse.Namespace) -> list[str]:
    """The delta benchmark's arguments: this run's work dir and output. Not --size: the
    delta workload is the issue's 512 MiB dataset, whatever the sequential file size."""
    argv = ["--output", str(args.output)]
    return argv + (["--work-dir", str(args.work_dir)] if args.work_dir else [])


def run_delta(args: argparse.Namespace) -> delta.Outcome | None:
    """The delta-send benchmark, unless skipped; interrupted or failed, its old section stays
    (it unmounts, stops its S3 server and cleans up after itself either way)."""
    if "delta" in args.skip:
        return None
    from tools.bench import delta

    try:
        return delta.run(delta.parse_args(delta_argv(args)))
    except KeyboardInterrupt:
        log.error("interrupted during the delta benchmark; keeping its old section")
    except Exception:
        log.exception("the delta benchmark failed; keeping its old section")
    return None


def sections_only(args: argparse.Namespace) -> int:
    """Only the parts that write a section of their own (chunking, cold, delta): each
    rewrites just its section of the report."""
    status = 0
    if "chunking" not in args.skip:
        status = chunking.main(["--output", str(args.output)])
    if "cold" not in args.skip:
        from tools.bench import cold

        status = cold.main(cold_argv(args)) or status
    if "delta" not in args.skip:
        from tools.bench import delta

        status = delta.main(delta_argv(args)) or status
    return status


def main(argv: Sequence[str] | None = None) -> int:
    from tools.bench import cold, delta

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    harness.setup_logging(args.verbose)
    if {"foundation", "datapath"} <= set(args.skip):
        return sections_only(args)
    if os.geteuid() != 0:
        log.error("needs root: dropping caches and FUSE allow_other (as tierfs uses it)")
        return 2
    if args.profile is not None and not profiling.available():
        log.error("--profile needs py-spy next to %s (pip install py-spy)", sys.executable)
        return 2
    signal.signal(signal.SIGTERM, harness.interrupt)
    signal.signal(signal.SIGHUP, harness.interrupt)
    work_dir = harness.make_work_dir(harness.work_parent(args.work_dir), "tierfs-bench-")
    log.info("work directory %s", work_dir)
    if warning := system.busy_warning():
        log.warning("%s", warning)
    targets = build(args.only or list(report.TARGETS), work_dir)
    try:
        machine = {**system.machine(work_dir), **system.software(REPO_ROOT)}
        results, options = run_all(targets, args)
    except KeyboardInterrupt:
        log.error("interrupted; unmounting and cleaning up")
        return 130
    finally:
        stop_all(targets, work_dir)
    outcome = run_chunking(args)
    section = chunking.section(outcome) if outcome is not None else None
    cold_outcome = run_cold(args)
    delta_outcome = run_delta(args)
    run_command = harness.command("tools.bench.run", argv)
    cold_section = None
    if cold_outcome is not None:
        cold_section = cold.section(cold_outcome, run_command)
    delta_section = None
    if delta_outcome is not None:
        delta_section = delta.section(delta_outcome, run_command)
    kept = kept_sections(args, section, cold_section, delta_section)
    write_report(args, argv, results, options, machine, kept)
    if outcome is not None:
        chunking.print_tables(outcome)
    if cold_outcome is not None:
        cold.print_tables(cold_outcome)
    if delta_outcome is not None:
        delta.print_tables(delta_outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
