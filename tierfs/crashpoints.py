"""Named crash points for the crash tests (docs/ARCHITECTURE.md, "Crash table").

When the environment variable TIERFS_CRASH_POINT names a point, the daemon kills itself with
SIGKILL the moment it reaches it, exactly as `kill -9` would. Unset, each call is a dict
lookup. Every point is listed in POINTS so that the tests can run one test per row.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "TIERFS_CRASH_POINT"

POINTS: dict[str, str] = {
    "write-after-staging": "file data written to staging, size not yet in the index",
    "commit-before": "a group commit is about to be written",
    "commit-after": "a group commit is written, its meta page not yet flushed",
    "fsync-after-data": "fsync flushed staging data, the index not yet committed",
    "fsync-after-commit": "fsync committed the index, not yet answered",
    "unlink-open-after": "an open file was unlinked (orphan recorded), not yet committed",
    "rename-after": "a rename was applied, not yet committed",
    "recovery-after-orphans": "mount-time recovery removed orphans, not yet marked in use",
    "shutdown-before-final-commit": "unmounting, the final commit not yet written",
    "seal-after-append": "a seal round's frames are durable past the segment's committed end",
    "seal-after-install": "a seal round's extents and chunks are in the group, not committed",
    "punch-before": "a seal is durable; its bytes are not yet punched out of staging",
    "compact-after-restage": "a fragmented file's bytes are back in staging, not yet resealed",
    "cold-after-append": "a migration's zone records are flushed, their locations not committed",
    "reclaim-after-relocate": "a victim's live records are copied and flushed, moves not committed",
    "reclaim-before-reset": "nothing in a zone is live (moved or freed, durably), not yet reset",
    "snapshot-after-capture": "a snapshot's point in time is taken and frees are held, no tree yet",
    "snapshot-after-install": "a snapshot's blobs are durable and installed, not committed",
    "reap-after-tree": "a deleted snapshot's tree blob is reaped in the group, not committed",
    "upload-after-pack": "a pack is durable upstream, its chunks not yet marked uploaded",
    "upload-before-manifest": "everything a manifest names is upstream, the manifest not put",
}

_armed = os.environ.get(ENV)


def crash_point(name: str) -> None:
    """Die like `kill -9` here when TIERFS_CRASH_POINT names this point."""
    if _armed is not None and _armed == name:
        logging.getLogger(__name__).warning("crash point %s reached: killing the daemon", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
