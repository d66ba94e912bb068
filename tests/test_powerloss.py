"""Power-loss tests: tierfs's data directory lives in the power-loss layer (`powerloss.layer`),
which forgets everything not made durable by fsync when its power is cut. Each crash is a
kill -9 of the daemon together with a power cut; the next mount must recover on its own with
every fsynced byte intact.

The first tests check the layer itself, so that a layer that kept too much cannot make the
tierfs tests pass for nothing.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    FUSE_REASON,
    Mount,
    cleanup_mount,
    configure,
    fuse_available,
    run_cli,
)
from tests.powerloss.fuse import fallocate
from tests.powerloss.process import LayerProcess
from tests.powerloss.rig import (
    COLD_SMALL_DEVICE,
    LOOP_ITERATIONS,
    POINT_SETTINGS,
    RANDOM_SETTINGS,
    SEED,
    Rig,
    crash_at_point,
    power_loss_after_clean_umount,
    power_loss_after_overwrite_of_sealed_data,
    random_crashes,
)
from tierfs.crashpoints import POINTS

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[LayerProcess]:
    """A power-loss layer over tmp_path/disk, not started; stopped (or killed) afterwards."""
    if not fuse_available():
        pytest.skip(FUSE_REASON)
    process = LayerProcess(tmp_path)
    try:
        yield process
    finally:
        try:
            process.stop()
        finally:
            process.kill()


def _rig(
    tmp_path: Path, layer: LayerProcess, settings: dict[str, object], *mkfs_args: str
) -> Iterator[Rig]:
    data_on_disk = layer.disk / "data"
    run_cli("mkfs", data_on_disk, "--site", "test-site", *mkfs_args)
    configure(data_on_disk, **settings)
    layer.start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(layer.mnt / "data", mnt)
    m.mount()
    try:
        yield Rig(m, layer)
    finally:
        cleanup_mount(m)


@pytest.fixture
def rig(tmp_path: Path, layer: LayerProcess) -> Iterator[Rig]:
    """tierfs mounted on a data directory in the layer, committing only on fsync and unmount.

    mkfs ran before the layer started, so the empty filesystem is durable."""
    region = f"file://{tmp_path / 'region'}"  # off the layer: the power cut spares it
    yield from _rig(
        tmp_path, layer, POINT_SETTINGS, "--zone-device", COLD_SMALL_DEVICE, "--regional", region
    )


@pytest.fixture(params=sorted(RANDOM_SETTINGS))
def random_rig(
    request: pytest.FixtureRequest, tmp_path: Path, layer: LayerProcess
) -> Iterator[Rig]:
    """As `rig`, with the default commit timer, under each seal policy."""
    yield from _rig(tmp_path, layer, RANDOM_SETTINGS[request.param])


# -- the layer itself ------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path below root -> its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, sync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def test_layer_power_cut_keeps_only_durable_changes(layer: LayerProcess) -> None:
    """Every kind of change not made durable (data, size, hole, name, new directory) is
    undone by a power cut; fsynced data under a fsynced name stays."""
    disk = layer.disk
    for name in ("overwritten", "renamed", "unlinked", "truncated", "appended", "punched"):
        (disk / name).write_bytes(name.encode() * 1000)
    layer.start()
    m = layer.mnt
    write(m / "synced", b"synced", sync=True)
    write(m / "named-only", b"data never fsynced")
    fsync_path(m)
    write(m / "data-only", b"entry never fsynced", sync=True)
    with open(m / "overwritten", "r+b") as rw:
        rw.write(b"NEW")
    os.rename(m / "renamed", m / "renamed-new")
    os.unlink(m / "unlinked")
    os.truncate(m / "truncated", 10)
    with open(m / "appended", "ab") as a:
        a.write(b"+tail")
    with open(m / "punched", "r+b") as p:
        fallocate(p.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    (m / "newdir").mkdir()
    write(m / "newdir" / "inner", b"inner", sync=True)
    fsync_path(m / "newdir")
    with open(m / "synced", "rb") as r, mmap.mmap(r.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:] == b"synced", "mmap reads through the layer"
    layer.cut_power()
    with pytest.raises(OSError) as dead:
        fsync_path(m / "synced")
    assert dead.value.errno == errno.EIO, "fsync after the power cut must fail"
    layer.restart()
    old = ("overwritten", "renamed", "unlinked", "truncated", "appended", "punched")
    expected: dict[str, bytes | None] = {name: name.encode() * 1000 for name in old}
    expected |= {"synced": b"synced", "named-only": b""}
    assert tree(m) == expected, "only durable changes survive"


def test_layer_clean_stop_keeps_everything(layer: LayerProcess) -> None:
    """Without a power cut the layer loses nothing, across restarts and on the disk."""
    layer.start()
    m = layer.mnt
    (m / "dir").mkdir()
    write(m / "dir" / "file", b"never fsynced")
    os.rename(m / "dir" / "file", m / "dir" / "moved")
    layer.restart()
    assert tree(m) == {"dir": None, "dir/moved": b"never fsynced"}
    layer.stop()
    assert tree(layer.disk) == {"dir": None, "dir/moved": b"never fsynced"}


# -- tierfs in the layer ---------------------------------------------------------------------


@pytest.mark.parametrize("point", sorted(POINTS))
def test_power_loss_at_crash_point(rig: Rig, point: str) -> None:
    crash_at_point(rig, point)


def test_power_loss_after_clean_umount(rig: Rig) -> None:
    power_loss_after_clean_umount(rig)


def test_power_loss_after_overwrite_of_sealed_data(rig: Rig) -> None:
    power_loss_after_overwrite_of_sealed_data(rig)


def test_power_loss_at_random_moments(random_rig: Rig) -> None:
    random_crashes(random_rig, SEED, iterations=2)


@pytest.mark.slow
def test_power_loss_at_random_moments_loop(random_rig: Rig) -> None:
    """Opt in with --run-slow; TIERFS_CRASH_SEED and TIERFS_CRASH_ITERATIONS change the run."""
    random_crashes(random_rig, SEED, iterations=LOOP_ITERATIONS)


def test_mkfs_survives_power_loss(tmp_path: Path, layer: LayerProcess) -> None:
    """Once mkfs has returned, the new filesystem must survive a power cut."""
    layer.start()
    data = layer.mnt / "data"
    run_cli("mkfs", data, "--site", "test-site")
    layer.cut_power()
    layer.restart()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(data, mnt)
    try:
        mounted = run_cli("mount", data, mnt, check=False)
        assert mounted.returncode == 0, (
            f"mount after mkfs and a power cut failed: {mounted.stderr.strip()}; the disk "
            f"kept: {sorted(tree(layer.mnt))}"
        )
        m.umount()
        fsck = run_cli("fsck", data, check=False)
        assert fsck.returncode == 0, f"fsck after mkfs and a power cut:\n{fsck.stdout}"
    finally:
        cleanup_mount(m)
