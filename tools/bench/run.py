"""`python -m tools.bench.run`: benchmark tierfs against native and the pyfuse3 floor.

Prints the result table on stdout (progress goes to the log on stderr) and rewrites
docs/benchmarks.md. Every mount it makes is unmounted and its work directory removed on every
exit path, Ctrl-C and SIGTERM included. docs/benchmarks.md describes the method.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from tools.bench import report, system, workloads
from tools.bench.targets import REPO_ROOT, Target, build

log = logging.getLogger("tools.bench")

WORK_DIR_CANDIDATES = (Path("/var/tmp"), Path("/work"))
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

Figures = dict[str, float]
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
    parser.add_argument("--repeat", type=_positive, default=1, help="runs; the median is shown")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown report")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def metrics(size: int, files: int) -> list[report.Metric]:
    """The reported figures, labelled with this run's sizes."""
    big = _human(size)
    return [
        report.Metric("seq_write", f"Sequential write {big}, 1 MiB I/O, fsync", "MB/s"),
        report.Metric("seq_read", f"Sequential read {big}, 1 MiB I/O, cold", "MB/s"),
        report.Metric("create", f"Create {files:,} x 4 KiB files", "files/s"),
        report.Metric("stat", f"Stat {files:,} files, cold", "files/s"),
        report.Metric("read", f"Read {files:,} x 4 KiB files, cold", "files/s"),
        report.Metric("delete", f"Delete {files:,} files", "files/s"),
    ]


def _human(size: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} B"


# -- the work directory --------------------------------------------------------------------


def work_parent(requested: Path | None) -> Path:
    """Where the work dir goes: never memory (tmpfs), since the figures are about disks."""
    if requested is not None:
        if system.is_memory_backed(requested):
            log.warning("%s is memory-backed: the figures will not measure a disk", requested)
        return requested
    for candidate in WORK_DIR_CANDIDATES:
        usable = candidate.is_dir() and os.access(candidate, os.W_OK)
        if usable and not system.is_memory_backed(candidate):
            return candidate
    raise SystemExit("no disk-backed work directory found; pass --work-dir")


def remove_work_dir(work_dir: Path) -> None:
    """Delete the work dir, unless a mount under it survived (never delete through a mount)."""
    left = system.mounts_under(work_dir)
    if left:
        log.error("not removing %s: still mounted: %s", work_dir, ", ".join(map(str, left)))
        return
    shutil.rmtree(work_dir, ignore_errors=True)


# -- measuring -------------------------------------------------------------------------------


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


def _phase(target: Target, key: str, fn: Callable[[], float], figures: Figures) -> None:
    figures[key] = value = fn()
    log.info("%s %s: %.1f", target.name, key, value)


def measure(target: Target, size: int, files: int, run: int) -> Figures:
    """One pass of every workload on a started target, in a directory of its own."""
    base = target.root / f"run{run}"
    base.mkdir()
    big = base / "sequential.bin"
    tree = workloads.Tree.under(base, files)
    figures: Figures = {}
    settle()
    _phase(target, "seq_write", lambda: workloads.seq_write(big, size), figures)
    make_cold(target)
    _phase(target, "seq_read", lambda: workloads.seq_read(big, size), figures)
    big.unlink()
    settle()
    _phase(target, "create", lambda: workloads.create_files(tree), figures)
    make_cold(target)
    _phase(target, "stat", lambda: workloads.stat_files(tree), figures)
    make_cold(target)
    _phase(target, "read", lambda: workloads.read_files(tree), figures)
    _phase(target, "delete", lambda: workloads.delete_files(tree), figures)
    base.rmdir()
    return figures


def run_all(targets: Sequence[Target], args: argparse.Namespace) -> tuple[Results, dict[str, str]]:
    """Every target, `repeat` times; also the mount options each FUSE target really got."""
    results: Results = {t.name: {} for t in targets}
    options: dict[str, str] = {}
    for target in targets:
        log.info("starting %s", target.name)
        target.start()
        if system.is_mounted(target.root):
            options[target.name] = system.mount_of(target.root).options
    for run in range(args.repeat):
        for target in targets:
            log.info("run %d/%d: %s", run + 1, args.repeat, target.name)
            figures = measure(target, args.size, args.files, run)
            for key, value in figures.items():
                results[target.name].setdefault(key, []).append(value)
    return results, options


# -- signals and cleanup ------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_all(targets: Sequence[Target], work_dir: Path) -> None:
    """Unmount everything and remove the work dir; a second Ctrl-C must not cut this short."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    for target in reversed(targets):
        try:
            target.stop()
        except Exception:
            log.exception("stopping %s failed", target.name)
    for mountpoint in system.mounts_under(work_dir):
        system.fusermount_unmount(mountpoint, lazy=True)
    remove_work_dir(work_dir)


# -- output -----------------------------------------------------------------------------------


def write_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    results: Results,
    options: dict[str, str],
    machine: dict[str, str],
) -> None:
    """Print the table (the runner's only stdout) and rewrite the markdown report."""
    table_metrics = metrics(args.size, args.files)
    table = report.rows(table_metrics, results)
    missed = report.misses(table_metrics, results)
    print(report.text_table(table))
    print()
    print("tierfs figures below 80% of the floor: " + ("; ".join(missed) or "none"))
    settings = {
        "Sizes": f"{_human(args.size)} sequential file, {args.files:,} small files",
        "Repeats": f"{args.repeat} (median shown)",
        **{f"FUSE options ({name})": opts for name, opts in options.items()},
    }
    run = report.Run(
        command=shlex.join(["python", "-m", "tools.bench.run", *argv]),
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        machine=machine,
        settings=settings,
        table=table,
        missed=missed,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report.document(run))
    log.info("wrote %s", args.output)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:
        log.error("needs root: dropping caches and FUSE allow_other (as tierfs uses it)")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="tierfs-bench-", dir=work_parent(args.work_dir)))
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
    write_report(args, argv, results, options, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
