"""Sending snapshots to the regional store: only what the region lacks, manifest last.

One background task (`run`) sends queued snapshots oldest first. Sending one reads like the
design (docs/ARCHITECTURE.md, "Replication"):

1. **Plan**: walk the snapshot's tree from its root, stopping at tree blobs already complete
   upstream (an unchanged subtree costs nothing); collect the tree blobs and data chunks not
   uploaded yet.
2. **Dedup against the region**: look the data chunks up in the region's index segments
   (`RegionIndex`: this site's earlier ones and every other site's of the dedup domain); a
   chunk found in another site's pack is read back and verified once, then counts as uploaded.
3. **Pack and upload** the rest, data chunks and tree blobs in packs of their own kinds: each
   pack's intent is recorded durably first, then the pack is put (name written once), then its
   chunks are marked uploaded and the intent removed, in one operation.
4. **Publish** this site's index segments for what it packed, then the domain's public part
   (once), then the signed **manifest**, last: everything it names is durable upstream by
   then. Its tree blobs are then marked complete and the snapshot `sent`.

A store that cannot be reached leaves the snapshot queued: the task backs off (doubling, up to
`MAX_BACKOFF`) and tries again; `tierfs sync` wakes it. The queue is bounded: beyond
`regional.queue_max` queued snapshots, the older queued snapshots of a schedule that has a newer
one queued are superseded (not sent; kept locally). Object-store calls run in worker threads
under the upload limiter; the index is only touched on the trio thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from tierfs import config as config_mod
from tierfs.crashpoints import crash_point
from tierfs.data.chunkstore import ChunkIndex
from tierfs.data.domain import Domain
from tierfs.data.reader import FileReader
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.durability import Durability
from tierfs.fs.namespace import FsError
from tierfs.meta import schema
from tierfs.meta.records import FLAG_TREE
from tierfs.meta.store import MetaStore
from tierfs.snap import manifest as manifest_mod
from tierfs.snap.catalog import DAMAGED, QUEUED, SENT, SUPERSEDED, Catalog, SnapshotRecord
from tierfs.snap.keys import SiteKeys
from tierfs.snap.refs import ordered_children
from tierfs.tiers.hot import HotStore
from tierfs.upstream import pack as packfmt
from tierfs.upstream import siteindex
from tierfs.upstream.congestion import Congestion
from tierfs.upstream.localstore import shares_filesystem
from tierfs.upstream.metered import MeteredStore
from tierfs.upstream.objectstore import ObjectExists, ObjectMissing, ObjectStoreError
from tierfs.upstream.state import UPLOADED, UpstreamState

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
IDLE_POLL = 30.0


@dataclasses.dataclass(frozen=True)
class ReplicatorSettings:
    pack_bytes: int
    uploads: int
    queue_max: int

    @classmethod
    def from_config(cls, config: config_mod.Config) -> ReplicatorSettings:
        return cls(
            pack_bytes=config.get("regional", "pack_mb") << 20,
            uploads=config.get("regional", "uploads"),
            queue_max=config.get("regional", "queue_max"),
        )


@dataclasses.dataclass
class Plan:
    """What one snapshot needs upstream that is not there: tree blobs, data chunks."""

    trees: list[bytes] = dataclasses.field(default_factory=list)
    data: list[bytes] = dataclasses.field(default_factory=list)
    walked: list[bytes] = dataclasses.field(default_factory=list)  # every tree blob visited


class SnapshotGone(Exception):
    """The snapshot being sent was deleted meanwhile."""


class SnapshotDamaged(Exception):
    """The snapshot names a chunk the index does not have (see tierfs fsck)."""


class Replicator:
    def __init__(
        self,
        store: MetaStore,
        chunks: ChunkIndex,
        reader: FileReader,
        hot: HotStore,
        durability: Durability,
        objects: MeteredStore,
        site: SiteKeys,
        domain: Domain,
        config: config_mod.Config,
        cache_dir: Path,
        settings: ReplicatorSettings,
    ) -> None:
        self.store = store
        self.chunks = chunks
        self.reader = reader
        self.hot = hot
        self.durability = durability
        self.objects = objects
        self.site = site
        self.domain = domain
        self.config = config
        self.settings = settings
        self.catalog = Catalog(store)
        self.state = UpstreamState(store)
        self.region = siteindex.RegionIndex(objects, cache_dir)
        self.limiter = trio.CapacityLimiter(settings.uploads)
        self.congestion = Congestion(self.limiter, settings.uploads)
        self.wake = trio.Event()
        self.idle = trio.Event()
        self.last_error: str | None = None
        self.backoff = 0.0
        self.sent = 0
        self.superseded = 0
        self.deduped_chunks = 0
        self.damaged = 0
        self._domain_published = False
        self.same_disk = _shares_disk(objects.url, cache_dir.parent.parent)

    # -- the task

    async def run(self) -> None:
        while True:
            self.wake = trio.Event()
            error = await self._attempt()
            if error is None:
                self.backoff, self.last_error = 0.0, None
                self.idle.set()
                wait = IDLE_POLL
            else:
                self.last_error = error
                self.backoff = min(max(1.0, self.backoff * 2), MAX_BACKOFF)
                log.warning("upload failed, retrying in %.0f s: %s", self.backoff, error)
                wait = self.backoff
            with trio.move_on_after(wait):
                await self.wake.wait()

    async def _attempt(self) -> str | None:
        """Settle packs an earlier attempt left in flight, then send the queue; returns
        what stopped it, if anything (a store that cannot be reached, most often)."""
        error: str | None = None
        try:
            await self._settle_intents()
            await self.send_queued()
        except* ObjectStoreError as group:
            error = str(group.exceptions[0])
        except* Exception as group:
            log.error("replication failed", exc_info=group.exceptions[0])
            error = f"internal error: {group.exceptions[0]!r}"
        return error

    def kick(self) -> None:
        """Send now (`tierfs sync`, a new snapshot)."""
        self.idle = trio.Event()
        self.wake.set()

    def queued(self) -> list[SnapshotRecord]:
        return [r for r in self.catalog.records() if r.upstream == QUEUED]

    async def send_queued(self) -> None:
        self._enforce_bound()
        while True:
            queue = self.queued()
            if not queue:
                return
            try:
                await self.send(queue[0])
            except SnapshotGone:
                log.info("snapshot %s was deleted before it was sent", queue[0].snapshot_id)
            except SnapshotDamaged as exc:
                self._mark(queue[0], DAMAGED)
                self.damaged += 1
                log.error("snapshot %s cannot be sent: %s", queue[0].snapshot_id, exc)

    def _enforce_bound(self) -> None:
        """Supersede older queued snapshots of a schedule with a newer one queued."""
        queue = self.queued()
        excess = len(queue) - self.settings.queue_max
        if excess <= 0:
            return
        newest: dict[str | None, int] = {}
        for r in queue:
            newest[r.schedule] = r.counter
        with self.store.op() as tx:
            for r in queue:
                if excess <= 0:
                    break
                if newest[r.schedule] != r.counter:
                    r.upstream = SUPERSEDED
                    self.catalog.put(tx, r)
                    self.superseded += 1
                    excess -= 1
                    log.warning("upload queue full: snapshot %s superseded", r.snapshot_id)

    # -- one snapshot

    async def send(self, record: SnapshotRecord) -> None:
        start = time.monotonic()
        plan = await self._plan(record)
        data = await self._dedup(plan.data)
        packed = await self._upload(packfmt.KIND_DATA, data)
        packed += await self._upload(packfmt.KIND_TREE, plan.trees)
        await self._publish_index()
        await self._publish_domain()
        self._current(record)  # deleted meanwhile: publish nothing
        await self._publish_manifest(record)
        with self.store.op() as tx:
            self.state.mark_complete(tx, plan.walked)
            self._mark(self._current(record, tx), SENT, tx)
        self.sent += 1
        log.info(
            "snapshot %s sent: %d trees and %d chunks new, %d packed, in %.1f s",
            record.snapshot_id,
            len(plan.trees),
            len(plan.data),
            packed,
            time.monotonic() - start,
        )

    def _mark(self, record: SnapshotRecord, state: str, tx: Any = None) -> None:
        with contextlib.ExitStack() as stack:
            if tx is None:
                tx = stack.enter_context(self.store.op())
            record.upstream = state
            self.catalog.put(tx, record)

    def _current(self, record: SnapshotRecord, tx: Any = None) -> SnapshotRecord:
        for r in self.catalog.records(tx):
            if r.counter == record.counter:
                return r
        raise SnapshotGone(record.snapshot_id)

    async def _plan(self, record: SnapshotRecord) -> Plan:
        """Tree blobs and data chunks the snapshot names that are not upstream yet."""
        plan, seen, stack = Plan(), set(), [record.root]
        while stack:
            blob_id = stack.pop()
            if blob_id in seen or self.state.complete(blob_id):
                continue
            seen.add(blob_id)
            await trio.lowlevel.checkpoint()  # loads from the cache do not yield
            self._current(record)
            try:
                blob = bytes(await self.reader.load_chunk(blob_id))
            except FsError:
                self._current(record)
                raise SnapshotDamaged(f"tree blob {blob_id.hex()[:16]} unreadable") from None
            plan.walked.append(blob_id)
            if not self.state.uploaded(blob_id):
                plan.trees.append(blob_id)
            trees = []
            for child in ordered_children(blob):
                chunk = self.chunks.get(child)
                if chunk is None:
                    self._current(record)
                    raise SnapshotDamaged(f"chunk {child.hex()[:16]} is not in the index")
                if chunk.flags & FLAG_TREE:
                    trees.append(child)
                elif child not in seen and not self.state.uploaded(child):
                    seen.add(child)
                    plan.data.append(child)
            stack.extend(reversed(trees))  # popped in the order the blob names them
        return plan

    async def _dedup(self, chunk_ids: list[bytes]) -> list[bytes]:
        """Chunks the region already holds (another site's, or ours from before a lost
        record) count as uploaded once read back and verified; returns the others."""
        if not chunk_ids:
            return []
        found = await trio.to_thread.run_sync(self.region.lookup, chunk_ids, limiter=self.limiter)
        verified = []
        for chunk_id, where in found.items():
            try:
                await trio.to_thread.run_sync(
                    packfmt.read_frame, self.objects, where.pack, where.entry, limiter=self.limiter
                )
            except (packfmt.PackError, ObjectMissing) as exc:
                log.warning(
                    "chunk %s in %s fails its check: %s", chunk_id.hex()[:16], where.pack, exc
                )
                continue
            verified.append((chunk_id, where))
        with self.store.op() as tx:
            for chunk_id, where in verified:
                self.state.mark(tx, chunk_id, where.pack, where.entry, UPLOADED)
        self.deduped_chunks += len(verified)
        done = {chunk_id for chunk_id, _ in verified}
        return [c for c in chunk_ids if c not in done]

    # -- packs

    async def _upload(self, kind: int, chunk_ids: list[bytes]) -> int:
        """Pack `chunk_ids` and upload the packs, `uploads` at a time; returns the count."""
        builder = packfmt.PackBuilder(kind, self.site.site_uuid, self.settings.pack_bytes)
        packs = 0
        async with trio.open_nursery() as nursery:
            for chunk_id in chunk_ids:
                builder.add(chunk_id, await self._frame(chunk_id))
                if builder.full:
                    await self._start_upload(nursery, builder)
                    builder = packfmt.PackBuilder(
                        kind, self.site.site_uuid, self.settings.pack_bytes
                    )
                    packs += 1
            if len(builder):
                await self._start_upload(nursery, builder)
                packs += 1
        return packs

    async def _frame(self, chunk_id: bytes) -> bytes:
        """The chunk's stored frame (compressed and checked as it is), hot or cold."""
        record = self.chunks.get(chunk_id)
        if record is None:  # its snapshot was deleted (and reaped) since the plan
            raise SnapshotGone(chunk_id.hex())
        hot = record.hot_location()
        if hot is not None:
            with self.chunks.pin(hot[0], hot[1]):
                return await trio.to_thread.run_sync(
                    self.hot.read, hot[0], hot[1], record.frame_len
                )
        cold = self.reader.cold
        where = record.cold_location()
        if cold is None or where is None:
            raise TierfsError(f"chunk {chunk_id.hex()[:16]} has no local copy", ExitCode.IO)
        with cold.pin(where[0]):
            return await trio.to_thread.run_sync(
                cold.read_frame, where[0], where[1], record.frame_len, chunk_id
            )

    async def _start_upload(self, nursery: trio.Nursery, builder: packfmt.PackBuilder) -> None:
        built = await trio.to_thread.run_sync(builder.finish, time.time_ns())
        with self.store.op() as tx:
            self.state.record_intent(tx, built.name, built.entries)
        await self.durability.sync(None)  # the intent is durable before the pack can land
        await self.limiter.acquire_on_behalf_of(built.name)
        nursery.start_soon(self._put_pack, built)

    async def _put_pack(self, built: packfmt.BuiltPack) -> None:
        try:
            await trio.sleep(self.objects.reserve(len(built.body)))
            started = time.monotonic()
            await trio.to_thread.run_sync(self.objects.put, built.name, built.body)
            self.congestion.observe(len(built.body), time.monotonic() - started)
        finally:
            self.limiter.release_on_behalf_of(built.name)
        crash_point("upload-after-pack")
        with self.store.op() as tx:
            self.state.land(tx, built.name, built.entries)

    async def _settle_intents(self) -> None:
        """Packs an interrupted attempt (or a crash) left between intent and landing: adopt
        those that are upstream (a put may land although its answer was lost), drop the
        others. Before anything is packed again, so that no chunk is packed twice."""
        for name, entries in list(self.state.intents()):
            size = await trio.to_thread.run_sync(self.objects.head, name, limiter=self.limiter)
            with self.store.op() as tx:
                if size is None:
                    self.state.drop_intent(tx, name)
                else:
                    self.state.land(tx, name, entries)
            log.info("pack %s %s", name, "adopted" if size else "dropped: it never landed")

    # -- publishing

    async def _publish_index(self) -> None:
        entries = self.state.pending_index()
        if not entries:
            return
        with self.store.op() as tx:
            seq = self.store.next_counter(tx, schema.K_NEXT_INDEX_SEQ)
        await self.durability.sync(None)  # a retry after a crash must not reuse the number
        segments = await trio.to_thread.run_sync(
            siteindex.encode_segments,
            self.site.site_uuid,
            self.site.epoch,
            seq,
            time.time_ns(),
            entries,
        )
        await self._put_all(segments)
        for name, body in segments.items():
            self.region.add(name, body)
        with self.store.op() as tx:
            self.state.indexed(tx, entries)

    async def _put_all(self, objects: dict[str, bytes]) -> None:
        async with trio.open_nursery() as nursery:
            for name, body in objects.items():
                nursery.start_soon(self._put, name, body)

    async def _put(self, name: str, body: bytes) -> None:
        await trio.sleep(self.objects.reserve(len(body)))
        await trio.to_thread.run_sync(self.objects.put, name, body, limiter=self.limiter)

    async def _publish_domain(self) -> None:
        """The domain's public part (id, chunker, signing key), once per store."""
        if self._domain_published:
            return
        doc = {
            "magic": "tierfs-domain-public",
            "format_version": 1,
            "domain_id": self.domain.domain_id,
            "name": self.domain.name,
            "chunker": dataclasses.asdict(self.domain.chunker),
            "domain_public_key": self.site.certificate.domain_public_key.hex(),
        }
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        await self._put(f"domains/{self.domain.domain_id}/domain.json", body)
        self._domain_published = True

    async def _publish_manifest(self, record: SnapshotRecord) -> None:
        parent = self._last_sent()
        manifest = manifest_mod.Manifest.create(
            self.site,
            snapshot_id=record.snapshot_id,
            counter=record.counter,
            root=record.root.hex(),
            time_ns=record.time_ns,
            schedule=record.schedule,
            name=record.name,
            parent=parent,
            config=self.config,
            stats={**record.stats, "paths": record.paths or ["/"]},
        )
        signed = manifest_mod.sign(manifest, self.site)
        crash_point("upload-before-manifest")
        try:
            await self._put(manifest.object_name, signed.encode())
        except ObjectExists:
            await self._accept_published(manifest)

    async def _accept_published(self, manifest: manifest_mod.Manifest) -> None:
        """A manifest of this name is upstream already: an earlier try that landed (its
        parent or settings may differ since). It is this snapshot if it verifies and names
        the same snapshot and root; anything else is a real conflict."""
        body = await trio.to_thread.run_sync(
            self.objects.get, manifest.object_name, limiter=self.limiter
        )
        there = manifest_mod.verify(body, self.site.certificate.domain_public_key)
        if (there.snapshot_id, there.root) != (manifest.snapshot_id, manifest.root):
            raise TierfsError(
                f"{manifest.object_name} upstream names another snapshot or tree",
                ExitCode.IO,
            )

    def _last_sent(self) -> str | None:
        last = None
        for r in self.catalog.records():
            if r.upstream == SENT:
                last = r.snapshot_id
        return last

    # -- status

    def status(self) -> dict[str, Any]:
        queue = self.queued()
        doc: dict[str, Any] = {
            "url": self.objects.url,
            "queue": {
                "snapshots": len(queue),
                "oldest": queue[0].snapshot_id if queue else None,
                "max": self.settings.queue_max,
            },
            "sent": self.sent,
            "superseded": self.superseded,
            "damaged": self.damaged,
            "deduped_chunks": self.deduped_chunks,
            "last_error": self.last_error,
            "backoff_s": self.backoff,
            "uploads_allowed": int(self.limiter.total_tokens),
            "congestion_backoffs": self.congestion.backoffs,
            "last_sent": self._last_sent_by_schedule(),
            "alarms": self._alarms(len(queue)),
        }
        doc.update(self.objects.status())
        return doc

    def _last_sent_by_schedule(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.catalog.records():
            if r.upstream == SENT:
                out[r.schedule or "manual"] = {"snapshot_id": r.snapshot_id, "time_ns": r.time_ns}
        return out

    def _alarms(self, queued: int) -> list[str]:
        alarms = []
        if queued >= self.settings.queue_max:
            alarms.append(f"upload queue full ({queued} snapshots): older ones are superseded")
        if self.last_error:
            alarms.append(f"regional store unreachable: {self.last_error}")
        if self.same_disk:
            alarms.append(
                "the regional store is a directory on the data directory's filesystem: it "
                "guards against mistakes, not against the loss of the disk"
            )
        return alarms


def _shares_disk(url: str, data_dir: Path) -> bool:
    """Whether a `file://` store lives on the data directory's filesystem."""
    if not url.startswith("file://"):
        return False
    return shares_filesystem(Path(urlsplit(url).path), data_dir)
