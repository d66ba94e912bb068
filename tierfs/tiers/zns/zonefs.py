"""A zoned device presented by a mounted zonefs directory (`mount -t zonefs`).

zonefs shows every sequential zone of a zoned block device as a file `seq/N` whose size is the
zone's write pointer (zns.md A.4). `ZonefsDevice` turns that back into the `ZonedDevice`
interface, so the cold tier runs on zonefs exactly as on the emulator: same operations, same
errnos. How each part maps (zns.md A.7):

=================  ==========================================================================
ZonedDevice        zonefs
=================  ==========================================================================
zones              `seq/0..N-1` (N = the size of `seq/`). Zone 0 of the drive (superblock) and
                   conventional zones (`cnv/`) are not used: every zone here is sequential.
geometry           capacity = `st_blocks * 512` of `seq/0`, LBA size = its `st_blksize`. zonefs
                   does not show the zone stride, so addresses are virtual: zone `z` starts at
                   `z * zone_size`, `zone_size` being the next power of two >= the capacity
                   unless given.
limits             `max_wro_seq_files` / `max_active_seq_files` under `/sys/fs/zonefs/DEV/`,
                   or given; 0 (none enforced here) when unknown; the drive still enforces its
                   own.
write, append      `pwrite` with O_DIRECT at the file size, from a page-aligned (mmap) buffer.
                   Append = fstat for the size, then that pwrite (one writer per zone: an
                   interleaved writer makes it fail rather than land elsewhere).
read               buffered `pread` (zonefs restricts only writes); zeros past the file size.
open_zone          an O_WRONLY|O_DIRECT handle kept open and pinned. With the `explicit-open`
                   mount option zonefs sends OPEN ZONE on the first write open and fails it
                   with EBUSY past `max_wro_seq_files`.
close_zone         close of that handle: with `explicit-open` the last close sends CLOSE ZONE
                   (RESET if nothing was written, so the zone is EMPTY, as on the drive).
implicit open      a write to a zone without a handle opens one, kept in LRU order; when the
                   open limit is reached the least recently written unpinned handle is closed,
                   as a drive closes an IMP_OPEN zone implicitly. Pinned ones never are
                   (ETOOMANYREFS), as EXP_OPEN zones.
finish / reset     `truncate(capacity)` / `truncate(0)`, after closing our handle.
report             size = wp - start. Mode without any permission bit: OFFLINE (zonefs also
                   shows a zone found read-only at mount this way); without write bits:
                   READONLY (found at run time, after an I/O error; the size is kept); size ==
                   capacity: FULL; a handle of ours: EXP_OPEN (with `explicit-open`, or
                   pinned) or IMP_OPEN; otherwise EMPTY or CLOSED (zonefs cannot tell a
                   CLOSED zone from one the drive still has implicitly open, ZenFS assumes
                   CLOSED too).
flush              fsync of one zone file: zonefs flushes the whole device.
=================  ==========================================================================

Errnos: zonefs answers with its own (zns.md A.4 and the kernel's fs/zonefs); `map_errno`
turns them into the interface's (zns.md A.2). Checks that zonefs would not make the same way
are made here first: alignment (EINVAL), and a write across the capacity, which zonefs would
shorten silently (EIO).

`explicit-open` cannot be read back from the mount (zonefs shows only `errors=`), so the
caller says whether it is set. The directory is locked with an exclusive `flock` on `seq/0`,
as ZenFS does, so two users cannot interleave writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from tierfs.datadir import unescape_mountinfo
from tierfs.errors import ExitCode, TierfsError
from tierfs.tiers.zns.device import ZonedDevice, ZoneGeometry
from tierfs.tiers.zns.device import zone_error as _err
from tierfs.tiers.zns.model import SECTOR, WP_INVALID, Cond, Geometry, Zone, ZoneType

log = logging.getLogger(__name__)

SYSFS_ZONEFS = Path("/sys/fs/zonefs")
MOUNTINFO = Path("/proc/self/mountinfo")
DEFAULT_APPEND_MAX = 1 << 20
READ_HANDLES = 32

# zonefs errno -> interface errno. EINVAL only means "not at the write pointer" for writes,
# whose alignment is checked before they reach zonefs.
_COMMON = {
    errno.EFBIG: errno.EIO,  # write at or past the capacity: the zone is FULL
    errno.EPERM: errno.EIO,  # immutable file: READONLY or OFFLINE zone
    errno.EACCES: errno.EIO,  # mode 000 (OFFLINE) opened without CAP_DAC_OVERRIDE
    errno.EROFS: errno.EPERM,  # errors=remount-ro after an I/O error: the device is read-only
    errno.EBUSY: errno.ETOOMANYREFS,  # explicit-open: max_wro_seq_files write-open files
}
_WRITE = {**_COMMON, errno.EINVAL: errno.EIO}


def map_errno(code: int, *, write: bool) -> int:
    """The interface's errno (zns.md A.2) for an errno zonefs returned.

    EIO, EOVERFLOW and ETOOMANYREFS come from the drive through zonefs unchanged."""
    return (_WRITE if write else _COMMON).get(code, code)


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class AlignedBuffer:
    """A reusable page-aligned buffer: O_DIRECT needs memory aligned to the logical block
    size, which Python's bytes are not; anonymous mmap memory is page-aligned."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)

    def load(self, data: bytes) -> memoryview:
        """`data` copied into the buffer; release the view before the next `load`."""
        if len(data) > len(self._map):
            self._map.close()
            self._map = mmap.mmap(-1, _round_up(len(data), mmap.PAGESIZE))
        self._map[: len(data)] = data
        return memoryview(self._map)[: len(data)]

    def close(self) -> None:
        self._map.close()


@dataclasses.dataclass
class _Writer:
    """A write handle on a zone file; `pinned` by open_zone(), so never closed for room."""

    fd: int
    pinned: bool


class ZonefsDevice(ZoneGeometry, ZonedDevice):
    """The sequential zones of a zonefs mount at `root` as a `ZonedDevice`."""

    def __init__(
        self,
        root: Path,
        *,
        explicit_open: bool = False,
        max_open: int | None = None,
        max_active: int | None = None,
        zone_size: int | None = None,
        zone_append_max: int = DEFAULT_APPEND_MAX,
    ) -> None:
        self.root = root
        self.explicit_open = explicit_open
        self._writers: OrderedDict[int, _Writer] = OrderedDict()
        self._readers: OrderedDict[int, int] = OrderedDict()
        self._capacities: dict[int, int] = {}
        self._unflushed = False
        self._lock_fd = self._lock()
        try:
            self.geometry = self._probe(zone_size, zone_append_max, max_open, max_active)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.max_open, self.max_active = self.geometry.effective_limits()
        self._buffer = AlignedBuffer()

    # -- setup

    def path(self, z: int) -> Path:
        """The file of zone `z`."""
        return self.root / "seq" / str(z)

    def _lock(self) -> int:
        """An exclusive flock on seq/0, as ZenFS takes: one user of the zones at a time."""
        try:
            fd = os.open(self.path(0), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TierfsError(
                f"{self.root}: not a zonefs mount (seq/0: {exc.strerror})", ExitCode.CONFIG
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TierfsError(
                f"{self.root}: zones in use by another process", ExitCode.BUSY
            ) from None
        return fd

    def _probe(
        self,
        zone_size: int | None,
        append_max: int,
        max_open: int | None,
        max_active: int | None,
    ) -> Geometry:
        """Geometry from the files (zns.md A.7), limits from sysfs unless given."""
        nr = self._count_zones()
        first = os.fstat(self._lock_fd)
        capacity = first.st_blocks * SECTOR
        sysfs = _sysfs_limits(self.root) or (0, 0)
        geometry = Geometry(
            lba_size=first.st_blksize,
            zone_size=zone_size or _next_power_of_two(capacity),
            zone_capacity=capacity,
            nr_zones=nr,
            nr_conv=0,
            max_open=sysfs[0] if max_open is None else max_open,
            max_active=sysfs[1] if max_active is None else max_active,
            zone_append_max=append_max,
        )
        geometry.validate()
        return geometry

    def _count_zones(self) -> int:
        """The size of `seq/` (zonefs: its number of files), checked against the names."""
        nr = os.stat(self.root / "seq").st_size
        if nr <= 0 or not self.path(nr - 1).exists() or self.path(nr).exists():
            raise TierfsError(
                f"{self.root}: not a zonefs mount (seq/ has size {nr}, which does not match "
                "its files)",
                ExitCode.CONFIG,
            )
        return nr

    # -- geometry

    def zone_end(self, z: int) -> int:
        return self.zone_start(z) + self._capacity(z)

    def is_conventional(self, z: int) -> bool:
        return False

    def _capacity(self, z: int) -> int:
        """Zone `z`'s capacity (its file's maximum size); only the last zone may differ."""
        if z not in self._capacities:
            self._stat(z)
        return self._capacities[z]

    # -- reports

    def _stat(self, z: int) -> os.stat_result:
        try:
            st = os.stat(self.path(z))
        except OSError as exc:
            raise self._error(exc, z, "stat", write=False) from None
        self._capacities.setdefault(z, st.st_blocks * SECTOR)
        return st

    def _cond(self, z: int, st: os.stat_result) -> Cond:
        perm = stat.S_IMODE(st.st_mode) & 0o777
        if perm == 0:
            return Cond.OFFLINE
        if not perm & 0o222:
            return Cond.READONLY
        if st.st_size >= st.st_blocks * SECTOR:
            return Cond.FULL
        writer = self._writers.get(z)
        if writer is not None:
            return Cond.EXP_OPEN if writer.pinned or self.explicit_open else Cond.IMP_OPEN
        return Cond.EMPTY if st.st_size == 0 else Cond.CLOSED

    def _condition(self, z: int) -> Cond:
        self._check_zone(z)
        return self._cond(z, self._stat(z))

    def zone(self, z: int) -> Zone:
        self._check_zone(z)
        st = self._stat(z)
        cond = self._cond(z, st)
        start = self.zone_start(z) // SECTOR
        length = self.geometry.zone_size // SECTOR
        if cond == Cond.FULL:
            wp = start + length
        elif cond in (Cond.READONLY, Cond.OFFLINE):
            wp = WP_INVALID
        else:
            wp = start + st.st_size // SECTOR
        return Zone(start, length, wp, ZoneType.SEQWRITE_REQ, cond, st.st_blocks)

    def report(self, sector: int = 0, nr: int | None = None) -> list[Zone]:
        if nr is not None and nr <= 0:
            raise _err(errno.EINVAL, "nr_zones must be positive")
        first = sector * SECTOR // self.geometry.zone_size
        last = self.geometry.nr_zones if nr is None else min(self.geometry.nr_zones, first + nr)
        return [self.zone(z) for z in range(first, last)]

    def counts(self) -> tuple[int, int]:
        conds = [zone.cond for zone in self.report()]
        return sum(c.is_open for c in conds), sum(c.is_active for c in conds)

    # -- write handles and resources

    def _check_active(self) -> None:
        """EOVERFLOW before an EMPTY zone becomes active, as the drive would answer (and
        before zonefs's default errors=remount-ro could turn a refused write into a
        read-only filesystem)."""
        if self.max_active and self.counts()[1] >= self.max_active:
            raise _err(errno.EOVERFLOW, "active zones exceeded")

    def _make_room(self) -> None:
        """Free an open slot: close the least recently written unpinned zone."""
        if not self.max_open or len(self._writers) < self.max_open:
            return
        if not self._evict():
            raise _err(errno.ETOOMANYREFS, "open zones exceeded")

    def _evict(self) -> bool:
        victim = next((z for z, w in self._writers.items() if not w.pinned), None)
        if victim is None:
            return False
        self._drop_writer(victim)
        return True

    def _writer(self, z: int, pinned: bool = False) -> _Writer:
        """The write handle of zone `z`, opened (taking an open slot) if needed. A FULL zone
        is left to zonefs (EFBIG, mapped to EIO)."""
        writer = self._writers.get(z)
        if writer is None:
            cond = self._condition(z)
            if cond in (Cond.READONLY, Cond.OFFLINE):
                raise _err(errno.EIO, f"zone {z} is {cond.name}")
            if cond == Cond.EMPTY:
                self._check_active()
            self._make_room()
            writer = self._writers[z] = _Writer(self._open_writer(z), pinned)
        writer.pinned = writer.pinned or pinned
        return writer

    def _open_writer(self, z: int) -> int:
        flags = os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
        try:
            return os.open(self.path(z), flags)
        except OSError as exc:
            if exc.errno != errno.EBUSY or not self._evict():
                raise self._error(exc, z, "open for writing", write=False) from None
        try:  # another process holds write-open files: we made room, try once more
            return os.open(self.path(z), flags)
        except OSError as exc:
            raise self._error(exc, z, "open for writing", write=False) from None

    def _drop_writer(self, z: int) -> None:
        """Close our handle (with explicit-open, zonefs closes the zone); zonefs never
        fails a close, so neither does this."""
        writer = self._writers.pop(z, None)
        if writer is None:
            return
        try:
            os.close(writer.fd)
        except OSError as exc:
            log.warning("closing zone %d of %s: %s", z, self.root, exc)

    # -- I/O

    def write(self, offset: int, data: bytes) -> None:
        self._check_io(offset, len(data))
        z = self.zone_of(offset)
        if data:
            self._write_at(z, offset - self.zone_start(z), data)

    def append(self, z: int, data: bytes) -> int:
        self._check_zone(z)
        if len(data) > self.geometry.zone_append_max:
            raise _err(errno.EINVAL, "append larger than zone_append_max")
        if len(data) % self.geometry.lba_size:
            raise _err(errno.EINVAL, "I/O not aligned to the logical block size")
        pos = self._stat(z).st_size
        if data:
            self._write_at(z, pos, data)
        return self.zone_start(z) + pos

    def _write_at(self, z: int, pos: int, data: bytes) -> None:
        """An O_DIRECT pwrite at `pos` of zone `z`; zonefs checks the write pointer."""
        capacity = self._capacity(z)
        if pos < capacity < pos + len(data):
            raise _err(errno.EIO, f"write crosses the capacity of zone {z}")
        fresh = z not in self._writers
        writer = self._writer(z)
        try:
            self._pwrite(writer.fd, data, pos)
        except OSError as exc:
            self._after_write_error(z, fresh)
            raise self._error(exc, z, f"write of {len(data)} bytes at {pos}", write=True) from None
        self._unflushed = True
        if pos + len(data) >= capacity:
            self._drop_writer(z)  # FULL: zonefs no longer holds the zone open
        else:
            self._writers.move_to_end(z)  # least recently written goes first for room

    def _after_write_error(self, z: int, fresh: bool) -> None:
        """Give back the open slot unless the zone is still open and writable: a handle
        opened for the failed write leaves the zone as it was (zonefs closes it again), and
        a FULL, READONLY or OFFLINE zone holds no resources."""
        if not fresh:
            try:
                cond = self._cond(z, self._stat(z))
            except OSError:
                cond = Cond.OFFLINE
            if cond not in (Cond.FULL, Cond.READONLY, Cond.OFFLINE):
                return
        self._drop_writer(z)

    def _pwrite(self, fd: int, data: bytes, pos: int) -> None:
        done = 0
        with self._buffer.load(data) as view:
            while done < len(data):
                with view[done:] as rest:
                    n = os.pwrite(fd, rest, pos + done)
                if n <= 0:
                    raise _err(errno.EIO, "short write")
                done += n

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.geometry.device_size:
            raise _err(errno.EINVAL, "read past the end of the device")
        z = self.zone_of(offset)
        pos = offset - self.zone_start(z)
        want = min(length, max(0, self._capacity(z) - pos))
        data = self._pread(z, pos, want) if want else b""
        return data + bytes(length - len(data))

    def _pread(self, z: int, pos: int, length: int) -> bytes:
        """Up to `length` bytes: zonefs stops reads at the file size (the write pointer)."""
        fd = self._reader(z)
        parts: list[bytes] = []
        got = 0
        while got < length:
            try:
                part = os.pread(fd, length - got, pos + got)
            except OSError as exc:
                raise self._error(exc, z, f"read at {pos + got}", write=False) from None
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def _reader(self, z: int) -> int:
        fd = self._readers.get(z)
        if fd is not None:
            self._readers.move_to_end(z)
            return fd
        try:
            fd = os.open(self.path(z), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, z, "open for reading", write=False) from None
        self._readers[z] = fd
        if len(self._readers) > READ_HANDLES:
            os.close(self._readers.popitem(last=False)[1])
        return fd

    def flush(self) -> None:
        """One fsync: zonefs answers any with a flush of the whole device. Immutable files
        (READONLY, OFFLINE zones) refuse fsync, so the first zone file that takes it wins."""
        if not self._unflushed:
            return
        error: OSError | None = None
        for z, fd in self._fsync_handles():
            try:
                os.fsync(fd)
            except OSError as exc:
                error = error or self._error(exc, z, "fsync", write=True)
                continue
            self._unflushed = False
            return
        raise error or _err(errno.EIO, f"{self.root}: no zone file to fsync")

    def _fsync_handles(self) -> Iterator[tuple[int, int]]:
        """Our open handles, then every zone file (opened only for the fsync)."""
        yield from [(z, w.fd) for z, w in self._writers.items()]
        yield 0, self._lock_fd
        for z in range(self.geometry.nr_zones):
            try:
                fd = os.open(self.path(z), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                yield z, fd
            finally:
                os.close(fd)

    # -- zone management

    def open_zone(self, z: int) -> None:
        cond = self._condition(z)
        if cond in (Cond.FULL, Cond.READONLY, Cond.OFFLINE):
            raise _err(errno.EIO, f"zone {z} is {cond.name}")
        self._writer(z, pinned=True)

    def close_zone(self, z: int) -> None:
        cond = self._condition(z)
        if cond in (Cond.FULL, Cond.READONLY, Cond.OFFLINE):
            self._drop_writer(z)  # zonefs no longer holds such a zone open
            raise _err(errno.EIO, f"zone {z} is {cond.name}")
        if z in self._writers:
            self._drop_writer(z)  # IMP_OPEN or EXP_OPEN: CLOSED, or EMPTY if unwritten
        elif cond == Cond.EMPTY:
            raise _err(errno.EIO, f"zone {z} is EMPTY")

    def finish_zone(self, z: int) -> None:
        cond = self._condition(z)
        if cond in (Cond.READONLY, Cond.OFFLINE):
            raise _err(errno.EIO, f"zone {z} is {cond.name}")
        if cond == Cond.FULL:
            return
        if z not in self._writers:
            # null_blk opens a zone to finish it: the same resource checks as a write
            if cond == Cond.EMPTY:
                self._check_active()
            self._make_room()
        self.flush()  # as the emulator: the data below the finished wp is durable
        self._drop_writer(z)
        self._truncate(z, self._capacity(z))

    def reset_zone(self, z: int) -> None:
        cond = self._condition(z)
        if cond in (Cond.READONLY, Cond.OFFLINE):
            raise _err(errno.EIO, f"zone {z} is {cond.name}")
        self._drop_writer(z)
        self._truncate(z, 0)

    def reset_all(self) -> None:
        for z in range(self.geometry.nr_zones):
            if self._condition(z) not in (Cond.EMPTY, Cond.READONLY, Cond.OFFLINE):
                self.reset_zone(z)

    def _truncate(self, z: int, size: int) -> None:
        try:
            os.truncate(self.path(z), size)
        except OSError as exc:
            raise self._error(exc, z, f"truncate to {size}", write=False) from None

    # -- errors and shutdown

    def _error(self, exc: OSError, z: int, what: str, *, write: bool) -> OSError:
        code = exc.errno or errno.EIO
        mapped = map_errno(code, write=write)
        name = errno.errorcode.get(code, str(code))
        return _err(mapped, f"zone {z} ({self.path(z)}): {what}: zonefs said {name}")

    def close_device(self) -> None:
        if self._lock_fd < 0:
            return
        try:
            self.flush()
        finally:
            for z in list(self._writers):
                self._drop_writer(z)
            for fd in self._readers.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._readers.clear()
            self._buffer.close()
            os.close(self._lock_fd)
            self._lock_fd = -1


def _sysfs_limits(root: Path) -> tuple[int, int] | None:
    """(max_wro_seq_files, max_active_seq_files) of the zonefs mounted at `root`."""
    source = _mount_source(root)
    if source is None:
        return None
    base = SYSFS_ZONEFS / Path(source).name
    try:
        wro = int((base / "max_wro_seq_files").read_text())
        active = int((base / "max_active_seq_files").read_text())
    except (OSError, ValueError):
        return None
    return wro, active


def _mount_source(root: Path) -> str | None:
    """The device of the zonefs mounted at `root`, from mountinfo."""
    target = str(root.resolve())
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2 or rfields[0] != "zonefs":
            continue
        if unescape_mountinfo(fields[4]) == target:
            return unescape_mountinfo(rfields[1])
    return None
