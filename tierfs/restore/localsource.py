"""A data directory as a restore source: its catalog's snapshots, chunks from its hot and
cold tiers, and from its regional store those evicted or damaged locally.

Kept apart from `source` because it needs the tiers' and the metadata's modules, which a
restore from a store URL never uses (and should not pay for importing).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tierfs import config
from tierfs.data import domain as domain_mod
from tierfs.datadir import DataDir
from tierfs.errors import ExitCode, TierfsError
from tierfs.meta.records import ChunkRecord
from tierfs.meta.store import MetaStore
from tierfs.restore.region import ChunkError, PackRead, decode_checked
from tierfs.restore.source import Job, SnapshotInfo, Source
from tierfs.snap import keys
from tierfs.snap.catalog import Catalog
from tierfs.snap.localchunks import LocalChunks
from tierfs.upstream.objectstore import StoreSettings, open_store
from tierfs.upstream.siteindex import Location
from tierfs.upstream.state import UpstreamState

log = logging.getLogger(__name__)

LOCAL_BATCH = 32  # chunks per job read from the local tiers


class DataDirSource(Source):
    """The local catalog and tiers of a data directory, with its regional store behind them."""

    def __init__(self, dd: DataDir, workers: int) -> None:
        cfg = config.load(dd.root)
        domain = domain_mod.load(dd.domain)
        url = cfg.get("regional", "url")
        store = open_store(url, StoreSettings.from_config(cfg)) if url else None
        super().__init__(str(dd.root), domain, store, workers)
        self.site_name = cfg.site
        self.meta = MetaStore.open(dd.meta, readonly=True)
        with self.meta.reader() as tx:
            self.site_uuid = str(self.meta.info(tx)["uuid"])
        self.epoch = _site_epoch(dd.root)
        self._local = LocalChunks(dd.root, self.meta, None)
        self._cold_lock = threading.Lock()
        self._upstream = UpstreamState(self.meta)

    def _list_snapshots(self) -> list[SnapshotInfo]:
        with self.meta.reader() as tx:
            records = list(Catalog(self.meta).records(tx))
        return [
            SnapshotInfo(
                site_name=self.site_name,
                site_uuid=self.site_uuid,
                epoch=self.epoch,
                counter=r.counter,
                snapshot_id=r.snapshot_id,
                name=r.name,
                time_ns=r.time_ns,
                schedule=r.schedule,
                root=r.root,
                verified=True,
                error=None,
                manifest=None,
                object_name=None,
                stats=dict(r.stats),
                paths=r.paths,
            )
            for r in records
        ]

    def read_jobs(self, chunk_ids: Iterable[bytes]) -> list[Job]:
        """Local chunks in batches; evicted ones from their packs, in runs."""
        local: list[bytes] = []
        reads: list[PackRead] = []
        unknown: list[bytes] = []
        with self.meta.reader() as tx:
            for chunk_id in dict.fromkeys(chunk_ids):
                record = self._record(tx, chunk_id)
                if record is not None and record.locations:
                    local.append(chunk_id)
                    continue
                read = self._pack_read(tx, chunk_id)
                if read is not None and self.store is not None:
                    reads.append(read)
                else:
                    unknown.append(chunk_id)
        jobs = [
            self._bind_local(local[i : i + LOCAL_BATCH]) for i in range(0, len(local), LOCAL_BATCH)
        ]
        return jobs + self._remote_jobs(reads, unknown)

    def _bind_local(self, chunk_ids: list[bytes]) -> Job:
        return lambda: [(c, self._read_local(c)) for c in chunk_ids]

    def _record(self, tx: Any, chunk_id: bytes) -> ChunkRecord | None:
        raw = tx.get(chunk_id, db=self.meta.chunks)
        return None if raw is None else ChunkRecord.decode(bytes(raw))

    def _read_local(self, chunk_id: bytes) -> bytes | memoryview | TierfsError:
        """A chunk from the hot or cold tier; from upstream if the local copy is bad."""
        with self.meta.reader() as tx:
            record = self._record(tx, chunk_id)
            result = self._read_tiers(tx, chunk_id, record)
        if not isinstance(result, TierfsError) or self.store is None:
            return result
        log.warning("%s; trying the regional store", result.message)
        with self.meta.reader() as tx:
            read = self._pack_read(tx, chunk_id)
        jobs = self._remote_jobs([read], []) if read else self._remote_jobs([], [chunk_id])
        ((_, remote),) = [r for job in jobs for r in job()]
        return result if isinstance(remote, TierfsError) else remote

    def _pack_read(self, tx: Any, chunk_id: bytes) -> PackRead | None:
        """Where this site put the chunk upstream (its `upstream` record), if it did."""
        if self.meta.upstream is None:
            return None
        up = self._upstream.get(chunk_id, tx)
        return None if up is None else PackRead(chunk_id, up.pack, up.offset, up.length, up.raw_len)

    def _read_tiers(
        self, tx: Any, chunk_id: bytes, record: ChunkRecord | None
    ) -> bytes | memoryview | TierfsError:
        if record is None:
            return ChunkError(chunk_id, "not in the index (freed meanwhile?)", ExitCode.IO)
        hot = record.hot_location()
        try:
            if hot is not None:
                raw = self._local.hot.read(hot[0], hot[1], record.frame_len)
                where = f"hot segment {hot[0]}"
                return decode_checked(raw, chunk_id, record.raw_len, self.content_id, where)
            with self._cold_lock:
                self._local.tx = tx
                plain = self._local.fetch(chunk_id)
        except OSError as exc:
            return ChunkError(chunk_id, f"unreadable: {exc}", ExitCode.IO)
        except TierfsError as exc:
            return ChunkError(chunk_id, exc.message, exc.exit_code)
        if self.content_id(plain) != chunk_id:
            detail = "cold copy does not match its id"
            return ChunkError(chunk_id, detail, ExitCode.VERIFY_FAILED)
        return plain

    def locate(self, chunk_ids: Iterable[bytes]) -> dict[bytes, Location]:
        """This site's upstream records first (no listing needed), the region's index next."""
        found: dict[bytes, Location] = {}
        rest: list[bytes] = []
        with self.meta.reader() as tx:
            for chunk_id in chunk_ids:
                up = self._upstream.get(chunk_id, tx) if self.meta.upstream is not None else None
                if up is None:
                    rest.append(chunk_id)
                    continue
                found[chunk_id] = Location(
                    chunk_id,
                    self.site_uuid,
                    up.pack,
                    up.offset,
                    up.length,
                    up.raw_len,
                    0,
                    self.epoch,
                    0,
                )
        return found | super().locate(rest)

    def close(self) -> None:
        self._local.close()
        self.meta.env.close()
        super().close()


def _site_epoch(data_dir: Path) -> int:
    """The site's certified epoch (1 when its keys cannot be read: listings only)."""
    try:
        return keys.load_site_keys(data_dir).epoch
    except TierfsError:
        return 1
