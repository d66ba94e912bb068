"""kill -9 crash tests: the daemon dies at every named crash point, or at a random moment, and
the next mount must recover on its own with every fsynced byte intact.

What a file may hold after a crash is described in `powerloss.model`; the checks after each
crash in `powerloss.rig`.
"""

from __future__ import annotations

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
from tests.powerloss.rig import (
    COLD_SMALL_DEVICE,
    LOOP_ITERATIONS,
    POINT_SETTINGS,
    RANDOM_SETTINGS,
    SEED,
    Rig,
    crash_at_point,
    random_crashes,
)
from tierfs.crashpoints import POINTS


def _rig(tmp_path: Path, data: Path, settings: dict[str, object]) -> Iterator[Rig]:
    if not fuse_available():
        pytest.skip(FUSE_REASON)
    configure(data, **settings)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(data, mnt)
    m.mount()
    try:
        yield Rig(m)
    finally:
        cleanup_mount(m)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A mounted tierfs that commits only on fsync and unmount, with a small zone device."""
    data = tmp_path / "data"
    region = f"file://{tmp_path / 'region'}"
    run_cli(
        "mkfs",
        data,
        "--site",
        "test-site",
        "--zone-device",
        COLD_SMALL_DEVICE,
        "--regional",
        region,
    )
    yield from _rig(tmp_path, data, POINT_SETTINGS)


@pytest.fixture(params=sorted(RANDOM_SETTINGS))
def random_rig(request: pytest.FixtureRequest, tmp_path: Path, data_dir: Path) -> Iterator[Rig]:
    """A mounted tierfs with the default commit timer, under each seal policy."""
    yield from _rig(tmp_path, data_dir, RANDOM_SETTINGS[request.param])


@pytest.mark.parametrize("point", sorted(POINTS))
def test_kill_at_crash_point(rig: Rig, point: str) -> None:
    crash_at_point(rig, point)


def test_kill_at_random_moments(random_rig: Rig) -> None:
    random_crashes(random_rig, SEED, iterations=3)


@pytest.mark.slow
def test_kill_at_random_moments_loop(random_rig: Rig) -> None:
    """Opt in with --run-slow; TIERFS_CRASH_SEED and TIERFS_CRASH_ITERATIONS change the run."""
    random_crashes(random_rig, SEED, iterations=LOOP_ITERATIONS)
