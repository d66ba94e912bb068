"""The cold tier through a real mount: migration into emulated zones, transparent reads,
reclaim, faulty zones, and the commands (`migrate`, `zones`, `mkfs --zone-device`)."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mount, configure, mounted, run_cli
from tierfs.tiers.zns.emulated import EmulatedZonedDevice

SMALL_DEVICE = "emulated:64M:4M"  # 16 zones of 4 MiB
MiB = 1 << 20


def random_bytes(n: int, seed: int) -> bytes:
    import blake3

    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def status(m: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run_cli("status", m.mnt, "--json").stdout)
    return doc


def zones(m: Mount) -> list[dict[str, Any]]:
    report: list[dict[str, Any]] = json.loads(run_cli("zones", m.mnt, "--json").stdout)
    return report


def drop_caches(m: Mount) -> None:
    """Nothing of the data may come from a cache: not the kernel's, not the daemon's."""
    from tierfs import control

    control.request(m.data / "run" / "control.sock", "drop_cache")
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.fixture
def cold_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    run_cli("mkfs", data, "--site", "cold", "--zone-device", SMALL_DEVICE)
    configure(data, seal__zstd_level=0)
    return data


@pytest.fixture
def cold_fs(tmp_path: Path, cold_data: Path) -> Iterator[Mount]:
    with mounted(tmp_path, cold_data) as m:
        yield m


def test_migrate_now_moves_every_chunk_and_reads_stay_equal(cold_fs: Mount) -> None:
    a, b = random_bytes(3 * MiB, 1), random_bytes(2 * MiB + 12345, 2)
    (cold_fs.mnt / "a").write_bytes(a)
    (cold_fs.mnt / "b").write_bytes(b)
    out = run_cli("migrate", cold_fs.mnt, "--now").stdout
    assert "migrated" in out
    doc = status(cold_fs)
    assert doc["tiers"]["cold"]["migrated_bytes"] >= len(a) + len(b)
    assert doc["tiers"]["hot"]["stored_bytes"] == 0
    assert doc["tiers"]["cold"]["bytes"] >= len(a) + len(b)
    live = sum(z["live_bytes"] for z in zones(cold_fs))
    assert live == doc["tiers"]["cold"]["bytes"]
    drop_caches(cold_fs)
    assert (cold_fs.mnt / "a").read_bytes() == a
    cold_fs.remount()
    drop_caches(cold_fs)
    assert (cold_fs.mnt / "b").read_bytes() == b
    with (cold_fs.mnt / "b").open("rb") as f:
        f.seek(MiB + 7)
        assert f.read(4096) == b[MiB + 7 : MiB + 7 + 4096]
    assert status(cold_fs)["errors"] == {"checksum": 0, "io": 0, "seal": 0}


def test_overwrite_of_cold_data_is_copy_on_write(cold_fs: Mount) -> None:
    data = bytearray(random_bytes(2 * MiB, 3))
    (cold_fs.mnt / "f").write_bytes(data)
    run_cli("migrate", cold_fs.mnt, "--now")
    with (cold_fs.mnt / "f").open("r+b") as f:
        f.seek(MiB)
        f.write(b"x" * 5000)
    data[MiB : MiB + 5000] = b"x" * 5000
    run_cli("flush", cold_fs.mnt)
    drop_caches(cold_fs)
    assert (cold_fs.mnt / "f").read_bytes() == bytes(data)


def test_deleted_data_frees_zones_and_reclaim_resets_them(cold_fs: Mount) -> None:
    (cold_fs.mnt / "gone").write_bytes(random_bytes(5 * MiB, 4))
    run_cli("migrate", cold_fs.mnt, "--now")
    used = [z for z in zones(cold_fs) if z["live_bytes"]]
    assert len(used) >= 2
    (cold_fs.mnt / "gone").unlink()
    os.sync()
    assert all(z["live_bytes"] == 0 for z in zones(cold_fs))
    run_cli("zones", cold_fs.mnt, "--reclaim")
    after = {z["zone"]: z for z in zones(cold_fs)}
    for z in used:
        assert after[z["zone"]]["condition"] == "empty", after[z["zone"]]
    assert status(cold_fs)["tiers"]["cold"]["zones_reset"] >= len(used)


def test_files_migrate_in_write_order_so_a_deleted_file_frees_whole_zones(
    cold_fs: Mount,
) -> None:
    """A file's chunks land together in the zones: deleting it leaves zones with nothing
    live, which reclaim resets without moving anything."""
    first, second = random_bytes(9 * MiB, 11), random_bytes(9 * MiB, 12)
    (cold_fs.mnt / "first").write_bytes(first)
    run_cli("flush", cold_fs.mnt)
    (cold_fs.mnt / "second").write_bytes(second)
    run_cli("migrate", cold_fs.mnt, "--now")
    (cold_fs.mnt / "first").unlink()
    os.sync()
    emptied = [z["zone"] for z in zones(cold_fs) if z["write_pointer"] and not z["live_bytes"]]
    assert len(emptied) >= 2, zones(cold_fs)
    run_cli("zones", cold_fs.mnt, "--reclaim")
    after = {z["zone"]: z for z in zones(cold_fs)}
    assert all(after[z]["condition"] == "empty" for z in emptied), after
    assert status(cold_fs)["tiers"]["cold"]["relocated_chunks"] == 0
    drop_caches(cold_fs)
    assert (cold_fs.mnt / "second").read_bytes() == second


def test_reclaim_relocates_live_records_out_of_dirty_zones(tmp_path: Path, cold_data: Path) -> None:
    """Files written in turn (one to keep, one to delete) share their zones: deleting one
    set leaves every zone half garbage, and reclaim must move the live half out."""
    configure(cold_data, cold__reserve_zones=13)
    with mounted(tmp_path, cold_data) as m:
        keep = {f"keep{i:02d}": random_bytes(256 << 10, 500 + i) for i in range(16)}
        for i, (name, data) in enumerate(keep.items()):
            (m.mnt / f"doomed{i:02d}").write_bytes(random_bytes(256 << 10, 600 + i))
            (m.mnt / name).write_bytes(data)
        run_cli("migrate", m.mnt, "--now")
        full = [z["zone"] for z in zones(m) if z["condition"] == "full"]
        assert full, zones(m)
        for i in range(16):
            (m.mnt / f"doomed{i:02d}").unlink()
        os.sync()
        assert all(
            0 < z["live_bytes"] < z["capacity"] * 3 // 4 for z in zones(m) if z["zone"] in full
        )
        # A victim is reset on the pass after its relocation, and the relocation stream may
        # open a zone that was just reset: a few rounds, until a dirty zone is left EMPTY.
        for _ in range(3):
            run_cli("zones", m.mnt, "--reclaim")
            after = {z["zone"]: z for z in zones(m)}
            if any(after[z]["condition"] == "empty" for z in full):
                break
        else:
            raise AssertionError(f"no dirty zone was emptied: {after}")
        assert status(m)["tiers"]["cold"]["relocated_chunks"] > 0
        for _ in range(2):
            drop_caches(m)
            for name, data in keep.items():
                assert (m.mnt / name).read_bytes() == data, name
            m.remount()


def test_migration_by_age_happens_in_the_background(tmp_path: Path, cold_data: Path) -> None:
    configure(cold_data, cold__cold_after=0.0, **{"seal__quiet_period": 0.0})
    with mounted(tmp_path, cold_data) as m:
        data = random_bytes(MiB, 7)
        (m.mnt / "old").write_bytes(data)
        run_cli("flush", m.mnt)
        deadline = time.monotonic() + 30
        while status(m)["tiers"]["cold"]["migrated_chunks"] == 0:
            assert time.monotonic() < deadline, "nothing migrated by age"
            time.sleep(0.5)
        drop_caches(m)
        assert (m.mnt / "old").read_bytes() == data


def _fault(data: Path, zone: int, kind: str) -> None:
    dev = EmulatedZonedDevice.open(data / "cold" / "zones.img")
    try:
        dev.set_offline(zone) if kind == "offline" else dev.set_readonly(zone)
    finally:
        dev.close_device()


def test_read_only_zone_still_reads_offline_zone_gives_eio(cold_fs: Mount) -> None:
    data = random_bytes(MiB, 8)
    (cold_fs.mnt / "f").write_bytes(data)
    run_cli("migrate", cold_fs.mnt, "--now")
    (zone,) = [z["zone"] for z in zones(cold_fs) if z["live_bytes"]]
    cold_fs.umount()
    _fault(cold_fs.data, zone, "readonly")
    cold_fs.mount()
    drop_caches(cold_fs)
    assert (cold_fs.mnt / "f").read_bytes() == data
    cold_fs.umount()
    _fault(cold_fs.data, zone, "offline")
    cold_fs.mount()
    drop_caches(cold_fs)
    with pytest.raises(OSError) as exc:
        (cold_fs.mnt / "f").read_bytes()
    assert exc.value.errno == errno.EIO
    assert status(cold_fs)["errors"]["io"] > 0


def test_corrupt_zone_record_gives_eio_and_counts(cold_fs: Mount) -> None:
    (cold_fs.mnt / "f").write_bytes(random_bytes(MiB, 9))
    run_cli("migrate", cold_fs.mnt, "--now")
    (zone,) = [z["zone"] for z in zones(cold_fs) if z["live_bytes"]]
    cold_fs.umount()
    image = cold_fs.data / "cold" / "zones.img"
    with image.open("r+b") as f:
        f.seek(zone * 4 * MiB + 200_000)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    cold_fs.mount()
    drop_caches(cold_fs)
    with pytest.raises(OSError) as exc:
        (cold_fs.mnt / "f").read_bytes()
    assert exc.value.errno == errno.EIO
    assert status(cold_fs)["errors"]["checksum"] > 0


def test_zone_device_option_is_checked(tmp_path: Path) -> None:
    bad = run_cli("mkfs", tmp_path / "a", "--zone-device", "emulated:lots", check=False)
    assert bad.returncode == 3 and "zone device" in bad.stderr
    small = run_cli("mkfs", tmp_path / "b", "--zone-device", "emulated:8M:4M", check=False)
    assert small.returncode == 3 and "too small" in small.stderr
    run_cli("mkfs", tmp_path / "c", "--zone-device", "none")
    assert not (tmp_path / "c" / "cold").exists()


def test_commands_without_a_cold_tier_fail_clearly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli("mkfs", data, "--zone-device", "none")
    with mounted(tmp_path, data) as m:
        commands: list[list[str | Path]] = [["migrate", m.mnt, "--now"], ["zones", m.mnt]]
        for args in commands:
            result = run_cli(*args, check=False)
            assert result.returncode == 3, result
            assert "no cold tier" in result.stderr


def test_fsck_checks_and_repairs_zone_live_bytes(cold_fs: Mount) -> None:
    (cold_fs.mnt / "f").write_bytes(random_bytes(MiB, 10))
    run_cli("migrate", cold_fs.mnt, "--now")
    cold_fs.umount()
    assert run_cli("fsck", cold_fs.data).returncode == 0
    from tierfs.meta.records import ZoneRecord
    from tierfs.meta.store import MetaStore

    store = MetaStore.open(cold_fs.data / "meta")
    with store.op() as tx:
        key, raw = next(iter(tx.cursor(db=store.zones)))
        record = ZoneRecord.decode(bytes(raw))
        record.live_bytes += 4096
        tx.put(bytes(key), record.encode(), db=store.zones)
    store.close()
    found = run_cli("fsck", cold_fs.data, check=False)
    assert found.returncode != 0 and "live bytes recorded" in found.stdout
    run_cli("fsck", cold_fs.data, "--repair")
    assert run_cli("fsck", cold_fs.data).returncode == 0


def test_promote_on_read_brings_chunks_back_to_the_hot_tier(
    tmp_path: Path, cold_data: Path
) -> None:
    configure(cold_data, cold__promote_on_read=True)
    with mounted(tmp_path, cold_data) as m:
        data = random_bytes(2 * MiB, 11)
        (m.mnt / "f").write_bytes(data)
        run_cli("migrate", m.mnt, "--now")
        cold_bytes = status(m)["tiers"]["cold"]["bytes"]
        drop_caches(m)
        assert (m.mnt / "f").read_bytes() == data
        deadline = time.monotonic() + 30
        while status(m)["tiers"]["cold"]["promoted_chunks"] == 0:
            assert time.monotonic() < deadline, "nothing promoted"
            time.sleep(0.5)
        doc = status(m)
        assert doc["tiers"]["hot"]["stored_bytes"] > 0
        assert doc["tiers"]["cold"]["bytes"] < cold_bytes
        drop_caches(m)
        assert (m.mnt / "f").read_bytes() == data
        m.umount()
        assert run_cli("fsck", m.data).returncode == 0
        m.mount()
        assert (m.mnt / "f").read_bytes() == data


# -- reclaim policy at high fill: a blocked migration must make progress


def _churn(
    m: Mount, files: dict[str, bytes], rounds: int, count: int, size: int, seed: int
) -> None:
    """Rounds of: delete `count` files (the oldest), write as many new ones of `size`
    bytes, `migrate --now` (which must succeed and leave nothing hot)."""
    for r in range(rounds):
        for name in sorted(files)[:count]:
            (m.mnt / name).unlink()
            del files[name]
        for i in range(count):
            name = f"f{seed}-{r:02d}-{i:02d}"
            files[name] = random_bytes(size, hash((seed, r, i)) & 0xFFFFFFFF)
            (m.mnt / name).write_bytes(files[name])
        result = run_cli("migrate", m.mnt, "--now", check=False)
        doc = status(m)
        garbage = [
            round(1 - z["live_bytes"] / z["write_pointer"], 3)
            for z in zones(m)
            if z["write_pointer"]
        ]
        assert result.returncode == 0, (r, result.stderr, doc["tiers"]["cold"], garbage)
        assert doc["tiers"]["hot"]["stored_bytes"] == 0, (r, doc["tiers"])


def _check_files(m: Mount, files: dict[str, bytes]) -> None:
    drop_caches(m)
    for name, data in files.items():
        assert (m.mnt / name).read_bytes() == data, name
    assert status(m)["errors"] == {"checksum": 0, "io": 0, "seal": 0}
    m.umount()
    assert run_cli("fsck", m.data).returncode == 0


def test_thin_garbage_does_not_block_migration_at_high_fill(
    tmp_path: Path, cold_data: Path
) -> None:
    """Garbage threshold deadlock: at ~85% fill, deleting a few files spreads their garbage
    thinly over the zones, below cold.min_garbage (0.6 here, so that no zone reaches it);
    once only the reserve is left EMPTY, migration must still go on: reclaim relocates the
    dirtiest zones whatever their share of garbage.

    Chunks migrate in write order, and the churn deletes files in name order: the names
    make every fourth file written the next to go, so each zone keeps three quarters."""
    configure(cold_data, cold__min_garbage=0.6)
    with mounted(tmp_path, cold_data) as m:
        files = {}
        for i in range(176):
            name = f"a{i % 4}{i // 4:03d}"
            files[name] = random_bytes(256 << 10, 100 + i)
            (m.mnt / name).write_bytes(files[name])
        run_cli("migrate", m.mnt, "--now")
        _churn(m, files, rounds=6, count=12, size=256 << 10, seed=1)
        assert status(m)["tiers"]["cold"]["relocated_chunks"] > 0
        _check_files(m, files)


def test_batches_larger_than_the_free_zones_do_not_block_migration(
    tmp_path: Path, cold_data: Path
) -> None:
    """Batch size deadlock: a migration batch (cold.batch_mb) larger than the zones reclaim
    keeps EMPTY must not wait for room that reclaim never makes (min_garbage 0 here, so the
    garbage threshold plays no part)."""
    configure(cold_data, cold__batch_mb=12, cold__min_garbage=0.0)
    with mounted(tmp_path, cold_data) as m:
        files = {f"a{i:02d}": random_bytes(MiB, 200 + i) for i in range(40)}
        for name, data in files.items():
            (m.mnt / name).write_bytes(data)
        run_cli("migrate", m.mnt, "--now")
        _churn(m, files, rounds=4, count=12, size=MiB, seed=2)
        _check_files(m, files)
