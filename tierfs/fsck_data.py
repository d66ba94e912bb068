"""`fsck` of the data path: extents, chunk records, reference counts, segments, accounting.

Leftover states and their repairs (docs/ARCHITECTURE.md, crash table):

* an extent of a missing inode -> removed (its chunk reference released);
* an extent pointing at a missing chunk -> data lost: reported with the file; --repair turns
  the range into a hole, so that the rest of the file reads;
* a chunk whose refcount differs from the extents, tree blobs and snapshots that use it ->
  refcount corrected;
* a chunk nothing uses (leaked, or held by a snapshot that a crash interrupted) -> record
  removed, frame punched; a tree blob nothing uses -> queued to be reaped at the next mount;
* a snapshot whose root blob is missing, or a tree blob that cannot be read -> reported (the
  snapshot is damaged); --repair deletes a snapshot record whose root is missing;
* a chunk copy outside its segment's committed end, or in a missing segment -> reported;
* a chunk with no local copy and no upstream record (so not evicted: lost) -> reported with
  the chunk; a tree blob with no local copy -> reported (trees are never evicted);
* segment live counts, inode data_bytes and the chunk counters -> recomputed;
* segment files the index does not know -> removed; bytes past a segment's end -> cut.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import TYPE_CHECKING

from tierfs import config
from tierfs.data.chunkstore import ChunkIndex
from tierfs.errors import TierfsError
from tierfs.meta import schema
from tierfs.meta.records import (
    FLAG_TREE,
    TIER_HOT,
    ChunkRecord,
    SegmentRecord,
    ZoneRecord,
    decode_extent,
)
from tierfs.snap.catalog import Catalog
from tierfs.snap.localchunks import LocalChunks
from tierfs.snap.refs import blob_children
from tierfs.tiers.cold import devspec
from tierfs.tiers.cold.record import record_len
from tierfs.tiers.hot import HotStore

if TYPE_CHECKING:
    from tierfs.fsck import Checker

_STATS = struct.Struct(">QQQQ")


class DataChecker:
    def __init__(self, checker: Checker) -> None:
        self.c = checker
        self.store = checker.store
        self.tx = checker.tx
        self.hot = HotStore(checker.staging.root.parent / "hot")
        self.uses: Counter[bytes] = Counter()
        self.referenced = 0
        self.chunks: dict[bytes, ChunkRecord] = {}
        self.unreadable_trees = 0
        self.segments: dict[int, SegmentRecord] = {}

    def run(self) -> None:
        self._load()
        self._check_extents()
        self._count_snapshot_refs()
        self._check_refcounts()
        self._check_copies()
        self._check_segments()
        self._check_zones()
        self._check_stats()

    def _load(self) -> None:
        with self.tx.cursor(db=self.store.chunks) as cur:
            for key, value in cur:
                self.chunks[bytes(key)] = ChunkRecord.decode(bytes(value))
        with self.tx.cursor(db=self.store.segments) as cur:
            for key, value in cur:
                self.segments[schema.key_ino(bytes(key))] = SegmentRecord.decode(bytes(value))

    def _check_extents(self) -> None:
        data_bytes: Counter[int] = Counter()
        doomed: list[tuple[bytes, str, str]] = []
        with self.tx.cursor(db=self.store.extents) as cur:
            for key, value in cur:
                ino = schema.key_ino(bytes(key))
                off = schema.unpack_u64(bytes(key), 8)
                chunk_id, _, length = decode_extent(bytes(value))
                if not self.c.known(ino):
                    doomed.append((bytes(key), f"extent of missing inode {ino}", "extent removed"))
                elif chunk_id not in self.chunks:
                    doomed.append(
                        (
                            bytes(key),
                            f"inode {ino}: bytes {off}..{off + length} are in missing chunk "
                            f"{chunk_id.hex()[:16]} (data lost)",
                            "range turned into a hole",
                        )
                    )
                else:
                    self.uses[chunk_id] += 1
                    self.referenced += length
                    data_bytes[ino] += length
        for key, problem, repair in doomed:
            if self.c._fix(problem, repair):
                self.tx.delete(key, db=self.store.extents)
        for ino, inode in self.c.inodes.items():
            if (
                inode.is_reg
                and inode.data_bytes != data_bytes[ino]
                and self.c._fix(
                    f"inode {ino}: data_bytes {inode.data_bytes}, extents hold {data_bytes[ino]}",
                    "data_bytes corrected",
                )
            ):
                inode.data_bytes = data_bytes[ino]
                self.store.put_inode(self.tx, inode)

    def _count_snapshot_refs(self) -> None:
        """Snapshots hold their root blob; every stored tree blob holds what it names."""
        if self.store.snapshots is None:
            return
        catalog = Catalog(self.store)
        for snap in list(catalog.records(self.tx)):
            if snap.root in self.chunks:
                self.uses[snap.root] += 1
            elif self.c._fix(
                f"snapshot {snap.snapshot_id}: root blob {snap.root.hex()[:16]} is missing",
                "snapshot record deleted",
            ):
                catalog.delete(self.tx, snap)
        data_dir = self.c.staging.root.parent
        with LocalChunks(data_dir, self.store, self.tx) as local:
            for chunk_id, record in self.chunks.items():
                if not record.flags & FLAG_TREE:
                    continue
                try:
                    children = blob_children(local.fetch(chunk_id))
                except TierfsError as exc:
                    self.c.result.add(f"tree blob {chunk_id.hex()[:16]}: {exc.message}")
                    self.unreadable_trees += 1
                    continue
                for child in children:
                    self.uses[child] += 1
                    if child not in self.chunks:
                        self.c.result.add(
                            f"tree blob {chunk_id.hex()[:16]} names missing chunk "
                            f"{child.hex()[:16]}: a snapshot is damaged"
                        )

    def _held_or_dead(self, chunk_id: bytes, db: object) -> bool:
        return db is not None and self.tx.get(chunk_id, db=db) is not None

    def _check_refcounts(self) -> None:
        if self.unreadable_trees:
            # What an unreadable blob names is unknown: lowering counts could free data a
            # snapshot still needs. Report, and leave the counts alone.
            self.c.result.add(
                f"{self.unreadable_trees} tree blobs cannot be read: reference counts are not "
                "checked (make the tier readable again, or delete the damaged snapshots)"
            )
            return
        index = ChunkIndex(self.store)
        for chunk_id, record in list(self.chunks.items()):
            used = self.uses[chunk_id]
            name = chunk_id.hex()[:16]
            if used == 0 and record.flags & FLAG_TREE:
                if not self._held_or_dead(chunk_id, self.store.dead_trees) and self.c._fix(
                    f"tree blob {name} is used by no snapshot", "queued to be reaped"
                ):
                    self.tx.put(chunk_id, b"", db=self.store.dead_trees)
                if record.refcount != 0 and self.c._fix(
                    f"tree blob {name}: refcount {record.refcount}, used by nothing",
                    "refcount corrected",
                ):
                    record.refcount = 0
                    index.put(self.tx, chunk_id, record)
            elif used == 0:
                held = self._held_or_dead(chunk_id, self.store.held)
                problem = (
                    f"chunk {name} was held by a snapshot that did not finish"
                    if held
                    else f"chunk {name} is used by no extent (leaked)"
                )
                if self.c._fix(problem, "chunk removed"):
                    if held:
                        self.tx.delete(chunk_id, db=self.store.held)
                    del self.chunks[chunk_id]
                    self.tx.delete(chunk_id, db=self.store.chunks)
                    for tier, seg, off in record.locations:
                        if tier == TIER_HOT:
                            self.hot.punch(seg, off, record.frame_len)
            elif record.refcount != used and self.c._fix(
                f"chunk {name}: refcount {record.refcount}, used {used} times",
                "refcount corrected",
            ):
                record.refcount = used
                index.put(self.tx, chunk_id, record)

    def _check_copies(self) -> None:
        """A chunk without a local copy must be evicted: durable upstream (its `upstream`
        record), and never a tree blob."""
        for chunk_id, record in self.chunks.items():
            if record.locations:
                continue
            name = chunk_id.hex()[:16]
            if record.flags & FLAG_TREE:
                self.c.result.add(f"tree blob {name} has no local copy")
            elif self.tx.get(chunk_id, db=self.store.upstream) is None:
                self.c.result.add(f"chunk {name} has no copy, local or upstream (data lost)")

    def _check_segments(self) -> None:
        live: Counter[int] = Counter()
        frames: Counter[int] = Counter()
        for chunk_id, record in self.chunks.items():
            for tier, seg, off in record.locations:
                if tier != TIER_HOT:
                    continue
                segment = self.segments.get(seg)
                if segment is None or off + record.frame_len > segment.end:
                    self.c.result.add(
                        f"chunk {chunk_id.hex()[:16]}: hot copy outside the committed part of "
                        f"segment {seg}"
                    )
                live[seg] += record.frame_len
                frames[seg] += 1
        index = ChunkIndex(self.store)
        for seg, seg_rec in self.segments.items():
            if (seg_rec.live_bytes, seg_rec.live_frames) != (
                live[seg],
                frames[seg],
            ) and self.c._fix(
                f"segment {seg}: live {seg_rec.live_bytes} bytes/{seg_rec.live_frames} frames, "
                f"chunks say {live[seg]}/{frames[seg]}",
                "live counts corrected",
            ):
                seg_rec.live_bytes, seg_rec.live_frames = live[seg], frames[seg]
                index.put_segment(self.tx, seg, seg_rec)
        for seg, path in list(self.hot.all_segments()):
            if seg not in self.segments:
                if self.c._fix(f"segment file {path.name} is not in the index", "file removed"):
                    path.unlink()
            elif path.stat().st_size > self.segments[seg].end and self.c._fix(
                f"segment {seg} holds bytes past its committed end", "cut at the committed end"
            ):
                self.hot.cut_to(seg, self.segments[seg].end)
        self.hot.close()

    def _check_zones(self) -> None:
        """Each zone's live bytes in DB_ZONES must be what the chunk records point at."""
        if self.store.zones is None:
            return
        live: Counter[int] = Counter()
        cold = [(cid, r) for cid, r in self.chunks.items() if r.cold_location() is not None]
        lba = self._zone_lba() if cold else 1
        if lba is None:
            self.c.result.add(
                f"{len(cold)} chunks have a cold copy, but no cold tier is configured "
                "(cold.device): their data cannot be read"
            )
            return
        for _, record in cold:
            where = record.cold_location()
            assert where is not None
            live[where[0]] += record_len(record.frame_len, lba)
        recorded: dict[int, ZoneRecord] = {}
        with self.tx.cursor(db=self.store.zones) as cur:
            for key, value in cur:
                recorded[schema.key_ino(bytes(key))] = ZoneRecord.decode(bytes(value))
        for zone in sorted(set(live) | set(recorded)):
            have = recorded.get(zone, ZoneRecord(0, 0))
            if have.live_bytes != live[zone] and self.c._fix(
                f"zone {zone}: {have.live_bytes} live bytes recorded, chunks say {live[zone]}",
                "live bytes corrected",
            ):
                have.live_bytes = live[zone]
                key = schema.ino_key(zone)
                if live[zone]:
                    self.tx.put(key, have.encode(), db=self.store.zones)
                else:
                    self.tx.delete(key, db=self.store.zones)

    def _zone_lba(self) -> int | None:
        data_dir = self.c.staging.root.parent
        spec = devspec.parse(config.load(data_dir).get("cold", "device"))
        if not spec.enabled:
            return None
        return devspec.lba_size(spec, data_dir / "cold")

    def _check_stats(self) -> None:
        raw = self.tx.get(schema.K_CHUNK_STATS, db=self.store.meta)
        found = _STATS.unpack(raw) if raw else (0, 0, 0, 0)
        expected = (
            len(self.chunks),
            sum(r.raw_len for r in self.chunks.values()),
            sum(r.frame_len for r in self.chunks.values()),
            self.referenced,
        )
        if found != expected and self.c._fix(
            f"chunk counters {found} differ from the index {expected}", "counters recomputed"
        ):
            self.tx.put(schema.K_CHUNK_STATS, _STATS.pack(*expected), db=self.store.meta)
