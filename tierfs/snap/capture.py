"""Capturing one consistent point in time for a snapshot, with writes paused briefly.

A tree describes sealed data only (`build_tree` refuses staged bytes), so the point in time is
a commit at which nothing is staged. Getting there must not stop writers for as long as the
dirty data takes to seal, so capture works like a live migration's pre-copy:

1. seal what is staged, with writers running (`Sealer.seal_pass`, bounded by what was staged
   when it began); repeat while they keep dirtying files, up to `PRECOPY_ROUNDS` times;
2. as soon as nothing is staged, commit and open a read transaction on that commit in the same
   trio step: no FUSE operation can run in between, so the pause is only the commit;
3. once what a round left staged is at most `GATE_BYTES` (or after the last round), close the
   `WriteGate` (writes wait) in that same trio step, seal what is left, commit and read, then
   open the gate: the pause is the time to seal at most `GATE_BYTES`, whatever the size of the
   filesystem. Only a writer faster than the sealer through every round leaves more.

The read transaction is the snapshot's state; building the tree from it happens afterwards,
in a worker thread, with writers running.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import trio

from tierfs.data.sealer import Sealer
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.durability import Durability
from tierfs.fs.staging import Staging
from tierfs.meta.store import MetaStore

log = logging.getLogger(__name__)

PRECOPY_ROUNDS = 8
GATE_BYTES = 8 << 20
GATED_PASSES = 16


class WriteGate:
    """Writes wait here while a snapshot takes its point in time (`operations.write`)."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    @property
    def closed(self) -> bool:
        return not self._open.is_set()

    async def wait_open(self) -> None:
        await self._open.wait()

    def close(self) -> None:
        if not self.closed:
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()


@dataclasses.dataclass
class Capture:
    """A read transaction on the snapshot's commit (abort it when done), and the pause."""

    txn: Any
    time_ns: int
    pause_ns: int
    gated: bool


async def capture(
    store: MetaStore, staging: Staging, sealer: Sealer, durability: Durability, gate: WriteGate
) -> Capture:
    """Seal, then take the point in time (see the module docstring)."""
    for _ in range(PRECOPY_ROUNDS):
        if not staging.dirty_since:
            return _take(store, durability, time.monotonic_ns(), gated=False)
        await sealer.seal_pass(budget=staging.staged_total())
        if staging.dirty_since and staging.staged_total() <= GATE_BYTES:
            break
    start = time.monotonic_ns()
    gate.close()
    try:
        # Writes wait, but a compaction may still restage a file meanwhile: seal until
        # nothing is staged rather than insisting on progress as `flush` does.
        for _ in range(GATED_PASSES):
            if not staging.dirty_since:
                break
            await sealer.seal_pass()
        if staging.dirty_since:
            raise TierfsError(
                f"no point in time reached: data is still staged after {GATED_PASSES} sealing "
                "passes with writes paused (see the log)",
                ExitCode.IO,
            )
        taken = _take(store, durability, start, gated=True)
    finally:
        gate.open()
    log.info("snapshot point in time taken with writes paused for %.1f ms", taken.pause_ns / 1e6)
    return taken


def _take(store: MetaStore, durability: Durability, start: int, gated: bool) -> Capture:
    """Commit and open a view of that commit, with no await in between (trio thread)."""
    durability.commit()
    txn = store.read_view()
    return Capture(txn, time.time_ns(), time.monotonic_ns() - start, gated)
