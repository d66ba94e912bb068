"""One tierfs under test: arm a crash point, crash it (kill -9, plus a power cut when its data
directory lives in the power-loss layer), remount it and check it against the model.

The checks after every crash are the same: the mount succeeds as it is (no fsck first), every
file is in a state the model allows, files that are gone left neither an inode nor a staging
file behind, and after a clean unmount `tierfs fsck` finds nothing.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import AGGRESSIVE_SEAL, Mount, force_unmount, run_cli, wait_for_exit
from tierfs import crashpoints
from tierfs.fs.staging import Staging
from tierfs.meta import schema
from tierfs.meta.store import MetaStore

from .model import FileModel, Model, Observed, observe
from .process import LayerProcess
from .workload import (
    Client,
    RandomWorkload,
    before_crash,
    reach_every_point,
    run_until_gone,
)

MAX_KILL_DELAY = 1.5
PUNCHED_BELOW = 64 * 1024

# The random runs: a fixed seed (printed in every failure) and the slow loop's length.
SEED = int(os.environ.get("TIERFS_CRASH_SEED", "20240611"))
LOOP_ITERATIONS = int(os.environ.get("TIERFS_CRASH_ITERATIONS", "40"))

# Compact a file as soon as a partial seal leaves it with more than one extent.
COMPACT_EAGERLY: dict[str, object] = {"seal__compact_min_extents": 1, "seal__compact_ratio": 1.0}

# The crash-point runs: commits only on fsync and unmount (and status), so that what a crash
# point catches uncommitted is the same on every run.
# With a small zone device (16 zones of 4 MiB) and 13 of them kept in reserve, reclaim's low
# mark (reserve + 2 free zones) is crossed as soon as data fills three zones. The workload's
# text patterns compress ~50x: stored raw, 8 MiB of them fill two zones.
COLD_SMALL_DEVICE = "emulated:64M:4M"
COLD_SMALL: dict[str, object] = {"cold__reserve_zones": 13, "seal__zstd_level": 0}
POINT_SETTINGS: dict[str, object] = {
    "metadata__commit_interval": 3600.0,
    **COMPACT_EAGERLY,
    **COLD_SMALL,
}

# The random runs, by seal policy: data that mostly stays staged during a run, or that is
# sealed, punched and compacted while the kills land.
RANDOM_SETTINGS: dict[str, dict[str, object]] = {
    "staging": COMPACT_EAGERLY,
    "sealing": {**AGGRESSIVE_SEAL, **COMPACT_EAGERLY},
}


@dataclass
class Rig:
    """A tierfs mount and how it crashes: kill -9 alone, or with a power cut of `layer`."""

    m: Mount
    layer: LayerProcess | None = None
    power_cut: threading.Event = field(default_factory=threading.Event)

    @property
    def log_file(self) -> Path:
        return self.m.data / "log" / "tierfs.log"

    def client(self, model: Model) -> Client:
        return Client(self.m.mnt, model, self.power_cut)

    def arm(self, point: str | None) -> None:
        """Make the next mount's daemon die at `point` (None: at no point)."""
        if point is None:
            self.m.env.pop(crashpoints.ENV, None)
        else:
            self.m.env[crashpoints.ENV] = point

    def try_mount(self) -> subprocess.CompletedProcess[str]:
        return run_cli("mount", self.m.data, self.m.mnt, env=self.m.env, check=False)

    def log_mark(self) -> int:
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int) -> str:
        with open(self.log_file, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    # -- crashing ---------------------------------------------------------------------------

    def assert_died_at(self, point: str, mark: int, what_happened: str) -> None:
        """The daemon logged reaching `point` (read before any power cut) and is gone."""
        log = self.log_since(mark)
        assert f"crash point {point} reached" in log, (
            f"the daemon did not die at crash point {point!r} ({what_happened}); "
            f"its log since:\n{log[-4000:]}"
        )
        self.wait_for_daemon_exit()

    def wait_for_daemon_exit(self) -> None:
        """Wait until the last daemon is gone (its pid file may be stale, or lost with the
        power)."""
        try:
            pid = self.m.daemon_pid()
        except FileNotFoundError:
            return
        wait_for_exit(pid)

    def cut_power(self) -> None:
        """Cut the layer's power (nothing becomes durable from now on); no-op without one."""
        if self.layer is not None:
            self.power_cut.set()
            self.layer.cut_power()

    def kill_now(self, pid: int) -> None:
        """The moment of the crash: power cut (if any), then kill -9. Safe from a thread.

        After a power cut the daemon may already have died of its I/O errors."""
        self.cut_power()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def kill(self, client: Client) -> None:
        self.kill_now(self.m.daemon_pid())
        self.recover(client)

    def recover(self, client: Client) -> None:
        """After the daemon died: detach its mount, drop the test's handles, and power the
        layer back on with what it kept."""
        self.wait_for_daemon_exit()
        self.cut_power()
        force_unmount(self.m.mnt)
        client.close_all()
        client.model.crashed()
        if self.layer is not None:
            self.layer.restart()
        self.power_cut.clear()

    def wait_until_punched(self, f: FileModel, timeout: float = 10.0) -> None:
        """Until the daemon has punched the sealed bytes out of the file's staging file (it
        does so once the seal's commit is durable)."""
        deadline = time.monotonic() + timeout
        while self._staged_allocation(f) >= PUNCHED_BELOW:
            assert time.monotonic() < deadline, f"{f.key}: staging not punched in {timeout:g}s"
            time.sleep(0.05)

    def _staged_allocation(self, f: FileModel) -> int:
        return sum(
            path.stat().st_blocks * 512
            for ino, _, path in Staging(self.m.data / "staging", 0).all_files()
            if ino == f.ino
        )

    # -- checking ---------------------------------------------------------------------------

    def remount_and_check(self, model: Model, context: str) -> Observed:
        """Mount again, as it is (no crash point, no fsck), and check every file."""
        self.arm(None)
        result = self.try_mount()
        assert result.returncode == 0, (
            f"mount after {context} failed (exit {result.returncode}): {result.stderr.strip()}"
        )
        observed = observe(self.m.mnt)
        problems = model.problems(observed) + self._staging_leftovers(model.gone(observed))
        assert not problems, f"after {context}:\n" + "\n".join(problems)
        return observed

    def umount_and_fsck(self, model: Model, observed: Observed, context: str) -> None:
        self.m.umount()
        leftovers = self._index_leftovers(model.gone(observed))
        assert not leftovers, f"after {context} and a clean unmount:\n" + "\n".join(leftovers)
        result = run_cli("fsck", self.m.data, check=False)
        assert result.returncode == 0, (
            f"fsck after {context} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )

    def _staging_leftovers(self, gone: list[FileModel]) -> list[str]:
        """Staging files (of any generation) of inodes that are gone."""
        by_ino = {f.ino: f for f in gone if f.ino is not None}
        return [
            f"{by_ino[ino].key}: gone, but its staging file {path} is still there"
            for ino, _, path in Staging(self.m.data / "staging", 0).all_files()
            if ino in by_ino
        ]

    def _index_leftovers(self, gone: list[FileModel]) -> list[str]:
        store = MetaStore.open(self.m.data / "meta", readonly=True)
        try:
            out = [
                f"{f.key}: gone, but inode {f.ino} is still in the index"
                for f in gone
                if f.ino is not None and store.get_inode(f.ino) is not None
            ]
            with store.tx.cursor(db=store.orphans) as cur:
                orphans = [schema.key_ino(bytes(k)) for k in cur.iternext(values=False)]
        finally:
            store.close()
        if orphans:
            out.append(f"orphan inodes still recorded: {orphans}")
        return out


# -- scenarios ------------------------------------------------------------------------------


def crash_at_point(rig: Rig, point: str) -> None:
    """One row of the crash table: durable files and an orphan, a crash (kill -9) to leave
    them for recovery, then a workload during which the daemon dies at `point`, then checks.
    The data directory must have `POINT_SETTINGS`."""
    model = Model()
    client = rig.client(model)
    durables = before_crash(client)
    rig.kill(client)
    mark = rig.log_mark()
    rig.arm(point)
    mounted = rig.try_mount()
    what = f"mount exited {mounted.returncode}: {mounted.stderr.strip()}"
    if mounted.returncode == 0:
        client = rig.client(model)
        if run_until_gone(lambda: reach_every_point(client, durables)):
            client.close_all()
            umount = run_cli("umount", rig.m.mnt, check=False)
            what = f"the workload finished; umount exited {umount.returncode}: {umount.stderr}"
        else:
            what = "the workload lost the mount"
    rig.assert_died_at(point, mark, what)
    rig.recover(client)
    context = f"a crash at {point}" + (" and a power cut" if rig.layer else "")
    observed = rig.remount_and_check(model, context)
    rig.umount_and_fsck(model, observed, context)


def random_crashes(rig: Rig, seed: int, iterations: int) -> None:
    """Random workloads, each killed (and its power cut) at a random moment, each checked.

    The seed fixes the operations and the kill delay; where exactly the kill lands also depends
    on timing, so a failing seed reproduces the workload, not always the very same crash.
    """
    model = Model()
    for i in range(iterations):
        rng = random.Random(f"{seed}/{i}")
        context = (
            f"random crash {i + 1}/{iterations} of seed {seed} (rerun the workload with "
            f"TIERFS_CRASH_SEED={seed})"
        )
        client = rig.client(model)
        killer = Killer(rig, rng.uniform(0.0, MAX_KILL_DELAY))
        killer.start()
        try:
            run_until_gone(RandomWorkload(client, rng).run)
        except Exception as exc:
            raise AssertionError(f"{context}: the workload failed: {exc!r}") from exc
        finally:
            killer.finish()
        rig.recover(client)
        observed = rig.remount_and_check(model, context)
        model.settle(observed)
        rig.umount_and_fsck(model, observed, context)
        if i + 1 < iterations:
            rig.m.mount()


class Killer(threading.Thread):
    """Crashes the rig's daemon after `delay` seconds, from its own thread."""

    def __init__(self, rig: Rig, delay: float) -> None:
        super().__init__(name="killer", daemon=True)
        self.rig = rig
        self.pid = rig.m.daemon_pid()
        self.delay = delay
        self.error: BaseException | None = None

    def run(self) -> None:
        time.sleep(self.delay)
        try:
            self.rig.kill_now(self.pid)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        """Wait for the kill; its failure is the test's failure."""
        self.join()
        if self.error is not None:
            raise AssertionError(f"the kill failed: {self.error!r}") from self.error


def power_loss_after_overwrite_of_sealed_data(rig: Rig) -> None:
    """Sealed, fsynced bytes overwritten in place and not fsynced, then a power cut after a
    commit that recorded the overwrite's staged range: the file must hold its old bytes or
    its new ones, never the hole the seal left in its staging file. Needs `POINT_SETTINGS`
    (no timer commit, no seal of the overwrite before the cut)."""
    model = Model()
    client = rig.client(model)
    f = client.create("sealed")
    client.write(f, 200 * 1024)
    client.fsync(f)
    client.fsync_dir()
    client.seal_all()
    rig.wait_until_punched(f)
    client.rewrite(f, 150 * 1024, 1000)
    client.fsync(f)  # flushes the staging file: the punched hole is durable now
    client.rewrite(f, 0, 64 * 1024)
    other = client.create("other")
    client.write(other, 10)
    client.fsync(other)  # commits (and flushes) the group: f's new staged range is durable
    rig.kill(client)
    context = "a power cut after an unsynced overwrite of sealed data"
    observed = rig.remount_and_check(model, context)
    rig.umount_and_fsck(model, observed, context)


def power_loss_after_clean_umount(rig: Rig) -> None:
    """A clean unmount makes everything durable, also against a power cut right after it; and
    what the next mount then sees must need no repair either."""
    assert rig.layer is not None
    model = Model()
    client = rig.client(model)
    durables = before_crash(client)
    client.unlink(durables.victim)
    client.rename(durables.moved, model.fresh_name(durables.moved))
    client.truncate(durables.keep)
    client.write(durables.keep, 3000)
    client.close_all()
    rig.m.umount()
    model.all_durable()
    rig.layer.cut_power()
    rig.layer.restart()
    context = "a clean unmount and a power cut"
    observed = rig.remount_and_check(model, context)
    rig.umount_and_fsck(model, observed, context)
