"""The mount daemon: one trio process serving FUSE plus its background tasks.

Start-up order matters and reads like the design:
lock the data directory -> load the config -> open the index -> recover crash leftovers ->
mount FUSE -> report ready -> serve (FUSE, committer, control socket) -> final commit ->
release the lock. `tierfs mount` runs this in a freshly started process (never a fork of a
process that has already set up trio or LMDB) and waits for the ready report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import logging.handlers
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from tierfs import config as config_mod
from tierfs import control, osutil, status
from tierfs.crashpoints import crash_point
from tierfs.data import domain as domain_mod
from tierfs.data.cache import ChunkCache
from tierfs.data.chunker import Chunker
from tierfs.data.chunkstore import ChunkIndex
from tierfs.data.coldtier import ColdPolicy, ColdTier
from tierfs.data.compactor import Compactor
from tierfs.data.evictor import Evictor, EvictPolicy, segment_mtime
from tierfs.data.extents import ExtentMap
from tierfs.data.keeper import Keeper
from tierfs.data.prefetcher import Prefetcher
from tierfs.data.prefetcher import status as prefetch_status
from tierfs.data.reader import FileReader
from tierfs.data.readthrough import ReadThrough
from tierfs.data.sealer import Sealer, SealPolicy
from tierfs.datadir import FSTYPE, DataDir, MountLock, mount_device
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.durability import Durability
from tierfs.fs.namespace import Namespace
from tierfs.fs.operations import TierfsOperations, activity
from tierfs.fs.recovery import mark_clean, recover
from tierfs.fs.staging import Staging
from tierfs.meta import schema
from tierfs.meta.store import MetaStore
from tierfs.snap import keys
from tierfs.snap.manager import SnapshotManager
from tierfs.snap.scheduler import Scheduler
from tierfs.tiers.cold import devspec
from tierfs.tiers.cold.errors import ColdFull
from tierfs.tiers.cold.zones import Lifetime
from tierfs.tiers.hot import HotStore
from tierfs.upstream.fetch import RegionReader
from tierfs.upstream.metered import MeteredStore
from tierfs.upstream.objectstore import StoreSettings, open_store
from tierfs.upstream.replicator import Replicator, ReplicatorSettings
from tierfs.upstream.state import UpstreamState

log = logging.getLogger(__name__)

READY_FD_ENV = "TIERFS_READY_FD"


@dataclass
class Daemon:
    data_dir: DataDir
    mountpoint: Path
    config: config_mod.Config
    store: MetaStore
    ns: Namespace
    durability: Durability
    ops: TierfsOperations
    hot: HotStore
    reader: FileReader
    sealer: Sealer
    compactor: Compactor
    cold: ColdTier | None
    snapshots: SnapshotManager
    replicator: Replicator | None
    scheduler: Scheduler
    evictor: Evictor | None = None
    keeper: Keeper | None = None
    prefetcher: Prefetcher | None = None

    async def handle_status(self, request: dict[str, Any]) -> dict[str, Any]:
        self.durability.commit()
        extra = {
            "mountpoint": str(self.mountpoint),
            "pid": os.getpid(),
            "metadata": {"commits": self.store.commits, "fsyncs": self.durability.fsyncs},
            "open_files": len(self.ops.handles),
            "errors": {
                "checksum": self.reader.checksum_errors,
                "io": self.reader.io_errors,
                "seal": self.sealer.failures,
            },
            "seal": {
                "rounds": self.sealer.rounds,
                "sealed_bytes": self.sealer.sealed_bytes,
                "compactions": self.compactor.compacted,
            },
            "cache": {
                "bytes": self.reader.cache.bytes,
                "hits": self.reader.cache.hits,
                "misses": self.reader.cache.misses,
            },
            "snapshots": {**self.snapshots.status(), "schedules": self.scheduler.status()},
            "upstream": self.replicator.status() if self.replicator else {"url": None},
            "eviction": self._eviction_status(),
        }
        doc = status.collect(self.data_dir, self.store, self.store.tx, True, extra)
        if self.cold is not None:
            doc["tiers"]["cold"] = self.cold.status()
        return {"status": doc}

    def _eviction_status(self) -> dict[str, Any]:
        if self.evictor is None or self.keeper is None or self.reader.region is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "local_bytes": self.evictor.local_bytes(),
            "capacity_bytes": self.evictor.policy.capacity,
            "high_pct": self.evictor.policy.high_pct,
            "low_pct": self.evictor.policy.low_pct,
            **dataclasses.asdict(self.evictor.counters),
            **dataclasses.asdict(self.keeper.counters),
            **dataclasses.asdict(self.reader.region.counters),
            "prefetching": self.prefetcher is not None,
            **prefetch_status(self.prefetcher),
        }

    async def handle_sync(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.durability.sync(None)
        return {}

    async def handle_flush(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.sealer.flush()
        return {"sealed_bytes": self.sealer.sealed_bytes}

    async def handle_drop_cache(self, request: dict[str, Any]) -> dict[str, Any]:
        self.reader.cache.drop()
        return {}

    async def handle_migrate(self, request: dict[str, Any]) -> dict[str, Any]:
        cold = self._need_cold()
        before = dataclasses.replace(cold.counters)
        if request.get("now"):
            await self.sealer.flush()
        while True:
            try:
                if request.get("now"):
                    await cold.migrate(None, Lifetime.LONG)
                else:
                    await cold.migrate(cold.due_segments(), Lifetime.LONG)
                break
            except ColdFull:
                # Zones emptied by earlier migrations' frees may be reset once durable.
                resets = cold.counters.zones_reset
                await self.durability.sync(None)
                await cold.reclaim()
                if cold.counters.zones_reset == resets:
                    raise
        return {
            "migrated_chunks": cold.counters.migrated_chunks - before.migrated_chunks,
            "migrated_bytes": cold.counters.migrated_bytes - before.migrated_bytes,
        }

    async def handle_zones(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"zones": self._need_cold().zones_report()}

    async def handle_reclaim(self, request: dict[str, Any]) -> dict[str, Any]:
        cold = self._need_cold()
        before = cold.counters.zones_reset
        for _ in range(2):  # the second pass resets what the first one relocated
            await self.durability.sync(None)
            await cold.reclaim()
        return {"zones_reset": cold.counters.zones_reset - before}

    def _need_cold(self) -> ColdTier:
        if self.cold is None:
            raise TierfsError(
                "this filesystem has no cold tier (cold.device is empty; see mkfs --zone-device)",
                ExitCode.CONFIG,
            )
        return self.cold

    async def handle_snapshot_create(self, request: dict[str, Any]) -> dict[str, Any]:
        record = await self.snapshots.create(request.get("name"), request.get("schedule"))
        return {"snapshot": record.to_json()}

    async def handle_upload(self, request: dict[str, Any]) -> dict[str, Any]:
        """`tierfs sync`: send queued snapshots now; with `wait`, until none is queued."""
        replicator = self.replicator
        if replicator is None:
            raise TierfsError(
                "this filesystem has no regional store (regional.url is empty; see mkfs "
                "--regional)",
                ExitCode.CONFIG,
            )
        replicator.kick()
        if not request.get("wait"):
            return {"queued": len(replicator.queued())}
        timeout = float(request.get("timeout_s", 3600.0))
        with trio.move_on_after(timeout):
            while replicator.queued() or not replicator.idle.is_set():
                await trio.sleep(0.1)
            return {"queued": 0, "sent": replicator.sent}
        raise TierfsError(
            f"{len(replicator.queued())} snapshots still queued after {timeout:g} s"
            + (f"; last error: {replicator.last_error}" if replicator.last_error else ""),
            ExitCode.TIMEOUT,
        )

    async def handle_evict(self, request: dict[str, Any]) -> dict[str, Any]:
        """`tierfs evict`: drop the local copies of chunks durable upstream, of everything
        or of some files; then make that durable so their space is given back."""
        if self.evictor is None:
            raise TierfsError(
                "this filesystem has no regional store to evict to (regional.url is empty; see "
                "mkfs --regional)",
                ExitCode.CONFIG,
            )
        inodes = request.get("inodes")
        result = await self.evictor.evict_files(None if inodes is None else map(int, inodes))
        await self.durability.sync(None)
        return {**result.as_dict(), "local_bytes": self.evictor.local_bytes()}

    async def handle_snapshot_list(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"snapshots": [r.to_json() for r in self.snapshots.list()]}

    async def handle_snapshot_delete(self, request: dict[str, Any]) -> dict[str, Any]:
        record = await self.snapshots.delete(str(request["key"]))
        return {"snapshot": record.to_json()}

    async def handle_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "mountpoint": str(self.mountpoint)}


def setup_logging(data_dir: DataDir, level: str, to_stderr: bool, site: str) -> None:
    data_dir.log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [site={site}] %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler: logging.Handler = logging.handlers.RotatingFileHandler(
        data_dir.log_file, maxBytes=16 << 20, backupCount=4
    )
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)


def tune_read_ahead(mountpoint: Path, kib: int) -> None:
    """Apply `mount.read_ahead_kb`; without the rights to (not root) the mount keeps the
    kernel's default, which is slower for large sequential reads but correct."""
    if not kib:
        return
    try:
        osutil.set_read_ahead(mount_device(mountpoint), kib)
    except OSError as exc:
        log.info("read-ahead stays at the kernel's default: %s", exc)


def fuse_options(data_dir: DataDir, config: config_mod.Config, extra: list[str]) -> set[str]:
    """FUSE mount options: ours, the config's, then the operator's -o (which win)."""
    options = set(pyfuse3.default_options)
    options |= {f"fsname={data_dir.root}", f"subtype={FSTYPE.split('.', 1)[1]}"}
    allow_other = config.get("mount", "allow_other") and os.geteuid() == 0
    for opt in extra:
        if opt == "noallow_other":
            allow_other = False
        elif opt == "allow_other":
            allow_other = True
        elif opt:
            options.add(opt)
    if allow_other:
        options.add("allow_other")
    return options


def open_daemon(
    data_dir: DataDir, mountpoint: Path, config: config_mod.Config, atime: str
) -> Daemon:
    store = MetaStore.open(
        data_dir.meta, preallocate_bytes=config.get("metadata", "preallocate_mb") << 20
    )
    domain = domain_mod.load(data_dir.domain)
    _check_domain(store, domain)
    staging = Staging(
        data_dir.staging,
        config.get("staging", "reserve_mb") << 20,
        config.get("staging", "max_mb") << 20,
    )
    chunks = ChunkIndex(store)
    extents = ExtentMap(store, chunks)
    hot = HotStore(data_dir.hot, config.get("hot", "segment_mb") << 20)
    patterns = tuple(p.strip() for p in config.get("seal", "fixed_chunking_patterns").split(","))
    ns = Namespace(store, staging, extents, atime, tuple(p for p in patterns if p))
    io_limiter = trio.CapacityLimiter(4)
    # Before recovery: deleting orphans frees chunks, and those in zones must leave the
    # zones' live bytes (the cold tier's hook on the chunk index).
    cold = _open_cold(data_dir, config, store, chunks, hot, io_limiter)
    recover(ns, hot, chunks)
    cpu_limiter = trio.CapacityLimiter(2)
    durability = Durability(
        ns,
        store,
        config.get("metadata", "commit_interval"),
        config.get("metadata", "max_batch_ops"),
        io_limiter,
    )
    cache = ChunkCache(config.get("cache", "chunk_cache_mb") << 20)
    reader = FileReader(ns, chunks, extents, hot, cache, cpu_limiter)
    policy = SealPolicy(
        quiet_period=config.get("seal", "quiet_period"),
        max_dirty_age=config.get("seal", "max_dirty_age"),
        staging_high_bytes=config.get("seal", "staging_high_mb") << 20,
        batch_bytes=config.get("seal", "batch_mb") << 20,
        stream_behind_bytes=config.get("seal", "stream_behind_mb") << 20,
        zstd_level=config.get("seal", "zstd_level"),
        hot_max_bytes=config.get("hot", "max_mb") << 20,
        idle_delay=config.get("seal", "idle_delay"),
    )
    sealer = Sealer(
        ns, chunks, extents, hot, Chunker(domain), durability, policy, cpu_limiter, io_limiter
    )
    sealer.activity = activity
    compactor = Compactor(
        sealer,
        reader,
        config.get("seal", "compact_min_extents"),
        config.get("seal", "compact_ratio"),
        domain.chunker.avg_size + domain.chunker.min_size,
    )
    ops = TierfsOperations(
        ns,
        reader,
        durability,
        str(data_dir.root),
        config.get("mount", "attr_timeout"),
        config.get("mount", "entry_timeout"),
        config.get("staging", "reserve_mb") << 20,
    )
    reader.cold = cold
    if cold is not None:
        cold.append_hot = sealer.append_frames
    snapshots = SnapshotManager(
        store,
        chunks,
        staging,
        sealer,
        durability,
        reader,
        sealer.chunker.content_id,
        config.get("seal", "zstd_level"),
        cpu_limiter,
    )
    ops.write_gate = snapshots.gate
    ops.attach_snapshots(snapshots.catalog, config)
    objects = _open_region(config)
    replicator = None
    if objects is not None:
        replicator = _open_replicator(
            data_dir, config, objects, store, chunks, reader, hot, durability, domain
        )
        snapshots.upstream = True
        snapshots.on_created = replicator.kick
    daemon = Daemon(
        data_dir,
        mountpoint,
        config,
        store,
        ns,
        durability,
        ops,
        hot,
        reader,
        sealer,
        compactor,
        cold,
        snapshots,
        replicator,
        Scheduler(snapshots, config.schedules),
    )
    if objects is not None:
        daemon.evictor, daemon.keeper = _open_eviction(daemon, objects)
        assert daemon.reader.region is not None
        if config.get("evict", "prefetch") and config.get("evict", "keep_fetched"):
            region, keeper = daemon.reader.region, daemon.keeper
            daemon.prefetcher = Prefetcher(chunks, region, keeper, daemon.evictor)
    return daemon


def _open_region(config: config_mod.Config) -> MeteredStore | None:
    """The regional store, or None without `regional.url`. Opening makes no request: a
    store that cannot be reached now only delays uploads and fails reads of evicted data."""
    url = config.get("regional", "url")
    if not url:
        return None
    inner = open_store(url, StoreSettings.from_config(config))
    return MeteredStore(inner, config.get("regional", "bandwidth_mbit") * 125_000)


def _open_eviction(daemon: Daemon, objects: MeteredStore) -> tuple[Evictor, Keeper]:
    """Eviction, read-through and the keeper of fetched frames, which need one another:
    reads fetch what eviction dropped, and the keeper asks eviction about the watermark."""
    config, store, chunks = daemon.config, daemon.store, daemon.reader.chunks
    upstream = UpstreamState(store)
    region = RegionReader(objects, daemon.sealer.chunker.content_id)
    daemon.reader.region = ReadThrough(upstream, region, config.get("regional", "read_timeout"))
    cold = daemon.cold
    policy = EvictPolicy(
        high_pct=config.get("evict", "high_pct"),
        low_pct=config.get("evict", "low_pct"),
        capacity=_local_capacity(daemon),
        interval=config.get("evict", "interval"),
    )
    last_access = cold.last_access if cold is not None else segment_mtime(daemon.hot.path)
    evictor = Evictor(store, chunks, daemon.reader.extents, upstream, cold, policy, last_access)
    keeper = Keeper(
        store, chunks, evictor, daemon.sealer.append_frames, config.get("evict", "keep_fetched")
    )
    daemon.reader.region.keep = keeper.offer
    daemon.reader.region.extra = daemon.reader.take_extra
    return evictor, keeper


def _local_capacity(daemon: Daemon) -> int:
    """`evict.capacity_mb`, or the hot tier's room (hot.max_mb, else the data disk) plus the
    cold device's capacity."""
    configured: int = daemon.config.get("evict", "capacity_mb") << 20
    if configured:
        return configured
    hot: int = daemon.config.get("hot", "max_mb") << 20
    if not hot:
        st = os.statvfs(daemon.data_dir.root)
        hot = st.f_blocks * st.f_frsize
    cold = sum(z["capacity"] for z in daemon.cold.zones_report()) if daemon.cold else 0
    return hot + cold


def _open_replicator(
    data_dir: DataDir,
    config: config_mod.Config,
    objects: MeteredStore,
    store: MetaStore,
    chunks: ChunkIndex,
    reader: FileReader,
    hot: HotStore,
    durability: Durability,
    domain: domain_mod.Domain,
) -> Replicator:
    """The regional store's replicator."""
    return Replicator(
        store,
        chunks,
        reader,
        hot,
        durability,
        objects,
        keys.load_site_keys(data_dir.root),
        domain,
        config,
        data_dir.root / "cache" / "region-index",
        ReplicatorSettings.from_config(config),
    )


def _open_cold(
    data_dir: DataDir,
    config: config_mod.Config,
    store: MetaStore,
    chunks: ChunkIndex,
    hot: HotStore,
    io_limiter: trio.CapacityLimiter,
) -> ColdTier | None:
    spec = devspec.parse(config.get("cold", "device"))
    if not spec.enabled:
        return None
    device = devspec.open_device(spec, data_dir.cold)
    hot_max = config.get("hot", "max_mb") << 20
    if not hot_max:
        st = os.statvfs(data_dir.root)
        hot_max = st.f_blocks * st.f_frsize
    policy = ColdPolicy(
        cold_after=config.get("cold", "cold_after"),
        hot_high_pct=config.get("cold", "hot_high_pct"),
        hot_low_pct=config.get("cold", "hot_low_pct"),
        batch_bytes=config.get("cold", "batch_mb") << 20,
        reserve_zones=config.get("cold", "reserve_zones"),
        min_garbage=config.get("cold", "min_garbage"),
        promote_on_read=config.get("cold", "promote_on_read"),
        hot_room=hot_max,
    )
    return ColdTier(store, chunks, hot, device, policy, io_limiter)


def _check_domain(store: MetaStore, domain: domain_mod.Domain) -> None:
    """A swapped domain file would silently name chunks differently: refuse it."""
    recorded = store.tx.get(schema.K_DOMAIN_ID, db=store.meta)
    if recorded is not None and bytes(recorded).decode() != domain.domain_id:
        raise TierfsError(
            f"domain.json is domain {domain.domain_id}, but this filesystem belongs to "
            f"{bytes(recorded).decode()}; restore its own domain file",
            ExitCode.CONFIG,
        )


def run(data_dir: DataDir, mountpoint: Path, options: list[str], foreground: bool) -> None:
    """Mount and serve until unmounted or signalled. Raises TierfsError before ready."""
    ready = ReadyPipe(int(os.environ.pop(READY_FD_ENV, "-1")))
    osutil.tune_malloc()
    lock = MountLock(data_dir)
    mounted = False
    daemon: Daemon | None = None
    try:
        lock.acquire()
        config = config_mod.load(data_dir.root)
        to_stderr = foreground and not ready.waiting
        setup_logging(data_dir, config.get("log", "level"), to_stderr, config.site)
        check_mountpoint(mountpoint)
        opts = fuse_options(data_dir, config, options)
        atime = "noatime" if "noatime" in opts else config.get("mount", "atime")
        daemon = open_daemon(data_dir, mountpoint, config, atime)
        try:
            pyfuse3.init(daemon.ops, str(mountpoint), opts)
        except RuntimeError as exc:
            raise TierfsError(
                f"{mountpoint}: FUSE mount failed: {exc}", ExitCode.MOUNT_FAILED
            ) from None
        mounted = True
        data_dir.pid_file.write_text(f"{os.getpid()}\n")
        log.info("mounted %s at %s (options %s)", data_dir.root, mountpoint, ",".join(sorted(opts)))
        trio.run(_serve, daemon, ready)
    except TierfsError as exc:
        log.error("mount failed: %s", exc.message)
        ready.report(f"ERR {int(exc.exit_code)} {exc.message}")
        raise
    except Exception as exc:
        log.exception("daemon failed")
        ready.report(f"ERR {int(ExitCode.INTERNAL)} internal error: {exc!r}")
        raise
    finally:
        ready.close()
        _shutdown(daemon, mounted)
        lock.release()


async def _serve(daemon: Daemon, ready: ReadyPipe) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            control.serve,
            daemon.data_dir.control_socket,
            {
                "status": daemon.handle_status,
                "sync": daemon.handle_sync,
                "flush": daemon.handle_flush,
                "drop_cache": daemon.handle_drop_cache,
                "migrate": daemon.handle_migrate,
                "zones": daemon.handle_zones,
                "reclaim": daemon.handle_reclaim,
                "snapshot_create": daemon.handle_snapshot_create,
                "snapshot_list": daemon.handle_snapshot_list,
                "snapshot_delete": daemon.handle_snapshot_delete,
                "upload": daemon.handle_upload,
                "evict": daemon.handle_evict,
                "ping": daemon.handle_ping,
            },
        )
        nursery.start_soon(daemon.durability.run)
        nursery.start_soon(daemon.sealer.run)
        nursery.start_soon(daemon.compactor.run)
        nursery.start_soon(daemon.snapshots.run_reaper)
        if daemon.replicator is not None:
            nursery.start_soon(daemon.replicator.run)
        if daemon.evictor is not None and daemon.keeper is not None:
            nursery.start_soon(daemon.evictor.run)
            nursery.start_soon(daemon.keeper.run)
        if daemon.prefetcher is not None:
            nursery.start_soon(daemon.prefetcher.run)
        nursery.start_soon(daemon.scheduler.run)
        if daemon.cold is not None:
            nursery.start_soon(daemon.cold.run)
        daemon.reader.prefetch = nursery
        nursery.start_soon(unmount_on_signals)
        nursery.start_soon(_when_serving, daemon, ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _when_serving(daemon: Daemon, ready: ReadyPipe) -> None:
    """Once the kernel has the daemon's INIT answer: tune read-ahead, then report ready.

    A stat of the mount point from a worker thread returns only after the loop has
    answered INIT; the kernel sets the mount's read-ahead while processing that answer, so
    tuning it any earlier would be undone.
    """
    with contextlib.suppress(OSError):
        await trio.to_thread.run_sync(os.stat, daemon.mountpoint)
    tune_read_ahead(daemon.mountpoint, daemon.config.get("mount", "read_ahead_kb"))
    ready.report("OK")
    _notify_systemd("READY=1")


async def unmount_on_signals() -> None:
    """SIGTERM, SIGINT or SIGHUP end the FUSE loop, which unmounts (also `restore mount`)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()


def _shutdown(daemon: Daemon | None, mounted: bool) -> None:
    """Make everything durable, unmount if still mounted, and close the index."""
    if daemon is not None:
        try:
            crash_point("shutdown-before-final-commit")
            _final_commit(daemon)
            daemon.ns.staging.close()
            daemon.hot.close()
            if daemon.cold is not None:
                daemon.cold.close()
            daemon.store.close()
        except Exception:
            log.exception("final commit failed; the next mount recovers")
    if mounted:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
    with contextlib.suppress(FileNotFoundError):
        if daemon is not None:
            daemon.data_dir.pid_file.unlink()
    log.info("daemon stopped")


def _final_commit(daemon: Daemon) -> None:
    """Everything durable, deferred frees done, and the index marked cleanly unmounted."""
    store = daemon.store
    try:
        daemon.ns.staging.take_sync_work().run()
    except OSError as exc:
        log.error("could not flush staging files at unmount (the index still commits): %s", exc)
    daemon.durability.commit()
    store.sync_meta()
    store.durable_commits = store.commits
    staging = daemon.ns.staging
    due = daemon.durability.take_unlinks() + staging.release_durable(store.durable_commits)
    unlinked = staging.unlinked_dirs | staging.unlink_files(due)
    daemon.sealer.free_durable_now()
    # Every removal must be durable before the index says "clean": a clean index skips the
    # scan for stray staging files at the next mount.
    staging.unsynced_dirs |= unlinked
    staging.unlinked_dirs = set()
    staging.take_sync_work().run()
    mark_clean(daemon.ns)
    store.commit()


def check_mountpoint(mountpoint: Path) -> None:
    try:
        if not mountpoint.is_dir():
            raise TierfsError(
                f"{mountpoint}: mount point is not a directory", ExitCode.MOUNT_FAILED
            )
    except OSError as exc:
        raise TierfsError(
            f"{mountpoint}: unusable mount point ({exc.strerror}); a dead mount? "
            f"try 'fusermount3 -u -z {mountpoint}'",
            ExitCode.MOUNT_FAILED,
        ) from None
    if os.path.ismount(mountpoint):
        raise TierfsError(f"{mountpoint}: something is already mounted there", ExitCode.BUSY)


class ReadyPipe:
    """The pipe on which `tierfs mount` waits for one line: "OK" or "ERR CODE MESSAGE".

    The first report closes it, so that nothing is ever written or closed twice (the fd
    number may belong to another file by then).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def waiting(self) -> bool:
        return self.fd >= 0

    def report(self, line: str) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, line.encode() + b"\n")
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _notify_systemd(state: str) -> None:
    """sd_notify without a dependency: a datagram to $NOTIFY_SOCKET, if systemd set one."""
    import socket

    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())
