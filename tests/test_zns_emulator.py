"""Conformance of the emulated zoned device with the kernel's rules (zns.md A.2 and A.6)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tierfs.errors import TierfsError
from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tierfs.tiers.zns.model import SECTOR, WP_INVALID, Cond, Geometry, Zone, ZoneType

LBA = 4096
GEO = Geometry(
    lba_size=LBA,
    zone_size=64 * 1024,
    zone_capacity=48 * 1024,
    nr_zones=12,
    nr_conv=2,
    max_open=3,
    max_active=4,
    zone_append_max=16 * 1024,
)
FIRST = GEO.nr_conv


def block(n: int = 1, fill: int = 0xAB) -> bytes:
    return bytes([fill]) * (LBA * n)


@pytest.fixture
def dev(tmp_path: Path) -> EmulatedZonedDevice:
    return EmulatedZonedDevice.create(tmp_path / "zones.img", GEO)


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)  # type: ignore[operator]
    return exc.value.errno or 0


def test_write_only_at_the_write_pointer(dev: EmulatedZonedDevice) -> None:
    z = FIRST
    start = dev.zone_start(z)
    dev.write(start, block())
    assert dev.cond[z] == Cond.IMP_OPEN
    assert errno_of(dev.write, start, block()) == errno.EIO
    assert errno_of(dev.write, start + 2 * LBA, block()) == errno.EIO
    assert errno_of(dev.write, start + LBA + 1, block()) == errno.EINVAL
    dev.write(start + LBA, block(2))
    assert dev.zone(z).wp == (start + 3 * LBA) // SECTOR


def test_crossing_capacity_is_refused_and_full_at_capacity(dev: EmulatedZonedDevice) -> None:
    z = FIRST
    cap_blocks = GEO.zone_capacity // LBA
    assert errno_of(dev.write, dev.zone_start(z), block(cap_blocks + 1)) == errno.EIO
    dev.write(dev.zone_start(z), block(cap_blocks))
    assert dev.cond[z] == Cond.FULL
    zone = dev.zone(z)
    assert zone.wp == zone.start + zone.len, "a FULL zone reports wp = start + len"
    assert errno_of(dev.write, dev.zone_end(z), block()) == errno.EIO
    assert dev.counts() == (0, 0), "a FULL zone holds no resources"


def test_implicit_close_picks_imp_open_never_exp_open(dev: EmulatedZonedDevice) -> None:
    dev.open_zone(FIRST)
    dev.write(dev.zone_start(FIRST + 1), block())
    dev.write(dev.zone_start(FIRST + 2), block())
    assert dev.counts() == (3, 3)
    dev.write(dev.zone_start(FIRST + 3), block())
    assert dev.cond[FIRST] == Cond.EXP_OPEN
    assert dev.cond[FIRST + 1] == Cond.CLOSED, "the oldest IMP_OPEN zone is closed implicitly"
    assert dev.cond[FIRST + 3] == Cond.IMP_OPEN


def test_too_many_refs_when_all_open_zones_are_explicit(dev: EmulatedZonedDevice) -> None:
    for z in range(FIRST, FIRST + 3):
        dev.open_zone(z)
    assert errno_of(dev.write, dev.zone_start(FIRST + 3), block()) == errno.ETOOMANYREFS
    assert errno_of(dev.open_zone, FIRST + 3) == errno.ETOOMANYREFS


def test_active_limit_gives_eoverflow_even_with_open_slots(dev: EmulatedZonedDevice) -> None:
    for z in range(FIRST, FIRST + 4):
        dev.write(dev.zone_start(z), block())
        dev.close_zone(z)
    assert dev.counts() == (0, 4)
    assert errno_of(dev.write, dev.zone_start(FIRST + 4), block()) == errno.EOVERFLOW
    assert errno_of(dev.finish_zone, FIRST + 4) == errno.EOVERFLOW, "finish of EMPTY checks active"
    dev.write(dev.wp[FIRST], block())
    assert dev.cond[FIRST] == Cond.IMP_OPEN, "a CLOSED zone needs only an open slot"


def test_close_semantics(dev: EmulatedZonedDevice) -> None:
    assert errno_of(dev.close_zone, FIRST) == errno.EIO, "close of EMPTY"
    dev.open_zone(FIRST)
    dev.close_zone(FIRST)
    assert dev.cond[FIRST] == Cond.EMPTY, "close of an open zone with wp == start"
    dev.write(dev.zone_start(FIRST), block())
    dev.close_zone(FIRST)
    assert dev.cond[FIRST] == Cond.CLOSED
    dev.close_zone(FIRST)
    assert dev.cond[FIRST] == Cond.CLOSED, "close of CLOSED is a no-op"


def test_finish_and_reset(dev: EmulatedZonedDevice) -> None:
    z = FIRST
    dev.write(dev.zone_start(z), block(2))
    dev.finish_zone(z)
    assert dev.cond[z] == Cond.FULL and dev.counts() == (0, 0)
    dev.finish_zone(z)
    assert dev.read(dev.zone_start(z), 2 * LBA) == block(2)
    dev.reset_zone(z)
    assert dev.cond[z] == Cond.EMPTY and dev.wp[z] == dev.zone_start(z)
    assert dev.read(dev.zone_start(z), LBA) == bytes(LBA)
    dev.reset_zone(z)
    assert dev.cond[z] == Cond.EMPTY
    assert errno_of(dev.open_zone, 0) == errno.EIO, "management of a conventional zone"


def test_reads_past_the_write_pointer_are_zeros(dev: EmulatedZonedDevice) -> None:
    dev.write(dev.zone_start(FIRST), block(1, 0x11))
    data = dev.read(dev.zone_start(FIRST), 2 * LBA)
    assert data == block(1, 0x11) + bytes(LBA)


def test_strict_read_past_wp(tmp_path: Path) -> None:
    strict = Geometry(**{**GEO.__dict__, "read_past_wp": "error"})
    dev = EmulatedZonedDevice.create(tmp_path / "z.img", strict)
    dev.write(dev.zone_start(FIRST), block())
    assert errno_of(dev.read, dev.zone_start(FIRST), 2 * LBA) == errno.EIO


def test_conventional_zones_take_random_writes(dev: EmulatedZonedDevice) -> None:
    dev.write(3 * LBA, block(1, 7))
    dev.write(0, block(1, 8))
    assert dev.read(3 * LBA, LBA) == block(1, 7)
    assert dev.zone(0).type == ZoneType.CONVENTIONAL and dev.zone(0).cond == Cond.NOT_WP


def test_append_returns_the_written_offset(dev: EmulatedZonedDevice) -> None:
    first = dev.append(FIRST, block())
    second = dev.append(FIRST, block(2))
    assert (first, second) == (dev.zone_start(FIRST), dev.zone_start(FIRST) + LBA)
    assert errno_of(dev.append, FIRST, block(5)) == errno.EINVAL, "larger than zone_append_max"
    assert errno_of(dev.append, 0, block()) == errno.EIO, "append to a conventional zone"


def test_restart_turns_open_zones_closed_and_keeps_flushed_data(tmp_path: Path) -> None:
    dev = EmulatedZonedDevice.create(tmp_path / "z.img", GEO)
    dev.write(dev.zone_start(FIRST), block(1, 1))
    dev.open_zone(FIRST + 1)
    dev.flush()
    dev.write(dev.zone_start(FIRST) + LBA, block(1, 2))
    dev.crash()
    again = EmulatedZonedDevice.open(tmp_path / "z.img")
    assert again.cond[FIRST] == Cond.CLOSED
    assert again.cond[FIRST + 1] == Cond.EMPTY, "an open zone with nothing written comes back EMPTY"
    assert again.wp[FIRST] == again.zone_start(FIRST) + LBA, "the wp is never ahead of data"
    assert again.read(again.zone_start(FIRST), 2 * LBA) == block(1, 1) + bytes(LBA)
    again.write(again.wp[FIRST], block(1, 3))
    assert again.counts() == (1, 1)


def test_partial_write_failure_advances_wp_part_way(dev: EmulatedZonedDevice) -> None:
    dev.fail_next_write(FIRST, 2 * LBA + 100)
    assert errno_of(dev.write, dev.zone_start(FIRST), block(4)) == errno.EIO
    assert dev.wp[FIRST] == dev.zone_start(FIRST) + 2 * LBA
    dev.write(dev.wp[FIRST], block(1))


def test_readonly_and_offline_zones(dev: EmulatedZonedDevice) -> None:
    dev.write(dev.zone_start(FIRST), block(1, 5))
    dev.set_readonly(FIRST)
    assert dev.read(dev.zone_start(FIRST), LBA) == block(1, 5)
    assert errno_of(dev.write, dev.wp[FIRST], block()) == errno.EIO
    assert errno_of(dev.reset_zone, FIRST) == errno.EIO
    assert dev.zone(FIRST).wp == WP_INVALID
    dev.set_offline(FIRST + 1)
    assert errno_of(dev.read, dev.zone_start(FIRST + 1), LBA) == errno.EIO
    for op in (dev.open_zone, dev.close_zone, dev.finish_zone, dev.reset_zone):
        assert errno_of(op, FIRST + 1) == errno.EIO
    dev.reset_all()
    assert dev.cond[FIRST] == Cond.READONLY and dev.cond[FIRST + 1] == Cond.OFFLINE


def test_report_struct_encoding(dev: EmulatedZonedDevice) -> None:
    dev.write(dev.zone_start(FIRST), block())
    raw = dev.pack_report(dev.zone_start(FIRST) // SECTOR, 2)
    assert len(raw) == 16 + 2 * 64
    zone = Zone.unpack(raw[16:80])
    assert zone == dev.zone(FIRST)
    assert zone.capacity == GEO.zone_capacity // SECTOR
    assert errno_of(dev.report, 0, 0) == errno.EINVAL


def test_limits_follow_null_blk_and_geometry_is_validated() -> None:
    geo = Geometry(**{**GEO.__dict__, "max_open": 10, "max_active": 4})
    assert geo.effective_limits() == (4, 4)
    assert Geometry(**{**GEO.__dict__, "max_active": 99}).effective_limits()[1] == 0
    with pytest.raises(TierfsError):
        Geometry(zone_size=3 << 20).validate()
