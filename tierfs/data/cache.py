"""A bounded in-memory cache of decompressed chunks (least recently used goes first).

Entries are plaintext `bytes`, or views of a raw frame's payload (read-only, so never
changed under a reader)."""

from __future__ import annotations

from collections import OrderedDict


class ChunkCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, chunk_id: bytes) -> bytes | memoryview | None:
        data = self._items.get(chunk_id)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(chunk_id)
        self.hits += 1
        return data

    def contains(self, chunk_id: bytes) -> bool:
        return chunk_id in self._items

    def put(self, chunk_id: bytes, data: bytes | memoryview) -> None:
        if len(data) > self.max_bytes or chunk_id in self._items:
            return
        self._items[chunk_id] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= len(old)

    def drop(self) -> None:
        """Forget everything (tests and benchmarks measure reads from the tier)."""
        self._items.clear()
        self.bytes = 0
