"""Unit tests of the small building blocks: range sets, record codecs, the config schema."""

from __future__ import annotations

import datetime
import tomllib
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tierfs import config
from tierfs.errors import ExitCode, TierfsError
from tierfs.fs.ranges import RangeSet
from tierfs.meta.records import Inode, decode_staged, encode_staged
from tierfs.snap.schedule import Schedule
from tierfs.upstream.congestion import Congestion

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 200), st.integers(0, 60)),
        st.tuples(st.just("truncate"), st.integers(0, 260), st.just(0)),
    ),
    max_size=40,
)


@given(ops)
def test_rangeset_matches_a_set_of_offsets(operations: list[tuple[str, int, int]]) -> None:
    ranges = RangeSet()
    model: set[int] = set()
    for kind, a, b in operations:
        if kind == "add":
            ranges.add(a, a + b)
            model |= set(range(a, a + b))
        else:
            ranges.truncate(a)
            model = {x for x in model if x < a}
    covered = {x for s, e in ranges.as_list() for x in range(s, e)}
    assert covered == model
    pairs = ranges.as_list()
    assert all(s < e for s, e in pairs)
    assert all(pairs[i][1] < pairs[i + 1][0] for i in range(len(pairs) - 1)), "not merged"
    assert decode_staged(encode_staged(7, pairs)) == (7, pairs)
    assert ranges.total() == len(model)


def test_inode_record_round_trip_and_unknown_version() -> None:
    inode = Inode(7, 0o100644, 1, 2, 3, 5 << 32, -1, 2, 3, 4, 0)
    assert Inode.decode(7, inode.encode()) == inode
    with pytest.raises(TierfsError) as exc:
        Inode.decode(7, b"\x09" + inode.encode()[1:])
    assert exc.value.exit_code == ExitCode.VERSION


def test_config_round_trip_and_errors(tmp_path: Path) -> None:
    cfg = config.defaults("store-042")
    config.write(tmp_path, cfg)
    assert config.load(tmp_path) == cfg
    bad = {"mount": {"atime": "always"}}
    with pytest.raises(TierfsError, match=r"mount\.atime") as exc:
        config.parse(bad, "x")
    assert exc.value.exit_code == ExitCode.CONFIG
    with pytest.raises(TierfsError) as exc:
        config.parse({"format_version": 2}, "x")
    assert exc.value.exit_code == ExitCode.VERSION
    with pytest.raises(TierfsError, match="must be >="):
        config.parse({"metadata": {"commit_interval": 0}}, "x")


@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 80)), max_size=20),
    st.integers(0, 300),
    st.integers(0, 120),
)
def test_rangeset_remove_and_intersect(
    adds: list[tuple[int, int]], start: int, length: int
) -> None:
    ranges = RangeSet()
    model: set[int] = set()
    for a, n in adds:
        ranges.add(a, a + n)
        model |= set(range(a, a + n))
    window = set(range(start, start + length))
    inside = {x for s, e in ranges.intersect(start, start + length) for x in range(s, e)}
    assert inside == model & window
    ranges.remove(start, start + length)
    assert {x for s, e in ranges.as_list() for x in range(s, e)} == model - window


def test_schedule_tables_are_checked_and_replace_the_defaults() -> None:
    cfg = config.parse(
        {"schedule": {"critical": {"paths": ["/db"], "every": 600, "keep_last": 3}}}, "t"
    )
    assert cfg.schedules == (
        Schedule("nightly", ("/",), at="02:00", keep_last=7),
        Schedule("critical", ("/db",), every=600.0, keep_last=3),
    )
    assert config.parse({}, "t").schedules[0].name == "critical"
    for bad in (
        {"paths": "/db", "every": 60},
        {"paths": ["db"], "every": 60},
        {"paths": ["/"], "every": 60, "at": "02:00"},
        {"paths": ["/"], "at": "25:00"},
        {"paths": ["/"], "every": 60, "keep_last": 0},
        {"paths": ["/"], "every": 60, "colour": "red"},
    ):
        with pytest.raises(TierfsError) as exc:
            config.parse({"schedule": {"x": bad}}, "t")
        assert exc.value.exit_code == ExitCode.CONFIG, bad
    rendered = config.render(cfg)
    assert config.parse(tomllib.loads(rendered), "t").schedules == cfg.schedules


def test_schedule_due_times() -> None:
    every = Schedule("e", ("/",), every=900.0)
    assert every.next_due(None, 1000.0) == 1000.0
    assert every.next_due(5000.0, 9999.0) == 5900.0
    daily = Schedule("d", ("/",), at="02:00")
    noon = datetime.datetime(2026, 12, 7, 12, 0).timestamp()
    due = datetime.datetime.fromtimestamp(daily.next_due(noon, noon))
    assert (due.day, due.hour, due.minute) == (8, 2, 0)
    early = datetime.datetime(2026, 12, 7, 1, 0).timestamp()
    assert datetime.datetime.fromtimestamp(daily.next_due(None, early)).day == 7


def test_uploads_in_flight_back_off_when_puts_slow_down() -> None:
    limiter = trio.CapacityLimiter(4)
    congestion = Congestion(limiter, most=4)
    mib = 1 << 20
    congestion.observe(8 * mib, 0.8)  # 0.1 s/MiB: the best so far
    assert limiter.total_tokens == 4
    congestion.observe(8 * mib, 4.0)  # five times slower: halve
    assert limiter.total_tokens == 2 and congestion.backoffs == 1
    congestion.observe(8 * mib, 8.0)
    assert limiter.total_tokens == 1
    congestion.observe(8 * mib, 8.0)  # never below one
    assert limiter.total_tokens == 1 and congestion.backoffs == 2
    congestion.observe(4 * mib, 0.4)  # back to normal: one more at a time
    congestion.observe(4 * mib, 0.4)
    assert limiter.total_tokens == 3
    congestion.observe(1024, 100.0)  # too small to tell
    assert limiter.total_tokens == 3
