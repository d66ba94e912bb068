"""The hot tier's segment files: where appends land, direct I/O and its fallback, and which
prefetched frames the reader loads with one read."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from tierfs.data.reader import RUN_GAP, RUN_MAX, ChunkPiece, Claimed, _hot_runs
from tierfs.meta.records import TIER_COLD, TIER_HOT
from tierfs.tiers.hot import ALIGN, DIRECT_MIN, HotStore


def append(store: HotStore, parts: list[bytes | memoryview]) -> int:
    """Append like the sealer does; the offset the parts landed at."""
    size = sum(len(p) for p in parts)
    assert store.active is not None
    offset = store.place(size)
    store.tail = store.append(store.active, offset, parts)
    return offset


def test_large_appends_start_aligned_and_small_ones_follow_the_tail(tmp_path: Path) -> None:
    store = HotStore(tmp_path / "hot")
    store.start_segment(1)
    small = os.urandom(100)
    big: list[bytes | memoryview] = [
        os.urandom(1000),
        memoryview(bytearray(os.urandom(DIRECT_MIN)))[7:],
        b"x" * 33,
    ]
    after = os.urandom(10)
    assert append(store, [small]) == 0
    at = append(store, big)
    assert at == ALIGN, "a direct append starts at the next 4 KiB boundary"
    assert store.tail % ALIGN == 0, "and is padded to the next one"
    last = append(store, [after])
    assert last == store.tail - len(after)
    assert store.read(1, 0, 100) == small
    assert store.read(1, at, sum(len(p) for p in big)) == b"".join(bytes(p) for p in big)
    assert store.read(1, last, 10) == after
    store.close()


def test_appends_use_the_page_cache_where_direct_io_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems refuse O_DIRECT (EINVAL at open): appends then go through the page
    cache, unaligned, and direct I/O is not tried again."""
    real_open = os.open

    def refuse_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    store = HotStore(tmp_path / "hot")
    store.start_segment(1)
    first = os.urandom(3)
    big = os.urandom(DIRECT_MIN + 5)
    append(store, [first])
    at = append(store, [big])
    assert not store.direct
    assert store.tail == at + len(big), "written without padding"
    assert store.place(DIRECT_MIN) == store.tail, "and no longer aligned"
    assert store.read(1, at, len(big)) == big
    store.close()


def piece(seg: int, off: int, length: int, tier: int = TIER_HOT) -> ChunkPiece:
    return ChunkPiece(0, 0, os.urandom(32), 0, seg, off, length, tier)


def test_prefetched_frames_back_to_back_in_a_segment_are_one_run() -> None:
    a, b = piece(1, 0, 1000), piece(1, 1000, 500)
    c = piece(1, 1500 + RUN_GAP, 100)  # after alignment padding between two seal rounds
    d = piece(1, 1600 + RUN_GAP + RUN_GAP + 1, 10)  # a gap too wide: a new run
    e = piece(2, 1610 + 2 * RUN_GAP + 1, 10)  # another segment
    f = piece(2, 0, 10, TIER_COLD)  # zone records are loaded alone
    big = [piece(3, i * (1 << 20), 1 << 20) for i in range(RUN_MAX // (1 << 20) + 1)]
    event = trio.Event()
    claims: list[Claimed] = [(p, event, None) for p in [a, b, c, d, e, f, *big]]
    runs = [[p for p, _, _ in run] for run in _hot_runs(claims)]
    assert runs[:5] == [[a, b, c], [d], [e], [f], big[:-1]]
    assert runs[5:] == [[big[-1]]], "a run stops at RUN_MAX bytes"
