"""The chunk index: chunk records, reference counts, accounting, and frees after commit.

A chunk's refcount is the number of extents that point at it. When it drops to zero the
record is deleted in the same operation, but its frame is not punched yet: the deletion is
only safe once the commit that made it is durable (invariant 3: a copy is never dropped while
durable metadata may still point at it). Such frees wait in `pending_frees` until a durable
commit covers them, and while no read has the frame (or, for a whole segment, any frame of
it) pinned. Each free is also recorded in DB_FREES in the same operation, and the record is
removed once the space is given back: a free that a crash interrupted is finished at mount.

Snapshots (tierfs.snap) add two exceptions. While a snapshot is being taken (`hold()`), a
chunk whose count reaches zero keeps its record, listed in DB_HELD, because the tree being
built from an earlier commit may still name it; the hold's end frees those still unused. And
a tree blob (FLAG_TREE) at zero is not freed here but listed in DB_DEAD_TREES: it holds
references to what it names, which `reap_tree` gives back first.
"""

from __future__ import annotations

import contextlib
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tierfs.meta import schema
from tierfs.meta.records import FLAG_TREE, TIER_COLD, TIER_HOT, ChunkRecord, SegmentRecord
from tierfs.meta.store import MetaStore

_STATS = struct.Struct(">QQQQ")
_FREE_KEY = struct.Struct(">QQ")
_I64 = struct.Struct(">q")


def _free_key(seg: int, offset: int) -> bytes:
    return _FREE_KEY.pack(seg, offset)


@dataclass
class ChunkStats:
    chunks: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0


@dataclass(frozen=True)
class PendingFree:
    """A frame (or a whole segment when `length` is -1) to give back after a durable commit."""

    commit: int
    seg: int
    offset: int
    length: int


class ChunkIndex:
    def __init__(self, store: MetaStore) -> None:
        self.store = store
        self.pending_frees: list[PendingFree] = []
        self.pinned: Counter[tuple[int, int]] = Counter()
        self.holding = 0
        # Set by the cold tier: a deleted chunk's zone record is no longer live.
        self.cold_free: Callable[[Any, int, int, int], None] | None = None

    # -- records

    def get(self, chunk_id: bytes, tx: Any = None) -> ChunkRecord | None:
        raw = (tx or self.store.tx).get(chunk_id, db=self.store.chunks)
        return None if raw is None else ChunkRecord.decode(bytes(raw))

    def scan(self, after: bytes, limit: int) -> tuple[list[tuple[bytes, ChunkRecord]], bytes]:
        """Up to `limit` chunk records in key order after key `after` (b"": from the first),
        and the key to continue from (b"" once the end is reached).

        For the background passes over every chunk (migration, eviction, prefetch): a slice
        reads the group transaction with no await inside, so a pass yields to FUSE requests
        between slices and picks up after the last key it saw, whatever changed meanwhile."""
        found: list[tuple[bytes, ChunkRecord]] = []
        with self.store.tx.cursor(db=self.store.chunks) as cur:
            positioned = cur.set_range(after) if after else cur.first()
            if positioned and after and bytes(cur.key()) == after:
                positioned = cur.next()
            while positioned and len(found) < limit:
                found.append((bytes(cur.key()), ChunkRecord.decode(bytes(cur.value()))))
                positioned = cur.next()
        return found, (found[-1][0] if positioned and found else b"")

    def put(self, tx: Any, chunk_id: bytes, record: ChunkRecord) -> None:
        tx.put(chunk_id, record.encode(), db=self.store.chunks)

    def insert(self, tx: Any, chunk_id: bytes, record: ChunkRecord) -> None:
        """A new chunk whose frame is durable in the hot tier."""
        self.put(tx, chunk_id, record)
        hot = record.hot_location()
        if hot is not None:
            self._segment_delta(tx, hot[0], record.frame_len, 1)
        self._stats_delta(tx, chunks=1, raw=record.raw_len, stored=record.frame_len)

    def add_ref(self, tx: Any, chunk_id: bytes, n: int = 1) -> None:
        record = self.get(chunk_id, tx)
        if record is None:
            raise KeyError(chunk_id.hex())
        record.refcount += n
        self.put(tx, chunk_id, record)

    def release(self, tx: Any, chunk_id: bytes, n: int = 1) -> None:
        record = self.get(chunk_id, tx)
        if record is None:
            raise KeyError(chunk_id.hex())
        record.refcount -= n
        if record.refcount > 0:
            self.put(tx, chunk_id, record)
        elif record.flags & FLAG_TREE:
            self.put(tx, chunk_id, record)
            tx.put(chunk_id, b"", db=self.store.dead_trees)
        elif self.holding:
            self.put(tx, chunk_id, record)
            tx.put(chunk_id, b"", db=self.store.held)
        else:
            self._delete(tx, chunk_id, record)

    def _delete(self, tx: Any, chunk_id: bytes, record: ChunkRecord) -> None:
        """Drop an unused chunk's record; its copies go once that is durable."""
        tx.delete(chunk_id, db=self.store.chunks)
        self._stats_delta(tx, chunks=-1, raw=-record.raw_len, stored=-record.frame_len)
        self._free_copies(tx, record.locations, record.frame_len)

    def drop_copies(
        self,
        tx: Any,
        chunk_id: bytes,
        record: ChunkRecord,
        which: list[tuple[int, int, int]] | None = None,
    ) -> None:
        """Eviction: the chunk keeps its record, references and counters but loses its
        local copies (`which`, default all; its frame is durable upstream); their space goes
        once this is durable."""
        gone = list(record.locations) if which is None else which
        self._free_copies(tx, gone, record.frame_len)
        record.locations = [loc for loc in record.locations if loc not in gone]
        self.put(tx, chunk_id, record)

    def replace_copy(
        self,
        tx: Any,
        chunk_id: bytes,
        record: ChunkRecord,
        old: tuple[int, int, int] | None,
        seg: int,
        offset: int,
    ) -> None:
        """A frame fetched back from upstream now lives at (`seg`, `offset`) of the hot
        tier, instead of the damaged copy `old` (a repair) or of no copy (evicted)."""
        if old is not None:
            self._free_copies(tx, [old], record.frame_len)
        record.locations = [loc for loc in record.locations if loc != old]
        record.locations.append((TIER_HOT, seg, offset))
        self.put(tx, chunk_id, record)
        self.add_segment_frame(tx, seg, record.frame_len)

    def _free_copies(self, tx: Any, locations: list[tuple[int, int, int]], length: int) -> None:
        for tier, a, b in locations:
            if tier == TIER_HOT:
                self.free_frame(tx, a, b, length)
            elif tier == TIER_COLD and self.cold_free is not None:
                self.cold_free(tx, a, b, length)

    # -- snapshots: holding frees, and reaping tree blobs

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep chunks whose count reaches zero (a snapshot is building from an earlier
        commit); at the end, free those that are still unused."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if not self.holding:
                with self.store.op() as tx:
                    self.release_held(tx)

    def release_held(self, tx: Any) -> int:
        """Free the held chunks nothing took a reference to (also at mount, after a crash
        while a snapshot was being taken). Returns how many were freed."""
        freed = 0
        with tx.cursor(db=self.store.held) as cur:
            held = [bytes(k) for k in cur.iternext(values=False)]
        for chunk_id in held:
            tx.delete(chunk_id, db=self.store.held)
            record = self.get(chunk_id, tx)
            if record is not None and record.refcount <= 0:
                record.refcount = 1
                self.put(tx, chunk_id, record)
                self.release(tx, chunk_id)
                freed += 1
        return freed

    def dead_trees(self, limit: int, tx: Any = None) -> list[bytes]:
        """Up to `limit` tree blobs waiting to be reaped."""
        out: list[bytes] = []
        db = self.store.dead_trees
        if db is None:
            return out
        with (tx or self.store.tx).cursor(db=db) as cur:
            for key in cur.iternext(values=False):
                if len(out) >= limit:
                    break
                out.append(bytes(key))
        return out

    def dead_tree_count(self, tx: Any = None) -> int:
        db = self.store.dead_trees
        return 0 if db is None else int((tx or self.store.tx).stat(db)["entries"])

    def reap_tree(self, tx: Any, chunk_id: bytes, children: set[bytes]) -> None:
        """A dead tree blob gives back its references to `children` (what its bytes name)
        and is freed, unless it was taken again since (a new snapshot named it)."""
        tx.delete(chunk_id, db=self.store.dead_trees)
        record = self.get(chunk_id, tx)
        if record is None or record.refcount > 0:
            return
        for child in children:
            if self.get(child, tx) is not None:  # fsck --repair may have dropped it
                self.release(tx, child)
        self._delete(tx, chunk_id, record)

    def drop_unused(self, tx: Any, chunk_id: bytes) -> None:
        """A chunk stored by a seal round that ended up unused (its range was rewritten)."""
        record = self.get(chunk_id, tx)
        if record is None or record.refcount > 0:
            return
        record.refcount = 1
        self.put(tx, chunk_id, record)
        self.release(tx, chunk_id)

    def free_frame(self, tx: Any, seg: int, offset: int, length: int) -> None:
        """Queue a frame's space for release once this change is durable."""
        self._queue_free(tx, seg, offset, length)
        if self._segment_delta(tx, seg, -length, -1):
            self._queue_free(tx, seg, 0, -1)

    def queue_free(self, tx: Any, seg: int, offset: int, length: int) -> None:
        """Give back a frame that no chunk record ever pointed at (once this is durable)."""
        self._queue_free(tx, seg, offset, length)

    def add_segment_frame(self, tx: Any, seg: int, length: int) -> None:
        """A frame written into an existing segment became live (promotion)."""
        self._segment_delta(tx, seg, length, 1)

    def _queue_free(self, tx: Any, seg: int, offset: int, length: int) -> None:
        self.pending_frees.append(PendingFree(self.store.commits, seg, offset, length))
        tx.put(_free_key(seg, offset), _I64.pack(length), db=self.store.frees)

    def forget_frees(self, done: list[PendingFree]) -> None:
        """The space of these frees is given back: drop their records."""
        with self.store.op() as tx:
            for f in done:
                tx.delete(_free_key(f.seg, f.offset), db=self.store.frees)

    def recorded_frees(self, tx: Any = None) -> list[PendingFree]:
        """Every free recorded in the index (at mount: all of them are durable)."""
        out = []
        with (tx or self.store.tx).cursor(db=self.store.frees) as cur:
            for key, value in cur:
                seg, offset = _FREE_KEY.unpack(bytes(key))
                out.append(PendingFree(-1, seg, offset, _I64.unpack(bytes(value))[0]))
        return out

    def referenced(self, tx: Any, delta: int) -> None:
        self._stats_delta(tx, referenced=delta)

    # -- segments

    def hot_live_bytes(self, tx: Any = None) -> int:
        """Bytes of the frames that live in hot segments (chunks moved to zones are not):
        what `hot.max_mb` limits."""
        total = 0
        with (tx or self.store.tx).cursor(db=self.store.segments) as cur:
            for _, value in cur:
                total += SegmentRecord.decode(bytes(value)).live_bytes
        return total

    def segment(self, seg: int, tx: Any = None) -> SegmentRecord | None:
        raw = (tx or self.store.tx).get(schema.ino_key(seg), db=self.store.segments)
        return None if raw is None else SegmentRecord.decode(bytes(raw))

    def put_segment(self, tx: Any, seg: int, record: SegmentRecord) -> None:
        tx.put(schema.ino_key(seg), record.encode(), db=self.store.segments)

    def _segment_delta(self, tx: Any, seg: int, nbytes: int, frames: int) -> bool:
        """Adjust a segment's live counts; True when an inactive segment became empty."""
        record = self.segment(seg, tx)
        if record is None:
            return False
        record.live_bytes += nbytes
        record.live_frames += frames
        if record.live_frames <= 0 and not record.active:
            tx.delete(schema.ino_key(seg), db=self.store.segments)
            return True
        self.put_segment(tx, seg, record)
        return False

    def retire_segment(self, tx: Any, seg: int) -> None:
        """The active segment is full: it takes no more appends."""
        record = self.segment(seg, tx)
        if record is None:
            return
        record.active = False
        if record.live_frames <= 0:
            tx.delete(schema.ino_key(seg), db=self.store.segments)
            self._queue_free(tx, seg, 0, -1)
        else:
            self.put_segment(tx, seg, record)

    # -- accounting

    def stats(self, tx: Any = None) -> ChunkStats:
        raw = (tx or self.store.tx).get(schema.K_CHUNK_STATS, db=self.store.meta)
        return ChunkStats(*_STATS.unpack(raw)) if raw else ChunkStats()

    def _stats_delta(
        self, tx: Any, chunks: int = 0, raw: int = 0, stored: int = 0, referenced: int = 0
    ) -> None:
        s = self.stats(tx)
        s.chunks += chunks
        s.raw_bytes += raw
        s.stored_bytes += stored
        s.referenced_bytes += referenced
        tx.put(
            schema.K_CHUNK_STATS,
            _STATS.pack(s.chunks, s.raw_bytes, s.stored_bytes, s.referenced_bytes),
            db=self.store.meta,
        )

    @contextlib.contextmanager
    def pin(self, seg: int, offset: int) -> Iterator[None]:
        """Keep a frame (and its segment) from being freed while a read uses it."""
        key = (seg, offset)
        self.pinned[key] += 1
        try:
            yield
        finally:
            self.pinned[key] -= 1
            if self.pinned[key] <= 0:
                del self.pinned[key]

    # -- frees after durable commits

    def take_durable_frees(self, durable_commits: int) -> list[PendingFree]:
        """Frees whose commit is durable and whose frame no read has pinned."""
        ready, keep = [], []
        pinned_segments = {seg for seg, _ in self.pinned}
        for f in self.pending_frees:
            busy = f.seg in pinned_segments if f.length < 0 else (f.seg, f.offset) in self.pinned
            if f.commit < durable_commits and not busy:
                ready.append(f)
            else:
                keep.append(f)
        self.pending_frees = keep
        return ready
