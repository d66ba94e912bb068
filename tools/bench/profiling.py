"""Optional sampling profiles of the FUSE daemons during timed phases (`--profile DIR`).

A figure that misses its target needs evidence of where the time goes; py-spy samples the
daemon serving the mount while one phase runs and leaves a raw (collapsed-stack) file per
phase. Sampling slows the daemon down, so figures of a profiled run are not comparable and
the report says so.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PY_SPY = Path(sys.executable).with_name("py-spy")
ATTACH_SECONDS = 1.0
STOP_TIMEOUT = 120.0


def available() -> bool:
    """py-spy is installed next to this interpreter (`pip install py-spy`; not a dependency)."""
    return PY_SPY.exists()


@contextlib.contextmanager
def sampled(pid: int | None, out_dir: Path | None, name: str) -> Iterator[None]:
    """Record `pid` with py-spy while the block runs, into OUT_DIR/NAME.txt (raw format).

    Does nothing without a directory or a daemon. Idle samples are kept (`--idle`), so that
    time a thread spends blocked in a syscall such as fdatasync shows up too.
    """
    if out_dir is None or pid is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.txt"
    cmd = [str(PY_SPY), "record", "-p", str(pid), "-f", "raw", "-o", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--threads", "--idle", "--rate", "250"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=ATTACH_SECONDS)
        yield
    finally:
        _stop(proc, out)


def _stop(proc: subprocess.Popen[bytes], out: Path) -> None:
    """SIGINT makes py-spy write its output; a py-spy that will not stop is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if out.exists():
        log.info("profile written to %s", out)
    else:
        log.warning("py-spy wrote no profile: %s", err.decode(errors="replace").strip())
