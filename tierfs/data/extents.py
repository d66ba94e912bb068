"""The extent map: per inode, file offset -> (chunk id, offset in chunk, length).

Extents never overlap; holes have none. An extent may use part of a chunk, so replacing a
range only trims its neighbours (copy-on-write: chunks are never modified). Every extent
holds one reference on its chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tierfs.data.chunkstore import ChunkIndex
from tierfs.meta import schema
from tierfs.meta.records import decode_extent, encode_extent
from tierfs.meta.store import MetaStore


@dataclass(frozen=True)
class Extent:
    file_off: int
    length: int
    chunk_id: bytes
    chunk_off: int

    @property
    def end(self) -> int:
        return self.file_off + self.length


def _key(ino: int, off: int) -> bytes:
    return schema.ino_key(ino) + schema.pack_u64(off)


def _seek(cur: Any, ino: int, start: int) -> bool:
    """Position `cur` on the first extent of `ino` that may overlap `start`."""
    prefix = schema.ino_key(ino)
    at_or_after = cur.set_range(_key(ino, start))
    if at_or_after and bytes(cur.key()) == _key(ino, start):
        return True
    # An extent covering `start` begins before it: it is the record just before this one.
    moved = cur.prev() if at_or_after else cur.last()
    if moved and bytes(cur.key()).startswith(prefix):
        return True
    return bool(cur.set_range(_key(ino, start)))


class ExtentMap:
    def __init__(self, store: MetaStore, chunks: ChunkIndex) -> None:
        self.store = store
        self.chunks = chunks

    def overlapping(self, ino: int, start: int, end: int, tx: Any = None) -> Iterator[Extent]:
        """Extents that overlap [start, end), in file order."""
        tx = tx or self.store.tx
        prefix = schema.ino_key(ino)
        with tx.cursor(db=self.store.extents) as cur:
            if not _seek(cur, ino, start):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    return
                off = schema.unpack_u64(key, 8)
                if off >= end:
                    return
                chunk_id, chunk_off, length = decode_extent(bytes(value))
                if off + length > start:
                    yield Extent(off, length, chunk_id, chunk_off)

    def insert(self, tx: Any, ino: int, ext: Extent, new_ref: bool = True) -> None:
        """Add an extent over a range that has none (the caller cleared it)."""
        tx.put(
            _key(ino, ext.file_off),
            encode_extent(ext.chunk_id, ext.chunk_off, ext.length),
            db=self.store.extents,
        )
        if new_ref:
            self.chunks.add_ref(tx, ext.chunk_id)
        self.chunks.referenced(tx, ext.length)

    def clear(self, tx: Any, ino: int, start: int, end: int) -> int:
        """Remove [start, end) from the map, trimming neighbours; returns bytes removed."""
        removed = 0
        for ext in list(self.overlapping(ino, start, end, tx)):
            tx.delete(_key(ino, ext.file_off), db=self.store.extents)
            self.chunks.referenced(tx, -ext.length)
            kept = 0
            if ext.file_off < start:
                left = Extent(ext.file_off, start - ext.file_off, ext.chunk_id, ext.chunk_off)
                self.insert(tx, ino, left, new_ref=False)
                kept += 1
            if ext.end > end:
                shift = end - ext.file_off
                right = Extent(end, ext.end - end, ext.chunk_id, ext.chunk_off + shift)
                self.insert(tx, ino, right, new_ref=kept > 0)
                kept += 1
            if kept == 0:
                self.chunks.release(tx, ext.chunk_id)
            removed += min(ext.end, end) - max(ext.file_off, start)
        return removed

    def count(self, ino: int, tx: Any = None) -> int:
        tx = tx or self.store.tx
        prefix = schema.ino_key(ino)
        n = 0
        with tx.cursor(db=self.store.extents) as cur:
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    n += 1
        return n
