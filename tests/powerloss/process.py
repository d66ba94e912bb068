"""Run the power-loss layer (`layer.py`) in its own process, and cut its power, from a test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tierfs.datadir import unescape_mountinfo

from . import layer
from .fuse import syncfs

REPO_DIR = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class LayerProcess:
    """The layer over `root/disk`, mounted at `root/layer-mnt`, with scratch space next to it.

    `start()` and `stop()` can be repeated: between them the disk is a plain directory tree.
    `cut_power()` makes the next `stop()` write back only what was durable.
    """

    def __init__(self, root: Path) -> None:
        self.disk = root / "disk"
        self.scratch = root / "layer"
        self.mnt = root / "layer-mnt"
        self.log = self.scratch / "layer.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.disk, self.scratch, self.mnt):
            d.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        assert self.proc is None, "the layer is already running"
        for name in (layer.READY_NAME, layer.CUT_NAME):
            (self.scratch / name).unlink(missing_ok=True)
        pythonpath = [str(REPO_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
        cmd = [sys.executable, "-m", "tests.powerloss.layer", str(self.disk), str(self.scratch)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, str(self.mnt)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        self._wait_for(lambda: (self.scratch / layer.READY_NAME).exists(), "become ready")

    def cut_power(self) -> None:
        """From now on nothing becomes durable; returns once the layer has acknowledged it."""
        self._signal(signal.SIGUSR1)
        self._wait_for(lambda: (self.scratch / layer.CUT_NAME).exists(), "cut the power")

    def power_was_cut(self) -> bool:
        return (self.scratch / layer.CUT_NAME).exists()

    def stop(self) -> None:
        """Unmount and write the disk back (the durable state if the power was cut)."""
        proc = self.proc
        if proc is None:
            return
        if not self.power_was_cut():
            # Dirty pages of shared writable mmaps are written back only now, as on a real
            # clean shutdown.
            syncfs(self.mnt)
        self._signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        finally:
            self.proc = None
        assert proc.returncode == 0, f"the layer exited {proc.returncode}:\n{self.log_tail()}"
        assert not is_mounted(self.mnt), f"the layer left {self.mnt} mounted"

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """Last-resort cleanup after a failed test: no write-back, just go away."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.proc = None
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no layer log)"

    def _signal(self, signum: int) -> None:
        assert self.proc is not None, "the layer is not running"
        self.proc.send_signal(signum)

    def _wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not done():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the layer exited {self.proc.returncode} before it could {what}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the layer did not {what} in time:\n{self.log_tail()}")
            time.sleep(0.01)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at `path` (works while its FUSE daemon is dead, too)."""
    target = str(path.absolute())
    with open("/proc/self/mountinfo") as f:
        return any(unescape_mountinfo(line.split()[4]) == target for line in f)
