"""Snapshots through a real mount: create, list, delete, retention, reuse, point in time.

A snapshot's tree is read back from the unmounted data directory (`LocalChunks`) and compared
with what the files held when it was taken.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, mounted, run_cli
from tierfs.data.chunker import Chunker
from tierfs.data.domain import load as load_domain
from tierfs.errors import ExitCode
from tierfs.meta.store import MetaStore
from tierfs.snap import treeformat as tf
from tierfs.snap.catalog import Catalog
from tierfs.snap.localchunks import LocalChunks
from tierfs.snap.tree import file_bytes, walk

KiB, MiB = 1024, 1024 * 1024


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def snapshot(m: Mount, *args: str) -> str:
    return run_cli("snapshot", "create", m.mnt, *args).stdout.strip()


def listing(m: Mount) -> list[dict[str, object]]:
    return list(json.loads(run_cli("snapshot", "list", m.mnt, "--json").stdout))


def status(m: Mount) -> dict[str, object]:
    return dict(json.loads(run_cli("status", m.mnt, "--json").stdout))


def snapshot_files(data: Path, snapshot_id: str) -> dict[bytes, tf.Entry | bytes]:
    """{path: file bytes, or the entry for anything else} of a snapshot, read offline."""
    store = MetaStore.open(data / "meta", readonly=True)
    try:
        with store.reader() as tx, LocalChunks(data, store, tx) as chunks:
            record = Catalog(store).find(snapshot_id, tx)
            cid = Chunker(load_domain(data / "domain.json")).content_id
            out: dict[bytes, tf.Entry | bytes] = {}
            for path, entry in walk(chunks.fetch, record.root, cid):
                if entry.type is not tf.FileType.REG:
                    out[path] = entry
                    continue
                out[path] = file_bytes(chunks.fetch, entry, cid)
            return out
    finally:
        store.close()


def fsck_clean(data: Path) -> None:
    result = run_cli("fsck", data, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def snap_fs(tmp_path: Path, data_dir: Path) -> Iterator[Mount]:
    with mounted(tmp_path, data_dir) as m:
        yield m


def test_a_snapshot_keeps_the_files_as_they_were(snap_fs: Mount) -> None:
    m = snap_fs
    (m.mnt / "docs").mkdir()
    (m.mnt / "docs" / "a.txt").write_bytes(b"first version\n")
    (m.mnt / "big.bin").write_bytes(payload("big", 3 * MiB))
    with open(m.mnt / "sparse.bin", "wb") as f:
        f.seek(5 * MiB)
        f.write(b"tail")
    os.link(m.mnt / "big.bin", m.mnt / "docs" / "big-link.bin")
    os.symlink("docs/a.txt", m.mnt / "link")
    first = snapshot(m, "--name", "before")
    (m.mnt / "docs" / "a.txt").write_bytes(b"second version\n")
    os.unlink(m.mnt / "big.bin")
    os.unlink(m.mnt / "docs" / "big-link.bin")
    (m.mnt / "new.txt").write_bytes(b"new")
    second = snapshot(m)
    listed = listing(m)
    assert [s["snapshot_id"] for s in listed] == [first, second]
    assert listed[0]["name"] == "before" and listed[1]["parent"] == first
    m.umount()

    old = snapshot_files(m.data, "before")
    assert old[b"docs/a.txt"] == b"first version\n"
    assert old[b"big.bin"] == payload("big", 3 * MiB) == old[b"docs/big-link.bin"]
    assert old[b"sparse.bin"] == bytes(5 * MiB) + b"tail"
    link = old[b"link"]
    assert isinstance(link, tf.Entry) and link.target == b"docs/a.txt"
    assert b"new.txt" not in old
    new = snapshot_files(m.data, second)
    assert new[b"docs/a.txt"] == b"second version\n" and new[b"new.txt"] == b"new"
    assert b"big.bin" not in new
    fsck_clean(m.data)


def test_kept_snapshots_keep_their_chunks_until_deleted(snap_fs: Mount) -> None:
    m = snap_fs
    run_cli("flush", m.mnt)
    empty = status(m)["chunks"]
    (m.mnt / "data.bin").write_bytes(payload("kept", 4 * MiB))
    taken = snapshot(m)
    os.unlink(m.mnt / "data.bin")
    run_cli("flush", m.mnt)
    assert status(m)["chunks"]["unique_bytes"] >= 4 * MiB  # type: ignore[index]
    run_cli("snapshot", "delete", m.mnt, taken)
    assert listing(m) == []
    run_cli("flush", m.mnt)
    deadline = 50
    while status(m)["snapshots"]["dead_trees"] and deadline:  # type: ignore[index]
        deadline -= 1
        run_cli("flush", m.mnt)
    after = status(m)["chunks"]
    assert after["unique_bytes"] == empty["unique_bytes"]  # type: ignore[index]
    m.umount()
    fsck_clean(m.data)


def test_an_unchanged_subtree_is_reused(snap_fs: Mount) -> None:
    m = snap_fs
    for d in range(20):
        sub = m.mnt / f"dir{d:02d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(5):
            (sub / f"f{f}").write_bytes(payload(f"{d}-{f}", 3000))
    snapshot(m)
    (m.mnt / "dir07" / "inner" / "f3").write_bytes(b"changed")
    snapshot(m)
    stats = listing(m)[1]["stats"]
    assert isinstance(stats, dict)
    # the root blob, the root directory, dir07 and dir07/inner are rebuilt; the 19 other
    # directories and their inner ones are reused (a build still visits them for the stamps)
    assert stats["trees_built"] == 4
    assert stats["trees_reused"] == 2 * 19
    m.umount()
    fsck_clean(m.data)


def test_a_snapshot_taken_while_a_file_is_written_is_one_point_in_time(
    snap_fs: Mount,
) -> None:
    m = snap_fs
    path = m.mnt / "stream.log"
    stop = threading.Event()
    block = 64 * KiB

    def writer() -> None:
        with open(path, "wb") as f:
            n = 0
            while not stop.is_set():
                f.write(n.to_bytes(8, "big") * (block // 8))
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        taken = [snapshot(m) for _ in range(2)]
    finally:
        stop.set()
        thread.join()
    final_size = path.stat().st_size
    m.umount()
    for snap_id in taken:
        content = snapshot_files(m.data, snap_id)[b"stream.log"]
        assert isinstance(content, bytes) and len(content) <= final_size
        whole = len(content) // block
        for n in range(whole):
            assert content[n * block : (n + 1) * block] == n.to_bytes(8, "big") * (block // 8)
    fsck_clean(m.data)


def test_unknown_snapshot_is_a_usage_error(snap_fs: Mount) -> None:
    result = run_cli("snapshot", "delete", snap_fs.mnt, "no-such-snapshot", check=False)
    assert result.returncode == ExitCode.USAGE
    assert "no snapshot" in result.stderr and len(result.stderr.splitlines()) == 1


def test_snapshots_survive_a_remount_and_reuse_continues(snap_fs: Mount) -> None:
    m = snap_fs
    for d in range(5):
        (m.mnt / f"d{d}").mkdir()
        (m.mnt / f"d{d}" / "f").write_bytes(payload(f"r{d}", 1000))
    first = snapshot(m)
    m.remount()
    (m.mnt / "d2" / "f").write_bytes(b"changed")
    snapshot(m)
    listed = listing(m)
    assert listed[0]["snapshot_id"] == first
    stats = listed[1]["stats"]
    assert isinstance(stats, dict) and stats["trees_reused"] == 4  # d0, d1, d3, d4
    m.umount()
    fsck_clean(m.data)


def test_a_snapshot_of_some_paths_holds_them_and_their_parents_only(snap_fs: Mount) -> None:
    m = snap_fs
    (m.mnt / "db" / "main").mkdir(parents=True)
    (m.mnt / "db" / "main" / "orders").write_bytes(b"orders")
    (m.mnt / "db" / "other").write_bytes(b"not critical")
    (m.mnt / "etc").mkdir()
    (m.mnt / "etc" / "app.conf").write_bytes(b"conf")
    (m.mnt / "scratch").write_bytes(b"scratch")
    configure_schedule(m, "critical", paths=["/db/main", "/etc/app.conf"], every=3600)
    m.remount()
    deadline = time.monotonic() + 30
    while not listing(m):  # the schedule is due at once after the mount
        assert time.monotonic() < deadline, "the critical schedule took no snapshot"
        time.sleep(0.2)
    (snap,) = listing(m)
    assert snap["schedule"] == "critical" and snap["paths"] == ["/db/main", "/etc/app.conf"]
    m.umount()
    files = snapshot_files(m.data, str(snap["snapshot_id"]))
    assert set(files) == {b"", b"db", b"db/main", b"db/main/orders", b"etc", b"etc/app.conf"}
    assert files[b"db/main/orders"] == b"orders"
    fsck_clean(m.data)


def test_a_schedule_keeps_its_last_snapshots_only(snap_fs: Mount) -> None:
    m = snap_fs
    (m.mnt / "f").write_bytes(b"x")
    configure_schedule(m, "often", paths=["/"], every=1, keep_last=2)
    m.remount()
    deadline = time.monotonic() + 60
    while status(m)["snapshots"]["created"] < 4:  # type: ignore[index]
        assert time.monotonic() < deadline, "the schedule does not run every second"
        time.sleep(0.5)
    kept = [s for s in listing(m) if s["schedule"] == "often"]
    assert len(kept) == 2
    schedules = status(m)["snapshots"]["schedules"]  # type: ignore[index]
    assert [s["name"] for s in schedules] == ["nightly", "often"]
    m.umount()
    fsck_clean(m.data)


def configure_schedule(m: Mount, name: str, **table: object) -> None:
    """Add a [schedule.NAME] table to tierfs.toml and let the daemon run schedules."""
    path = m.data / "tierfs.toml"
    kept, skipping = [], False
    for line in path.read_text().splitlines():
        if line.startswith("["):
            skipping = line == f"[schedule.{name}]"
        if not skipping:
            kept.append(line)
    kept.append(f"[schedule.{name}]")
    kept += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path.write_text("\n".join(kept) + "\n")
    m.env = {k: v for k, v in os.environ.items() if k != "TIERFS_SCHEDULES"}
