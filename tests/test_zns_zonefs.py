"""The zonefs backend (`ZonefsDevice`) against a test-only zonefs (`tests/zonefs_layer/`).

No zonefs exists here, so the layer presents an emulated zoned device with zonefs's rules
over FUSE. Its own tests come first, so that a layer too lenient cannot make the backend
tests pass for nothing. Then the backend: the same operations give the same results and
errnos as the emulator (a differential run), reports match the device's own view, and
read-only, offline and partly failed zones behave as zonefs shows them.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FUSE_REASON, fuse_available
from tests.zonefs_layer.layer import FAULT_XATTR, ZONE_XATTR
from tests.zonefs_layer.process import ZonefsLayer
from tierfs.errors import ExitCode, TierfsError
from tierfs.tiers.zns.device import ZonedDevice
from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tierfs.tiers.zns.model import SECTOR, WP_INVALID, Cond, Geometry, Zone, ZoneType
from tierfs.tiers.zns.zonefs import AlignedBuffer, ZonefsDevice, map_errno

LBA = 4096
CAP = 48 * 1024
ZONE = 64 * 1024
GEO = Geometry(
    lba_size=LBA,
    zone_size=ZONE,
    zone_capacity=CAP,
    nr_zones=12,
    nr_conv=1,
    max_open=3,
    max_active=4,
    zone_append_max=16 * 1024,
)
NR_SEQ = GEO.nr_zones - 1  # zone 0 holds zonefs's superblock and is not shown
FIRST = 1  # the device zone of seq/0
DIRECT_WRITE = os.O_WRONLY | os.O_DIRECT


def block(n: int = 1, fill: int = 0xAB) -> bytes:
    return bytes([fill]) * (LBA * n)


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno or 0


def aligned(data: bytes) -> mmap.mmap:
    """O_DIRECT through a real zonefs needs aligned memory: keep the tests honest."""
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[: len(data)] = data
    return buf


@dataclass
class Rig:
    """A layer process and the zonefs backends opened on it (closed before it stops)."""

    layer: ZonefsLayer
    devices: list[ZonefsDevice] = field(default_factory=list)

    @property
    def mnt(self) -> Path:
        return self.layer.mnt

    def seq(self, i: int) -> Path:
        return self.mnt / "seq" / str(i)

    def device_view(self, i: int) -> Zone:
        """The emulated device's own view of the zone behind seq/i."""
        return Zone.unpack(os.getxattr(self.seq(i), ZONE_XATTR))

    def inject(self, i: int, fault: bytes) -> None:
        os.setxattr(self.seq(i), FAULT_XATTR, fault)

    def device(self) -> ZonefsDevice:
        dev = ZonefsDevice(
            self.mnt,
            explicit_open=self.layer.explicit_open,
            max_open=GEO.max_open,
            max_active=GEO.max_active,
            zone_append_max=GEO.zone_append_max,
        )
        self.devices.append(dev)
        return dev

    def close_devices(self) -> None:
        while self.devices:
            self.devices.pop().close_device()


MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[MakeRig]:
    """Start layers over fresh emulated devices; every one is unmounted afterwards."""
    if not fuse_available():
        pytest.skip(FUSE_REASON)
    with ExitStack() as stack:
        count = itertools.count()

        def make(
            explicit_open: bool = True,
            errors: str = "repair",
            prepare: Callable[[EmulatedZonedDevice], None] | None = None,
        ) -> Rig:
            n = next(count)
            image = tmp_path / f"zones{n}.img"
            emulated = EmulatedZonedDevice.create(image, GEO)
            if prepare is not None:
                prepare(emulated)
            emulated.close_device()
            layer = ZonefsLayer(
                image,
                tmp_path / f"mnt{n}",
                tmp_path / f"layer{n}.log",
                explicit_open=explicit_open,
                errors=errors,
            )
            rig = Rig(layer)
            stack.callback(layer.stop)
            stack.callback(rig.close_devices)
            layer.start()
            return rig

        yield make


@pytest.fixture
def rig(make_rig: MakeRig) -> Rig:
    """zonefs mounted with explicit-open and errors=repair."""
    return make_rig()


# -- the layer itself ------------------------------------------------------------------------


def test_layer_shows_the_zonefs_layout(rig: Rig) -> None:
    assert os.listdir(rig.mnt) == ["seq"], "no cnv/: the only conventional zone is zone 0"
    names = sorted(os.listdir(rig.mnt / "seq"), key=int)
    assert names == [str(i) for i in range(NR_SEQ)]
    assert os.stat(rig.mnt / "seq").st_size == NR_SEQ
    st = os.stat(rig.seq(0))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_size, st.st_blocks * SECTOR, st.st_blksize) == (0, CAP, LBA)
    assert errno_of(os.open, rig.mnt / "seq" / "11", os.O_CREAT | os.O_WRONLY) == errno.EACCES
    assert errno_of(os.mkdir, rig.mnt / "cnv") == errno.EPERM
    assert errno_of(os.unlink, rig.seq(0)) == errno.EPERM
    assert errno_of(os.rename, rig.seq(0), rig.seq(1)) == errno.EPERM
    assert errno_of(os.chmod, rig.seq(0), 0o600) == errno.EPERM


def test_layer_takes_only_direct_appends_and_truncates_to_reset_or_finish(rig: Rig) -> None:
    fd = os.open(rig.seq(0), DIRECT_WRITE)
    try:
        assert os.pwrite(fd, aligned(block()), 0) == LBA
        assert errno_of(os.pwrite, fd, aligned(block()), 0) == errno.EINVAL, "not at the size"
        assert errno_of(os.pwrite, fd, aligned(block()), 2 * LBA) == errno.EINVAL
        assert errno_of(os.pwrite, fd, aligned(b"x" * 100), LBA) == errno.EINVAL, "unaligned"
        written = os.pwrite(fd, aligned(block(CAP // LBA)), LBA)
        assert written == CAP - LBA, "a write across the capacity is shortened to it"
        assert errno_of(os.pwrite, fd, aligned(block()), CAP) == errno.EFBIG
    finally:
        os.close(fd)
    assert os.stat(rig.seq(0)).st_size == CAP and rig.device_view(0).cond == Cond.FULL
    buffered = os.open(rig.seq(1), os.O_WRONLY)
    try:
        assert errno_of(os.pwrite, buffered, block(), 0) == errno.EIO, "buffered write"
    finally:
        os.close(buffered)
    assert errno_of(os.truncate, rig.seq(0), LBA) == errno.EPERM
    os.truncate(rig.seq(0), 0)
    assert os.stat(rig.seq(0)).st_size == 0 and rig.device_view(0).cond == Cond.EMPTY
    os.truncate(rig.seq(2), CAP)
    assert os.stat(rig.seq(2)).st_size == CAP and rig.device_view(2).cond == Cond.FULL
    with open(rig.seq(2), "rb") as f:
        assert f.read() == bytes(CAP)


def test_layer_explicit_open_follows_write_opens(rig: Rig) -> None:
    fds = [os.open(rig.seq(i), DIRECT_WRITE) for i in range(GEO.max_open)]
    try:
        assert [rig.device_view(i).cond for i in range(3)] == [Cond.EXP_OPEN] * 3
        assert errno_of(os.open, rig.seq(3), DIRECT_WRITE) == errno.EBUSY, "max_wro_seq_files"
        os.pwrite(fds[1], aligned(block()), 0)
    finally:
        for fd in fds:
            os.close(fd)
    assert rig.device_view(0).cond == Cond.EMPTY, "an unwritten zone is reset, not closed"
    assert rig.device_view(1).cond == Cond.CLOSED
    os.close(os.open(rig.seq(3), DIRECT_WRITE))


# -- the backend -----------------------------------------------------------------------------


def both_are_zoned_devices(dev: ZonefsDevice, emulated: EmulatedZonedDevice) -> list[ZonedDevice]:
    """mypy checks that both backends satisfy the interface."""
    return [dev, emulated]


def test_geometry_is_probed_from_the_files(rig: Rig) -> None:
    dev = rig.device()
    expected = Geometry(
        lba_size=LBA,
        zone_size=ZONE,
        zone_capacity=CAP,
        nr_zones=NR_SEQ,
        nr_conv=0,
        max_open=GEO.max_open,
        max_active=GEO.max_active,
        zone_append_max=GEO.zone_append_max,
    )
    assert dev.geometry == expected
    assert (dev.max_open, dev.max_active) == (3, 4)
    assert (dev.nr_zones(), dev.zone_size_sectors()) == (NR_SEQ, ZONE // SECTOR)
    assert isinstance(dev, ZonedDevice)
    with pytest.raises(TierfsError) as busy:
        rig.device()
    assert busy.value.exit_code == ExitCode.BUSY, "seq/0 is flocked, as ZenFS does"
    with pytest.raises(TierfsError) as missing:
        ZonefsDevice(rig.mnt / "seq")
    assert missing.value.exit_code == ExitCode.CONFIG


def test_a_plain_directory_is_not_taken_for_zonefs(tmp_path: Path) -> None:
    (tmp_path / "seq").mkdir()
    (tmp_path / "seq" / "0").write_bytes(block())
    with pytest.raises(TierfsError) as exc:
        ZonefsDevice(tmp_path)
    assert exc.value.exit_code == ExitCode.CONFIG


def test_append_and_read_round_trip(rig: Rig) -> None:
    dev = rig.device()
    start = dev.zone_start(0)
    assert dev.append(0, block(1, 1)) == start
    assert dev.append(0, block(2, 2)) == start + LBA
    dev.write(start + 3 * LBA, block(1, 3))
    expected = block(1, 1) + block(2, 2) + block(1, 3)
    assert dev.read(start, 5 * LBA) == expected + bytes(LBA), "zeros past the write pointer"
    assert dev.read(start + 10, 100) == expected[10:110], "reads need no alignment"
    assert dev.read(start + CAP, LBA) == bytes(LBA), "past the capacity: zeros"
    assert dev.zone(0).wp == (start + 4 * LBA) // SECTOR
    big = bytes(range(256)) * (8 * LBA // 256)  # more than one FUSE request
    dev.write(dev.zone_start(1), big)
    assert dev.read(dev.zone_start(1), len(big)) == big


def test_write_pointer_survives_reopen_and_restart(rig: Rig) -> None:
    dev = rig.device()
    dev.append(2, block(3, 7))
    dev.flush()
    dev.close_device()
    again = rig.device()
    assert again.zone(2).wp - again.zone(2).start == 3 * LBA // SECTOR
    assert again.zone(2).cond == Cond.CLOSED == rig.device_view(2).cond
    rig.close_devices()
    rig.layer.restart()
    after = rig.device()
    assert after.append(2, block(1, 8)) == after.zone_start(2) + 3 * LBA
    assert after.read(after.zone_start(2), 4 * LBA) == block(3, 7) + block(1, 8)


def test_reset_and_finish(rig: Rig) -> None:
    dev = rig.device()
    start = dev.zone_start(0)
    dev.append(0, block(2, 5))
    dev.finish_zone(0)
    zone = dev.zone(0)
    assert zone.cond == Cond.FULL and zone.wp == zone.start + zone.len
    assert rig.device_view(0).cond == Cond.FULL
    assert dev.read(start, 3 * LBA) == block(2, 5) + bytes(LBA)
    dev.finish_zone(0)
    assert errno_of(dev.append, 0, block()) == errno.EIO, "zonefs's EFBIG"
    dev.reset_zone(0)
    assert dev.zone(0).cond == Cond.EMPTY and dev.zone(0).wp == zone.start
    assert rig.device_view(0).cond == Cond.EMPTY
    assert dev.read(start, LBA) == bytes(LBA)
    dev.reset_zone(0)
    for z in (1, 2):
        dev.append(z, block())
    dev.reset_all()
    assert {z.cond for z in dev.report()} == {Cond.EMPTY}
    assert dev.counts() == (0, 0)


# The differential run: each step on the zonefs backend and on an emulated device of the
# same geometry; results (or errnos) and full reports must agree after every step.
Z = ZONE
STEPS: list[tuple[str, tuple[Any, ...]]] = [
    ("write", (0, block())),
    ("write", (0, block())),  # not at the write pointer
    ("write", (2 * LBA, block())),
    ("write", (LBA + 1, block())),  # unaligned offset
    ("write", (LBA, b"x" * 100)),  # unaligned length
    ("append", (0, block(1, 2))),
    ("append", (0, block(5))),  # larger than zone_append_max
    ("write", (2 * LBA, block(11))),  # across the capacity
    ("write", (Z, block())),
    ("write", (2 * Z, block())),
    ("write", (3 * Z, block())),  # a fourth open zone: zone 0 is closed implicitly
    ("open_zone", (4,)),  # 4 active zones: EOVERFLOW
    ("close_zone", (1,)),
    ("finish_zone", (4,)),  # finishing an EMPTY zone checks the active limit too
    ("finish_zone", (1,)),
    ("open_zone", (4,)),
    ("reset_zone", (0,)),
    ("open_zone", (2,)),
    ("open_zone", (3,)),
    ("write", (5 * Z, block())),  # every open zone is explicitly open: ETOOMANYREFS
    ("close_zone", (4,)),  # open, nothing written: EMPTY
    ("close_zone", (4,)),  # EMPTY: EIO
    ("write", (5 * Z, block())),
    ("finish_zone", (5,)),
    ("write", (5 * Z + CAP, block())),  # FULL
    ("append", (5, block())),
    ("open_zone", (5,)),
    ("close_zone", (5,)),
    ("finish_zone", (5,)),
    ("reset_zone", (5,)),
    ("read", (2 * Z, 2 * LBA)),
    ("read", (2 * Z + CAP, LBA)),
    ("read", (11 * Z, LBA)),  # past the device
    ("report", (0, 0)),
    ("counts", ()),
    ("reset_all", ()),
    ("flush", ()),
]


def outcome(dev: ZonedDevice, op: str, args: tuple[Any, ...]) -> object:
    try:
        return getattr(dev, op)(*args)
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def test_same_results_and_errnos_as_the_emulator(make_rig: MakeRig, tmp_path: Path) -> None:
    """explicit-open off, so a zone opened by a write is IMP_OPEN on both sides."""
    rig = make_rig(explicit_open=False)
    dev = rig.device()
    reference = EmulatedZonedDevice.create(tmp_path / "reference.img", dev.geometry)
    try:
        zonefs, emulated = both_are_zoned_devices(dev, reference)
        for step, (op, args) in enumerate(STEPS):
            got, want = outcome(zonefs, op, args), outcome(emulated, op, args)
            assert got == want, f"step {step} {op}{args[:1]}: zonefs {got}, emulator {want}"
            assert zonefs.report() == emulated.report(), f"after step {step} {op}{args[:1]}"
    finally:
        reference.close_device()


def assert_same_as_device(rig: Rig, dev: ZonefsDevice) -> None:
    """Type, condition, capacity and write pointer; the write pointer relative to the zone
    start, since the device has zonefs's superblock zone in front."""
    for i, zone in enumerate(dev.report()):
        view = rig.device_view(i)
        assert (zone.type, zone.cond, zone.capacity) == (
            ZoneType.SEQWRITE_REQ,
            view.cond,
            view.capacity,
        )
        assert zone.wp - zone.start == view.wp - view.start or zone.wp == view.wp == WP_INVALID


def test_report_matches_the_device_view(rig: Rig) -> None:
    dev = rig.device()
    dev.open_zone(0)
    dev.append(1, block())  # explicit-open: zonefs opened the zone explicitly
    dev.append(2, block())
    dev.close_zone(2)
    dev.finish_zone(3)
    dev.write(dev.zone_start(4), block(CAP // LBA))
    dev.open_zone(5)
    dev.close_zone(5)
    dev.append(6, block())
    dev.reset_zone(6)
    conds = [z.cond for z in dev.report()[:7]]
    assert conds == [
        Cond.EXP_OPEN,
        Cond.EXP_OPEN,
        Cond.CLOSED,
        Cond.FULL,
        Cond.FULL,
        Cond.EMPTY,
        Cond.EMPTY,
    ]
    assert_same_as_device(rig, dev)
    # zonefs learns of a bad zone from an I/O error: a write to a zone it holds open, a read
    # of written data (a failed OPEN ZONE or a read of an empty file would not tell it)
    rig.inject(1, b"readonly")
    rig.inject(2, b"offline")
    assert errno_of(dev.append, 1, block()) == errno.EIO
    assert errno_of(dev.read, dev.zone_start(2), LBA) == errno.EIO
    assert dev.zone(1).cond == Cond.READONLY and dev.zone(2).cond == Cond.OFFLINE
    assert_same_as_device(rig, dev)


def test_write_opens_of_other_processes_take_open_slots(rig: Rig) -> None:
    """explicit-open: zonefs refuses a write open past max_wro_seq_files (EBUSY) whoever
    holds the others; the backend gives up its least recently written zone and retries."""
    dev = rig.device()
    dev.append(0, block())
    others = [os.open(rig.seq(i), DIRECT_WRITE) for i in (9, 10)]
    try:
        assert dev.append(1, block()) == dev.zone_start(1), "zone 0 was closed to make room"
        assert dev.zone(0).cond == Cond.CLOSED == rig.device_view(0).cond
        dev.open_zone(1)
        assert errno_of(dev.append, 2, block()) == errno.ETOOMANYREFS, "zonefs's EBUSY"
    finally:
        for fd in others:
            os.close(fd)
    dev.append(2, block())


def test_readonly_zone_keeps_its_data_readable(rig: Rig) -> None:
    dev = rig.device()
    start = dev.zone_start(0)
    dev.append(0, block(2, 4))
    rig.inject(0, b"readonly")
    assert dev.zone(0).cond == Cond.EXP_OPEN, "zonefs has not seen an error yet"
    assert errno_of(dev.append, 0, block()) == errno.EIO
    assert stat.S_IMODE(os.stat(rig.seq(0)).st_mode) == 0o440, "zonefs drops the write bits"
    zone = dev.zone(0)
    assert (zone.cond, zone.wp) == (Cond.READONLY, WP_INVALID)
    assert dev.read(start, 2 * LBA) == block(2, 4)
    assert errno_of(dev.write, start + 2 * LBA, block()) == errno.EIO
    for op in (dev.open_zone, dev.close_zone, dev.finish_zone, dev.reset_zone):
        assert errno_of(op, 0) == errno.EIO
    dev.reset_all()
    assert dev.counts() == (0, 0), "a READONLY zone holds no resources"


def test_offline_zone_refuses_everything(rig: Rig) -> None:
    dev = rig.device()
    start = dev.zone_start(1)
    dev.append(1, block())
    rig.inject(1, b"offline")
    assert errno_of(dev.read, start, LBA) == errno.EIO, "the device's own error"
    st = os.stat(rig.seq(1))
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0, 0), "zonefs: no access, size 0"
    assert errno_of(dev.read, start, LBA) == errno.EIO, "zonefs's EPERM"
    assert (dev.zone(1).cond, dev.zone(1).wp) == (Cond.OFFLINE, WP_INVALID)
    assert errno_of(dev.write, start, block()) == errno.EIO
    for op in (dev.open_zone, dev.close_zone, dev.finish_zone, dev.reset_zone):
        assert errno_of(op, 1) == errno.EIO


def test_partial_write_failure_is_recovered_from_the_write_pointer(rig: Rig) -> None:
    """errors=repair: zonefs resyncs the file size to the device's write pointer."""
    dev = rig.device()
    start = dev.zone_start(2)
    dev.append(2, block(1, 1))
    rig.inject(2, b"fail-after=%d" % (2 * LBA + 100))
    assert errno_of(dev.append, 2, block(4, 2)) == errno.EIO
    assert dev.zone(2).wp == (start + 3 * LBA) // SECTOR, "one block, then two of four"
    assert dev.append(2, block(1, 3)) == start + 3 * LBA
    assert dev.read(start, 4 * LBA) == block(1, 1) + block(2, 2) + block(1, 3)


def test_remount_ro_makes_the_device_read_only(make_rig: MakeRig) -> None:
    """zonefs's default errors=remount-ro: after any I/O error every write is refused."""
    rig = make_rig(errors="remount-ro")
    dev = rig.device()
    dev.append(0, block(1, 9))
    rig.inject(0, b"fail-after=0")
    assert errno_of(dev.append, 0, block()) == errno.EIO
    assert errno_of(dev.append, 3, block()) == errno.EPERM, "EROFS: the device is read-only"
    assert errno_of(dev.reset_zone, 0) == errno.EPERM
    assert dev.read(dev.zone_start(0), LBA) == block(1, 9)


def test_zone_read_only_at_mount_looks_offline(make_rig: MakeRig) -> None:
    """zonefs cannot know the size of a zone found READONLY at mount: it hides it."""

    def prepare(emulated: EmulatedZonedDevice) -> None:
        emulated.write(emulated.zone_start(FIRST), block())
        emulated.set_readonly(FIRST)

    rig = make_rig(prepare=prepare)
    dev = rig.device()
    assert rig.device_view(0).cond == Cond.READONLY
    assert dev.zone(0).cond == Cond.OFFLINE
    assert errno_of(dev.read, dev.zone_start(0), LBA) == errno.EIO


# -- pieces without a mount ------------------------------------------------------------------


def test_aligned_buffer_is_page_aligned() -> None:
    buf = AlignedBuffer()
    try:
        for size in (LBA, 5 * mmap.PAGESIZE + LBA):
            with buf.load(block(size // LBA)) as view:
                address = ctypes.addressof(ctypes.c_char.from_buffer(view))
                assert address % mmap.PAGESIZE == 0 and bytes(view) == block(size // LBA)
    finally:
        buf.close()


def test_errno_mapping() -> None:
    assert map_errno(errno.EINVAL, write=True) == errno.EIO, "not at the write pointer"
    assert map_errno(errno.EINVAL, write=False) == errno.EINVAL
    assert map_errno(errno.EFBIG, write=True) == errno.EIO
    assert map_errno(errno.EPERM, write=False) == errno.EIO
    assert map_errno(errno.EROFS, write=True) == errno.EPERM
    assert map_errno(errno.EBUSY, write=False) == errno.ETOOMANYREFS
    for passed in (errno.EIO, errno.EOVERFLOW, errno.ETOOMANYREFS):
        assert map_errno(passed, write=True) == passed
