"""Which zoned device the cold tier uses: `cold.device` in tierfs.toml, `mkfs --zone-device`.

    ""                   no cold tier
    emulated:SIZE        an emulated device on DATA_DIR/cold/zones.img (SIZE like 64G, 512M)
    emulated:SIZE:ZONE   the same with zones of ZONE (a power of two, e.g. 4M; for tests)
    emulated:auto        the same, sized at mkfs from the data directory's free space
    zonefs:DIR           a mounted zonefs
    block:/dev/nvme0n2   a zoned block device (blkzoned ioctls)

The emulated device's geometry: zones of `EMULATED_ZONE_MB` (capacity = size), 4 KiB blocks,
no conventional zones, at most 14 open and active zones (a ZN540's limits). `auto` takes a
quarter of the free space, at least 16 zones and at most 1 TiB.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from tierfs.errors import ExitCode, TierfsError
from tierfs.tiers.zns.blockdev import ZonedBlockDevice
from tierfs.tiers.zns.device import ZonedDevice
from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tierfs.tiers.zns.model import Geometry
from tierfs.tiers.zns.zonefs import ZonefsDevice

EMULATED_ZONE_MB = 256
EMULATED_FILE = "zones.img"
AUTO_SHARE = 4
MIN_ZONES = 16
MAX_AUTO_BYTES = 1 << 40
_SIZE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    kind: str  # "", "emulated", "zonefs", "block"
    arg: str

    @property
    def enabled(self) -> bool:
        return bool(self.kind)

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.kind else ""


def parse(text: str) -> DeviceSpec:
    """Check a device string; a bad one is a configuration error (exit 3)."""
    text = text.strip()
    if not text:
        return DeviceSpec("", "")
    kind, sep, arg = text.partition(":")
    if not sep or not arg:
        raise _bad(text, "expected KIND:ARGUMENT")
    if kind == "emulated":
        size, _, zone = arg.partition(":")
        if size != "auto" and _SIZE.match(size) is None:
            raise _bad(text, "the size must look like 512M, 64G or auto")
        if zone and (_SIZE.match(zone) is None or not _is_pow2(_bytes(zone))):
            raise _bad(text, "the zone size must be a power of two like 4M or 256M")
    elif kind in ("zonefs", "block"):
        if not arg.startswith("/"):
            raise _bad(text, "the path must be absolute")
    else:
        raise _bad(text, "the kind must be emulated, zonefs or block")
    return DeviceSpec(kind, arg)


def _bad(text: str, why: str) -> TierfsError:
    return TierfsError(
        f"zone device {text!r}: {why} (emulated:SIZE, zonefs:DIR or block:/dev/...)",
        ExitCode.CONFIG,
    )


def _bytes(text: str) -> int:
    match = _SIZE.match(text)
    assert match is not None
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def emulated_geometry(size: int, zone: int = EMULATED_ZONE_MB << 20) -> Geometry:
    nr_zones = size // zone
    if nr_zones < MIN_ZONES:
        raise TierfsError(
            f"emulated zone device of {size >> 20} MiB is too small: at least {MIN_ZONES} zones "
            f"of {zone >> 20} MiB",
            ExitCode.CONFIG,
        )
    return Geometry(
        lba_size=4096,
        zone_size=zone,
        zone_capacity=zone,
        nr_zones=nr_zones,
        nr_conv=0,
        max_open=14,
        max_active=14,
        zone_append_max=1 << 20,
    )


def emulated_size(size: str, zone: int, data_dir: Path) -> int:
    """The device size for `emulated:SIZE` (at mkfs)."""
    if size == "auto":
        existing = data_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        st = os.statvfs(existing)
        free = st.f_bavail * st.f_frsize
        return max(MIN_ZONES * zone, min(free // AUTO_SHARE, MAX_AUTO_BYTES)) // zone * zone
    return _bytes(size)


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """A checked device choice, made before mkfs writes anything."""

    spec: DeviceSpec
    geometry: Geometry | None  # the emulated device's, to create

    @property
    def recorded(self) -> str:
        """The spec for tierfs.toml (an emulated size resolved, `auto` included)."""
        if self.geometry is None:
            return str(self.spec)
        return f"emulated:{self.geometry.device_size >> 20}M:{self.geometry.zone_size >> 20}M"


def plan(spec: DeviceSpec, data_dir: Path) -> DevicePlan:
    """Check the device (size and geometry, or that a zonefs/block device answers) without
    creating anything, so that a bad choice leaves no half-made filesystem behind."""
    if spec.kind == "emulated":
        size_text, _, zone_text = spec.arg.partition(":")
        zone = _bytes(zone_text) if zone_text else EMULATED_ZONE_MB << 20
        geometry = emulated_geometry(emulated_size(size_text, zone, data_dir), zone)
        geometry.validate()
        return DevicePlan(spec, geometry)
    if spec.enabled:
        open_device(spec, data_dir / "cold").close_device()
    return DevicePlan(spec, None)


def create(device: DevicePlan, cold_dir: Path) -> None:
    """Create the emulated device of a plan (zonefs and block devices exist already)."""
    if device.geometry is not None:
        cold_dir.mkdir(mode=0o700, exist_ok=True)
        EmulatedZonedDevice.create(cold_dir / EMULATED_FILE, device.geometry).close_device()


def open_device(spec: DeviceSpec, cold_dir: Path) -> ZonedDevice:
    if spec.kind == "emulated":
        return EmulatedZonedDevice.open(cold_dir / EMULATED_FILE)
    if spec.kind == "zonefs":
        return ZonefsDevice(Path(spec.arg))
    if spec.kind == "block":
        return ZonedBlockDevice(Path(spec.arg))  # a device without zones is refused (exit 3)
    raise TierfsError("no cold tier configured (cold.device is empty)", ExitCode.CONFIG)


def lba_size(spec: DeviceSpec, cold_dir: Path) -> int:
    """The device's logical block size (zone records are padded to it), read-only: fsck
    must not change the device's state files."""
    if spec.kind == "emulated":
        return EmulatedZonedDevice.geometry_of(cold_dir / EMULATED_FILE).lba_size
    device = open_device(spec, cold_dir)
    try:
        return device.geometry.lba_size
    finally:
        device.close_device()
