"""The raw zoned block device backend (`ZonedBlockDevice`).

No zoned block device exists on the machines this was written on (the kernel has zoned
support and null_blk compiled out), so the backend runs here against `KernelModel`: the
kernel's side of the blkzoned ioctls and of O_DIRECT I/O (argument checks, alignment,
sysfs), over an emulated device that follows null_blk's rules. A differential run then
compares every result, errno and report with an emulated device of the same geometry.

On hardware: a device named in TIERFS_ZONED_TEST_DEVICE (its zones are reset), or a zoned
null_blk the test makes through configfs when the kernel has null_blk. Otherwise those tests
skip and say why. A loop device (which exists here) checks the refusal of a disk without
zones.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tierfs.errors import ExitCode, TierfsError
from tierfs.tiers.cold import devspec
from tierfs.tiers.zns import blockdev
from tierfs.tiers.zns.blockdev import (
    BLKCLOSEZONE,
    BLKFINISHZONE,
    BLKGETNRZONES,
    BLKGETSIZE64,
    BLKGETZONESZ,
    BLKOPENZONE,
    BLKREPORTZONE,
    BLKREPORTZONEV2,
    BLKRESETZONE,
    BLKSSZGET,
    INT,
    U32,
    U64,
    ZONE_RANGE,
    Syscalls,
    ZonedBlockDevice,
    map_errno,
    pack_range,
    pack_report_request,
    parse_report,
)
from tierfs.tiers.zns.device import ZonedDevice
from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tierfs.tiers.zns.model import (
    BLK_ZONE,
    BLK_ZONE_REP_CAPACITY,
    REPORT_HEADER,
    SECTOR,
    WP_INVALID,
    Cond,
    Geometry,
    Zone,
    ZoneType,
)

LBA = 4096
ZONE = 64 * 1024
CAP = 48 * 1024
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
DEV = Path("/dev/zoned-model")


def block(n: int = 1, fill: int = 0xAB) -> bytes:
    return bytes([fill]) * (LBA * n)


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno or 0


# -- the ABI: ioctl numbers and structs --------------------------------------------------------


def _ioc(direction: int, nr: int, size: int) -> int:
    """asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr, with type 0x12."""
    return direction << 30 | size << 16 | 0x12 << 8 | nr


_IO, _IOW, _IOR, _IOWR = 0, 1, 2, 3


def test_ioctl_numbers_match_the_kernel_definitions() -> None:
    """From blkzoned.h and fs.h (`_IOWR(0x12, 130, struct blk_zone_report)`, ...), and the
    literal numbers zns.md A.3 checked with a C program against Debian 12's headers."""
    report, zone_range = REPORT_HEADER.size, ZONE_RANGE.size
    assert (report, zone_range, BLK_ZONE.size) == (16, 16, 64)
    expected = {
        BLKREPORTZONE: (_ioc(_IOWR, 130, report), 0xC0101282),
        BLKRESETZONE: (_ioc(_IOW, 131, zone_range), 0x40101283),
        BLKGETZONESZ: (_ioc(_IOR, 132, 4), 0x80041284),
        BLKGETNRZONES: (_ioc(_IOR, 133, 4), 0x80041285),
        BLKOPENZONE: (_ioc(_IOW, 134, zone_range), 0x40101286),
        BLKCLOSEZONE: (_ioc(_IOW, 135, zone_range), 0x40101287),
        BLKFINISHZONE: (_ioc(_IOW, 136, zone_range), 0x40101288),
        BLKREPORTZONEV2: (_ioc(_IOWR, 142, report), 0xC010128E),
        BLKSSZGET: (_ioc(_IO, 104, 0), 0x1268),
        BLKGETSIZE64: (_ioc(_IOR, 114, 8), 0x80081272),
    }
    for value, (encoded, literal) in expected.items():
        assert value == encoded == literal, hex(value)


def test_zone_range_encoding() -> None:
    """struct blk_zone_range { __u64 sector; __u64 nr_sectors; }, little-endian here."""
    raw = pack_range(0x0102030405060708, 0x1000)
    assert raw == bytes.fromhex("0807060504030201") + (0x1000).to_bytes(8, "little")
    assert ZONE_RANGE.unpack(raw) == (0x0102030405060708, 0x1000)


def test_report_request_and_zone_descriptor_layout() -> None:
    buf = pack_report_request(8192, 3)
    assert len(buf) == 16 + 3 * 64
    assert buf[:16] == (8192).to_bytes(8, "little") + (3).to_bytes(4, "little") + bytes(4)
    zone = Zone(8192, 8192, 8200, ZoneType.SEQWRITE_REQ, Cond.IMP_OPEN, 6144, 1, 0)
    raw = zone.pack()
    # start, len, wp (u64), type, cond, non_seq, reset (u8), 4 reserved, capacity (u64)
    assert raw[0:8] == (8192).to_bytes(8, "little")
    assert raw[8:16] == (8192).to_bytes(8, "little")
    assert raw[16:24] == (8200).to_bytes(8, "little")
    assert raw[24:28] == bytes([0x2, 0x2, 1, 0]) and raw[28:32] == bytes(4)
    assert raw[32:40] == (6144).to_bytes(8, "little"), "capacity at offset 32"
    assert raw[40:] == bytes(24)


def test_report_round_trip() -> None:
    zone = Zone(8192, 8192, 8200, ZoneType.SEQWRITE_REQ, Cond.IMP_OPEN, 6144)
    buf = pack_report_request(8192, 2)
    REPORT_HEADER.pack_into(buf, 0, 8192, 1, BLK_ZONE_REP_CAPACITY)
    buf[16:80] = zone.pack()
    assert parse_report(bytes(buf)) == [zone], "only nr_zones of the reply count"
    REPORT_HEADER.pack_into(buf, 0, 8192, 1, 0)
    assert parse_report(buf)[0].capacity == 8192, "no capacity flag (< 5.9): capacity = len"


def test_unknown_zone_types_and_conditions_are_eio() -> None:
    buf = pack_report_request(0, 1)
    REPORT_HEADER.pack_into(buf, 0, 0, 1, BLK_ZONE_REP_CAPACITY)
    BLK_ZONE.pack_into(buf, 16, 0, 8, 0, 0x3, 0x1, 0, 0, 8)  # host-aware
    assert errno_of(parse_report, buf) == errno.EIO
    BLK_ZONE.pack_into(buf, 16, 0, 8, 0, 0x2, 0xFF, 0, 0, 8)  # a cached report's ACTIVE
    assert errno_of(parse_report, buf) == errno.EIO


def test_errno_mapping() -> None:
    """The drive's errnos are the interface's; the ioctl layer's own become them."""
    for passed in (errno.EIO, errno.EINVAL, errno.EOVERFLOW, errno.ETOOMANYREFS, errno.EPERM):
        assert map_errno(passed) == passed
    assert map_errno(errno.EBADF) == errno.EPERM
    assert map_errno(errno.EROFS) == errno.EPERM
    assert map_errno(errno.ENOTTY) == errno.EIO


# -- devices without zones ---------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    if shutil.which("losetup") is None:
        pytest.skip("no losetup here")
    setup = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True
    )
    if setup.returncode != 0:
        pytest.skip(f"no loop device here: {setup.stderr.strip()}")
    loop = Path(setup.stdout.strip())
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", str(loop)], check=False)


def test_loop_device_is_refused_as_not_zoned(loop_device: Path, tmp_path: Path) -> None:
    with pytest.raises(TierfsError) as exc:
        ZonedBlockDevice(loop_device)
    assert exc.value.exit_code == ExitCode.CONFIG
    assert "not a zoned block device" in exc.value.message
    spec = devspec.parse(f"block:{loop_device}")
    for attempt in (
        lambda: devspec.open_device(spec, tmp_path),
        lambda: devspec.plan(spec, tmp_path),
    ):
        with pytest.raises(TierfsError) as exc:
            attempt()
        assert exc.value.exit_code == ExitCode.CONFIG
        assert "not a zoned block device" in exc.value.message


def test_not_a_block_device_and_missing_paths(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(LBA))
    with pytest.raises(TierfsError) as exc:
        ZonedBlockDevice(plain)
    assert exc.value.exit_code == ExitCode.CONFIG and "not a block device" in exc.value.message
    with pytest.raises(TierfsError) as exc:
        ZonedBlockDevice(tmp_path / "missing")
    assert exc.value.exit_code == ExitCode.IO and "cannot open" in exc.value.message


# -- a model of the kernel ---------------------------------------------------------------------


class KernelModel(Syscalls):
    """The kernel's side of a host-managed zoned block device whose zones are an emulated
    device (null_blk's rules): the blkzoned ioctls with blkdev_zone_mgmt's argument checks,
    O_DIRECT's alignment checks (memory, offset, length: EINVAL), sysfs attributes, and an
    exclusive, possibly read-only open. `v2`: the kernel knows BLKREPORTZONEV2 (6.19+);
    otherwise it answers EINVAL, as this machine's 6.18 does."""

    def __init__(
        self,
        dev: EmulatedZonedDevice,
        *,
        v2: bool = False,
        read_only: bool = False,
        busy: bool = False,
        attrs: dict[str, str] | None = None,
    ) -> None:
        g = dev.geometry
        self.dev = dev
        self.v2 = v2
        self.read_only = read_only
        self.busy = busy
        self.attrs = (
            {
                "zoned": "host-managed",
                "max_open_zones": str(g.max_open),
                "max_active_zones": str(g.max_active),
                "zone_write_granularity": str(g.lba_size),
            }
            if attrs is None
            else attrs
        )
        self.fds: dict[int, int] = {}
        self.requests: list[int] = []
        self.direct_ios = 0
        self.syncs = 0
        self._next_fd = 100

    def stat(self, path: Path) -> os.stat_result:
        return os.stat_result((stat.S_IFBLK | 0o660, 0, 0, 1, 0, 0, 0, 0, 0, 0))

    def open(self, path: Path, flags: int) -> int:
        assert flags & os.O_DIRECT and flags & os.O_EXCL and flags & os.O_CLOEXEC
        if self.busy:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        fd, self._next_fd = self._next_fd, self._next_fd + 1
        self.fds[fd] = flags
        return fd

    def close(self, fd: int) -> None:
        del self.fds[fd]

    def _writable(self, fd: int) -> bool:
        return self.fds[fd] & os.O_ACCMODE != os.O_RDONLY

    def ioctl(self, fd: int, request: int, buf: bytearray) -> None:
        assert fd in self.fds
        self.requests.append(request)
        dev, g = self.dev, self.dev.geometry
        if request == BLKGETZONESZ:
            U32.pack_into(buf, 0, dev.zone_size_sectors())
        elif request == BLKGETNRZONES:
            U32.pack_into(buf, 0, dev.nr_zones())
        elif request == BLKSSZGET:
            INT.pack_into(buf, 0, g.lba_size)
        elif request == BLKGETSIZE64:
            U64.pack_into(buf, 0, g.device_size)
        elif request == BLKREPORTZONE or (request == BLKREPORTZONEV2 and self.v2):
            self._report(buf)
        elif request in (BLKOPENZONE, BLKCLOSEZONE, BLKFINISHZONE, BLKRESETZONE):
            self._manage(fd, request, buf)
        elif request == BLKREPORTZONEV2:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        else:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def _report(self, buf: bytearray) -> None:
        sector, nr, _ = REPORT_HEADER.unpack_from(buf)
        if nr == 0:
            raise OSError(errno.EINVAL, "nr_zones == 0")
        assert len(buf) >= REPORT_HEADER.size + nr * BLK_ZONE.size, "reply would overflow"
        reply = self.dev.pack_report(sector, nr)
        buf[: len(reply)] = reply

    def _manage(self, fd: int, request: int, buf: bytearray) -> None:
        if not self._writable(fd):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        sector, nr_sectors = ZONE_RANGE.unpack(buf)
        zs = self.dev.zone_size_sectors()
        end = self.dev.geometry.device_size // SECTOR
        if not nr_sectors or sector % zs or sector + nr_sectors > end or nr_sectors % zs:
            raise OSError(errno.EINVAL, "range not zone-aligned")
        op = {
            BLKOPENZONE: self.dev.open_zone,
            BLKCLOSEZONE: self.dev.close_zone,
            BLKFINISHZONE: self.dev.finish_zone,
            BLKRESETZONE: self.dev.reset_zone,
        }[request]
        for z in range(sector // zs, (sector + nr_sectors) // zs):
            op(z)

    def _direct(self, buf: memoryview, offset: int) -> None:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        lba = self.dev.geometry.lba_size
        if address % lba or offset % lba or len(buf) % lba:
            raise OSError(errno.EINVAL, "O_DIRECT: unaligned memory, offset or length")
        self.direct_ios += 1

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if not self._writable(fd):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        self._direct(data, offset)
        self.dev.write(offset, bytes(data))
        return len(data)

    def preadv(self, fd: int, buf: memoryview, offset: int) -> int:
        assert fd in self.fds
        self._direct(buf, offset)
        n = max(0, min(len(buf), self.dev.geometry.device_size - offset))
        if n:
            buf[:n] = self.dev.read(offset, n)
        return n

    def fdatasync(self, fd: int) -> None:
        assert fd in self.fds
        self.syncs += 1
        self.dev.flush()

    def queue_attr(self, fd: int, name: str) -> str | None:
        return self.attrs.get(name)


@pytest.fixture
def model(tmp_path: Path) -> Iterator[EmulatedZonedDevice]:
    dev = EmulatedZonedDevice.create(tmp_path / "model.img", GEO)
    yield dev
    if dev.fd >= 0:
        dev.close_device()


@pytest.fixture
def kernel(model: EmulatedZonedDevice) -> KernelModel:
    return KernelModel(model)


@pytest.fixture
def dev(kernel: KernelModel) -> Iterator[ZonedBlockDevice]:
    device = ZonedBlockDevice(DEV, zone_append_max=GEO.zone_append_max, syscalls=kernel)
    yield device
    device.close_device()


def test_geometry_and_limits_come_from_the_device(
    dev: ZonedBlockDevice, model: EmulatedZonedDevice
) -> None:
    assert isinstance(dev, ZonedDevice)
    assert dev.geometry == GEO
    assert (dev.max_open, dev.max_active) == GEO.effective_limits() == (3, 4)
    assert (dev.zone_size_sectors(), dev.nr_zones()) == (ZONE // SECTOR, GEO.nr_zones)
    assert [dev.is_conventional(z) for z in range(3)] == [True, False, False]
    assert dev.zone_end(1) == ZONE + CAP and dev.zone_of(ZONE + CAP) == 1
    assert errno_of(dev.zone_of, GEO.device_size) == errno.EINVAL
    assert dev.report() == model.report()


def test_without_sysfs_limits_there_are_none(model: EmulatedZonedDevice) -> None:
    device = ZonedBlockDevice(DEV, syscalls=KernelModel(model, attrs={}))
    try:
        assert (device.geometry.max_open, device.geometry.max_active) == (0, 0)
        assert (device.max_open, device.max_active) == (0, 0)
        assert device.geometry.zone_append_max == blockdev.DEFAULT_APPEND_MAX
    finally:
        device.close_device()


def test_host_aware_devices_are_refused(model: EmulatedZonedDevice) -> None:
    kernel = KernelModel(model, attrs={"zoned": "host-aware"})
    with pytest.raises(TierfsError) as exc:
        ZonedBlockDevice(DEV, syscalls=kernel)
    assert exc.value.exit_code == ExitCode.CONFIG and "host-managed" in exc.value.message
    assert not kernel.fds, "the descriptor is closed again"


def test_report_falls_back_from_v2_once(model: EmulatedZonedDevice) -> None:
    old = KernelModel(model)
    device = ZonedBlockDevice(DEV, syscalls=old)
    device.zone(3)
    device.counts()
    reports = [r for r in old.requests if r in (BLKREPORTZONE, BLKREPORTZONEV2)]
    assert reports[0] == BLKREPORTZONEV2 and set(reports[1:]) == {BLKREPORTZONE}
    device.close_device()
    new = KernelModel(model, v2=True)
    device = ZonedBlockDevice(DEV, syscalls=new)
    device.zone(3)
    assert {r for r in new.requests if r in (BLKREPORTZONE, BLKREPORTZONEV2)} == {BLKREPORTZONEV2}
    device.close_device()


def test_reports_come_in_batches(
    model: EmulatedZonedDevice, kernel: KernelModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockdev, "REPORT_BATCH", 5)
    device = ZonedBlockDevice(DEV, syscalls=kernel)
    try:
        before = kernel.requests.count(BLKREPORTZONE)
        assert device.report() == model.report()
        assert kernel.requests.count(BLKREPORTZONE) - before == 3, "5 + 5 + 2 zones"
        assert device.report(4 * ZONE // SECTOR, 7) == model.report(4 * ZONE // SECTOR, 7)
        assert device.report(GEO.device_size // SECTOR) == []
    finally:
        device.close_device()


def test_busy_device_is_exit_code_6(model: EmulatedZonedDevice) -> None:
    with pytest.raises(TierfsError) as exc:
        ZonedBlockDevice(DEV, syscalls=KernelModel(model, busy=True))
    assert exc.value.exit_code == ExitCode.BUSY


def test_writes_are_direct_at_the_write_pointer(
    dev: ZonedBlockDevice, kernel: KernelModel, model: EmulatedZonedDevice
) -> None:
    start = dev.zone_start(2)
    dev.write(start, block(2, 1))
    assert dev.append(2, block(1, 2)) == start + 2 * LBA
    assert kernel.direct_ios == 2, "each write one O_DIRECT pwrite from aligned memory"
    assert model.read(start, 3 * LBA) == block(2, 1) + block(1, 2)
    assert dev.read(start + LBA, 4 * LBA) == block(1, 1) + block(1, 2) + bytes(2 * LBA)
    assert dev.zone(2).cond == Cond.IMP_OPEN and dev.zone(2).wp == (start + 3 * LBA) // SECTOR


def test_reads_of_any_range_are_aligned_direct_reads(dev: ZonedBlockDevice) -> None:
    start = dev.zone_start(0)  # conventional
    data = bytes(range(256)) * (3 * LBA // 256)
    dev.write(start, data)
    assert dev.read(start + 100, 2 * LBA) == data[100 : 100 + 2 * LBA]
    assert dev.read(start + 5, 7) == data[5:12]
    assert dev.read(start, 0) == b""


def test_flush_and_close(dev: ZonedBlockDevice, kernel: KernelModel) -> None:
    dev.flush()
    assert kernel.syncs == 0, "nothing written: nothing to flush"
    dev.append(1, block())
    dev.flush()
    dev.flush()
    assert kernel.syncs == 1
    dev.append(1, block())
    dev.finish_zone(1)
    assert kernel.syncs == 2, "finish makes the data below the write pointer durable first"
    dev.append(2, block())
    dev.close_device()
    dev.close_device()
    assert kernel.syncs == 3 and not kernel.fds


def test_partial_write_failure_rereads_the_write_pointer(
    dev: ZonedBlockDevice, kernel: KernelModel, model: EmulatedZonedDevice
) -> None:
    start = dev.zone_start(3)
    dev.append(3, block())
    model.fail_next_write(3, 2 * LBA)
    assert errno_of(dev.write, start + LBA, block(4)) == errno.EIO
    reports = kernel.requests.count(BLKREPORTZONE)
    assert dev.append(3, block(1, 7)) == start + 3 * LBA, "the wp the device reports"
    assert kernel.requests.count(BLKREPORTZONE) == reports, "re-read at the error already"
    assert dev.read(start + 3 * LBA, LBA) == block(1, 7)


def test_a_stale_view_never_refuses_a_good_write(
    dev: ZonedBlockDevice, model: EmulatedZonedDevice
) -> None:
    """Another (non-exclusive) writer moved the write pointer: our view is checked again
    against the device before a write is refused."""
    start = dev.zone_start(4)
    model.write(start, block())
    dev.write(start + LBA, block())
    assert errno_of(dev.write, start, block()) == errno.EIO
    assert dev.append(4, block()) == start + 2 * LBA


def test_zones_failing_behind_our_back(dev: ZonedBlockDevice, model: EmulatedZonedDevice) -> None:
    for z in (2, 3):
        dev.append(z, block(2, z))
    model.set_readonly(2)
    model.set_offline(3)
    assert errno_of(dev.append, 2, block()) == errno.EIO
    assert dev.zone(2) == Zone(
        2 * ZONE // SECTOR, ZONE // SECTOR, WP_INVALID, ZoneType.SEQWRITE_REQ, Cond.READONLY, 96
    )
    assert dev.read(dev.zone_start(2), 2 * LBA) == block(2, 2), "READONLY zones stay readable"
    assert errno_of(dev.read, dev.zone_start(3), LBA) == errno.EIO
    assert dev.zone(3).cond == Cond.OFFLINE
    for op in (dev.reset_zone, dev.finish_zone, dev.open_zone, dev.close_zone):
        assert errno_of(op, 3) == errno.EIO
    assert errno_of(dev.reset_zone, 2) == errno.EIO
    dev.reset_all()  # skips READONLY and OFFLINE zones
    assert [z.cond for z in dev.report()[1:4]] == [Cond.EMPTY, Cond.READONLY, Cond.OFFLINE]


def test_read_only_device(model: EmulatedZonedDevice) -> None:
    model.write(model.zone_start(1), block(1, 9))
    kernel = KernelModel(model, read_only=True)
    device = ZonedBlockDevice(DEV, syscalls=kernel)
    try:
        assert device.read_only
        assert device.read(device.zone_start(1), LBA) == block(1, 9)
        assert errno_of(device.write, device.zone_start(1) + LBA, block()) == errno.EPERM
        assert errno_of(device.append, 1, block()) == errno.EPERM
        for op in (device.reset_zone, device.finish_zone, device.open_zone, device.close_zone):
            assert errno_of(op, 1) == errno.EPERM
    finally:
        device.close_device()
    assert kernel.syncs == 0 and not kernel.fds


def test_management_ioctls_carry_the_zone_range(dev: ZonedBlockDevice, kernel: KernelModel) -> None:
    seen: list[tuple[int, tuple[int, int]]] = []
    ioctl = kernel.ioctl

    def spy(fd: int, request: int, buf: bytearray) -> None:
        if request in (BLKOPENZONE, BLKCLOSEZONE, BLKFINISHZONE, BLKRESETZONE):
            seen.append((request, ZONE_RANGE.unpack(buf)))
        ioctl(fd, request, buf)

    kernel.ioctl = spy  # type: ignore[method-assign]
    dev.open_zone(5)
    dev.close_zone(5)
    dev.finish_zone(5)
    dev.reset_zone(5)
    zone = (5 * ZONE // SECTOR, ZONE // SECTOR)
    assert seen == [(r, zone) for r in (BLKOPENZONE, BLKCLOSEZONE, BLKFINISHZONE, BLKRESETZONE)]
    assert errno_of(dev.open_zone, 0) == errno.EIO, "conventional: no ioctl"
    assert errno_of(dev.open_zone, GEO.nr_zones) == errno.EINVAL
    assert len(seen) == 4


def test_devspec_opens_block_devices(
    kernel: KernelModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockdev, "Syscalls", lambda: kernel)
    spec = devspec.parse(f"block:{DEV}")
    device = devspec.open_device(spec, tmp_path)
    try:
        assert isinstance(device, ZonedBlockDevice) and device.geometry.nr_zones == 12
    finally:
        device.close_device()
    assert devspec.plan(spec, tmp_path).recorded == f"block:{DEV}"
    assert devspec.lba_size(spec, tmp_path) == LBA
    assert not kernel.fds


# -- the differential run ----------------------------------------------------------------------


def steps(geometry: Geometry) -> list[tuple[str, tuple[Any, ...]]]:
    """Operations on a device with zone 0 conventional, 3 open / 4 active zones, and an
    append limit of 4 blocks; results (or errnos) and reports must agree after each."""
    z, cap, lba = geometry.zone_size, geometry.zone_capacity, geometry.lba_size
    end = geometry.device_size

    def blocks(n: int, fill: int = 0xAB) -> bytes:
        return bytes([fill]) * (lba * n)

    return [
        ("write", (0, blocks(1))),  # conventional: anywhere
        ("write", (8 * lba, blocks(2, 3))),
        ("write", (z - lba, blocks(2))),  # across the conventional zone's end
        ("read", (0, 2 * lba)),
        ("append", (0, blocks(1))),  # no append to a conventional zone
        ("open_zone", (0,)),
        ("write", (z, blocks(1))),
        ("write", (z, blocks(1))),  # not at the write pointer
        ("write", (z + 2 * lba, blocks(1))),
        ("write", (z + lba + 1, blocks(1))),  # unaligned offset
        ("write", (z + lba, b"x" * 100)),  # unaligned length
        ("append", (1, blocks(1, 2))),
        ("append", (1, blocks(5))),  # larger than zone_append_max
        ("write", (z + 2 * lba, blocks(cap // lba))),  # across the capacity
        ("write", (2 * z, blocks(1))),
        ("write", (3 * z, blocks(1))),
        ("write", (4 * z, blocks(1))),  # a fourth open zone: zone 1 is closed implicitly
        ("counts", ()),
        ("open_zone", (5,)),  # 4 active zones: EOVERFLOW
        ("close_zone", (2,)),
        ("finish_zone", (5,)),  # finishing an EMPTY zone checks the active limit too
        ("finish_zone", (2,)),
        ("open_zone", (5,)),
        ("reset_zone", (1,)),
        ("open_zone", (3,)),
        ("open_zone", (4,)),
        ("write", (6 * z, blocks(1))),  # every open zone is explicitly open: ETOOMANYREFS
        ("close_zone", (5,)),  # open, nothing written: EMPTY
        ("close_zone", (5,)),  # EMPTY: EIO
        ("write", (6 * z, blocks(1))),
        ("finish_zone", (6,)),
        ("write", (6 * z + lba, blocks(1))),  # FULL
        ("append", (6, blocks(1))),
        ("open_zone", (6,)),
        ("close_zone", (6,)),
        ("finish_zone", (6,)),  # FULL: nothing to do
        ("reset_zone", (6,)),
        ("read", (3 * z, 2 * lba)),  # data, then zeros past the write pointer
        ("read", (3 * z + lba // 2, lba)),
        ("read", (3 * z + cap, lba)),  # past the capacity
        ("read", (end, lba)),  # past the device
        ("write", (end, blocks(1))),
        ("open_zone", (geometry.nr_zones,)),
        ("report", (0, 0)),
        ("report", (3 * z // SECTOR, 2)),
        ("zone", (4,)),
        ("write", (7 * z, blocks(cap // lba))),  # to the capacity: FULL
        ("counts", ()),
        ("flush", ()),
        ("reset_all", ()),
        ("counts", ()),
    ]


def outcome(device: ZonedDevice, op: str, args: tuple[Any, ...]) -> object:
    try:
        return getattr(device, op)(*args)
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def run_differential(device: ZonedDevice, reference: EmulatedZonedDevice) -> None:
    for step, (op, args) in enumerate(steps(reference.geometry)):
        got, want = outcome(device, op, args), outcome(reference, op, args)
        assert got == want, f"step {step} {op}{args[:1]}: block device {got}, emulator {want}"
        assert device.report() == reference.report(), f"after step {step} {op}{args[:1]}"


def test_same_results_and_errnos_as_the_emulator(dev: ZonedBlockDevice, tmp_path: Path) -> None:
    reference = EmulatedZonedDevice.create(tmp_path / "reference.img", GEO)
    try:
        run_differential(dev, reference)
    finally:
        reference.close_device()


# -- a real zoned device -----------------------------------------------------------------------

ZONED_ENV = "TIERFS_ZONED_TEST_DEVICE"
NULLB = Path("/sys/kernel/config/nullb")
# null_blk's configfs units: size, zone_size and zone_capacity in MiB
NULLB_GEO = Geometry(
    lba_size=4096,
    zone_size=4 << 20,
    zone_capacity=3 << 20,
    nr_zones=16,
    nr_conv=1,
    max_open=3,
    max_active=4,
    zone_append_max=16 * 1024,
)
NULLB_SETTINGS = {
    "blocksize": "4096",
    "size": "64",
    "memory_backed": "1",
    "zoned": "1",
    "zone_size": "4",
    "zone_capacity": "3",
    "zone_nr_conv": "1",
    "zone_max_open": "3",
    "zone_max_active": "4",
}


def zoned_disks() -> dict[str, str]:
    """/sys/block/*/queue/zoned of every disk."""
    found = {}
    for attr in sorted(Path("/sys/block").glob("*/queue/zoned")):
        with contextlib.suppress(OSError):
            found[attr.parent.parent.name] = attr.read_text().strip()
    return found


@contextlib.contextmanager
def null_blk() -> Iterator[Path | str]:
    """A zoned null_blk of NULLB_GEO made through configfs (and removed after), or why
    there is none."""
    if not NULLB.is_dir():
        modprobe = shutil.which("modprobe")
        if modprobe is None:
            yield "no null_blk: modprobe is not installed and null_blk is not loaded"
            return
        loaded = subprocess.run(
            [modprobe, "null_blk", "nr_devices=0"], capture_output=True, text=True, timeout=60
        )
        if loaded.returncode != 0:
            yield f"no null_blk: modprobe null_blk failed: {loaded.stderr.strip()}"
            return
        if not NULLB.is_dir():
            yield f"null_blk is loaded but {NULLB} is missing (configfs not mounted?)"
            return
    node = NULLB / f"tierfs-test-{os.getpid()}"
    try:
        node.mkdir()
    except OSError as exc:
        yield f"cannot create a null_blk device: {exc}"
        return
    try:
        try:
            for name, value in NULLB_SETTINGS.items():
                (node / name).write_text(value)
            (node / "power").write_text("1")
            path = Path(f"/dev/nullb{int((node / 'index').read_text())}")
        except (OSError, ValueError) as exc:
            yield f"cannot configure a zoned null_blk: {exc}"
            return
        yield path
    finally:
        with contextlib.suppress(OSError):
            (node / "power").write_text("0")
        with contextlib.suppress(OSError):
            node.rmdir()


@pytest.fixture
def zoned_device() -> Iterator[tuple[Path, bool]]:
    """(a host-managed device, whether it is our null_blk of NULLB_GEO) or a skip."""
    disks = zoned_disks()
    named = os.environ.get(ZONED_ENV)
    if named:
        name = Path(named).resolve().name
        if disks.get(name) != "host-managed":
            pytest.skip(
                f"{ZONED_ENV}={named} is not host-managed: queue/zoned is {disks.get(name)}"
            )
        yield Path(named), False
        return
    with null_blk() as made:
        if isinstance(made, Path):
            yield made, True
            return
        managed = [name for name, kind in disks.items() if kind == "host-managed"]
        seen = ", ".join(f"{name}: {kind}" for name, kind in disks.items()) or "no disks"
        pytest.skip(
            "needs a host-managed zoned block device, which this machine lacks "
            f"(/sys/block/*/queue/zoned: {seen}); {made}. "
            + (
                f"Found {', '.join(managed)}: name one in {ZONED_ENV} to test on it (its "
                "zones are reset)."
                if managed
                else f"Set {ZONED_ENV}=/dev/... to use one whose zones may be reset."
            )
        )


def test_on_a_real_zoned_device(zoned_device: tuple[Path, bool], tmp_path: Path) -> None:
    path, ours = zoned_device
    device = ZonedBlockDevice(path, zone_append_max=NULLB_GEO.zone_append_max)
    try:
        with pytest.raises(TierfsError) as exc:
            ZonedBlockDevice(path)
        assert exc.value.exit_code == ExitCode.BUSY, "the open is exclusive"
        if ours:
            assert device.geometry == NULLB_GEO
            device.reset_all()
            reference = EmulatedZonedDevice.create(tmp_path / "reference.img", NULLB_GEO)
            try:
                run_differential(device, reference)
            finally:
                reference.close_device()
            return
        # a device of its own geometry: the last sequential zone only
        z = max(z for z in range(device.nr_zones()) if not device.is_conventional(z))
        lba, start = device.geometry.lba_size, device.zone_start(z)
        device.reset_zone(z)
        data = bytes([0x5A]) * (2 * lba)
        device.write(start, data)
        assert errno_of(device.write, start, data) == errno.EIO, "not at the write pointer"
        assert device.append(z, data) == start + 2 * lba
        device.flush()
        assert device.read(start, 5 * lba) == data + data + bytes(lba)
        assert device.zone(z).wp == (start + 4 * lba) // SECTOR
        device.finish_zone(z)
        assert device.zone(z).cond == Cond.FULL
        assert errno_of(device.append, z, data) == errno.EIO
        device.reset_zone(z)
        assert device.zone(z).cond == Cond.EMPTY
    finally:
        device.close_device()
