"""A seeded random tree copied in with `rsync -aHAX` must come back identical."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, assert_mostly_sealed

SEED = 20261126
NAMES = ["a", "b c", "ünï cødé", "x" * 120, "-dash", ".hidden", "日本語", "tab\tname"]


def build_tree(root: Path, rng: random.Random, max_file: int) -> None:
    """Files from empty to `max_file` bytes, sparse files, hard links, symlinks, xattrs, depth."""
    files: list[Path] = []
    dirs = [root]
    deep = root
    for depth in range(12):
        deep = deep / f"level {depth} ✓"
    deep.mkdir(parents=True)
    dirs.append(deep)
    for i in range(30):
        parent = rng.choice(dirs)
        d = parent / f"{rng.choice(NAMES)}-{i}"
        d.mkdir()
        os.chmod(d, rng.choice([0o755, 0o700, 0o775]))
        dirs.append(d)
    sizes = [0, 1, 4095, 4096, 65537, 1 << 20, max_file]
    for i in range(120):
        f = rng.choice(dirs) / f"{rng.choice(NAMES)}.{i}"
        f.write_bytes(rng.randbytes(rng.choice(sizes) if i % 10 else max_file // 8))
        os.chmod(f, rng.choice([0o644, 0o600, 0o755, 0o444]))
        os.utime(f, ns=(rng.randrange(1, 2**41), rng.randrange(1, 2**41)))
        files.append(f)
    for i in range(6):
        f = rng.choice(dirs) / f"sparse.{i}"
        with open(f, "wb") as out:
            for _ in range(3):
                out.seek(rng.randrange(0, 64 << 20))
                out.write(rng.randbytes(rng.randrange(1, 10000)))
        files.append(f)
    for i in range(15):
        src = rng.choice(files)
        os.link(src, rng.choice(dirs) / f"hardlink.{i}")
    for i in range(15):
        target = os.path.relpath(rng.choice(files), rng.choice(dirs))
        os.symlink(target if i % 3 else "dangling/target", rng.choice(dirs) / f"symlink.{i}")
    for i, f in enumerate(rng.sample(files, 25)):
        os.setxattr(f, f"user.k{i}", rng.randbytes(rng.randrange(0, 2000)))
    for d in rng.sample(dirs, 5):
        os.setxattr(d, "user.dir", b"directory attribute")


def rsync_differences(src: Path, dst: Path) -> list[str]:
    result = subprocess.run(
        ["rsync", "-anciHAX", "--delete", f"{src}/", f"{dst}/"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_rsync_round_trip(any_fs: Mount, tmp_path: Path) -> None:
    fs = any_fs
    src = tmp_path / "src"
    src.mkdir()
    build_tree(src, random.Random(SEED), max_file=64 << 20)
    subprocess.run(["rsync", "-aHAX", f"{src}/", f"{fs.mnt}/"], check=True, capture_output=True)
    assert rsync_differences(src, fs.mnt) == [], f"seed {SEED}"
    time.sleep(1)
    assert_mostly_sealed(fs)
    fs.remount()
    assert rsync_differences(src, fs.mnt) == [], f"seed {SEED}, after remount"
    result = subprocess.run(
        ["diff", "-r", "--no-dereference", str(src), str(fs.mnt)], capture_output=True
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace")[:2000]
