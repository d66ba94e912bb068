"""The raw zoned block device backend: struct encodings, and a clear error on plain disks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tierfs.errors import ExitCode, TierfsError
from tierfs.tiers.zns.blockdev import (
    BLKREPORTZONE,
    BLKRESETZONE,
    ZonedBlockDevice,
    pack_range,
    pack_report_request,
    parse_report,
)
from tierfs.tiers.zns.model import BLK_ZONE, REPORT_HEADER, Cond, Zone, ZoneType


def test_struct_sizes_and_ioctl_numbers() -> None:
    assert BLK_ZONE.size == 64, "struct blk_zone is 64 bytes"
    assert REPORT_HEADER.size == 16
    assert len(pack_range(8, 16)) == 16
    assert BLKREPORTZONE & 0xFF == 130 and BLKRESETZONE & 0xFF == 131
    assert REPORT_HEADER.size == (BLKREPORTZONE >> 16) & 0x3FFF, "size field of the ioctl"


def test_report_round_trip() -> None:
    zone = Zone(8192, 8192, 8200, ZoneType.SEQWRITE_REQ, Cond.IMP_OPEN, 6144)
    buf = pack_report_request(8192, 2)
    REPORT_HEADER.pack_into(buf, 0, 8192, 1, 1)
    buf[16:80] = zone.pack()
    assert parse_report(bytes(buf)) == [zone]
    assert zone.pack()[32:40] == (6144).to_bytes(8, "little"), "capacity at offset 32"


def test_loop_device_is_refused_as_not_zoned(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    setup = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True
    )
    if setup.returncode != 0:
        pytest.skip(f"no loop device here: {setup.stderr.strip()}")
    loop = setup.stdout.strip()
    try:
        with pytest.raises(TierfsError) as exc:
            ZonedBlockDevice(Path(loop))
        assert exc.value.exit_code == ExitCode.CONFIG
        assert "not a zoned block device" in exc.value.message
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
