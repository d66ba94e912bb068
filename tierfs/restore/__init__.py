"""Restoring from snapshots: the shared source (`source`), listing and extraction.

`source.open_source` opens a data directory or a regional store URL; `extract` copies a
snapshot's tree out of one. See docs/ARCHITECTURE.md, "Restore".
"""

from tierfs.restore.source import SnapshotInfo, Source, open_source, parse_time

__all__ = ["SnapshotInfo", "Source", "open_source", "parse_time"]
