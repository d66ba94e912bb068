"""What the benchmarks that make mounts of their own share: logging and the root check of their
`main`, the work directory (on a disk, removed on every exit path), the signals that interrupt
a run and are ignored while it cleans up, and the section of docs/benchmarks.md each writes.

Used by tools/bench/run.py, tools/bench/cold.py and tools/bench/delta.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from tools.bench import report, system

log = logging.getLogger("tools.bench")

WORK_DIR_CANDIDATES = (Path("/var/tmp"), Path("/work"))
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WIDTH = 95
MACHINE_KEYS = (
    "CPUs (nproc)",
    "Memory",
    "Kernel",
    "Work dir filesystem",
    "Load average at start",
    "Python",
    "tierfs",
)

Handlers = dict[signal.Signals, Any]
Outcome = TypeVar("Outcome")


# -- logging and the command line -------------------------------------------------------------


def setup_logging(verbose: bool) -> None:
    """Progress to stderr (stdout is for the tables)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def command(module: str, argv: Sequence[str]) -> str:
    """The command line that ran `module`, as the report quotes it."""
    return shlex.join(["python", "-m", module, *argv])


def add_common_options(parser: argparse.ArgumentParser, default_output: Path) -> None:
    """The options every benchmark with a work directory and a report section ends with."""
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where to make the temporary work directory (default: /var/tmp or /work)",
    )
    parser.add_argument("--output", type=Path, default=default_output, help="markdown report")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def update_document(path: Path, name: str, text: str, logger: logging.Logger) -> None:
    """Replace (or append) section `name` of the report, leaving the rest of the file as it
    is."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.with_section(old, name, text))
    logger.info("wrote the %s section of %s", name, path)


def main(
    argv: Sequence[str] | None,
    *,
    module: str,
    parse_args: Callable[[Sequence[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace], Outcome],
    print_tables: Callable[[Outcome], None],
    section: Callable[[Outcome, str], str],
    name: str,
    root_for: str,
    cleaned_up: str,
    logger: logging.Logger,
) -> int:
    """A benchmark's `main`: parse, check for root, run (Ctrl-C ends it with 130 once it has
    cleaned up), print the tables and, unless --no-write, write its section of the report."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(args_list)
    setup_logging(args.verbose)
    if os.geteuid() != 0:
        logger.error("needs root: %s", root_for)
        return 2
    try:
        outcome = run(args)
    except KeyboardInterrupt:
        logger.error("interrupted; %s", cleaned_up)
        return 130
    print_tables(outcome)
    if not args.no_write:
        update_document(args.output, name, section(outcome, command(module, args_list)), logger)
    return 0


# -- signals ------------------------------------------------------------------------------------


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def catch_signals() -> Handlers:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt (also when the suite runner, which
    ignores them while it cleans up, calls us); the previous handlers, to restore."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, interrupt)
    return previous


def ignore_signals() -> None:
    """While cleaning up: a second Ctrl-C must not cut it short."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def signals_ignored(previous: Handlers) -> Iterator[None]:
    """The signals ignored inside the block; then the handlers are `previous` again."""
    ignore_signals()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- the work directory ---------------------------------------------------------------------


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


def make_work_dir(parent: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def remove_work_dir(work_dir: Path) -> None:
    """Delete the work dir, unless a mount under it survived (never delete through a mount)."""
    left = system.mounts_under(work_dir)
    if left:
        log.error("not removing %s: still mounted: %s", work_dir, ", ".join(map(str, left)))
        return
    shutil.rmtree(work_dir, ignore_errors=True)


def unmount_and_remove(work_dir: Path) -> None:
    """Unmount whatever is left under the work dir (lazily), then remove it."""
    for mountpoint in system.mounts_under(work_dir):
        system.fusermount_unmount(mountpoint, lazy=True)
    remove_work_dir(work_dir)


# -- the report ---------------------------------------------------------------------------------


def load() -> str:
    """The load average now, as `system.machine` gives it at the start."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def busy_note(machine: dict[str, str], load_end: str, what: str) -> str:
    """Whether the machine was quiet from start to end of a run; `what` (times, figures)
    can move between runs when it was not."""
    cpus = len(os.sched_getaffinity(0))
    start = machine["Load average at start"]
    busy = max(float(start.split()[0]), float(load_end.split()[0])) >= 0.5 * cpus
    verdict = (
        f"other work competed for the same cores and disk, so {what} can move by tens of "
        "percent between runs"
        if busy
        else "the machine was otherwise quiet"
    )
    return (
        f"Load average {start} at the start and {load_end} at the end, on {cpus} CPUs: {verdict}."
    )


def bullets(items: Sequence[str]) -> str:
    """Markdown bullets, wrapped at WIDTH."""
    return "\n".join(
        textwrap.fill(item, WIDTH, initial_indent="- ", subsequent_indent="  ") for item in items
    )


def machine_list(machine: dict[str, str]) -> dict[str, str]:
    """The machine's facts the sections show, in MACHINE_KEYS order."""
    return {k: machine[k] for k in MACHINE_KEYS if k in machine}
