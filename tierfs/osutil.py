"""Small OS calls that the standard library lacks."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate the whole blocks inside [offset, offset+length); the size stays."""
    start = (offset + BLOCK - 1) // BLOCK * BLOCK
    end = (offset + length) // BLOCK * BLOCK
    if end <= start:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
