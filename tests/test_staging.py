"""Staging files on their own: deferred punches never reach bytes written after them."""

from __future__ import annotations

import os
from pathlib import Path

from tierfs.fs.staging import Staging

INO = 7
BLOCK = 64 * 1024


def sealed_and_awaiting_punch(tmp_path: Path) -> Staging:
    """An inode whose first 64 KiB were staged, then sealed: their punch waits for commit 1
    to be durable."""
    staging = Staging(tmp_path / "staging", reserve_bytes=0)
    staging.acquire(INO)
    staging.write(INO, 0, os.urandom(BLOCK))
    staging.unstage(INO, 0, BLOCK)
    staging.defer_punch(1, INO, 0, BLOCK)
    return staging


def test_bytes_compaction_writes_over_a_sealed_range_survive_its_pending_punch(
    tmp_path: Path,
) -> None:
    staging = sealed_and_awaiting_punch(tmp_path)
    copy = os.urandom(BLOCK)
    staging.write_unmarked(INO, 0, copy)
    staging.release_durable(durable_commits=2)
    assert staging.read(INO, 0, BLOCK) == copy
    staging.release(INO)


def test_a_pending_punch_frees_the_sealed_bytes_once_durable(tmp_path: Path) -> None:
    staging = sealed_and_awaiting_punch(tmp_path)
    staging.release_durable(durable_commits=1)
    assert staging.allocated_bytes(INO) >= BLOCK, "punched before its commit was durable"
    staging.release_durable(durable_commits=2)
    assert staging.allocated_bytes(INO) == 0
    assert staging.read(INO, 0, BLOCK) == bytes(BLOCK)
    staging.release(INO)
