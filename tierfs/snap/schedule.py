"""Snapshot schedules: `[schedule.NAME]` tables of `tierfs.toml`, and the task that runs them.

A schedule names the paths it protects, how often (`every` seconds, or daily `at` HH:MM local
time) and how many of its snapshots to keep locally (`keep_last`), so that local snapshots
cannot fill the disk. Defaults follow the edge playbook: `critical` every 15 minutes (no paths
until the operator lists them) and `nightly` at 02:00 for everything. A schedule without paths
does not run. `TIERFS_SCHEDULES=off` in the daemon's environment stops every schedule (tests,
maintenance windows).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from tierfs.errors import ExitCode, TierfsError
from tierfs.snap.catalog import SENT

if TYPE_CHECKING:
    from tierfs.snap.manager import SnapshotManager

log = logging.getLogger(__name__)

ENV = "TIERFS_SCHEDULES"
TICK = 10.0
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_AT = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    paths: tuple[str, ...] = ()
    every: float = 0.0
    at: str = ""
    keep_last: int = 7

    def next_due(self, last: float | None, now: float) -> float:
        """When the next snapshot is due (Unix seconds), the last one taken at `last`."""
        if self.every:
            return now if last is None else last + self.every
        hour, minute = (int(x) for x in self.at.split(":"))
        after = datetime.datetime.fromtimestamp(last if last is not None else now)
        due = after.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if due <= after:
            due += datetime.timedelta(days=1)
        return due.timestamp()

    def to_toml(self) -> list[str]:
        paths = ", ".join(_quote(p) for p in self.paths)
        lines = [f"[schedule.{self.name}]", f"paths = [{paths}]"]
        lines.append(f"every = {self.every!r}" if self.every else f"at = {_quote(self.at)}")
        lines.append(f"keep_last = {self.keep_last}")
        return lines


DEFAULT_SCHEDULES = (
    Schedule("critical", (), every=900.0, keep_last=96),
    Schedule("nightly", ("/",), at="02:00", keep_last=7),
)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_schedules(raw: Mapping[str, Any], where: str) -> tuple[Schedule, ...]:
    """The `[schedule.NAME]` tables; defaults for names not given (a table replaces one)."""
    given = {name: _parse_one(name, table, where) for name, table in raw.items()}
    defaults = [s for s in DEFAULT_SCHEDULES if s.name not in given]
    return (*defaults, *given.values())


def _parse_one(name: str, table: Any, where: str) -> Schedule:
    what = f"{where}: schedule.{name}"
    if not _NAME.fullmatch(name) or not isinstance(table, dict):
        raise TierfsError(
            f"{what}: a schedule is a [schedule.NAME] table, NAME in [a-z0-9_-]", ExitCode.CONFIG
        )
    unknown = set(table) - {"paths", "every", "at", "keep_last"}
    if unknown:
        raise TierfsError(f"{what}: unknown key {sorted(unknown)[0]}", ExitCode.CONFIG)
    paths = table.get("paths", [])
    if not isinstance(paths, list) or not all(
        isinstance(p, str) and p.startswith("/") for p in paths
    ):
        raise TierfsError(f'{what}.paths: a list of absolute paths, like ["/"]', ExitCode.CONFIG)
    every, at = table.get("every", 0.0), table.get("at", "")
    if isinstance(every, bool) or not isinstance(every, int | float) or every < 0:
        raise TierfsError(f"{what}.every: seconds, a number >= 0", ExitCode.CONFIG)
    if not isinstance(at, str) or (at and not _AT.fullmatch(at)):
        raise TierfsError(f'{what}.at: a time of day as "HH:MM"', ExitCode.CONFIG)
    if bool(every) == bool(at):
        raise TierfsError(f"{what}: give either every (seconds) or at (HH:MM)", ExitCode.CONFIG)
    keep = table.get("keep_last", 7)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise TierfsError(f"{what}.keep_last: an integer >= 1", ExitCode.CONFIG)
    return Schedule(name, tuple(paths), float(every), at, keep)


def tree_paths(schedule: Schedule) -> list[bytes] | None:
    """The paths as `build_tree` takes them (None: the whole filesystem)."""
    if "/" in schedule.paths:
        return None
    return [p.strip("/").encode() for p in schedule.paths]


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
