"""An object store wrapper that counts what is sent and holds uploads to a bandwidth cap.

The replicator talks to the regional store only through this, so `status` can show bytes
uploaded by kind of object and requests by verb, and a site on a thin WAN link can cap the
upload rate (`regional.bandwidth_mbit`: `reserve` says how long to wait before a put, and the
caller waits where it can be cancelled). Calls block (they run in worker threads); the
counters and the cap are shared by all of them under one lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

from tierfs.upstream.objectstore import ObjectStore

KINDS = ("data_pack", "tree_pack", "index", "manifest", "domain", "other")


def kind_of(name: str) -> str:
    """The kind of an object, from its name (docs/FORMAT.md)."""
    if name.startswith("packs/data/"):
        return "data_pack"
    if name.startswith("packs/tree/"):
        return "tree_pack"
    if name.startswith("index/"):
        return "index"
    if name.startswith("sites/") and "/manifests/" in name:
        return "manifest"
    if name.startswith("domains/"):
        return "domain"
    return "other"


class MeteredStore(ObjectStore):
    """Counts bytes put (by kind) and requests (by verb); paces puts to `bytes_per_s`."""

    def __init__(self, inner: ObjectStore, bytes_per_s: float = 0.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.bytes_per_s = bytes_per_s
        self.uploaded: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._next_send = 0.0

    def put(self, name: str, data: bytes) -> None:
        self._count("put")
        self.inner.put(name, data)
        with self._lock:
            self.uploaded[kind_of(name)] += len(data)

    def get(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        self._count("get")
        return self.inner.get(name, start, end)

    def head(self, name: str) -> int | None:
        self._count("head")
        return self.inner.head(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        self._count("list")
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self._count("delete")
        self.inner.delete(name)

    def close(self) -> None:
        self.inner.close()

    def _count(self, verb: str) -> None:
        with self._lock:
            self.requests[verb] += 1

    def reserve(self, size: int) -> float:
        """Seconds to wait before putting `size` bytes, so that puts average at most
        `bytes_per_s`. The caller sleeps (cancellably, on the trio side), then puts."""
        if self.bytes_per_s <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + size / self.bytes_per_s
        return start - now

    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "uploaded_bytes": sum(self.uploaded.values()),
                "uploaded_by_kind": {k: self.uploaded[k] for k in KINDS},
                "requests": {v: self.requests[v] for v in ("put", "get", "head", "list")},
            }
