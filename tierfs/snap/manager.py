"""Taking, listing and deleting snapshots in the daemon, and giving back what they held.

`create` reads like the design: hold chunk frees -> capture a point in time (writes paused
briefly, `capture`) -> build the tree from that commit in a worker thread -> store the blobs
that are new as chunks (durable first) -> one operation takes the blobs' references, the
snapshot's reference on its root and records the snapshot -> frees resume.

Retention is hierarchical (`tierfs.snap.refs`): deleting a snapshot gives back its one
reference on the root blob; a tree blob whose count reaches zero is queued in DB_DEAD_TREES,
and `reap` reads it, gives back its own references and frees it, one blob per operation,
so deleting a snapshot costs work in proportion to what only it held.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from tierfs.crashpoints import crash_point
from tierfs.data import frame
from tierfs.data.chunkstore import ChunkIndex
from tierfs.data.reader import FileReader
from tierfs.data.sealer import Sealer
from tierfs.data.sealwork import Placed
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.durability import Durability
from tierfs.fs.namespace import FsError
from tierfs.fs.staging import Staging
from tierfs.meta import schema
from tierfs.meta.records import FLAG_TREE, TIER_HOT, ChunkRecord
from tierfs.meta.store import MetaStore
from tierfs.snap import tree as tree_mod
from tierfs.snap.capture import Capture, WriteGate, capture
from tierfs.snap.catalog import QUEUED, Catalog, SnapshotRecord, make_snapshot_id
from tierfs.snap.refs import blob_children

log = logging.getLogger(__name__)

REAP_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Label:
    """What a snapshot is called and covers: --name, its schedule, and its paths."""

    name: str | None = None
    schedule: str | None = None
    paths: list[bytes] | None = None

    def shown_paths(self) -> list[str] | None:
        if self.paths is None:
            return None
        return ["/" + p.decode(errors="replace") for p in self.paths]


class SnapshotManager:
    """The daemon's snapshots. One snapshot operation runs at a time (`lock`)."""

    def __init__(
        self,
        store: MetaStore,
        chunks: ChunkIndex,
        staging: Staging,
        sealer: Sealer,
        durability: Durability,
        reader: FileReader,
        content_id: Callable[[bytes], bytes],
        zstd_level: int,
        cpu_limiter: trio.CapacityLimiter,
    ) -> None:
        self.store = store
        self.chunks = chunks
        self.staging = staging
        self.sealer = sealer
        self.durability = durability
        self.reader = reader
        self.content_id = content_id
        self.zstd_level = zstd_level
        self.cpu_limiter = cpu_limiter
        self.catalog = Catalog(store)
        self.gate = WriteGate()
        self.lock = trio.Lock()
        self.upstream = False  # set when a regional store is configured
        self.on_created: Callable[[], None] | None = None  # the replicator's kick
        self.created = 0
        self.deleted = 0
        self.reaped = 0
        self.last_pause_ns = 0
        self.max_pause_ns = 0
        self.wake_reaper = trio.Event()
        self.started = time.time()
        self.unreapable: set[bytes] = set()

    # -- create

    async def create(
        self,
        name: str | None = None,
        schedule: str | None = None,
        paths: list[bytes] | None = None,
    ) -> SnapshotRecord:
        """Take a snapshot of the whole filesystem, or of `paths` (see `build_tree`)."""
        async with self.lock:
            with self.chunks.hold():
                taken = await capture(
                    self.store, self.staging, self.sealer, self.durability, self.gate
                )
                self._note_pause(taken.pause_ns)
                crash_point("snapshot-after-capture")
                try:
                    old_cache = self.catalog.load_cache() if self.catalog.cache_owner() else {}
                    result, blobs = await trio.to_thread.run_sync(
                        self._build, taken, old_cache, paths, limiter=self.cpu_limiter
                    )
                finally:
                    taken.txn.abort()
                label = Label(name, schedule, paths)
                record = await self._store(taken, result, blobs, old_cache, label)
            # Durable before it is acknowledged (and before the replicator may publish it).
            await self.durability.sync(None)
        self.created += 1
        if self.on_created is not None:
            self.on_created()
        log.info(
            "snapshot %s taken: %d files, %d new blobs, writes paused %.1f ms",
            record.snapshot_id,
            result.stats.files,
            result.stats.blobs_new,
            taken.pause_ns / 1e6,
        )
        return record

    def _note_pause(self, pause_ns: int) -> None:
        self.last_pause_ns = pause_ns
        self.max_pause_ns = max(self.max_pause_ns, pause_ns)

    def _build(
        self,
        taken: Capture,
        old_cache: dict[int, tuple[bytes, bytes]],
        paths: list[bytes] | None,
    ) -> tuple[tree_mod.TreeResult, dict[bytes, bytes]]:
        """Build the tree of the captured commit (worker thread); blobs in emission order."""
        blobs: dict[bytes, bytes] = {}
        view = tree_mod.LmdbIndexView(self.store, taken.txn)
        result = tree_mod.build_tree(
            view, old_cache, content_id=self.content_id, sink=blobs.__setitem__, paths=paths
        )
        return result, blobs

    async def _store(
        self,
        taken: Capture,
        result: tree_mod.TreeResult,
        blobs: dict[bytes, bytes],
        old_cache: dict[int, tuple[bytes, bytes]],
        label: Label,
    ) -> SnapshotRecord:
        missing = [blob_id for blob_id in blobs if self.chunks.get(blob_id) is None]
        frames = await trio.to_thread.run_sync(
            self._frames, [(i, blobs[i]) for i in missing], limiter=self.cpu_limiter
        )
        box: list[SnapshotRecord] = []

        def install(tx: Any, placed: list[Placed]) -> None:
            fresh = self._insert_blobs(tx, placed)
            self._take_refs(tx, blobs, fresh)
            self.chunks.add_ref(tx, result.root_id)
            box.append(self._record(tx, taken, result, label))
            self.catalog.save_cache(tx, box[0].counter, old_cache, result.cache)
            crash_point("snapshot-after-install")

        await self.sealer.append_frames(frames, install)
        return box[0]

    def _frames(self, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        return [frame.encode(blob_id, blob, self.zstd_level)[0] for blob_id, blob in items]

    def _insert_blobs(self, tx: Any, placed: list[Placed]) -> set[bytes]:
        """Chunk records for the blobs just written; returns their ids. One that appeared
        meanwhile (a file sealed with the very same bytes) keeps its record: the copy just
        written is given back."""
        fresh = set()
        for p in placed:
            if self.chunks.get(p.chunk_id, tx) is not None:
                self.chunks.queue_free(tx, p.seg, p.offset, p.frame_len)
                continue
            record = ChunkRecord(
                0, p.raw_len, p.frame_len, p.codec, [(TIER_HOT, p.seg, p.offset)], FLAG_TREE
            )
            self.chunks.insert(tx, p.chunk_id, record)
            fresh.add(p.chunk_id)
        return fresh

    def _take_refs(self, tx: Any, blobs: dict[bytes, bytes], fresh: set[bytes]) -> None:
        """Each blob not yet holding its children's references takes them, children first
        (blobs come bottom-up). A tree record holds them for as long as it exists, so a
        blob stored before is skipped, unless it was stored as file data (equal bytes)."""
        for blob_id, blob in blobs.items():
            record = self.chunks.get(blob_id, tx)
            if record is None:
                raise TierfsError(f"tree blob {blob_id.hex()[:16]} is missing", ExitCode.INTERNAL)
            if blob_id not in fresh and record.flags & FLAG_TREE:
                continue
            if not record.flags & FLAG_TREE:
                record.flags |= FLAG_TREE
                self.chunks.put(tx, blob_id, record)
            for child in blob_children(blob):
                self.chunks.add_ref(tx, child)

    def _record(
        self,
        tx: Any,
        taken: Capture,
        result: tree_mod.TreeResult,
        label: Label,
    ) -> SnapshotRecord:
        counter = self.store.next_counter(tx, schema.K_NEXT_SNAPSHOT)
        latest = self.catalog.latest(tx)
        record = SnapshotRecord(
            counter=counter,
            snapshot_id=make_snapshot_id(taken.time_ns, counter, label.name or label.schedule),
            time_ns=taken.time_ns,
            root=result.root_id,
            name=label.name,
            schedule=label.schedule,
            paths=label.shown_paths(),
            parent=latest.snapshot_id if latest else None,
            pause_ns=taken.pause_ns,
            upstream=QUEUED if self.upstream else "local",
            stats=result.stats.as_dict(),
        )
        self.catalog.put(tx, record)
        return record

    # -- list and delete

    def list(self) -> list[SnapshotRecord]:
        return list(self.catalog.records())

    async def delete(self, key: str) -> SnapshotRecord:
        async with self.lock:
            with self.store.op() as tx:
                record = self.catalog.find(key, tx)
                self.catalog.delete(tx, record)
                if self.chunks.get(record.root, tx) is not None:  # fsck may have dropped it
                    self.chunks.release(tx, record.root)
        self.deleted += 1
        self.wake_reaper.set()
        log.info("snapshot %s deleted", record.snapshot_id)
        return record

    # -- giving back what deleted snapshots held

    async def run_reaper(self) -> None:
        """Background task: reap dead tree blobs whenever there are some."""
        while True:
            self.wake_reaper = trio.Event()
            try:
                while await self.reap(REAP_BATCH):
                    pass
            except Exception:
                log.exception("reaping deleted snapshots failed; retried later")
                await trio.sleep(5)
            with trio.move_on_after(60):
                await self.wake_reaper.wait()

    async def reap(self, limit: int) -> int:
        """Free up to `limit` dead tree blobs; returns how many were handled. A blob that
        cannot be read is skipped (and counted in `unreapable`) rather than blocking the
        others: what it holds stays held until it reads again (fsck reports it)."""
        done = 0
        candidates = self.chunks.dead_trees(limit + len(self.unreapable))
        for blob_id in [b for b in candidates if b not in self.unreapable][:limit]:
            try:
                blob = await self.reader.load_chunk(blob_id)
                children = blob_children(bytes(blob))
            except (FsError, TierfsError) as exc:
                self.unreapable.add(blob_id)
                log.error("deleted snapshot's tree blob %s unreadable: %s", blob_id.hex()[:16], exc)
                continue
            async with self.lock:
                with self.store.op() as tx:
                    self.chunks.reap_tree(tx, blob_id, children)
                crash_point("reap-after-tree")
            done += 1
        self.reaped += done
        return done

    def status(self) -> dict[str, Any]:
        records = self.list()
        return {
            "count": len(records),
            "latest": records[-1].snapshot_id if records else None,
            "latest_time_ns": records[-1].time_ns if records else None,
            "created": self.created,
            "deleted": self.deleted,
            "trees_reaped": self.reaped,
            "dead_trees": self.chunks.dead_tree_count(),
            "unreapable_trees": len(self.unreapable),
            "last_pause_ms": round(self.last_pause_ns / 1e6, 3),
            "max_pause_ms": round(self.max_pause_ns / 1e6, 3),
            "now_ns": time.time_ns(),
        }
