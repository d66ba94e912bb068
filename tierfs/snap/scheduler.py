"""The daemon task that takes scheduled snapshots (`schedule.Schedule`) and prunes them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from tierfs.snap.catalog import SENT
from tierfs.snap.schedule import ENV, Schedule, tree_paths

if TYPE_CHECKING:
    from tierfs.snap.manager import SnapshotManager

log = logging.getLogger(__name__)

TICK = 10.0


class Scheduler:
    """The daemon task that takes scheduled snapshots and keeps `keep_last` of each."""

    def __init__(
        self,
        manager: SnapshotManager,
        schedules: tuple[Schedule, ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self.schedules = [s for s in schedules if s.paths]
        self.clock = clock
        self.failures = 0

    async def run(self) -> None:
        if os.environ.get(ENV) == "off":
            log.info("schedules are off (%s=off)", ENV)
            return
        while True:
            for schedule in self.schedules:
                try:
                    await self.run_if_due(schedule)
                except Exception:
                    self.failures += 1
                    log.exception("scheduled snapshot %s failed; tried again later", schedule.name)
            await trio.sleep(TICK)

    async def run_if_due(self, schedule: Schedule) -> bool:
        mine = [r for r in self.manager.list() if r.schedule == schedule.name]
        last = mine[-1].time_ns / 1e9 if mine else None
        if self.clock() < schedule.next_due(last, self.manager.started):
            return False
        await self.manager.create(schedule=schedule.name, paths=tree_paths(schedule))
        await self.prune(schedule)
        return True

    async def prune(self, schedule: Schedule) -> None:
        """Delete the oldest snapshots of the schedule beyond its `keep_last`."""
        mine = [r for r in self.manager.list() if r.schedule == schedule.name]
        for record in mine[: max(0, len(mine) - schedule.keep_last)]:
            await self.manager.delete(record.snapshot_id)

    def status(self) -> list[dict[str, Any]]:
        out = []
        for schedule in self.schedules:
            mine = [r for r in self.manager.list() if r.schedule == schedule.name]
            last = mine[-1].time_ns / 1e9 if mine else None
            sent = [r for r in mine if r.upstream == SENT]
            out.append(
                {
                    "name": schedule.name,
                    "paths": list(schedule.paths),
                    "kept": len(mine),
                    "last": mine[-1].snapshot_id if mine else None,
                    "next_due": schedule.next_due(last, self.manager.started),
                    "last_sent": sent[-1].snapshot_id if sent else None,
                    "rpo_met": self._rpo_met(schedule, sent[-1].time_ns / 1e9 if sent else None),
                }
            )
        return out

    def _rpo_met(self, schedule: Schedule, last_sent: float | None) -> bool | None:
        """Whether the schedule's data is upstream recently enough: its last sent snapshot
        is at most two intervals old (None without a regional store, or before the first
        interval since the mount has passed)."""
        if not self.manager.upstream:
            return None
        rpo = 2 * (schedule.every or 86400.0)
        now = self.clock()
        if last_sent is None:
            return None if now - self.manager.started < rpo else False
        return now - last_sent <= rpo
