"""The cold store's exceptions.

Two families, because callers treat them differently:

* `RecordError` (a `tierfs.data.frame.FrameError`): the bytes at a location are not the record
  they should be (bad magic, version, length, zone offset, chunk id or checksum). The daemon's
  read path already turns a `FrameError` into `EIO` and counts it in `errors.checksum`.
* `ColdError` (a `TierfsError`, exit code `IO`): the store could not do what was asked (no
  free zone, an offline zone, a failed append, a reset that would be unsafe). Each carries
  an `errno` so the FUSE layer can answer with it.

Errors of the device itself (`OSError` with the errnos of `tierfs/tiers/zns/device.py`) pass
through unchanged where the store has nothing to add.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING

from tierfs.data.frame import FrameError
from tierfs.errors import ExitCode, TierfsError

if TYPE_CHECKING:
    from tierfs.tiers.cold.record import Location


class RecordError(FrameError):
    """A zone record failed its checks; the location does not hold the expected chunk."""


class ColdError(TierfsError):
    """A cold store operation failed; the message names the zone (and chunk) involved."""

    errno: int = _errno.EIO

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.IO) -> None:
        super().__init__(message, exit_code)


class ColdFull(ColdError):
    """No zone can take the batch without eating into the reclaim reserve.

    Nothing was written. The caller reclaims (or evicts upstream) and tries again."""

    errno = _errno.ENOSPC


class ZoneOffline(ColdError):
    """The zone is OFFLINE: its records are lost locally and must be restored from a later
    tier. Reads of it fail with EIO; the caller reports the chunks as lost (status, fsck)."""

    def __init__(self, zone: int) -> None:
        super().__init__(f"zone {zone} is offline: its records are lost locally")
        self.zone = zone


class ZoneBusy(ColdError):
    """A reset was refused because it would not be safe yet: a reader pins the zone, the
    usage table still counts live bytes in it, the commit that moved its last record is not
    durable, or an append to it is not settled."""

    errno = _errno.EBUSY


class AppendError(ColdError):
    """An append failed part way (an I/O error from the device).

    `written` are the locations of the batch's records that were wholly written and then
    flushed before the error: they are durable and may be committed. The rest of the batch
    was not stored. The zone that failed is finished (or dropped if it went read-only or
    offline), so no later record follows the torn one."""

    def __init__(self, message: str, zone: int, written: list[Location], cause: int) -> None:
        super().__init__(message)
        self.zone = zone
        self.written = written
        self.errno = cause
