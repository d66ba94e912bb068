"""Differential test: random operations on the mount and on a plain directory must agree.

A Hypothesis state machine applies the same operation to a tierfs mount and to a plain
directory on the host, compares the outcome (result or errno) after every step, compares the
touched paths' metadata and contents, and compares both trees in full at the end of every run.
The mount is remounted in the middle of the sequence. In CI Hypothesis is derandomised
(profile "ci"); HYPOTHESIS_PROFILE=long runs more and longer sequences.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import Mount

NAMES = ["f0", "f1", "d0", "d1", "é x"]
PATHS = sorted(
    {n for n in NAMES}
    | {f"{a}/{b}" for a in ("d0", "d1") for b in NAMES}
    | {f"d0/d1/{b}" for b in ("f0", "d0")}
)
MAX_FILE = 256 * 1024
STEPS_PER_RUN = 250
RUNS = 20
REMOUNT_EVERY = 1000

paths = st.sampled_from(PATHS)
modes = st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o444, 0o4755, 0o2755, 0o1777])
xattr_names = st.sampled_from(["user.a", "user.b", "user.long." + "x" * 100])


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """('ok', result) or ('err', errno): what an application would observe."""
    try:
        return "ok", fn()
    except OSError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, exc.errno)


def describe(path: Path) -> tuple[Any, ...]:
    """What must match between the two trees for one path."""
    try:
        st_ = os.lstat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    kind = stat.S_IFMT(st_.st_mode)
    info: tuple[Any, ...] = (kind, stat.S_IMODE(st_.st_mode), st_.st_nlink)
    if stat.S_ISREG(st_.st_mode):
        info += (st_.st_size, path.read_bytes())
    elif stat.S_ISLNK(st_.st_mode):
        info += (os.readlink(path),)
    elif stat.S_ISDIR(st_.st_mode):
        info += (sorted(os.listdir(path)),)
    if not stat.S_ISLNK(st_.st_mode):
        xattrs = sorted(
            (n, os.getxattr(path, n)) for n in os.listxattr(path) if n.startswith("user.")
        )
        info += (xattrs,)
    return info


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            out[str(full.relative_to(root))] = describe(full)
    return out


class Counter:
    ops = 0


def make_machine(fs: Mount, model_root: Path, counter: Counter) -> type[RuleBasedStateMachine]:
    class FsAgainstDirectory(RuleBasedStateMachine):
        """The mount (`a`) against a plain directory (`b`)."""

        @initialize()
        def fresh_roots(self) -> None:
            self.a = fs.mnt / "run"
            self.b = model_root
            for root in (self.a, self.b):
                if root.exists():
                    shutil.rmtree(root)
                root.mkdir()

        def both(self, op: Callable[[Path], Any], *touched: str) -> None:
            counter.ops += 1
            ra = outcome(lambda: op(self.a))
            rb = outcome(lambda: op(self.b))
            assert ra == rb, f"op #{counter.ops}: mount gave {ra}, directory gave {rb}"
            for rel in touched:
                for p in {rel, os.path.dirname(rel)} - {""}:
                    assert describe(self.a / p) == describe(self.b / p), f"{p} differs"
            if counter.ops % REMOUNT_EVERY == 0:
                fs.remount()

        @rule(path=paths, data=st.binary(max_size=4096), offset=st.integers(0, MAX_FILE))
        def write(self, path: str, data: bytes, offset: int) -> None:
            def op(root: Path) -> int:
                fd = os.open(root / path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    return os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)

            self.both(op, path)

        @rule(path=paths, data=st.binary(max_size=1024))
        def append(self, path: str, data: bytes) -> None:
            def op(root: Path) -> int:
                fd = os.open(root / path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    return os.write(fd, data)
                finally:
                    os.close(fd)

            self.both(op, path)

        @rule(path=paths, size=st.integers(0, MAX_FILE))
        def truncate(self, path: str, size: int) -> None:
            self.both(lambda r: os.truncate(r / path, size), path)

        @rule(path=paths)
        def open_trunc(self, path: str) -> None:
            self.both(lambda r: os.close(os.open(r / path, os.O_WRONLY | os.O_TRUNC)), path)

        @rule(path=paths, offset=st.integers(0, MAX_FILE), size=st.integers(0, 65536))
        def read(self, path: str, offset: int, size: int) -> None:
            def op(root: Path) -> bytes:
                fd = os.open(root / path, os.O_RDONLY)
                try:
                    return os.pread(fd, size, offset)
                finally:
                    os.close(fd)

            self.both(op)

        @rule(src=paths, dst=paths)
        def rename(self, src: str, dst: str) -> None:
            self.both(lambda r: os.rename(r / src, r / dst), src, dst)

        @rule(src=paths, dst=paths)
        def link(self, src: str, dst: str) -> None:
            self.both(lambda r: os.link(r / src, r / dst), src, dst)

        @rule(path=paths)
        def unlink(self, path: str) -> None:
            self.both(lambda r: os.unlink(r / path), path)

        @rule(path=paths, mode=modes)
        def mkdir(self, path: str, mode: int) -> None:
            self.both(lambda r: os.mkdir(r / path, mode & 0o777), path)

        @rule(path=paths)
        def rmdir(self, path: str) -> None:
            self.both(lambda r: os.rmdir(r / path), path)

        @rule(path=paths, dest=st.sampled_from(["f0", "../f1", "nowhere", "d0/f0"]))
        def symlink(self, path: str, dest: str) -> None:
            self.both(lambda r: os.symlink(dest, r / path), path)

        @rule(path=paths, mode=modes)
        def chmod(self, path: str, mode: int) -> None:
            self.both(lambda r: os.chmod(r / path, mode), path)

        @rule(path=paths, atime=st.integers(0, 2**40), mtime=st.integers(0, 2**40))
        def utimens(self, path: str, atime: int, mtime: int) -> None:
            def op(root: Path) -> tuple[int, int]:
                os.utime(root / path, ns=(atime, mtime), follow_symlinks=False)
                st_ = os.lstat(root / path)
                return st_.st_atime_ns, st_.st_mtime_ns

            self.both(op, path)

        @rule(path=paths, name=xattr_names, value=st.binary(max_size=300))
        def setxattr(self, path: str, name: str, value: bytes) -> None:
            self.both(lambda r: os.setxattr(r / path, name, value, follow_symlinks=False), path)

        @rule(path=paths, name=xattr_names)
        def removexattr(self, path: str, name: str) -> None:
            self.both(lambda r: os.removexattr(r / path, name, follow_symlinks=False), path)

        @rule(path=paths)
        def stat_path(self, path: str) -> None:
            self.both(lambda r: describe(r / path))

        @invariant()
        def root_listing_agrees(self) -> None:
            if hasattr(self, "a"):
                assert sorted(os.listdir(self.a)) == sorted(os.listdir(self.b))

        def teardown(self) -> None:
            if hasattr(self, "a"):
                assert tree(self.a) == tree(self.b), "trees differ at the end of the run"

    return FsAgainstDirectory


def test_mount_agrees_with_plain_directory(any_fs: Mount, tmp_path: Path) -> None:
    fs = any_fs
    counter = Counter()
    machine = make_machine(fs, tmp_path / "model", counter)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=RUNS,
            stateful_step_count=STEPS_PER_RUN,
            deadline=None,
            suppress_health_check=list(__import__("hypothesis").HealthCheck),
        ),
    )
    assert counter.ops >= 2000, f"only {counter.ops} operations ran"
    fs.remount()
    assert tree(fs.mnt / "run") == tree(tmp_path / "model"), "trees differ after the final remount"
