"""`tierfs status`: what the filesystem holds and where, as a versioned JSON document.

The schema is published in docs/STATUS.md. Keys are only ever added, never renamed. Until the
first release `schema_version` stays "1.0"; after it, its minor number grows with added keys.
"""

from __future__ import annotations

import os
from typing import Any

from tierfs import config
from tierfs.data.chunkstore import ChunkIndex, ChunkStats
from tierfs.datadir import DataDir
from tierfs.meta.records import Inode, ZoneRecord, decode_ranges
from tierfs.meta.store import MetaStore
from tierfs.snap.catalog import Catalog

STATUS_SCHEMA_VERSION = "1.0"
TIERS = ("staging", "hot", "cold", "regional", "cloud")


def collect(
    data_dir: DataDir, store: MetaStore, tx: Any, mounted: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The status document from a consistent view of the index (`tx`)."""
    info = store.info(tx)
    files = dirs = logical = 0
    with tx.cursor(db=store.inodes) as cur:
        for key, value in cur:
            inode = Inode.decode(int.from_bytes(key, "big"), bytes(value))
            if inode.is_reg:
                files += 1
                logical += inode.size
            elif inode.is_dir:
                dirs += 1
    staged = 0
    with tx.cursor(db=store.staging) as cur:
        for _, value in cur:
            staged += sum(b - a for a, b in decode_ranges(bytes(value)))
    tiers: dict[str, dict[str, int]] = {t: {"bytes": 0} for t in TIERS}
    tiers["staging"] = {"bytes": _allocated(data_dir.staging), "staged_bytes": staged}
    stats = _chunk_stats(store, tx)
    hot_live = ChunkIndex(store).hot_live_bytes(tx)
    tiers["cold"] = {"bytes": _cold_live(store, tx)}
    tiers["hot"] = {"bytes": _allocated(data_dir.hot), "stored_bytes": hot_live}
    cfg = config.load(data_dir.root)
    doc: dict[str, Any] = {
        "schema_version": STATUS_SCHEMA_VERSION,
        "site": cfg.site,
        "fs_uuid": info["uuid"],
        "metadata_schema": info["schema"],
        "mounted": mounted,
        "data_dir": str(data_dir.root),
        "logical_bytes": logical,
        "files": files,
        "directories": dirs,
        "tiers": tiers,
        "chunks": {
            "count": stats.chunks,
            "stored_bytes": stats.stored_bytes,
            "unique_bytes": stats.raw_bytes,
            "referenced_bytes": stats.referenced_bytes,
            "dedup_ratio": _ratio(stats.referenced_bytes, stats.raw_bytes),
            "compression_ratio": _ratio(stats.raw_bytes, stats.stored_bytes),
        },
        "queue": {"pending_bytes": 0},
        "snapshots": _snapshots(store, tx),
        "upstream": {"url": cfg.get("regional", "url") or None},
        "errors": {"io": 0, "checksum": 0},
        "metadata": {"bytes": _allocated(data_dir.meta)},
    }
    if extra:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key].update(value)
            else:
                doc[key] = value
    return doc


def _snapshots(store: MetaStore, tx: Any) -> dict[str, Any]:
    records = list(Catalog(store).records(tx))
    return {"count": len(records), "latest": records[-1].snapshot_id if records else None}


def _chunk_stats(store: MetaStore, tx: Any) -> ChunkStats:
    return ChunkIndex(store).stats(tx)


def _ratio(a: int, b: int) -> float:
    return round(a / b, 3) if b else 1.0


def _allocated(root: os.PathLike[str]) -> int:
    """Bytes allocated on disk (not apparent size) under `root`."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def render_table(doc: dict[str, Any]) -> str:
    lines = [
        f"site            {doc['site']}",
        f"mounted         {'yes' if doc['mounted'] else 'no'}",
        f"mountpoint      {doc.get('mountpoint') or '-'}",
        f"data directory  {doc['data_dir']}",
        f"files           {doc['files']:,} in {doc['directories']:,} directories",
        f"logical size    {_human(doc['logical_bytes'])}",
        "",
        f"{'tier':<10} {'bytes':>12}",
    ]
    for name in TIERS:
        lines.append(f"{name:<10} {_human(doc['tiers'][name]['bytes']):>12}")
    chunks, snaps = doc["chunks"], doc["snapshots"]
    lines += [
        "",
        f"chunks          {chunks['count']:,} ({_human(chunks['stored_bytes'])} stored)",
        f"snapshots       {snaps['count']} (latest: {snaps['latest'] or '-'})",
        f"regional store  {_upstream_line(doc['upstream'])}",
        *_eviction_lines(doc.get("eviction") or {}),
        "errors          " + ", ".join(f"{k}={v}" for k, v in doc["errors"].items()),
    ]
    return "\n".join(lines)


def _upstream_line(upstream: dict[str, Any]) -> str:
    if not upstream.get("url"):
        return "-"
    queue = upstream.get("queue")
    if queue is None:  # not mounted
        return str(upstream["url"])
    alarms = upstream.get("alarms") or []
    return f"{upstream['url']}, {queue['snapshots']} snapshots queued" + (
        f"; {len(alarms)} alarms (status --json)" if alarms else ""
    )


def _eviction_lines(eviction: dict[str, Any]) -> list[str]:
    """Local copies against the watermark, and what read-through did, when it is on."""
    if not eviction.get("enabled"):
        return []
    used, room = eviction["local_bytes"], eviction["capacity_bytes"]
    share = f"{100 * used / room:.0f} %" if room else "-"
    return [
        f"local copies    {_human(used)} of {_human(room)} ({share}; evicted above "
        f"{eviction['high_pct']} %)",
        f"read-through    {eviction['fetched_chunks']:,} chunks fetched, "
        f"{eviction['repairs']:,} repairs, {eviction['timeouts']:,} timeouts",
    ]


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _cold_live(store: MetaStore, tx: Any) -> int:
    """Bytes of zone records that chunks point at (the daemon adds the zone details)."""
    if store.zones is None:
        return 0
    total = 0
    with tx.cursor(db=store.zones) as cur:
        for _, value in cur:
            total += ZoneRecord.decode(bytes(value)).live_bytes
    return total
