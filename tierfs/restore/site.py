"""`tierfs restore site`: rebuild a lost site on a new machine, metadata first.

The site's snapshot tree is turned into a fresh index (`site_tree.TreeRestorer`) without
reading any file data: every chunk the files use is recorded as **evicted**, a chunk record
with its sizes and reference count but no local copy, plus an `upstream` record saying where
the region holds its frame. The filesystem can be mounted as soon as the index is written;
file data comes from the region when it is read.

What the rebuilt data directory holds, and why:

- `tierfs.toml`: the site's policies from the manifest's `config` (a manifest never carries
  credentials), with the store URL, endpoint and credentials of this command, the site name
  given, and a cold device made here (the old machine's device path means nothing here);
- `domain.json` and the keys from the recovery bundle. The bundle must hold the site key: a
  site is its key (its UUID names its objects upstream), so a domain-only bundle is refused;
- a **new epoch**: the site key is certified again under an epoch above every epoch the site
  ever published (the manifest's, the bundle's, and any in the names of its manifests and
  index segments upstream), so that nothing the rebuilt site publishes can reuse an object
  name of the old machine, even if the old machine published after the snapshot restored;
- the index: the snapshot's inodes, entries, cookies, xattrs, symlinks and extents; evicted
  chunk records; the chunk counters (an evicted chunk counts in all four: `stored_bytes` is
  the frame bytes wherever they are, the region included);
  `fs_uuid` set to the site UUID; `next_snapshot` after the highest counter the site
  published; and the upstream state, so that the next sync sends nothing the region has.

Upstream state: every data chunk is UPLOADED at the location the region's index gives. The
restored snapshot's tree blobs get UPLOADED | COMPLETE records although they are not in the
local chunk index: a verified manifest is published only after everything its tree names is
durable upstream, so COMPLETE is true of them. The replicator consults it by id when it
walks the tree of a later snapshot: a directory that did not change since encodes to the
same blob (ctime and hard-link numbers are kept, see `site_tree`), and the walk stops there
instead of sending the subtree again. They are not made chunk records: no local snapshot
names them (the catalog starts empty), and a record without a reference would be a leak to
fsck.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from tierfs import config as config_mod
from tierfs.data import domain as domain_mod
from tierfs.data import frame
from tierfs.data.chunker import Chunker
from tierfs.datadir import DataDir, is_locked
from tierfs.errors import ExitCode, TierfsError
from tierfs.meta import schema
from tierfs.meta.records import ChunkRecord
from tierfs.meta.store import MetaStore
from tierfs.restore.site_tree import BatchWriter, Progress, TreeRestorer, TreeResult, TreeStats
from tierfs.snap import keys
from tierfs.snap import manifest as manifest_mod
from tierfs.tiers.cold import devspec
from tierfs.upstream import siteindex
from tierfs.upstream.objectstore import ObjectStore
from tierfs.upstream.siteindex import Location
from tierfs.upstream.state import COMPLETE, UPLOADED, UpstreamState

log = logging.getLogger(__name__)

LIST_WORKERS = 16
_STATS = struct.Struct(">QQQQ")  # the chunk counters (tierfs.data.chunkstore)
_ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class SnapshotInfoLike(Protocol):
    """What `Source.pick` answers (tierfs.restore.source.SnapshotInfo)."""

    @property
    def snapshot_id(self) -> str: ...

    @property
    def manifest(self) -> manifest_mod.Manifest | None: ...

    @property
    def verified(self) -> bool: ...


class SourceLike(Protocol):
    """What the rebuild needs of a regional source (tierfs.restore.source.Source)."""

    @property
    def store(self) -> ObjectStore | None: ...

    def fetch(self, chunk_id: bytes) -> bytes: ...

    def locate(self, chunk_ids: Iterable[bytes]) -> Mapping[bytes, Location]: ...


@dataclasses.dataclass(frozen=True)
class SiteOptions:
    """The command's choices: where, which site, and the store settings of this machine."""

    data_dir: Path
    site: str
    url: str
    zone_device: str = "emulated:auto"
    endpoint: str | None = None  # None: the manifest's
    region: str | None = None  # None: the manifest's
    profile: str | None = None  # None: the manifest's
    force: bool = False
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(os.environ))


@dataclasses.dataclass
class SiteResult:
    """What a rebuild did, for the command's report."""

    data_dir: Path
    site_uuid: str
    snapshot_id: str
    epoch: int
    next_snapshot: int
    tree: TreeStats
    chunks: int
    evicted_bytes: int
    tree_seconds: float
    seconds: float


# -- checks before anything is written -----------------------------------------------------


def check_target(data_dir: Path, force: bool) -> None:
    """Refuse a directory that holds anything (a filesystem only goes with --force, never a
    mounted one); checked before the region is read, and again before writing."""
    dd = DataDir(data_dir)
    if not dd.root.exists():
        return
    if not dd.root.is_dir():
        raise TierfsError(f"{dd.root}: exists and is not a directory", ExitCode.NOT_A_FILESYSTEM)
    if not any(dd.root.iterdir()):
        return
    if not dd.is_filesystem():
        raise TierfsError(
            f"{dd.root}: not empty; a site is rebuilt into an empty (or new) directory",
            ExitCode.ALREADY_EXISTS,
        )
    if not force:
        raise TierfsError(
            f"{dd.root}: already holds a tierfs filesystem (use --force to replace it)",
            ExitCode.ALREADY_EXISTS,
        )
    if is_locked(dd):
        raise TierfsError(f"{dd.root}: filesystem is mounted; unmount it first", ExitCode.BUSY)


def check_bundle(bundle: keys.Bundle, site: str) -> keys.SiteKeys:
    """The bundle's site key, which must be the named site's: a rebuilt site keeps its key."""
    if bundle.site is None:
        raise TierfsError(
            "the bundle holds no site key (a --domain-only bundle): rebuilding a site needs "
            "the site's own bundle ('tierfs key export DATA_DIR FILE' on the old machine)",
            ExitCode.CONFIG,
        )
    if bundle.site.site_name != site:
        raise TierfsError(
            f"the bundle is for site {bundle.site.site_name!r}, not {site!r}", ExitCode.CONFIG
        )
    return bundle.site


def check_snapshot(
    info: SnapshotInfoLike, bundle: keys.Bundle, site_keys: keys.SiteKeys
) -> manifest_mod.Manifest:
    """Only a verified manifest of this very site and domain is rebuilt from (exit 12)."""
    m = info.manifest
    if m is None:
        raise TierfsError(
            f"snapshot {info.snapshot_id} is a local one: a site is rebuilt from its regional "
            "store (give the store URL as SOURCE)",
            ExitCode.USAGE,
        )
    if not info.verified:
        raise TierfsError(
            f"snapshot {info.snapshot_id}: its manifest did not verify against the bundle's "
            "domain key; refusing to rebuild from it",
            ExitCode.VERIFY_FAILED,
        )
    if (m.domain_id, m.site_uuid) != (bundle.domain.domain_id, site_keys.site_uuid):
        raise TierfsError(
            f"snapshot {info.snapshot_id} is of site {m.site_name!r} {m.site_uuid} in domain "
            f"{m.domain_id}, not of the bundle's site {site_keys.site_name!r} "
            f"{site_keys.site_uuid}",
            ExitCode.VERIFY_FAILED,
        )
    return m


# -- epochs and counters the site used upstream --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Published:
    """The highest epoch and snapshot counter in the names of a site's objects upstream."""

    epoch: int
    counter: int


def published(store: ObjectStore, site_uuid: str, workers: int = LIST_WORKERS) -> Published:
    """List the site's manifests and its index segments of every prefix (258 listings, in
    parallel): the old machine may have published after the snapshot being restored."""
    epoch, counter = 0, 0
    for name in store.list(manifest_mod.manifests_prefix(site_uuid)):
        try:
            parsed = manifest_mod.parse_manifest_name(name)
        except ValueError:
            continue
        epoch, counter = max(epoch, parsed.epoch), max(counter, parsed.counter)
    prefixes = [f"{siteindex.index_prefix(p)}{site_uuid}/" for p in siteindex.all_prefixes()]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for names in pool.map(lambda p: list(store.list(p)), prefixes):
            for name in names:
                with contextlib.suppress(ValueError):
                    epoch = max(epoch, siteindex.parse_segment_name(name).epoch)
    return Published(epoch, counter)


def new_epoch(m: manifest_mod.Manifest, site_keys: keys.SiteKeys, seen: Published) -> int:
    """One above every epoch the site is known to have used."""
    return max(m.site_epoch, site_keys.epoch, seen.epoch) + 1


# -- tierfs.toml ---------------------------------------------------------------------------


def site_config(
    m: manifest_mod.Manifest, opts: SiteOptions, cold_device: str
) -> tuple[config_mod.Config, bool]:
    """The manifest's settings, with this machine's site name, store and cold device.

    Returns the config and whether it holds credentials (then tierfs.toml is made 0600).
    A setting this tierfs does not know (a newer site's) is left out, with a warning.
    """
    known = {(s.section, s.key) for s in config_mod.SETTINGS}
    raw: dict[str, dict[str, Any]] = {}
    for section, table in m.config.items():
        if not isinstance(table, Mapping):
            continue
        for key, value in table.items():
            if (section, key) in known:
                raw.setdefault(section, {})[key] = value
            else:
                log.warning("manifest setting %s.%s is unknown here; left out", section, key)
    regional = raw.setdefault("regional", {})
    regional["url"] = opts.url
    if opts.endpoint is not None:
        regional["endpoint"] = opts.endpoint
    if opts.region is not None:
        regional["region"] = opts.region
    has_credentials = all(opts.env.get(k) for k in _ENV_CREDENTIALS)
    if has_credentials:
        regional["access_key_id"] = opts.env["AWS_ACCESS_KEY_ID"]
        regional["secret_access_key"] = opts.env["AWS_SECRET_ACCESS_KEY"]
        regional["profile"] = ""
    elif opts.profile is not None:
        regional["profile"] = opts.profile
    raw.setdefault("site", {})["name"] = opts.site
    raw.setdefault("cold", {})["device"] = cold_device
    # Every chunk starts evicted: bring the data back in the background, so that the site
    # stops depending on the store for reads as soon as its disks allow.
    raw.setdefault("evict", {})["prefetch"] = True
    return config_mod.parse(raw, f"the settings of snapshot {m.snapshot_id}"), has_credentials


# -- the rebuild ---------------------------------------------------------------------------


def rebuild(
    opts: SiteOptions,
    bundle: keys.Bundle,
    src: SourceLike,
    info: SnapshotInfoLike,
    progress: Progress | None = None,
) -> SiteResult:
    """Rebuild the site of `bundle` from snapshot `info` into `opts.data_dir`.

    Everything is checked before the first write; a failure after it removes what was
    written, so the command can simply be run again.
    """
    started = time.monotonic()
    site_keys = check_bundle(bundle, opts.site)
    m = check_snapshot(info, bundle, site_keys)
    check_target(opts.data_dir, opts.force)
    if src.store is None:
        raise TierfsError("a site is rebuilt from its regional store URL", ExitCode.USAGE)
    seen = published(src.store, site_keys.site_uuid)
    epoch = new_epoch(m, site_keys, seen)
    zones = devspec.plan(
        devspec.parse("" if opts.zone_device == "none" else opts.zone_device), opts.data_dir
    )
    cfg, secret = site_config(m, opts, zones.recorded)
    dd = DataDir(opts.data_dir.absolute())
    created = not dd.root.exists()
    _clear(dd)
    try:
        store = _create(dd, bundle, site_keys, epoch, zones)
        try:
            tree_started = time.monotonic()
            fixed = tuple(p.strip() for p in cfg.get("seal", "fixed_chunking_patterns").split(","))
            restorer = TreeRestorer(
                store,
                src.fetch,
                Chunker(bundle.domain).content_id,
                fixed_patterns=fixed,
                progress=progress,
            )
            tree = restorer.run(bytes.fromhex(m.root))
            tree_seconds = time.monotonic() - tree_started
            next_snapshot = max(m.counter, seen.counter) + 1
            chunks, evicted = _record_chunks(store, src, tree, next_snapshot)
            store.sync_meta()
        finally:
            store.close()
        _write_config(dd, cfg, secret)
        _sync_dirs(dd)
    except BaseException:
        log.error("rebuild of %s failed; removing what it wrote", dd.root)
        _clear(dd)
        if created:
            with contextlib.suppress(OSError):
                dd.root.rmdir()
        raise
    log.info(
        "site %s rebuilt from snapshot %s as epoch %d: %d files, %d chunks evicted",
        opts.site,
        info.snapshot_id,
        epoch,
        tree.stats.files,
        chunks,
    )
    return SiteResult(
        dd.root,
        site_keys.site_uuid,
        info.snapshot_id,
        epoch,
        next_snapshot,
        tree.stats,
        chunks,
        evicted,
        tree_seconds,
        time.monotonic() - started,
    )


def _write_config(dd: DataDir, cfg: config_mod.Config, secret: bool) -> None:
    """tierfs.toml, last (a directory without it is no filesystem); mode 0600 from its first
    byte when it holds credentials."""
    previous = os.umask(0o077) if secret else None
    try:
        config_mod.write(dd.root, cfg)
    finally:
        if previous is not None:
            os.umask(previous)


def _clear(dd: DataDir) -> None:
    """Empty the target (checked empty, or a replaceable filesystem, by `check_target`)."""
    if not dd.root.exists():
        return
    for child in dd.root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _create(
    dd: DataDir,
    bundle: keys.Bundle,
    site_keys: keys.SiteKeys,
    epoch: int,
    zones: devspec.DevicePlan,
) -> MetaStore:
    """The layout, domain file, keys (certified under the new epoch), cold device and an
    empty index whose `fs_uuid` is the site's UUID, as mkfs would have made them."""
    dd.root.mkdir(parents=True, exist_ok=True)
    dd.make_layout()
    domain_mod.write(dd.domain, bundle.domain)
    keys.write_domain_keys(dd.root, bundle.domain_keys)
    keys.write_site_keys(dd.root, site_keys)
    keys.renew_certificate(dd.root, bundle.domain_keys, epoch=epoch)
    devspec.create(zones, dd.cold)
    store = MetaStore.create(dd.meta, site_keys.site_name)
    with store.op() as tx:
        tx.put(schema.K_DOMAIN_ID, bundle.domain.domain_id.encode(), db=store.meta)
        tx.put(schema.K_UUID, _uuid_bytes(site_keys.site_uuid), db=store.meta)
    store.commit()
    return store


def _uuid_bytes(text: str) -> bytes:
    return uuid.UUID(text).bytes


def codec_of(location: Location) -> int:
    """A frame's codec from its sizes: a raw frame's payload is exactly the plaintext, and
    zstd is only kept when it saves at least 1/16 (docs/FORMAT.md, "Chunk frame"), so an
    evicted chunk's record gets its codec without fetching its frame."""
    payload = location.length - frame.HEADER_SIZE
    return frame.CODEC_RAW if payload == location.raw_len else frame.CODEC_ZSTD


def _record_chunks(
    store: MetaStore, src: SourceLike, tree: TreeResult, next_snapshot: int
) -> tuple[int, int]:
    """Evicted chunk records with their upstream locations, the tree blobs' upstream
    records, and the counters; returns (chunks, frame bytes left upstream)."""
    wanted = list(tree.refs) + [b for b in tree.blob_ids if b not in tree.refs]
    where = src.locate(wanted)
    missing = [c for c in tree.refs if c not in where]
    if missing:
        raise TierfsError(
            f"{len(missing)} chunks the snapshot names are not in the region's index (first: "
            f"{missing[0].hex()[:16]}); the region is damaged or was cleaned up",
            ExitCode.IO,
        )
    writer = BatchWriter(store)
    state = UpstreamState(store)
    raw_bytes = frame_bytes = 0
    try:
        for chunk_id, refcount in tree.refs.items():
            loc = where[chunk_id]
            record = ChunkRecord(refcount, loc.raw_len, loc.length, codec_of(loc), [])
            writer.put(chunk_id, record.encode(), store.chunks)
            state.mark(writer.txn, chunk_id, loc.pack, loc.entry, UPLOADED)
            writer.count()
            raw_bytes += loc.raw_len
            frame_bytes += loc.length
        for blob_id in tree.blob_ids - tree.refs.keys():
            found = where.get(blob_id)
            if found is None:
                log.warning("tree blob %s not in the region's index", blob_id.hex()[:16])
                continue
            state.mark(writer.txn, blob_id, found.pack, found.entry, UPLOADED | COMPLETE)
            writer.count()
        _put_counters(writer, store, tree, raw_bytes, frame_bytes, next_snapshot)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return len(tree.refs), frame_bytes


def _put_counters(
    writer: BatchWriter,
    store: MetaStore,
    tree: TreeResult,
    raw_bytes: int,
    frame_bytes: int,
    next_snapshot: int,
) -> None:
    stats = _STATS.pack(len(tree.refs), raw_bytes, frame_bytes, tree.referenced_bytes)
    meta = store.meta
    writer.put(schema.K_CHUNK_STATS, stats, meta)
    writer.put(schema.K_NEXT_INO, schema.pack_u64(tree.next_ino), meta)
    writer.put(schema.K_NEXT_COOKIE, schema.pack_u64(tree.next_cookie), meta)
    writer.put(schema.K_NEXT_SNAPSHOT, schema.pack_u64(next_snapshot), meta)


def _sync_dirs(dd: DataDir) -> None:
    """The new directory entries durable, as after mkfs."""
    dirs = [dd.meta, dd.staging, dd.hot, dd.run, dd.log_dir, keys.keys_dir(dd.root), dd.root]
    if dd.cold.exists():
        dirs.append(dd.cold)
    for d in [*dirs, dd.root.parent]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
