"""What the index knows about the regional store: which chunks are there, packs in flight.

Three databases (schema 1.2, docs/FORMAT.md "upstream, pack_intents, index_pending"):

* `upstream`: chunk id -> where the region holds it (pack, offset, length, raw length) and
  flags. `UPLOADED`: the frame is durable upstream (in a pack this site put, or in another
  site's pack, read back and verified once). `COMPLETE` (tree blobs only): everything the blob
  names, recursively, is upstream too; set only once a manifest naming the blob is published,
  so a walk may stop at such a blob.
* `pack_intents`: pack name -> the pack's entries, recorded (durably) before its upload, and
  removed in the operation that marks its chunks uploaded. At start the replicator adopts an
  intent whose pack exists upstream and drops one whose pack does not.
* `index_pending`: chunk id -> segment entry of a chunk this site packed whose index segment
  is not published yet; published with the next send.

All calls run on the trio thread inside `store.op()` (or read the group transaction).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from typing import Any

from tierfs.errors import ExitCode, TierfsError
from tierfs.meta.store import MetaStore
from tierfs.upstream.pack import PackEntry
from tierfs.upstream.siteindex import SegmentEntry

UPLOADED = 1
COMPLETE = 2
_RECORD = struct.Struct(">BBQII")  # version, flags, offset, length, raw length; then the pack
_VERSION = 1


@dataclasses.dataclass(frozen=True)
class UpstreamRecord:
    flags: int
    pack: str
    offset: int
    length: int
    raw_len: int

    def encode(self) -> bytes:
        head = _RECORD.pack(_VERSION, self.flags, self.offset, self.length, self.raw_len)
        return head + self.pack.encode()

    @classmethod
    def decode(cls, data: bytes) -> UpstreamRecord:
        version, flags, offset, length, raw_len = _RECORD.unpack_from(data)
        if version != _VERSION:
            raise TierfsError("upstream record has an unknown version", ExitCode.VERSION)
        return cls(flags, bytes(data[_RECORD.size :]).decode(), offset, length, raw_len)


class UpstreamState:
    """The `upstream`, `pack_intents` and `index_pending` databases of one index."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store

    def get(self, chunk_id: bytes, tx: Any = None) -> UpstreamRecord | None:
        raw = (tx or self.store.tx).get(chunk_id, db=self.store.upstream)
        return None if raw is None else UpstreamRecord.decode(bytes(raw))

    def uploaded(self, chunk_id: bytes, tx: Any = None) -> bool:
        return self.get(chunk_id, tx) is not None

    def complete(self, chunk_id: bytes, tx: Any = None) -> bool:
        record = self.get(chunk_id, tx)
        return record is not None and bool(record.flags & COMPLETE)

    def mark(self, tx: Any, chunk_id: bytes, pack: str, entry: PackEntry, flags: int) -> None:
        record = UpstreamRecord(flags, pack, entry.offset, entry.length, entry.raw_len)
        tx.put(chunk_id, record.encode(), db=self.store.upstream)

    def mark_complete(self, tx: Any, chunk_ids: list[bytes]) -> None:
        for chunk_id in chunk_ids:
            record = self.get(chunk_id, tx)
            if record is not None and not record.flags & COMPLETE:
                tx.put(
                    chunk_id,
                    dataclasses.replace(record, flags=record.flags | COMPLETE).encode(),
                    db=self.store.upstream,
                )

    # -- packs in flight

    def record_intent(self, tx: Any, name: str, entries: list[PackEntry]) -> None:
        doc = {"entries": [[e.chunk_id.hex(), e.offset, e.length, e.raw_len] for e in entries]}
        tx.put(name.encode(), json.dumps(doc).encode(), db=self.store.pack_intents)

    def intents(self, tx: Any = None) -> Iterator[tuple[str, list[PackEntry]]]:
        with (tx or self.store.tx).cursor(db=self.store.pack_intents) as cur:
            items = [(bytes(k).decode(), json.loads(bytes(v))) for k, v in cur]
        for name, doc in items:
            yield name, [PackEntry(bytes.fromhex(i), o, n, r) for i, o, n, r in doc["entries"]]

    def land(self, tx: Any, name: str, entries: list[PackEntry]) -> None:
        """The pack is durable upstream: its chunks are uploaded and to be indexed."""
        for e in entries:
            self.mark(tx, e.chunk_id, name, e, UPLOADED)
            segment = SegmentEntry(e.chunk_id, name, e.offset, e.length, e.raw_len)
            tx.put(e.chunk_id, _encode_segment_entry(segment), db=self.store.index_pending)
        tx.delete(name.encode(), db=self.store.pack_intents)

    def drop_intent(self, tx: Any, name: str) -> None:
        tx.delete(name.encode(), db=self.store.pack_intents)

    # -- index entries to publish

    def pending_index(self, tx: Any = None) -> list[SegmentEntry]:
        with (tx or self.store.tx).cursor(db=self.store.index_pending) as cur:
            return [_decode_segment_entry(bytes(k), bytes(v)) for k, v in cur]

    def indexed(self, tx: Any, entries: list[SegmentEntry]) -> None:
        for e in entries:
            tx.delete(e.chunk_id, db=self.store.index_pending)


def _encode_segment_entry(e: SegmentEntry) -> bytes:
    return struct.pack(">QII", e.offset, e.length, e.raw_len) + e.pack.encode()


def _decode_segment_entry(chunk_id: bytes, value: bytes) -> SegmentEntry:
    offset, length, raw_len = struct.unpack_from(">QII", value)
    return SegmentEntry(chunk_id, value[16:].decode(), offset, length, raw_len)
