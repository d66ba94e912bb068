"""Where a restore reads snapshots from: a data directory, or a regional store.

Every restore command (`restore list`, `extract`, `mount`, `site`) opens a `Source` with
`open_source(SOURCE, ...)` and asks it three things: which snapshots there are
(`snapshots`, `pick`), the plaintext of a chunk or tree blob by id (`fetch`, `read_jobs` for
many at once) and where the region holds chunks (`locate`).

* **A store URL** (`file:///PATH`, `s3://BUCKET/PREFIX`): the snapshots are the signed
  manifests under `sites/*/manifests/`, each verified against the domain public key of a
  recovery bundle (`--key-file`; a domain-only bundle is enough). One that does not verify
  is listed with the reason and never restored. Chunks are found through the index segments
  of every site of the region (`region.RegionLocator`) and read with ranged GETs.
* **A data directory** (or the mount point of one): the snapshots are the local catalog's,
  trusted as the site's own index (no signature to check). The index is opened read-only,
  without the mount lock: LMDB readers never block the daemon and see committed states
  only, so this works mounted or not. Chunks come from the hot or cold tier; a chunk with no
  local copy (evicted: its record has no location, and its `upstream` record says where its
  frame is upstream) or a local copy that fails its checks is read from the regional store
  when `regional.url` is set.

Whatever the source, every chunk and blob is checked against its keyed content id
(`Chunker(domain).content_id`) before it is handed out, so a tree is exactly as trustworthy
as the root id of a verified manifest. Errors are `TierfsError`s with one line naming the
chunk: exit 12 for a damaged chunk, 10 for a missing or unreachable one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tierfs.data import domain as domain_mod
from tierfs.data.chunker import Chunker
from tierfs.datadir import resolve
from tierfs.errors import ExitCode, TierfsError
from tierfs.restore.region import (
    ChunkError,
    PackRead,
    RegionLocator,
    Result,
    read_run,
    runs,
)
from tierfs.snap import keys
from tierfs.snap import manifest as manifest_mod
from tierfs.snap.manifest import Manifest
from tierfs.upstream.objectstore import ObjectStore, StoreSettings, open_store
from tierfs.upstream.siteindex import Location

log = logging.getLogger(__name__)

ID_SIZE = 32
BLOB_CACHE_BYTES = 64 << 20
Job = Callable[[], list[Result]]

_FRACTION = re.compile(r"(\.\d+)")


def parse_time(text: str) -> int:
    """ISO 8601 (`2026-12-07T15:30:00Z`, `2026-12-07 15:30+01:00`, `2026-12-07`) -> ns since
    the epoch; UTC unless an offset is given. Up to nine fraction digits are kept, so a
    manifest's own `time` names exactly that instant. Bad text: exit 2."""
    raw = text.strip()
    nanos = 0
    match = _FRACTION.search(raw)
    if match and ":" in raw[: match.start()]:
        digits = match.group(1)[1:]
        if len(digits) > 9:
            raise TierfsError(f"bad time {text!r}: more than nine fraction digits", ExitCode.USAGE)
        nanos = int(digits.ljust(9, "0"))
        raw = raw[: match.start()] + raw[match.end() :]
    try:
        when = datetime.datetime.fromisoformat(raw)
    except ValueError:
        raise TierfsError(
            f"bad time {text!r}: expected ISO 8601 such as 2026-12-07T15:30:00Z", ExitCode.USAGE
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    seconds = int(when.timestamp())
    return seconds * 1_000_000_000 + nanos


def utc_iso(time_ns: int) -> str:
    """`2026-12-07T15:30:00Z`: how listings show a snapshot's time (seconds are enough)."""
    when = datetime.datetime.fromtimestamp(time_ns // 1_000_000_000, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot a source offers, verified or not (an unverified one is never restored).

    For a manifest that failed verification, the fields come from its object name and,
    when it still parses, from its unverified body: shown so that the operator sees it, not
    trusted. `root` is empty when unknown.
    """

    site_name: str
    site_uuid: str
    epoch: int
    counter: int
    snapshot_id: str
    name: str | None
    time_ns: int
    schedule: str | None
    root: bytes
    verified: bool
    error: str | None
    manifest: Manifest | None
    object_name: str | None
    stats: dict[str, Any]
    error_code: ExitCode | None = None
    paths: list[str] | None = None  # local partial snapshots: the paths they cover

    @property
    def time(self) -> str:
        return utc_iso(self.time_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "site_name": self.site_name,
            "site_uuid": self.site_uuid,
            "epoch": self.epoch,
            "counter": self.counter,
            "snapshot_id": self.snapshot_id,
            "name": self.name,
            "time": manifest_mod.iso_time(self.time_ns),
            "time_ns": self.time_ns,
            "schedule": self.schedule,
            "root": self.root.hex(),
            "verified": self.verified,
            "error": self.error,
            "object_name": self.object_name,
            "paths": self.paths,
            "stats": self.stats,
        }


class BlobCache:
    """A thread-safe LRU of plaintexts by id, bounded in bytes (tree blobs are re-read often:
    every entry of a directory walk, every extent list of a file)."""

    def __init__(self, max_bytes: int = BLOB_CACHE_BYTES) -> None:
        self._items: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: bytes) -> None:
        if len(value) > self._max // 4:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self._max:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)


class Source:
    """What a restore reads: snapshots, chunks by id, chunk locations (see the module doc).

    Methods block (disk, network): call them from worker threads in async code. `fetch`,
    `read_jobs`, `locate` are thread-safe; `snapshots` is computed once and cached.
    """

    def __init__(
        self, description: str, domain: domain_mod.Domain, store: ObjectStore | None, workers: int
    ) -> None:
        self.description = description
        self.domain = domain
        self.store = store
        self.workers = workers
        self.content_id: Callable[[bytes | memoryview], bytes] = Chunker(domain).content_id
        self._cache = BlobCache()
        self._locator = RegionLocator(store, workers) if store is not None else None
        self._snapshots: list[SnapshotInfo] | None = None
        self._snap_lock = threading.Lock()

    # -- snapshots

    def snapshots(self, site: str | None = None) -> list[SnapshotInfo]:
        """Every snapshot, oldest first; `site` keeps one site's (by name or UUID)."""
        with self._snap_lock:
            if self._snapshots is None:
                self._snapshots = sorted(
                    self._list_snapshots(),
                    key=lambda i: (i.time_ns, i.site_uuid, i.epoch, i.counter),
                )
            found = self._snapshots
        if site is None:
            return list(found)
        uuids = {i.site_uuid for i in found if i.verified and i.site_name == site}
        return [i for i in found if site in (i.site_name, i.site_uuid) or i.site_uuid in uuids]

    def _list_snapshots(self) -> list[SnapshotInfo]:
        raise NotImplementedError

    def pick(self, key: str | None, at: str | None, site: str | None = None) -> SnapshotInfo:
        """A snapshot by id or name (`latest` or None: the newest), or the latest at or before
        the ISO time `at`. Refuses (exit 12) a snapshot that did not verify."""
        infos = self.snapshots(site)
        if key is not None and key != "latest" and at is not None:
            raise TierfsError("give a snapshot or --at TIME, not both", ExitCode.USAGE)
        if key is not None and key != "latest":
            chosen = self._by_key(infos, key)
        else:
            chosen = self._latest(infos, None if at is None else parse_time(at), at)
        if not chosen.verified:
            raise TierfsError(
                f"snapshot {chosen.snapshot_id} of site {chosen.site_name}: "
                f"{chosen.error}; refusing to restore from it",
                chosen.error_code or ExitCode.VERIFY_FAILED,
            )
        return chosen

    def _by_key(self, infos: list[SnapshotInfo], key: str) -> SnapshotInfo:
        matches = [i for i in infos if i.snapshot_id == key] or [i for i in infos if i.name == key]
        if not matches:
            raise TierfsError(
                f"no snapshot {key!r} in {self.description} (see tierfs restore list)",
                ExitCode.USAGE,
            )
        if len(matches) > 1:
            which = ", ".join(f"{i.site_name}/{i.snapshot_id}" for i in matches)
            raise TierfsError(
                f"several snapshots match {key!r} ({which}); give the id and --site",
                ExitCode.USAGE,
            )
        return matches[0]

    def _latest(self, infos: list[SnapshotInfo], at_ns: int | None, at: str | None) -> SnapshotInfo:
        sites = sorted({i.site_name for i in infos})
        if len(sites) > 1:
            raise TierfsError(
                f"{self.description} holds snapshots of several sites ({', '.join(sites)}): "
                "give --site NAME",
                ExitCode.USAGE,
            )
        candidates = [i for i in infos if at_ns is None or i.time_ns <= at_ns]
        if not candidates:
            when = f" at or before {at}" if at else ""
            raise TierfsError(f"no snapshot{when} in {self.description}", ExitCode.USAGE)
        return candidates[-1]

    # -- chunks

    def fetch(self, chunk_id: bytes) -> bytes:
        """The plaintext of a chunk or tree blob, checked against its keyed content id.

        Raises TierfsError naming the chunk: exit 12 when it is damaged, 10 when missing or
        unreachable. Results are kept in a bounded LRU (tree blobs are read repeatedly)."""
        cached = self._cache.get(chunk_id)
        if cached is not None:
            return cached
        ((_, result),) = self._read([chunk_id])
        if isinstance(result, TierfsError):
            raise result
        data = bytes(result)
        self._cache.put(chunk_id, data)
        return data

    def prefetch(self, chunk_ids: Iterable[bytes]) -> None:
        """Read blobs into the cache with the fewest requests (a directory's subtrees)."""
        wanted = [c for c in dict.fromkeys(chunk_ids) if self._cache.get(c) is None]
        jobs = self.read_jobs(wanted) if wanted else []
        if len(jobs) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(jobs))) as pool:
                results = [r for rs in pool.map(lambda job: job(), jobs) for r in rs]
        else:
            results = [r for job in jobs for r in job()]
        for chunk_id, result in results:
            if not isinstance(result, TierfsError):
                self._cache.put(chunk_id, bytes(result))

    def read_jobs(self, chunk_ids: Iterable[bytes]) -> list[Job]:
        """Jobs that, run (in any threads), give (id, plaintext or error) for every id once.

        Upstream, each job is one ranged GET of adjacent frames of one pack; locally, a
        batch of chunks. Jobs come in pack order, so running them in order reads each pack
        front to back."""
        raise NotImplementedError

    def _read(self, chunk_ids: list[bytes]) -> list[Result]:
        return [r for job in self.read_jobs(chunk_ids) for r in job()]

    def locate(self, chunk_ids: Iterable[bytes]) -> dict[bytes, Location]:
        """Where the region holds these chunks (those it holds), for a site rebuild."""
        if self._locator is None:
            return {}
        return self._locator.locate(chunk_ids)

    def _remote_jobs(self, reads: list[PackRead], unknown: list[bytes]) -> list[Job]:
        """Jobs for frames whose place is known (`reads`) and for ids to look up first."""
        store = self.store
        if unknown:
            if self._locator is None or store is None:
                missing = "not in this data directory, and it has no regional store"
                return [_failed(unknown, missing)]
            found = self._locator.locate(unknown)
            reads = reads + [PackRead.of(found[c]) for c in unknown if c in found]
            lost = [c for c in unknown if c not in found]
            jobs = [_failed(lost, "in no index segment of the region")] if lost else []
        else:
            jobs = []
        if not reads:
            return jobs
        assert store is not None
        cid = self.content_id
        return jobs + [_bind_run(store, run, cid) for run in runs(reads)]

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _failed(chunk_ids: list[bytes], detail: str) -> Job:
    def job() -> list[Result]:
        return [(c, ChunkError(c, detail, ExitCode.IO)) for c in chunk_ids]

    return job


def _bind_run(
    store: ObjectStore, run: list[PackRead], content_id: Callable[[bytes | memoryview], bytes]
) -> Job:
    return lambda: read_run(store, run, content_id)


# -- a regional store ------------------------------------------------------------------------


class StoreSource(Source):
    """Snapshots and chunks of a regional store, trusted through the domain public key."""

    store: ObjectStore

    def __init__(
        self, store: ObjectStore, domain: domain_mod.Domain, public_key: bytes, workers: int
    ) -> None:
        super().__init__(store.url, domain, store, workers)
        self.public_key = public_key

    def _list_snapshots(self) -> list[SnapshotInfo]:
        names = []
        for name in self.store.list("sites/"):
            try:
                names.append((name, manifest_mod.parse_manifest_name(name)))
            except ValueError:
                continue
        if not names:
            return []
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda item: self._info(*item), names))

    def _info(self, name: str, parts: manifest_mod.ManifestName) -> SnapshotInfo:
        """The snapshot of one manifest object: verified, or with the reason it is not."""
        data = self.store.get(name)
        try:
            manifest = manifest_mod.verify(
                data, self.public_key, domain_id=self.domain.domain_id, what=f"manifest {name}"
            )
        except TierfsError as exc:
            log.warning("%s", exc.message)
            return _unverified(name, parts, data, exc)
        if (manifest.site_uuid, manifest.site_epoch, manifest.counter, manifest.snapshot_id) != (
            parts.site_uuid,
            parts.epoch,
            parts.counter,
            parts.snapshot_id,
        ):
            error = TierfsError(
                f"manifest {name}: its object name does not match the snapshot it holds",
                ExitCode.VERIFY_FAILED,
            )
            return _unverified(name, parts, data, error)
        return SnapshotInfo(
            site_name=manifest.site_name,
            site_uuid=manifest.site_uuid,
            epoch=manifest.site_epoch,
            counter=manifest.counter,
            snapshot_id=manifest.snapshot_id,
            name=manifest.name,
            time_ns=manifest.time_ns,
            schedule=manifest.schedule,
            root=bytes.fromhex(manifest.root),
            verified=True,
            error=None,
            manifest=manifest,
            object_name=name,
            stats=dict(manifest.stats),
        )

    def read_jobs(self, chunk_ids: Iterable[bytes]) -> list[Job]:
        return self._remote_jobs([], list(dict.fromkeys(chunk_ids)))


def _unverified(
    name: str, parts: manifest_mod.ManifestName, data: bytes, error: TierfsError
) -> SnapshotInfo:
    """What the object claims (shown, never trusted), and why it did not verify."""
    claimed: dict[str, Any] = {}
    try:
        body = json.loads(manifest_mod.SignedManifest.decode(data).manifest)
        if isinstance(body, dict):
            claimed = body
    except (TierfsError, ValueError, UnicodeDecodeError):
        pass

    def text(key: str) -> str | None:
        value = claimed.get(key)
        return value if isinstance(value, str) else None

    time_ns = claimed.get("time_ns")
    root = text("root") or ""
    stats = claimed.get("stats")
    return SnapshotInfo(
        site_name=text("site_name") or "?",
        site_uuid=parts.site_uuid,
        epoch=parts.epoch,
        counter=parts.counter,
        snapshot_id=parts.snapshot_id,
        name=text("name"),
        time_ns=time_ns if isinstance(time_ns, int) and time_ns >= 0 else 0,
        schedule=text("schedule"),
        root=bytes.fromhex(root) if re.fullmatch(r"[0-9a-f]{64}", root) else b"",
        verified=False,
        error=error.message,
        manifest=None,
        object_name=name,
        stats=stats if isinstance(stats, dict) else {},
        error_code=error.exit_code,
    )


# -- opening ---------------------------------------------------------------------------------


def open_source(
    source: str,
    *,
    key_file: Path | None = None,
    passphrase_file: Path | None = None,
    passphrase: keys.Passphrase = None,
    endpoint: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    profile: str | None = None,
    workers: int = 8,
) -> Source:
    """Open SOURCE: a store URL (needs `key_file`, a recovery bundle) or a data directory.

    S3 credentials: `access_key_id`/`secret_access_key`, else `profile`, else boto3's own
    search (the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables, the shared
    files, instance metadata). Nothing is read from the store yet: the first listing finds
    out whether it is reachable (exit 10) and the credentials good (exit 3).
    """
    if "://" in source:
        return _open_store_source(
            source,
            key_file,
            passphrase if passphrase is not None else _passphrase_reader(passphrase_file),
            StoreSettings(
                endpoint=endpoint or "",
                region=region or "",
                access_key_id=access_key_id or "",
                secret_access_key=secret_access_key or "",
                profile=profile or "",
            ),
            workers,
        )
    path = Path(source)
    if not path.exists():
        raise TierfsError(f"{source}: no such file or directory", ExitCode.NOT_A_FILESYSTEM)
    from tierfs.restore.localsource import DataDirSource  # its tiers' modules: only here

    return DataDirSource(resolve(path).require(), workers)


def _passphrase_reader(passphrase_file: Path | None) -> keys.Passphrase:
    if passphrase_file is None:
        return None

    def read() -> str:
        try:
            line = passphrase_file.read_text().split("\n", 1)[0].rstrip("\r")
        except OSError as exc:
            raise TierfsError(
                f"{passphrase_file}: cannot read the passphrase file ({exc.strerror})",
                ExitCode.USAGE,
            ) from None
        if not line:
            raise TierfsError(f"{passphrase_file}: the first line is empty", ExitCode.USAGE)
        return line

    return read


def _open_store_source(
    url: str,
    key_file: Path | None,
    passphrase: keys.Passphrase,
    settings: StoreSettings,
    workers: int,
) -> StoreSource:
    if key_file is None:
        raise TierfsError(
            f"{url}: a regional store needs --key-file BUNDLE (a recovery bundle from "
            "'tierfs key export', --domain-only is enough) to verify its snapshots",
            ExitCode.USAGE,
        )
    bundle = keys.read_bundle(key_file, passphrase)
    store = open_store(url, settings)
    root = getattr(store, "root", None)
    if isinstance(root, Path) and not root.is_dir():
        store.close()
        raise TierfsError(f"{url}: no such directory", ExitCode.NOT_A_FILESYSTEM)
    return StoreSource(store, bundle.domain, bundle.domain_keys.public_key, workers)
