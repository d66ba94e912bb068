"""Run the zonefs layer (`layer.py`) in its own process from a test, and always unmount it."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from tierfs.datadir import unescape_mountinfo

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class ZonefsLayer:
    """The layer over the emulated device `image`, mounted at `mnt`; its log in `log_path`.

    `start()` and `stop()` can be repeated (the device keeps its zones in between, as a drive
    across a power cycle: open zones come back closed). `stop()` unmounts with
    `fusermount3 -u`, lazily if something still holds the mount, and waits for the process.
    """

    def __init__(
        self,
        image: Path,
        mnt: Path,
        log_path: Path,
        *,
        explicit_open: bool = True,
        errors: str = "repair",
    ) -> None:
        self.image = image
        self.mnt = mnt
        self.log_path = log_path
        self.explicit_open = explicit_open
        self.errors = errors
        self.proc: subprocess.Popen[bytes] | None = None
        mnt.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tests.zonefs_layer.layer", str(self.image), str(self.mnt)]
        if self.explicit_open:
            cmd.append("--explicit-open")
        return [*cmd, f"--errors={self.errors}"]

    def start(self) -> None:
        assert self.proc is None, "the layer is already running"
        pythonpath = [str(REPO_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(f"the layer exited before mounting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the layer did not mount in time:\n{self.log_tail()}")
            time.sleep(0.005)

    def stop(self) -> None:
        """Unmount, wait for the process to exit (0), and never leave a mount behind."""
        proc, self.proc = self.proc, None
        try:
            clean = unmount(self.mnt)
            if proc is not None:
                if not clean:
                    proc.terminate()  # a lazy detach ends the session only once unused
                code = _wait(proc)
                assert code == 0, f"the layer exited {code}:\n{self.log_tail()}"
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            unmount(self.mnt)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no layer log)"


def _wait(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the layer did not exit after its unmount") from None


def unmount(mnt: Path) -> bool:
    """`fusermount3 -u`; if the mount is busy (a handle left open), detach it lazily.
    False if it had to."""
    if not is_mounted(mnt):
        return True
    done = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if done.returncode == 0 or not is_mounted(mnt):
        return True
    log.warning("fusermount3 -u %s: %s; detaching lazily", mnt, done.stderr.strip())
    with contextlib.suppress(OSError):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    return False


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at `path` (also while its FUSE daemon is dead)."""
    target = str(path.absolute())
    with open("/proc/self/mountinfo") as f:
        return any(unescape_mountinfo(line.split()[4]) == target for line in f)
