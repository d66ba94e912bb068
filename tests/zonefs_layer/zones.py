"""zonefs's per-file rules over an emulated zoned device (what the kernel's fs/zonefs does).

Every method raises `OSError(errno)` with the errno zonefs returns (zns.md A.4, and the
kernel's fs/zonefs/file.c and super.c where zns.md says nothing), so the FUSE layer only
translates. Followed closely:

* layout: zone 0 holds the superblock and is not shown; sequential zones from the next one
  are `seq/0..N-1`. Conventional zone files (`cnv/`) are not emulated: the device may have at
  most one conventional zone (the superblock's).
* the file size is the zone's write pointer (`wpoffset`); `st_blocks * 512` its capacity.
* writes (`write`): EPERM to an immutable file, EROFS once the filesystem went read-only,
  EFBIG at or past the capacity, EIO if not O_DIRECT (buffered writes to sequential files are
  refused), a write crossing the capacity is shortened to it, EINVAL if not block-aligned or
  not at the file size; a device error goes through `io_error` and is returned as is.
* reads: EPERM from an OFFLINE file, stop at the file size, EINVAL if O_DIRECT and unaligned.
* truncate: to 0 = zone reset, to the capacity = zone finish, any other size EPERM.
* `explicit-open`: the first write open sends OPEN ZONE (EBUSY past `max_wro_seq_files`, the
  device's open limit), the last close CLOSE ZONE (RESET if nothing was written); a file that
  fills up or is truncated to its capacity is no longer open.
* errors (`io_error`): the zone is reported again. OFFLINE: mode 000, size 0. READONLY: write
  bits dropped, size kept (a zone already READONLY at mount looks OFFLINE: mode 000, size 0).
  `errors=` picks the rest: `remount-ro` (zonefs's default: the whole filesystem refuses
  writes, EROFS, and a size ahead of the file is not exposed), `zone-ro`, `zone-offline`, or
  `repair` (the size follows the device's write pointer).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tierfs.tiers.zns.model import SECTOR, Cond, Zone

log = logging.getLogger("zonefs_layer")

FILE_PERM = 0o640
ERRORS_MODES = ("remount-ro", "zone-ro", "zone-offline", "repair")
FAULT_READONLY = b"readonly"
FAULT_OFFLINE = b"offline"
FAULT_FAIL_AFTER = b"fail-after="


def refuse(code: int, why: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {why}")


@dataclass(eq=False)
class ZoneFile:
    """One `seq/N` file: zonefs's `struct zonefs_zone` and the inode fields it drives."""

    index: int
    zone: int
    capacity: int
    wpoffset: int
    mode: int = FILE_PERM
    readonly: bool = False
    offline: bool = False
    opened: bool = False  # ZONEFS_ZONE_OPEN: explicitly opened by zonefs
    writers: int = 0  # write-open handles

    @property
    def immutable(self) -> bool:
        return self.readonly or self.offline

    def update_mode(self, at_mount: bool) -> None:
        """zonefs_inode_update_mode: a zone read-only at mount cannot show a valid size, so
        it gets no access at all, like an offline one."""
        if self.offline or (self.readonly and at_mount):
            self.mode &= ~0o777
        elif self.readonly:
            self.mode &= ~0o222


class Zonefs:
    """The files of a zonefs mount over `dev`, with zonefs's rules."""

    def __init__(self, dev: EmulatedZonedDevice, explicit_open: bool, errors: str) -> None:
        if errors not in ERRORS_MODES:
            raise ValueError(f"errors={errors}: not one of {', '.join(ERRORS_MODES)}")
        if dev.geometry.nr_conv > 1:
            raise ValueError("conventional zone files (cnv/) are not emulated")
        self.dev = dev
        self.explicit_open = explicit_open
        self.errors = errors
        self.sb_readonly = False
        self.write_open = 0  # s_wro_seq_files
        self.max_write_open = dev.max_open  # max_wro_seq_files = the device's open limit
        self.lba = dev.geometry.lba_size
        first = max(dev.geometry.nr_conv, 1)
        zones = range(first, dev.geometry.nr_zones)
        self.files = [self._mount_file(i, z) for i, z in enumerate(zones)]

    def _mount_file(self, index: int, z: int) -> ZoneFile:
        f = ZoneFile(index, z, self.dev.geometry.zone_capacity, 0)
        f.wpoffset = self._check_condition(f, self.dev.zone(z))
        f.update_mode(at_mount=True)
        return f

    def _check_condition(self, f: ZoneFile, zone: Zone) -> int:
        """zonefs_check_zone_condition: flag bad zones; the readable size of the zone."""
        if zone.cond == Cond.OFFLINE:
            f.offline = True
            return 0
        if zone.cond == Cond.READONLY:
            f.readonly = True  # its wp is invalid: keep the size zonefs had
            return f.wpoffset
        if zone.cond == Cond.FULL:
            return f.capacity
        return (zone.wp - zone.start) * SECTOR

    def _set_size(self, f: ZoneFile, size: int) -> None:
        """zonefs_i_size_write: a full zone is no longer open."""
        f.wpoffset = size
        if size >= f.capacity:
            f.opened = False

    # -- errors

    def io_error(self, f: ZoneFile, write: bool) -> None:
        """zonefs_handle_io_error: report the zone again and apply `errors=`."""
        data_size = self._check_condition(f, self.dev.zone(f.zone))
        isize = f.wpoffset
        if not f.immutable and not write and isize == data_size:
            return
        if isize != data_size:
            log.warning("seq/%d: invalid size %d (should be %d)", f.index, isize, data_size)
        if f.offline or self.errors == "zone-offline":
            f.offline = True
            f.update_mode(at_mount=False)
            data_size = 0
        elif f.readonly or self.errors == "zone-ro":
            f.readonly = True
            f.update_mode(at_mount=False)
            data_size = isize
        elif self.errors == "remount-ro" and data_size > isize:
            data_size = isize  # do not expose data the file never acknowledged
        if f.immutable:
            f.opened = False
        if self.errors == "remount-ro" and not self.sb_readonly:
            log.warning("remounting filesystem read-only")
            self.sb_readonly = True
        self._set_size(f, data_size)

    # -- open and close

    def check_write_access(self) -> None:
        """What the VFS checks before a write open or a truncate (EROFS before EPERM)."""
        if self.sb_readonly:
            raise refuse(errno.EROFS, "the filesystem is read-only")

    def open_for_write(self, f: ZoneFile) -> None:
        """zonefs_seq_file_write_open."""
        self.check_write_access()
        if f.immutable:
            raise refuse(errno.EPERM, f"seq/{f.index} is immutable")
        if f.writers == 0:
            self.write_open += 1
            if self.explicit_open:
                try:
                    self._explicit_open(f)
                except OSError:
                    self.write_open -= 1
                    raise
        f.writers += 1

    def _explicit_open(self, f: ZoneFile) -> None:
        if self.max_write_open and self.write_open > self.max_write_open:
            raise refuse(errno.EBUSY, "max_wro_seq_files files are open for writing")
        if f.wpoffset < f.capacity:
            self.dev.open_zone(f.zone)
            f.opened = True

    def close_for_write(self, f: ZoneFile) -> None:
        """zonefs_seq_file_write_close: never fails the close(2) itself."""
        f.writers -= 1
        if f.writers:
            return
        if f.opened:
            try:
                self._close_zone(f)
            except OSError:
                self.io_error(f, write=False)
                if f.opened and not self.sb_readonly:
                    log.warning("closing seq/%d failed: remounting read-only", f.index)
                    self.sb_readonly = True
                return  # zonefs does not drop the write-open count here either
            f.opened = False
        self.write_open -= 1

    def _close_zone(self, f: ZoneFile) -> None:
        """An explicitly opened zone never written is reset, not closed: a CLOSED zone would
        stay active (zonefs_zone_mgmt)."""
        if f.wpoffset == 0:
            self.dev.reset_zone(f.zone)
        else:
            self.dev.close_zone(f.zone)

    # -- I/O

    def read(self, f: ZoneFile, offset: int, size: int, direct: bool) -> bytes:
        """zonefs_file_read_iter."""
        if f.immutable and not f.mode & 0o777:
            raise refuse(errno.EPERM, f"seq/{f.index} is offline")
        if offset >= f.capacity or offset >= f.wpoffset:
            return b""
        size = min(size, f.wpoffset - offset)
        if direct and (offset | size) % self.lba:
            raise refuse(errno.EINVAL, "direct read not aligned to the block size")
        try:
            return self.dev.read(self.dev.zone_start(f.zone) + offset, size)
        except OSError:
            self.io_error(f, write=False)
            raise

    def write(self, f: ZoneFile, offset: int, data: bytes, direct: bool) -> int:
        """zonefs_file_write_iter and zonefs_file_dio_write; the count written."""
        if f.immutable:
            raise refuse(errno.EPERM, f"seq/{f.index} is immutable")
        if self.sb_readonly:
            raise refuse(errno.EROFS, "the filesystem is read-only")
        if offset >= f.capacity:
            raise refuse(errno.EFBIG, f"write at {offset}, seq/{f.index} holds {f.capacity}")
        if not direct:
            raise refuse(errno.EIO, "sequential zone files take direct writes only")
        count = min(len(data), f.capacity - offset)
        if (offset | count) % self.lba:
            raise refuse(errno.EINVAL, "direct write not aligned to the block size")
        if offset != f.wpoffset:
            raise refuse(errno.EINVAL, f"write at {offset}, seq/{f.index} size {f.wpoffset}")
        try:
            self.dev.write(self.dev.zone_start(f.zone) + offset, data[:count])
        except OSError:
            self.io_error(f, write=True)
            raise
        self._set_size(f, offset + count)
        return count

    def fsync(self, f: ZoneFile) -> None:
        """zonefs_file_fsync: a flush of the whole device."""
        if f.immutable:
            raise refuse(errno.EPERM, f"seq/{f.index} is immutable")
        try:
            self.dev.flush()
        except OSError:
            self.io_error(f, write=True)
            raise

    def truncate(self, f: ZoneFile, size: int) -> None:
        """zonefs_file_truncate: 0 resets the zone, the capacity finishes it."""
        if size == 0:
            manage = self.dev.reset_zone
        elif size == f.capacity:
            manage = self.dev.finish_zone
        else:
            raise refuse(errno.EPERM, f"truncate seq/{f.index} to {size}")
        if size == f.wpoffset:
            return
        manage(f.zone)  # a failure is returned, without io_error (as zonefs)
        error: OSError | None = None
        if f.opened and size == 0:
            try:
                self.dev.open_zone(f.zone)  # keep accepting writes
            except OSError as exc:
                error = exc
        self._set_size(f, size)
        if size:
            f.opened = False
        if error is not None:
            raise error

    # -- test hooks (extended attributes of the layer, not of zonefs)

    def inject(self, f: ZoneFile, fault: bytes) -> None:
        """Fault injection into the device: zonefs notices at the next I/O error."""
        if fault == FAULT_READONLY:
            self.dev.set_readonly(f.zone)
        elif fault == FAULT_OFFLINE:
            self.dev.set_offline(f.zone)
        elif fault.startswith(FAULT_FAIL_AFTER):
            self.dev.fail_next_write(f.zone, int(fault[len(FAULT_FAIL_AFTER) :]))
        else:
            raise refuse(errno.EINVAL, f"unknown fault {fault!r}")

    def device_zone(self, f: ZoneFile) -> bytes:
        """The device's own view of the zone (a packed `struct blk_zone`)."""
        return self.dev.zone(f.zone).pack()
