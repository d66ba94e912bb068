"""Snapshot schedules: `[schedule.NAME]` tables of `tierfs.toml` (`scheduler` runs them).

A schedule names the paths it protects, how often (`every` seconds, or daily `at` HH:MM local
time) and how many of its snapshots to keep locally (`keep_last`), so that local snapshots
cannot fill the disk. Defaults follow the edge playbook: `critical` every 15 minutes (no paths
until the operator lists them) and `nightly` at 02:00 for everything. A schedule without paths
does not run. `TIERFS_SCHEDULES=off` in the daemon's environment stops every schedule (tests,
maintenance windows). This module is read by the configuration, so every command imports
it: it does not import trio.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Mapping
from typing import Any

from tierfs.errors import ExitCode, TierfsError

ENV = "TIERFS_SCHEDULES"
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
