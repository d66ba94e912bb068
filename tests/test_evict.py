"""Eviction and read-through: data durable upstream leaves the site and comes back on read.

Through a real mount and a real regional store (a local directory, and SeaweedFS): `tierfs
evict`, the watermark, reads of evicted data (equal byte for byte and by `rsync -anciHAX`),
an unreachable or hanging store (EIO after `regional.read_timeout`, then reads work again),
and repairs of a damaged hot frame and of an offline zone from the region.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mount, configure, mounted, run_cli
from tests.s3server import BUCKET
from tests.test_replication import make_fs, payload, s3_url_and_config, sync
from tests.test_rsync import rsync_differences
from tierfs import control
from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tools.s3server import start, stop

MiB = 1 << 20


def status(m: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run_cli("status", m.mnt, "--json").stdout)
    return doc


def eviction(m: Mount) -> dict[str, Any]:
    return dict(status(m)["eviction"])


def drop_caches(m: Mount) -> None:
    """Nothing read afterwards may come from a cache: not the kernel's, not the daemon's."""
    control.request(m.data / "run" / "control.sock", "drop_cache")
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def evict(m: Mount, *args: str | Path) -> str:
    return run_cli("evict", m.mnt, *args).stdout


def snapshot_and_send(m: Mount) -> None:
    run_cli("snapshot", "create", m.mnt)
    sync(m)


def fill(root: Path) -> None:
    """Files of several kinds: large and small, sparse, hard-linked, a symlink, an xattr."""
    (root / "dir").mkdir()
    (root / "dir" / "big.bin").write_bytes(payload("big", 5 * MiB))
    (root / "dir" / "small.txt").write_bytes(b"small file\n" * 30)
    with (root / "sparse").open("wb") as f:
        f.seek(3 * MiB)
        f.write(payload("sparse", 300_000))
    os.link(root / "dir" / "big.bin", root / "hardlink")
    os.symlink("dir/small.txt", root / "link")
    os.setxattr(root / "dir" / "small.txt", "user.note", b"kept")
    os.chmod(root / "dir" / "small.txt", 0o640)


def wait_for(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(params=["local", "s3"])
def regional_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mount]:
    if request.param == "s3":
        url, settings = s3_url_and_config(request.getfixturevalue("s3_server"))
    else:
        url, settings = f"file://{tmp_path / 'region'}", {}
    data = make_fs(tmp_path, url, settings)
    with mounted(tmp_path, data) as m:
        yield m


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_evicted_data_reads_back_equal(regional_fs: Mount, tmp_path: Path) -> None:
    m = regional_fs
    fill(m.mnt)
    reference = tmp_path / "reference"
    subprocess.run(["rsync", "-aHAX", f"{m.mnt}/", f"{reference}/"], check=True)
    snapshot_and_send(m)
    before = eviction(m)["local_bytes"]
    assert "evicted" in evict(m, "--all")
    after = eviction(m)
    assert after["evicted_chunks"] > 0
    assert after["local_bytes"] < before - 5 * MiB
    drop_caches(m)
    assert rsync_differences(reference, m.mnt) == []
    assert (m.mnt / "dir" / "big.bin").read_bytes() == payload("big", 5 * MiB)
    assert eviction(m)["fetched_chunks"] > 0
    wait_for("fetched chunks kept locally", lambda: eviction(m)["kept_chunks"] > 0)
    m.umount()
    report = run_cli("fsck", m.data)
    assert ": 0 problems" in report.stdout, report.stdout


def test_a_sequential_read_of_an_evicted_file_fetches_each_chunk_once_in_few_gets(
    tmp_path: Path,
) -> None:
    """Its chunks come in spans of the packs they were sent in, whatever order the prefetch
    tasks run in: no chunk twice, and about one GET per pack, not one per chunk."""
    data = make_fs(tmp_path, f"file://{tmp_path / 'region'}", {})
    with mounted(tmp_path, data) as m:
        (m.mnt / "big.bin").write_bytes(payload("seq", 40 * MiB))
        snapshot_and_send(m)
        evict(m, "--all")
        evicted = eviction(m)["evicted_chunks"]
        packs = sum(1 for p in (tmp_path / "region" / "packs" / "data").rglob("*") if p.is_file())
        gets_before = status(m)["upstream"]["requests"]["get"]
        fetched_before = eviction(m)["fetched_chunks"]
        drop_caches(m)
        with (m.mnt / "big.bin").open("rb") as f:
            assert f.read() == payload("seq", 40 * MiB)
        assert evicted > 100  # about 130 chunks of 300 KiB
        assert eviction(m)["fetched_chunks"] - fetched_before == evicted
        gets = status(m)["upstream"]["requests"]["get"] - gets_before
        assert packs >= 4 and gets <= 2 * packs, (gets, packs)


def test_evicting_files_drops_only_their_data_and_never_unsent_data(tmp_path: Path) -> None:
    region = tmp_path / "region"
    data = make_fs(tmp_path, f"file://{region}", {})
    with mounted(tmp_path, data) as m:
        (m.mnt / "a").write_bytes(payload("a", 2 * MiB))
        (m.mnt / "b").write_bytes(payload("b", 2 * MiB))
        snapshot_and_send(m)
        (m.mnt / "unsent").write_bytes(payload("unsent", MiB))
        run_cli("flush", m.mnt)
        out = evict(m, m.mnt / "a", m.mnt / "unsent")
        assert "not upstream yet" in out, out
        drop_caches(m)
        region.rename(tmp_path / "away")
        assert (m.mnt / "b").read_bytes() == payload("b", 2 * MiB)
        assert (m.mnt / "unsent").read_bytes() == payload("unsent", MiB)
        with pytest.raises(OSError) as exc:
            (m.mnt / "a").read_bytes()
        assert exc.value.errno == errno.EIO
        (tmp_path / "away").rename(region)
        assert (m.mnt / "a").read_bytes() == payload("a", 2 * MiB)


def test_without_a_regional_store_evict_says_so(fs: Mount) -> None:
    failed = run_cli("evict", fs.mnt, "--all", check=False)
    assert failed.returncode == 3, failed.stderr
    assert "no regional store" in failed.stderr
    usage = run_cli("evict", fs.mnt, check=False)
    assert usage.returncode == 2


def test_above_the_high_watermark_eviction_runs_by_itself(tmp_path: Path) -> None:
    data = make_fs(tmp_path, f"file://{tmp_path / 'region'}", {})
    configure(
        data,
        evict__capacity_mb=16,
        evict__high_pct=50,
        evict__low_pct=25,
        evict__interval=0.2,
        evict__keep_fetched=False,
        seal__zstd_level=0,
    )
    with mounted(tmp_path, data) as m:
        for i in range(3):
            (m.mnt / f"f{i}").write_bytes(payload(f"f{i}", 4 * MiB))
        snapshot_and_send(m)
        wait_for("eviction to the low watermark", lambda: eviction(m)["local_bytes"] <= 4 * MiB)
        assert eviction(m)["evicted_chunks"] > 0
        drop_caches(m)
        assert all((m.mnt / f"f{i}").read_bytes() == payload(f"f{i}", 4 * MiB) for i in range(3))


def test_a_hanging_store_gives_eio_after_the_timeout_then_reads_work(tmp_path: Path) -> None:
    directory = tmp_path / "seaweed"
    server = start(directory, bucket=BUCKET)
    try:
        url, settings = s3_url_and_config(server)
        data = make_fs(tmp_path, url, {**settings, "regional__read_timeout": 2.0})
        with mounted(tmp_path, data) as m:
            (m.mnt / "f").write_bytes(payload("f", 2 * MiB))
            snapshot_and_send(m)
            evict(m, "--all")
            drop_caches(m)
            os.kill(server.pid, signal.SIGSTOP)  # connections open, nothing answers
            try:
                began = time.monotonic()
                with pytest.raises(OSError) as exc:
                    (m.mnt / "f").read_bytes()
                took = time.monotonic() - began
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert exc.value.errno == errno.EIO
            assert 1.5 < took < 15, took
            assert eviction(m)["timeouts"] > 0
            assert (m.mnt / "f").read_bytes() == payload("f", 2 * MiB)
    finally:
        stop(directory)


def _corrupt_hot_frames(data: Path, below: int) -> None:
    """Flip one byte of every frame-sized run in the first `below` bytes of each hot segment
    file: the frames of a file sealed in one round, not the snapshot's tree blobs after
    them (fsck cannot repair those)."""
    for seg in (data / "hot").rglob("*.seg"):
        with seg.open("r+b") as f:
            size = min(seg.stat().st_size, below)
            for pos in range(4096, size, 256 * 1024):
                f.seek(pos)
                byte = f.read(1)
                if byte:
                    f.seek(pos)
                    f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_hot_copy_is_repaired_from_upstream(tmp_path: Path) -> None:
    region = tmp_path / "region"
    data = make_fs(tmp_path, f"file://{region}", {})
    configure(data, seal__zstd_level=0)
    content = payload("f", 3 * MiB)
    with mounted(tmp_path, data) as m:
        (m.mnt / "f").write_bytes(content)
        snapshot_and_send(m)
        m.umount()
        _corrupt_hot_frames(data, below=len(content))
        m.mount()
        drop_caches(m)
        assert (m.mnt / "f").read_bytes() == content
        doc = status(m)
        assert doc["errors"]["checksum"] > 0
        assert doc["eviction"]["repairs"] > 0
        wait_for("damaged copies rewritten", lambda: eviction(m)["repaired_copies"] > 0)
        m.umount()
        report = run_cli("fsck", data)
        assert ": 0 problems" in report.stdout, report.stdout
        region.rename(tmp_path / "away")
        m.mount()
        drop_caches(m)
        assert (m.mnt / "f").read_bytes() == content


def test_an_offline_zone_is_repaired_from_upstream(tmp_path: Path) -> None:
    region = tmp_path / "region"
    data = tmp_path / "data"
    run_cli(
        "mkfs", data, "--site", "z", "--regional", f"file://{region}",
        "--zone-device", "emulated:64M:4M",
    )  # fmt: skip
    configure(data, seal__zstd_level=0)
    content = payload("z", MiB)
    with mounted(tmp_path, data) as m:
        (m.mnt / "f").write_bytes(content)
        run_cli("migrate", m.mnt, "--now")
        snapshot_and_send(m)
        zones = json.loads(run_cli("zones", m.mnt, "--json").stdout)
        (zone,) = [z["zone"] for z in zones if z["live_bytes"]]
        m.umount()
        dev = EmulatedZonedDevice.open(data / "cold" / "zones.img")
        try:
            dev.set_offline(zone)
        finally:
            dev.close_device()
        m.mount()
        drop_caches(m)
        assert (m.mnt / "f").read_bytes() == content
        assert eviction(m)["repairs"] > 0
        wait_for("the offline copy replaced", lambda: eviction(m)["repaired_copies"] > 0)


def test_prefetch_brings_evicted_data_back_in_the_background(tmp_path: Path) -> None:
    region = tmp_path / "region"
    data = make_fs(tmp_path, f"file://{region}", {})
    with mounted(tmp_path, data) as m:
        for i in range(3):
            (m.mnt / f"f{i}").write_bytes(payload(f"p{i}", 2 * MiB))
        snapshot_and_send(m)
        evict(m, "--all")
        evicted = eviction(m)["local_bytes"]
        m.umount()
        configure(data, evict__prefetch=True)  # as `tierfs restore site` leaves a new site
        m.mount()
        wait_for("prefetch to finish", lambda: eviction(m)["prefetch_done"])
        doc = eviction(m)
        assert doc["prefetched_chunks"] > 0
        assert doc["local_bytes"] > evicted + 5 * MiB
        drop_caches(m)
        region.rename(tmp_path / "away")  # everything reads from local copies now
        assert all((m.mnt / f"f{i}").read_bytes() == payload(f"p{i}", 2 * MiB) for i in range(3))


def test_a_damaged_object_upstream_fails_only_the_file_that_uses_it(tmp_path: Path) -> None:
    """Packs hold a file's chunks back to back in name order, so the pack's first frame is
    file `a`'s; damaging it fails reads of `a` alone (EIO, logged with the chunk), and the
    other evicted files read back equal."""
    region = tmp_path / "region"
    data = make_fs(tmp_path, f"file://{region}", {})
    configure(data, seal__zstd_level=0)
    names = ("a", "b", "c")
    with mounted(tmp_path, data) as m:
        for name in names:
            (m.mnt / name).write_bytes(payload(name, MiB))
        snapshot_and_send(m)
        evict(m, "--all")
        (pack,) = [p for p in (region / "packs" / "data").rglob("*") if p.is_file()]
        with pack.open("r+b") as f:
            f.seek(48 + 56 + 1000)  # the header, the first frame's header, into its payload
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        drop_caches(m)
        with pytest.raises(OSError) as exc:
            (m.mnt / "a").read_bytes()
        assert exc.value.errno == errno.EIO
        assert all((m.mnt / n).read_bytes() == payload(n, MiB) for n in names[1:])
        assert eviction(m)["damaged"] > 0
        log = (data / "log" / "tierfs.log").read_text()
        assert "does not match its id" in log or "checksum" in log
