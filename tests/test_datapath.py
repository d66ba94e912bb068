"""The data path through a real mount: sealing, dedup, partial overwrites, checksums, space."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mount, configure, mounted, run_cli
from tierfs.data.frame import HEADER_SIZE

SEED = 1234
MiB = 1024 * 1024


def status(fs: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run_cli("status", fs.mnt, "--json").stdout)
    return doc


def flush(fs: Mount) -> dict[str, Any]:
    run_cli("flush", fs.mnt)
    return status(fs)


def stored(fs: Mount) -> int:
    return int(flush(fs)["chunks"]["stored_bytes"])


def random_bytes(n: int, seed: int = SEED) -> bytes:
    return random.Random(seed).randbytes(n)


def test_flush_seals_everything_and_frees_staging(fs: Mount) -> None:
    data = random_bytes(20 * MiB)
    (fs.mnt / "f").write_bytes(data)
    doc = flush(fs)
    assert doc["tiers"]["staging"]["staged_bytes"] == 0
    assert doc["chunks"]["unique_bytes"] == len(data)
    assert doc["chunks"]["count"] >= 20
    fs.remount()
    assert status(fs)["tiers"]["staging"]["bytes"] < MiB, "sealed bytes left in staging"
    assert (fs.mnt / "f").read_bytes() == data
    fs.umount()
    assert run_cli("fsck", fs.data).returncode == 0


def test_dedup_across_files_and_shifted_content(fs: Mount) -> None:
    data = random_bytes(16 * MiB)
    (fs.mnt / "a").write_bytes(data)
    first = stored(fs)
    shutil.copyfile(fs.mnt / "a", fs.mnt / "b")
    assert stored(fs) == first, "an identical copy must not store anything"
    (fs.mnt / "c").write_bytes(b"inserted at the front" + data)
    grown = stored(fs) - first
    assert grown < 3 * MiB, f"a shifted copy stored {grown} bytes, not a few chunks"
    doc = status(fs)
    assert doc["chunks"]["dedup_ratio"] > 2.5
    for name, expect in (("a", data), ("b", data), ("c", b"inserted at the front" + data)):
        assert (fs.mnt / name).read_bytes() == expect


def test_small_overwrite_stores_only_new_bytes_copy_on_write(fs: Mount) -> None:
    data = random_bytes(32 * MiB)
    (fs.mnt / "big").write_bytes(data)
    shutil.copyfile(fs.mnt / "big", fs.mnt / "twin")
    before = stored(fs)
    patch = random_bytes(4096, seed=99)
    with open(fs.mnt / "big", "r+b") as f:
        f.seek(10 * MiB + 1234)
        f.write(patch)
    grown = stored(fs) - before
    assert 4096 <= grown < 4096 + 2 * HEADER_SIZE + 1024, f"4 KiB overwrite stored {grown}"
    expect = bytearray(data)
    expect[10 * MiB + 1234 : 10 * MiB + 1234 + 4096] = patch
    assert (fs.mnt / "big").read_bytes() == bytes(expect)
    assert (fs.mnt / "twin").read_bytes() == data, "copy-on-write broke the dedup twin"
    fs.remount()
    assert (fs.mnt / "big").read_bytes() == bytes(expect)


def test_truncate_and_unlink_release_chunks(fs: Mount) -> None:
    data = random_bytes(8 * MiB)
    (fs.mnt / "f").write_bytes(data)
    assert stored(fs) >= 8 * MiB
    os.truncate(fs.mnt / "f", MiB)
    os.truncate(fs.mnt / "f", 2 * MiB)
    assert (fs.mnt / "f").read_bytes() == data[:MiB] + bytes(MiB)
    (fs.mnt / "f").unlink()
    doc = flush(fs)
    assert doc["chunks"]["count"] == 0
    assert doc["chunks"]["stored_bytes"] == 0
    fs.umount()
    hot = sum(p.stat().st_blocks * 512 for p in (fs.data / "hot").rglob("*.seg"))
    assert hot < MiB, f"{hot} bytes of freed chunks still allocated in the hot tier"
    assert run_cli("fsck", fs.data).returncode == 0


def test_compressible_data_is_compressed(fs: Mount) -> None:
    text = b"".join(f"line {i} of a very repetitive log\n".encode() for i in range(300_000))
    (fs.mnt / "log").write_bytes(text)
    doc = flush(fs)
    assert doc["chunks"]["stored_bytes"] < len(text) // 4
    assert doc["chunks"]["compression_ratio"] > 4
    fs.remount()
    assert (fs.mnt / "log").read_bytes() == text


def test_fixed_chunking_for_databases(fs: Mount) -> None:
    data = random_bytes(4 * MiB)
    (fs.mnt / "app.db").write_bytes(data)
    first = stored(fs)
    with open(fs.mnt / "app.db", "r+b") as f:
        f.seek(256 * 1024)
        f.write(random_bytes(256 * 1024, seed=7))
    grown = stored(fs) - first
    assert grown <= 256 * 1024 + 4 * HEADER_SIZE, f"a rewritten block stored {grown} bytes"


def test_corrupt_frame_gives_eio_and_counts(fs: Mount) -> None:
    data = random_bytes(2 * MiB)
    (fs.mnt / "f").write_bytes(data)
    flush(fs)
    fs.umount()
    segment = next((fs.data / "hot").rglob("*.seg"))
    with open(segment, "r+b") as f:
        f.seek(HEADER_SIZE + 1000)
        byte = f.read(1)
        f.seek(HEADER_SIZE + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    fs.mount()
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    with pytest.raises(OSError) as exc:
        (fs.mnt / "f").read_bytes()
    assert exc.value.errno == errno.EIO
    with open(fs.mnt / "f", "rb") as f:
        f.seek(MiB + 512 * 1024)
        assert f.read(4096) == data[MiB + 512 * 1024 : MiB + 512 * 1024 + 4096]
    assert status(fs)["errors"]["checksum"] >= 1
    log = (fs.data / "log" / "tierfs.log").read_text()
    assert "failed its check" in log and "inode" in log


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """tierfs on a 160 MiB loop-mounted ext4, to run the disk full."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(160 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    under = tmp_path / "under"
    under.mkdir()
    if subprocess.run(["mount", "-o", "loop", str(image), str(under)]).returncode != 0:
        pytest.skip("cannot loop-mount an image here")
    try:
        run_cli("mkfs", under / "data", "--site", "small")
        configure(
            under / "data",
            staging__reserve_mb=8,
            seal__quiet_period=0.0,
            metadata__preallocate_mb=8,
        )
        with mounted(tmp_path, under / "data") as m:
            yield m
    finally:
        subprocess.run(["umount", "-l", str(under)], check=False)


def test_disk_full_gives_enospc_and_recovers(small_fs: Mount) -> None:
    fs = small_fs
    keep = random_bytes(8 * MiB)
    (fs.mnt / "keep").write_bytes(keep)
    flush(fs)
    with pytest.raises(OSError) as exc, open(fs.mnt / "filler", "wb") as f:
        for i in range(200):
            f.write(random_bytes(MiB, seed=i))
    assert exc.value.errno == errno.ENOSPC
    assert (fs.mnt / "keep").read_bytes() == keep
    (fs.mnt / "filler").unlink()
    flush(fs)
    (fs.mnt / "after").write_bytes(b"space is back")
    assert (fs.mnt / "after").read_bytes() == b"space is back"
    fs.remount()
    assert (fs.mnt / "keep").read_bytes() == keep


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_compaction_rechunks_fragmented_file_and_dedup_recovers(
    tmp_path: Path, data_dir: Path
) -> None:
    configure(data_dir, seal__compact_min_extents=16, seal__quiet_period=0.0)
    with mounted(tmp_path, data_dir) as fs:
        rng = random.Random(SEED)
        data = bytearray(random_bytes(4 * MiB))
        (fs.mnt / "f").write_bytes(data)
        flush(fs)
        with open(fs.mnt / "f", "r+b") as f:
            for _ in range(150):
                off = rng.randrange(0, len(data) - 4096)
                patch = rng.randbytes(4096)
                f.seek(off)
                f.write(patch)
                data[off : off + 4096] = patch
        flush(fs)
        wait_for(lambda: status(fs)["seal"]["compactions"] >= 1)
        flush(fs)
        assert (fs.mnt / "f").read_bytes() == bytes(data)
        before = stored(fs)
        (fs.mnt / "copy").write_bytes(bytes(data))
        grown = stored(fs) - before
        assert grown < 2 * MiB, f"a copy of the compacted file stored {grown} new bytes"
        fs.remount()
        assert (fs.mnt / "f").read_bytes() == bytes(data)
        fs.umount()
        assert run_cli("fsck", fs.data).returncode == 0


def test_hot_limit_full_gives_enospc_and_keeps_data(tmp_path: Path, data_dir: Path) -> None:
    configure(data_dir, hot__max_mb=4, staging__max_mb=4, seal__quiet_period=0.0)
    with mounted(tmp_path, data_dir) as fs:
        keep = random_bytes(3 * MiB)
        (fs.mnt / "keep").write_bytes(keep)
        flush(fs)
        with pytest.raises(OSError) as exc, open(fs.mnt / "more", "wb") as f:
            for i in range(64):
                f.write(random_bytes(MiB, seed=100 + i))
                f.flush()
                time.sleep(0.05)
        assert exc.value.errno == errno.ENOSPC
        assert (fs.mnt / "keep").read_bytes() == keep
        (fs.mnt / "more").unlink()
        (fs.mnt / "keep").unlink()
        flush(fs)
        (fs.mnt / "again").write_bytes(keep)
        flush(fs)
        assert (fs.mnt / "again").read_bytes() == keep


def test_dedup_within_a_file(fs: Mount) -> None:
    block = random_bytes(2 * MiB)
    (fs.mnt / "repeats").write_bytes(block * 8)
    total = stored(fs)
    assert total < 4 * MiB, f"8 repeats of a 2 MiB block stored {total} bytes"
    assert (fs.mnt / "repeats").read_bytes() == block * 8


def test_rewrite_after_truncate_uses_a_new_staging_generation(fs: Mount) -> None:
    first = random_bytes(3 * MiB, seed=1)
    (fs.mnt / "f").write_bytes(first)
    run_cli("status", fs.mnt)
    second = random_bytes(MiB, seed=2)
    with open(fs.mnt / "f", "r+b") as f:
        f.truncate(512 * 1024)
        f.seek(0)
        f.write(second)
    assert (fs.mnt / "f").read_bytes() == second
    fs.remount()
    assert (fs.mnt / "f").read_bytes() == second
    fs.umount()
    names = sorted(p.name for p in (fs.data / "staging").rglob("*") if p.is_file())
    assert len(names) == 1 and names[0].endswith(".1"), names
    assert run_cli("fsck", fs.data).returncode == 0


def test_rewriting_sealed_bytes_with_the_same_content_loses_nothing(
    tmp_path: Path, data_dir: Path
) -> None:
    """The rewrite seals into the very chunk its old extents use; the seal round that
    installs it (with another file's new data) must neither fail nor drop anything."""
    configure(data_dir, seal__quiet_period=3600.0, seal__max_dirty_age=3600.0)
    with mounted(tmp_path, data_dir) as fs:
        b = random_bytes(100_000, seed=5)
        (fs.mnt / "b").write_bytes(b)
        flush(fs)
        a = random_bytes(100_000, seed=6)
        (fs.mnt / "a").write_bytes(a)
        with open(fs.mnt / "b", "r+b") as f:
            f.write(b)
        doc = flush(fs)
        assert doc["tiers"]["staging"]["staged_bytes"] == 0
        assert (fs.mnt / "a").read_bytes() == a
        assert (fs.mnt / "b").read_bytes() == b
        fs.remount()
        assert (fs.mnt / "a").read_bytes() == a
        fs.umount()
        assert run_cli("fsck", fs.data).returncode == 0
        # The rewrite moved the old extent's reference to the new one: no reference is
        # left over once both files go.
        fs.mount()
        (fs.mnt / "a").unlink()
        (fs.mnt / "b").unlink()
        assert flush(fs)["chunks"]["count"] == 0


def test_a_long_sequential_write_is_sealed_behind_its_writer(
    tmp_path: Path, data_dir: Path
) -> None:
    """With seal.stream_behind_mb set, an open file written front to back is sealed while
    it is written; the bytes sealed and the bytes still staged read back the same."""
    configure(data_dir, seal__stream_behind_mb=2, seal__batch_mb=2)
    with mounted(tmp_path, data_dir) as m:
        data = os.urandom(12 << 20)
        with (m.mnt / "stream").open("wb") as f:
            for i in range(0, len(data), 1 << 20):
                f.write(data[i : i + (1 << 20)])
                f.flush()
            deadline = time.monotonic() + 20
            while status(m)["seal"]["sealed_bytes"] < 4 << 20:
                assert time.monotonic() < deadline, "nothing sealed behind the open writer"
                time.sleep(0.1)
            f.write(b"tail")
        assert (m.mnt / "stream").read_bytes() == data + b"tail"
        run_cli("flush", m.mnt)
        m.remount()
        assert (m.mnt / "stream").read_bytes() == data + b"tail"


def staging_allocated(data_dir: Path, ino: int) -> int:
    """Allocated bytes of an inode's staging file (tierfs inode numbers are st_ino)."""
    path = data_dir / "staging" / f"{ino & 0xFF:02x}" / f"{ino:016x}"
    return path.stat().st_blocks * 512 if path.exists() else 0


def test_fsync_after_sealing_behind_the_writer_leaves_sealed_bytes_out_of_staging(
    tmp_path: Path, data_dir: Path
) -> None:
    """An fsync of a file sealed behind its writer first makes those seals durable and
    punches their bytes out of staging, so that it flushes only what is not sealed yet: the
    sealed bytes reach the disk once, as chunks. The fsynced file survives kill -9."""
    configure(data_dir, seal__stream_behind_mb=2, seal__batch_mb=2)
    data = os.urandom(16 << 20)
    with mounted(tmp_path, data_dir) as m:
        path = m.mnt / "stream"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(0, 12 << 20, 1 << 20):
                os.write(fd, data[i : i + (1 << 20)])
            deadline = time.monotonic() + 30
            while status(m)["seal"]["sealed_bytes"] < 8 << 20:
                assert time.monotonic() < deadline, "nothing sealed behind the open writer"
                time.sleep(0.05)
            sealed = status(m)["seal"]["sealed_bytes"]
            for i in range(12 << 20, len(data), 1 << 20):
                os.write(fd, data[i : i + (1 << 20)])
            os.fsync(fd)
            allocated = staging_allocated(data_dir, os.fstat(fd).st_ino)
        finally:
            os.close(fd)
        assert allocated <= len(data) - sealed + MiB, (
            f"{allocated:,} bytes of staging after fsync, {sealed:,} of {len(data):,} sealed"
        )
        m.kill9()
        m.mount()
        assert path.read_bytes() == data
        m.umount()
        assert run_cli("fsck", m.data).returncode == 0
