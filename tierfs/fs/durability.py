"""Group commits and fsync: the only code that commits the metadata index while mounted."""

from __future__ import annotations

import logging
import time

import trio

from tierfs.crashpoints import crash_point
from tierfs.fs.namespace import Namespace
from tierfs.meta.store import MetaStore

log = logging.getLogger(__name__)

_POLL = 0.05


class Durability:
    """Commits the group transaction on a timer, on pressure, and on demand (fsync)."""

    def __init__(
        self,
        ns: Namespace,
        store: MetaStore,
        interval: float,
        max_ops: int,
        io_limiter: trio.CapacityLimiter,
    ) -> None:
        self.ns = ns
        self.store = store
        self.interval = interval
        self.max_ops = max_ops
        self.io_limiter = io_limiter
        self._last_commit = time.monotonic()
        self.fsyncs = 0
        self.sync_lock = trio.Lock()
        self._unlinks: list[str] = []

    def commit(self) -> None:
        """Fold staged ranges into the group and commit it (trio thread, no await).

        Staged bytes over sealed data are flushed first: data goes down before the metadata
        that covers it.
        """
        for ino in self.ns.shadowing_unsynced():
            self.ns.staging.take_sync_work(ino).run()
        self.ns.persist_staging_ranges()
        crash_point("commit-before")
        self.store.commit()
        crash_point("commit-after")
        self._last_commit = time.monotonic()

    async def sync(self, ino: int | None) -> None:
        """Make one inode's data (or all staged data) and all metadata durable.

        Syncs run one at a time: `take_sync_work` hands a file or directory to exactly one
        sync, so a second sync must not return before the first one's flush has finished.
        """
        async with self.sync_lock:
            if ino is not None and self.ns.staging.punch_pending(ino):
                await self._punch_sealed()
            work = self.ns.staging.take_sync_work(ino)
            await trio.to_thread.run_sync(work.run, limiter=self.io_limiter)
            crash_point("fsync-after-data")
            await self._commit_durably()
            crash_point("fsync-after-commit")
            self.fsyncs += 1

    async def _punch_sealed(self) -> None:
        """Make the seals done so far durable and punch their bytes out of staging, so that
        the fsync that follows does not write back what already lies in chunks: a file
        sealed behind its writer then reaches the disk once, not twice."""
        await self._commit_durably()
        self._release_durable_now()

    async def _commit_durably(self) -> None:
        """Commit the group and flush its meta page: every commit so far is durable."""
        self.commit()
        committed = self.store.commits
        await trio.to_thread.run_sync(self.store.sync_meta, limiter=self.io_limiter)
        self.store.durable_commits = max(self.store.durable_commits, committed)

    def _release_durable_now(self) -> None:
        """Deferred punches whose commit is durable, now; removals of staging files are
        left to the committer task, which unlinks them in a worker thread."""
        unlinks = self.ns.staging.release_durable(self.store.durable_commits)
        self._unlinks.extend(unlinks)

    def take_unlinks(self) -> list[str]:
        """Staging files due for removal that the committer task has not removed yet."""
        unlinks, self._unlinks = self._unlinks, []
        return unlinks

    async def run(self) -> None:
        """The committer task: commit every `interval`, or sooner once `max_ops` piled up."""
        while True:
            await trio.sleep(_POLL)
            due = time.monotonic() - self._last_commit >= self.interval
            if self.store.pending_ops >= self.max_ops or (due and self._has_changes()):
                self.commit()
            self._release_durable_now()
            unlinks = self.take_unlinks()
            if unlinks:
                self.ns.staging.unlinked_dirs |= await trio.to_thread.run_sync(
                    self.ns.staging.unlink_files, unlinks, limiter=self.io_limiter
                )

    def _has_changes(self) -> bool:
        return self.store.pending_ops > 0 or bool(self.ns.staging.changed)
