"""The local snapshot catalog: one record per kept snapshot, and the tree cache of the last one.

Records live in DB_SNAPSHOTS under the site's snapshot counter, so LMDB's order is the order
they were taken. The tree cache (`{directory inode: (stamp, tree id)}`, see
`tierfs.snap.tree`) lives in DB_TREE_CACHE and belongs to one snapshot, recorded under
K_TREE_CACHE_OF: its tree ids stay stored exactly as long as that snapshot is kept, which is
what makes reusing them safe. Deleting that snapshot empties the cache.
All calls are on the trio thread, inside a `MetaStore.op()` (or a read transaction).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from tierfs.errors import ExitCode, TierfsError
from tierfs.meta import schema
from tierfs.meta.store import MetaStore

RECORD_VERSION = 1
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

# Upstream state of a snapshot (the replicator moves it along).
LOCAL = "local"  # no regional store: kept here only
QUEUED = "queued"  # waiting for the replicator
SENT = "sent"  # its manifest is published upstream
SUPERSEDED = "superseded"  # dropped from the queue by a newer snapshot of its schedule
DAMAGED = "damaged"  # names a chunk the index lacks: never sent (see tierfs fsck)


@dataclasses.dataclass
class SnapshotRecord:
    """A kept snapshot: what it is called, when it was taken, its root blob and figures."""

    counter: int
    snapshot_id: str
    time_ns: int
    root: bytes
    name: str | None = None
    schedule: str | None = None
    paths: list[str] | None = None  # None: the whole filesystem
    parent: str | None = None
    pause_ns: int = 0
    upstream: str = LOCAL
    stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        doc = dataclasses.asdict(self)
        doc["root"] = self.root.hex()
        doc["v"] = RECORD_VERSION
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> SnapshotRecord:
        doc = json.loads(bytes(data))
        if doc.pop("v", None) != RECORD_VERSION:
            raise TierfsError("snapshot record has an unknown version", ExitCode.VERSION)
        doc["root"] = bytes.fromhex(doc["root"])
        return cls(**doc)

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["root"] = self.root.hex()
        doc["time"] = utc_text(self.time_ns)
        return doc


def utc_text(time_ns: int) -> str:
    when = datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_snapshot_id(time_ns: int, counter: int, label: str | None) -> str:
    """`20261207T153000Z-42[-label]`: sorts by time, unique by counter, readable by label."""
    stamp = datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC)
    out = f"{stamp.strftime('%Y%m%dT%H%M%SZ')}-{counter}"
    if label:
        clean = _ID_CHARS.sub("-", label).strip("-.")[:40]
        if clean:
            out += f"-{clean}"
    return out


class Catalog:
    """DB_SNAPSHOTS and DB_TREE_CACHE of one index."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store

    # -- records

    def put(self, tx: Any, record: SnapshotRecord) -> None:
        tx.put(schema.pack_u64(record.counter), record.encode(), db=self.store.snapshots)

    def delete(self, tx: Any, record: SnapshotRecord) -> None:
        tx.delete(schema.pack_u64(record.counter), db=self.store.snapshots)
        if self.cache_owner(tx) == record.counter:
            self.clear_cache(tx)

    def records(self, tx: Any = None) -> Iterator[SnapshotRecord]:
        """Every kept snapshot, oldest first."""
        db = self.store.snapshots
        if db is None:
            return
        with (tx or self.store.tx).cursor(db=db) as cur:
            for _, value in cur:
                yield SnapshotRecord.decode(bytes(value))

    def find(self, key: str, tx: Any = None) -> SnapshotRecord:
        """A snapshot by id, or by name when exactly one has it."""
        named = []
        for record in self.records(tx):
            if record.snapshot_id == key:
                return record
            if record.name == key:
                named.append(record)
        if len(named) == 1:
            return named[0]
        if named:
            ids = ", ".join(r.snapshot_id for r in named)
            raise TierfsError(
                f"several snapshots are named {key!r} ({ids}); give the id", ExitCode.USAGE
            )
        raise TierfsError(f"no snapshot {key!r} (see tierfs snapshot list)", ExitCode.USAGE)

    def latest(self, tx: Any = None) -> SnapshotRecord | None:
        db = self.store.snapshots
        if db is None:
            return None
        with (tx or self.store.tx).cursor(db=db) as cur:
            return SnapshotRecord.decode(bytes(cur.value())) if cur.last() else None

    # -- the tree cache of the last build

    def cache_owner(self, tx: Any = None) -> int | None:
        raw = (tx or self.store.tx).get(schema.K_TREE_CACHE_OF, db=self.store.meta)
        return None if raw is None else schema.unpack_u64(bytes(raw))

    def load_cache(self, tx: Any = None) -> dict[int, tuple[bytes, bytes]]:
        out = {}
        with (tx or self.store.tx).cursor(db=self.store.tree_cache) as cur:
            for key, value in cur:
                raw = bytes(value)
                out[schema.key_ino(bytes(key))] = (raw[:32], raw[32:])
        return out

    def save_cache(
        self,
        tx: Any,
        owner: int,
        old: Mapping[int, tuple[bytes, bytes]],
        new: Mapping[int, tuple[bytes, bytes]],
    ) -> None:
        """Replace the cache by `new`, writing only what differs from `old`."""
        db = self.store.tree_cache
        for ino in old.keys() - new.keys():
            tx.delete(schema.ino_key(ino), db=db)
        for ino, value in new.items():
            if old.get(ino) != value:
                tx.put(schema.ino_key(ino), value[0] + value[1], db=db)
        tx.put(schema.K_TREE_CACHE_OF, schema.pack_u64(owner), db=self.store.meta)

    def clear_cache(self, tx: Any) -> None:
        tx.drop(self.store.tree_cache, delete=False)
        tx.delete(schema.K_TREE_CACHE_OF, db=self.store.meta)
