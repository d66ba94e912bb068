"""The cold store library (tierfs/tiers/cold) against the emulated zoned device.

Records (format, corruption), the allocator (sequential appends, zone boundaries, lifetime
classes, the active limit, the reserve, restarts, failing writes), reads (READONLY, OFFLINE),
reclaim (empty zones, relocation, pins and epochs), scanning, crash points, and a stateful
model of append/free/reclaim/restart.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tierfs.crashpoints import POINTS
from tierfs.data import frame
from tierfs.errors import ExitCode
from tierfs.tiers.cold import (
    AppendError,
    ColdFull,
    Lifetime,
    Location,
    Reclaimer,
    RecordError,
    ZoneAllocator,
    ZoneBusy,
    ZoneOffline,
    ZoneUsage,
    read_chunk,
    read_record,
    scan_zone,
)
from tierfs.tiers.cold import reclaim as reclaim_mod
from tierfs.tiers.cold import record as rec
from tierfs.tiers.cold import zones as zones_mod
from tierfs.tiers.cold.errors import ColdError
from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tierfs.tiers.zns.model import PROFILES, Cond, Geometry

LBA = 4096
SMALL = Geometry(
    lba_size=LBA,
    zone_size=64 * 1024,
    zone_capacity=48 * 1024,
    nr_zones=16,
    nr_conv=2,
    max_open=3,
    max_active=4,
    zone_append_max=16 * 1024,
)
ZONE_BLOCKS = SMALL.zone_capacity // LBA
ONE_BLOCK = LBA - rec.HEADER_SIZE - frame.HEADER_SIZE
"""The largest plaintext whose raw record takes exactly one block."""

SHORT, LONG = int(Lifetime.SHORT), int(Lifetime.LONG)

# -- helpers


def chunk(data: bytes) -> tuple[bytes, bytes]:
    """(chunk id, raw frame) of `data`."""
    cid = hashlib.sha256(data).digest()
    return cid, frame.encode(cid, data, 0)[0]


def blob(n: int, seed: object) -> bytes:
    return random.Random(str(seed)).randbytes(n)


def blocks_payload(blocks: int, seed: object) -> bytes:
    """Plaintext whose raw record is exactly `blocks` blocks."""
    return blob(blocks * LBA - rec.HEADER_SIZE - frame.HEADER_SIZE, seed)


def make(n: int, blocks: int = 1, tag: str = "") -> list[tuple[bytes, bytes, bytes]]:
    """n chunks as (id, plaintext, frame), each record `blocks` blocks long."""
    out = []
    for i in range(n):
        data = blocks_payload(blocks, f"{tag}/{i}")
        cid, fr = chunk(data)
        out.append((cid, data, fr))
    return out


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[EmulatedZonedDevice]:
    d = EmulatedZonedDevice.create(tmp_path / "zones.img", SMALL)
    yield d
    d.close_device()


@pytest.fixture
def alloc(dev: EmulatedZonedDevice) -> ZoneAllocator:
    return ZoneAllocator(dev, reserve=2)


def commit_all(alloc: ZoneAllocator, usage: ZoneUsage, locs: list[Location], klass: int) -> None:
    """What the caller does once the locations are committed."""
    for loc in locs:
        usage.add(loc, klass)
    alloc.settle(locs)


# -- records


def test_record_round_trip_and_layout() -> None:
    data = b"hello"
    cid, fr = chunk(data)
    raw = rec.encode(fr, klass=7, zone_offset=3 * LBA, lba=LBA, flags=rec.FLAG_RELOCATED)
    assert len(raw) == LBA == rec.record_len(len(fr), LBA)
    assert raw[:4] == b"TFZR" and raw[4] == 1 and raw[5] == rec.FLAG_RELOCATED and raw[6] == 7
    assert int.from_bytes(raw[16:24], "big") == 3 * LBA
    assert raw[24:56] == cid
    assert raw[rec.HEADER_SIZE : rec.HEADER_SIZE + len(fr)] == fr
    assert not any(raw[rec.HEADER_SIZE + len(fr) :])
    header, back = rec.decode(raw, zone_offset=3 * LBA, expected_id=cid)
    assert back == fr and frame.decode(back, cid) == data
    assert (header.klass, header.relocated, header.raw_len, header.payload_len) == (
        7,
        True,
        5,
        len(fr),
    )
    assert header.record_len(LBA) == LBA


def test_the_documented_example() -> None:
    """docs/FORMAT.md, "Zone records": `hello` as a class-1 record at zone offset 8192."""
    fr = frame.encode(b"\x11" * 32, b"hello", 0)[0]
    raw = rec.encode(fr, klass=1, zone_offset=8192, lba=LBA)
    assert raw[:32].hex(" ") == (
        "54 46 5a 52 01 00 01 00 00 00 00 05 00 00 00 3d "
        "00 00 00 00 00 00 20 00 11 11 11 11 11 11 11 11"
    )
    assert raw[56:64].hex(" ") == "80 b9 c5 2c a8 bc b3 fc"
    assert len(raw) == LBA and raw[64:125] == fr and not any(raw[125:])


def test_location_packs_in_16_bytes() -> None:
    loc = Location(900, (1 << 33) + LBA, 3 * LBA)
    assert len(loc.pack()) == 16 and Location.unpack(loc.pack()) == loc


@pytest.mark.parametrize(
    ("where", "why"),
    [
        (0, "magic"),
        (4, "version"),
        (5, "flags"),
        (6, "checksum"),  # lifetime class
        (9, "checksum"),  # plaintext length
        (24, "another chunk"),  # chunk id
        (rec.HEADER_SIZE + 60, "checksum"),  # inside the frame payload
    ],
)
def test_record_corruption_is_detected(where: int, why: str) -> None:
    cid, fr = chunk(b"x" * 500)
    raw = bytearray(rec.encode(fr, klass=1, zone_offset=0, lba=LBA))
    raw[where] ^= 0x40
    with pytest.raises(RecordError, match=why):
        rec.decode(bytes(raw), zone_offset=0, expected_id=cid)


def test_record_misplaced_or_truncated_is_detected() -> None:
    _, fr = chunk(b"y" * 5000)
    raw = rec.encode(fr, klass=1, zone_offset=LBA, lba=LBA)
    with pytest.raises(RecordError, match="written at"):
        rec.decode(raw, zone_offset=0)
    with pytest.raises(RecordError, match="header says"):
        rec.decode(raw[:LBA], zone_offset=LBA)
    with pytest.raises(RecordError, match="magic"):
        rec.parse_header(bytes(LBA))
    assert isinstance(RecordError("x"), frame.FrameError)


def test_encode_refuses_what_is_not_a_frame() -> None:
    _, fr = chunk(b"z" * 100)
    with pytest.raises(ValueError, match="not a chunk frame"):
        rec.encode(b"nonsense" * 10, klass=1, zone_offset=0, lba=LBA)
    with pytest.raises(ValueError, match="header says"):
        rec.encode(fr + b"extra", klass=1, zone_offset=0, lba=LBA)
    with pytest.raises(ValueError, match="byte"):
        rec.encode(fr, klass=256, zone_offset=0, lba=LBA)


# -- appending


def test_appends_are_sequential_and_split_across_zones(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    chunks = make(20, blocks=2)
    locs = alloc.append_batch(SHORT, [fr for _, _, fr in chunks])
    per_zone = ZONE_BLOCKS // 2
    zones = sorted({loc.zone for loc in locs})
    assert len(zones) == -(-len(chunks) // per_zone)
    for i, loc in enumerate(locs):
        assert loc.zone == zones[i // per_zone]
        assert loc.offset == (i % per_zone) * 2 * LBA and loc.length == 2 * LBA
    for z in zones[:-1]:
        assert dev.cond[z] == Cond.FULL
    for (cid, data, _), loc in zip(chunks, locs, strict=True):
        assert read_chunk(dev, loc, cid) == data
    scanned = list(scan_zone(dev, zones[0]))
    assert [(e.offset, e.length) for e in scanned] == [(loc.offset, loc.length) for loc in locs[:6]]
    assert all(e.header is not None and e.problem is None for e in scanned)


def test_a_record_that_does_not_fit_finishes_the_zone(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    first = alloc.append_batch(SHORT, [fr for _, _, fr in make(ZONE_BLOCKS - 1, tag="a")])
    z = first[0].zone
    assert dev.cond[z] == Cond.IMP_OPEN
    (big,) = alloc.append_batch(SHORT, [make(1, blocks=3, tag="b")[0][2]])
    assert big.zone != z and big.offset == 0
    assert dev.cond[z] == Cond.FULL, "the zone with one block left was finished"
    assert all(loc.offset + loc.length <= SMALL.zone_capacity for loc in first)


def test_test_profile_geometry(tmp_path: Path) -> None:
    """Realistic sizes: 512 KiB chunks in 3 MiB zones, five records per zone."""
    d = EmulatedZonedDevice.create(tmp_path / "z.img", PROFILES["test"])
    try:
        a = ZoneAllocator(d)
        chunks = []
        for i in range(12):
            data = blob(512 << 10, i)
            cid, fr = chunk(data)
            chunks.append((cid, data, fr))
        locs = a.append_batch(LONG, [fr for _, _, fr in chunks])
        assert [loc.zone for loc in locs] == [2] * 5 + [3] * 5 + [4] * 2
        assert locs[5].offset == 0 and d.cond[2] == Cond.FULL
        for (cid, data, _), loc in zip(chunks, locs, strict=True):
            assert read_chunk(d, loc, cid) == data
    finally:
        d.close_device()


def test_lifetime_classes_go_to_distinct_zones(alloc: ZoneAllocator) -> None:
    short = alloc.append_batch(SHORT, [fr for _, _, fr in make(3, tag="s")])
    long = alloc.append_batch(LONG, [fr for _, _, fr in make(3, tag="l")])
    short2 = alloc.append_batch(SHORT, [fr for _, _, fr in make(2, tag="s2")])
    moved = alloc.append_batch(SHORT, [fr for _, _, fr in make(1, tag="r")], relocated=True)
    assert {loc.zone for loc in short} == {loc.zone for loc in short2}
    assert short2[0].offset == short[-1].offset + LBA
    zones = [{loc.zone for loc in g} for g in (short, long, moved)]
    assert len(set().union(*zones)) == 3
    assert alloc.zone_class(long[0].zone) == LONG


def test_active_limit_finishes_the_fullest_zone_instead_of_blocking(tmp_path: Path) -> None:
    geo = Geometry(**{**SMALL.__dict__, "max_open": 2, "max_active": 2})
    d = EmulatedZonedDevice.create(tmp_path / "z.img", geo)
    try:
        a = ZoneAllocator(d, reserve=0)
        one = a.append_batch(1, [fr for _, _, fr in make(5, tag="1")])
        two = a.append_batch(2, [fr for _, _, fr in make(2, tag="2")])
        three = a.append_batch(3, [fr for _, _, fr in make(1, tag="3")])
        assert d.cond[one[0].zone] == Cond.FULL, "the fullest active zone was finished"
        assert d.cond[two[0].zone].is_active and d.cond[three[0].zone].is_active
        assert d.counts()[1] <= 2
        again = a.append_batch(1, [fr for _, _, fr in make(1, tag="1b")])
        assert again[0].zone not in {one[0].zone, two[0].zone, three[0].zone}
        assert d.counts()[1] <= 2
    finally:
        d.close_device()


def test_reserve_is_kept_for_reclaim(dev: EmulatedZonedDevice, alloc: ZoneAllocator) -> None:
    with pytest.raises(ColdFull) as exc:
        for i in range(100):
            alloc.append_batch(SHORT, [fr for _, _, fr in make(ZONE_BLOCKS, tag=str(i))])
    assert exc.value.exit_code == ExitCode.IO and exc.value.errno == errno.ENOSPC
    assert alloc.free_zones() and len(alloc.free_zones()) == alloc.reserve
    wps = list(dev.wp)
    with pytest.raises(ColdFull):
        alloc.append_batch(LONG, [fr for _, _, fr in make(1, tag="late")])
    assert dev.wp == wps, "a refused batch writes nothing"
    locs = alloc.append_batch(SHORT, [fr for _, _, fr in make(2, tag="moved")], relocated=True)
    assert len(alloc.free_zones()) == alloc.reserve - 1 and locs[0].offset == 0


def test_restart_resumes_at_the_write_pointer(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    d = EmulatedZonedDevice.create(path, SMALL)
    a = ZoneAllocator(d)
    short = a.append_batch(SHORT, [fr for _, _, fr in make(3, tag="s")])
    long = a.append_batch(LONG, [fr for _, _, fr in make(2, blocks=2, tag="l")])
    d.crash()  # a power cut: appends were flushed, so nothing is lost
    d = EmulatedZonedDevice.open(path)
    try:
        assert d.cond[short[0].zone] == Cond.CLOSED and d.cond[long[0].zone] == Cond.CLOSED
        a = ZoneAllocator(d)
        assert a.writing() == {short[0].zone, long[0].zone}
        (more,) = a.append_batch(SHORT, [make(1, tag="s2")[0][2]])
        assert more == Location(short[0].zone, 3 * LBA, LBA)
        (more_long,) = a.append_batch(LONG, [make(1, tag="l2")[0][2]])
        assert more_long == Location(long[0].zone, 4 * LBA, LBA)
        (moved,) = a.append_batch(SHORT, [make(1, tag="r")[0][2]], relocated=True)
        assert moved.zone not in {short[0].zone, long[0].zone} and moved.offset == 0
    finally:
        d.close_device()


def test_an_unreadable_first_record_leaves_the_zone_idle(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    d = EmulatedZonedDevice.create(path, SMALL)
    a = ZoneAllocator(d)
    (loc,) = a.append_batch(SHORT, [make(1)[0][2]])
    os.pwrite(d.fd, b"\xff" * 8, d.zone_start(loc.zone))
    d.close_device()
    d = EmulatedZonedDevice.open(path)
    try:
        a = ZoneAllocator(d)
        assert a.writing() == set() and a.keys[loc.zone] is None
        (new,) = a.append_batch(SHORT, [make(1, tag="n")[0][2]])
        assert new.zone != loc.zone
    finally:
        d.close_device()


def test_a_write_failing_part_way_keeps_earlier_records(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    chunks = make(4, blocks=2)
    (first,) = alloc.append_batch(SHORT, [chunks[0][2]])
    z = first.zone
    dev.fail_next_write(z, 3 * LBA)  # the second record of the batch is torn
    with pytest.raises(AppendError) as exc:
        alloc.append_batch(SHORT, [fr for _, _, fr in chunks[1:]])
    err = exc.value
    assert err.zone == z and err.errno == errno.EIO and err.exit_code == ExitCode.IO
    assert err.written == [Location(z, 2 * LBA, 2 * LBA)]
    assert read_chunk(dev, first, chunks[0][0]) == chunks[0][1]
    assert read_chunk(dev, err.written[0], chunks[1][0]) == chunks[1][1]
    assert dev.cond[z] == Cond.FULL, "no record may follow the torn one"
    entries = list(scan_zone(dev, z))
    assert [e.problem is None for e in entries] == [True, True, False]
    assert entries[2].offset == 4 * LBA
    (after,) = alloc.append_batch(SHORT, [chunks[2][2]])
    assert after.zone != z and read_chunk(dev, after, chunks[2][0]) == chunks[2][1]


def test_scan_resynchronises_after_damage(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    d = EmulatedZonedDevice.create(path, SMALL)
    try:
        a = ZoneAllocator(d)
        before = a.append_batch(SHORT, [fr for _, _, fr in make(2, tag="a")])
        z = before[0].zone
        # A torn record: a header block whose payload never made it (as after a power cut
        # on a drive whose write pointer moved past unflushed data).
        torn = rec.encode(
            make(1, blocks=3, tag="t")[0][2], klass=SHORT, zone_offset=2 * LBA, lba=LBA
        )
        d.write(d.zone_start(z) + 2 * LBA, torn[:LBA] + bytes(LBA))
        d.flush()
        a = ZoneAllocator(d)
        after = a.append_batch(SHORT, [fr for _, _, fr in make(2, tag="b")])
        assert after[0] == Location(z, 4 * LBA, LBA)
        entries = list(scan_zone(d, z))
        assert [(e.offset, e.length, e.problem is None) for e in entries] == [
            (0, LBA, True),
            (LBA, LBA, True),
            (2 * LBA, 2 * LBA, False),
            (4 * LBA, LBA, True),
            (5 * LBA, LBA, True),
        ]
        assert [e.offset for e in scan_zone(d, z, verify=False)][:2] == [0, LBA]
    finally:
        d.close_device()


def test_scan_of_a_finished_zone_stops_at_its_unwritten_end(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    locs = alloc.append_batch(SHORT, [fr for _, _, fr in make(3)])
    alloc.finish(locs[0].zone)
    assert dev.cond[locs[0].zone] == Cond.FULL
    assert [e.offset for e in scan_zone(dev, locs[0].zone)] == [0, LBA, 2 * LBA]
    assert list(scan_zone(dev, 13)) == []


# -- reading faulty zones


def test_readonly_zone_reads_work_and_it_is_drained(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    chunks = make(ZONE_BLOCKS)
    locs = alloc.append_batch(LONG, [fr for _, _, fr in chunks])
    usage = ZoneUsage()
    commit_all(alloc, usage, locs, LONG)
    z = locs[0].zone
    dev.set_readonly(z)
    alloc.refresh(z)
    assert read_chunk(dev, locs[0], chunks[0][0]) == chunks[0][1]
    assert len(list(scan_zone(dev, z))) == ZONE_BLOCKS
    reclaimer = Reclaimer(alloc, usage)
    assert reclaimer.pick_victims() == [z], "drained whatever the free space"
    result = reclaimer.relocate(z, [(c[0], loc) for c, loc in zip(chunks, locs, strict=True)])
    assert len(result.moves) == ZONE_BLOCKS and result.error is None
    for m in result.moves:
        usage.move(m.old, m.new, commit=0)
    alloc.settle([m.new for m in result.moves])
    assert reclaimer.pick_victims() == [] and reclaimer.empty_zones(1) == []
    with pytest.raises(ColdError, match="READONLY"):
        reclaimer.reset(z, durable_commits=1)


def test_offline_zone_reads_fail_clearly(dev: EmulatedZonedDevice, alloc: ZoneAllocator) -> None:
    chunks = make(2)
    locs = alloc.append_batch(LONG, [fr for _, _, fr in chunks])
    usage = ZoneUsage()
    commit_all(alloc, usage, locs, LONG)
    z = locs[0].zone
    dev.set_offline(z)
    with pytest.raises(ZoneOffline) as exc:
        read_record(dev, locs[0], chunks[0][0])
    assert exc.value.zone == z and exc.value.errno == errno.EIO
    assert exc.value.exit_code == ExitCode.IO and "offline" in str(exc.value)
    with pytest.raises(ZoneOffline):
        list(scan_zone(dev, z))
    alloc.refresh(z)
    assert Reclaimer(alloc, usage).lost_zones() == [z]


def test_corrupt_or_misdirected_reads_raise_record_errors(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    chunks = make(2)
    locs = alloc.append_batch(LONG, [fr for _, _, fr in chunks])
    with pytest.raises(RecordError, match="another chunk"):
        read_record(dev, locs[0], chunks[1][0])
    z = locs[0].zone
    assert read_record(dev, Location(z, LBA, LBA), chunks[1][0]) == chunks[1][2]
    # A record image written elsewhere than it says (a misdirected write, a stale copy).
    dev.write(
        dev.zone_start(z) + 2 * LBA, rec.encode(chunks[0][2], klass=1, zone_offset=0, lba=LBA)
    )
    with pytest.raises(RecordError, match="written at"):
        read_record(dev, Location(z, 2 * LBA, LBA), chunks[0][0])
    with pytest.raises(RecordError, match="not a record's place"):
        read_record(dev, Location(locs[0].zone, 100, LBA))
    with pytest.raises(RecordError, match="holds no records"):
        read_record(dev, Location(0, 0, LBA))
    os.pwrite(dev.fd, b"\x00\x01", dev.zone_start(locs[1].zone) + locs[1].offset + 200)
    with pytest.raises(RecordError, match="checksum"):
        read_chunk(dev, locs[1], chunks[1][0])


# -- reclaim


def fill_two_zones(
    alloc: ZoneAllocator, usage: ZoneUsage
) -> tuple[list[tuple[bytes, bytes, bytes]], list[Location]]:
    chunks = make(2 * ZONE_BLOCKS, tag="fill")
    locs = alloc.append_batch(SHORT, [fr for _, _, fr in chunks])
    commit_all(alloc, usage, locs, SHORT)
    return chunks, locs


def test_reclaim_moves_live_records_and_resets_the_victim(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    usage = ZoneUsage()
    chunks, locs = fill_two_zones(alloc, usage)
    victim, other = locs[0].zone, locs[-1].zone
    for loc in locs[:ZONE_BLOCKS:2]:  # half of the victim is garbage
        usage.remove(loc, commit=0)
    for loc in locs[ZONE_BLOCKS : ZONE_BLOCKS + 2]:  # 1/6 of the other: below min_garbage
        usage.remove(loc, commit=0)
    reclaimer = Reclaimer(alloc, usage, low_mark=1)
    assert reclaimer.pick_victims() == [], "plenty of free zones"
    reclaimer.low_mark = len(alloc.free_zones()) + 1
    assert reclaimer.pick_victims(limit=2) == [victim]
    for loc in locs[ZONE_BLOCKS + 2 : ZONE_BLOCKS + 4]:  # now 1/3 of the other
        usage.remove(loc, commit=0)
    assert reclaimer.pick_victims(limit=2) == [victim, other], "most garbage first"
    live = [
        (c[0], loc)
        for c, loc in zip(chunks, locs, strict=True)
        if loc.zone == victim and usage.live_bytes(victim) and (loc.offset // LBA) % 2
    ]
    result = reclaimer.relocate(victim, live)
    assert [m.old for m in result.moves] == [loc for _, loc in live]
    news = [m.new for m in result.moves]
    assert {n.zone for n in news} == {news[0].zone} and news[0].offset == 0
    assert [n.offset for n in news] == [i * LBA for i in range(len(news))]
    with pytest.raises(ZoneBusy, match="live bytes"):
        reclaimer.reset(victim, durable_commits=1)
    for m in result.moves:
        usage.move(m.old, m.new, commit=1)
    alloc.settle(news)
    with pytest.raises(ZoneBusy, match="not durable"):
        reclaimer.reset(victim, durable_commits=1)
    reclaimer.reset(victim, durable_commits=2)
    assert dev.cond[victim] == Cond.EMPTY and victim in alloc.free_zones()
    by_id = {c[0]: c[1] for c in chunks}
    for m in result.moves:
        assert read_chunk(dev, m.new, m.chunk_id) == by_id[m.chunk_id]
        raw = dev.read(dev.zone_start(m.new.zone) + m.new.offset, m.new.length)
        assert rec.decode(raw, m.new.offset, m.chunk_id)[0].relocated


def test_garbage_only_zones_are_reset_at_once(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    usage = ZoneUsage()
    chunks, locs = fill_two_zones(alloc, usage)
    victim = locs[0].zone
    for loc in locs[:ZONE_BLOCKS]:
        usage.remove(loc, commit=5)
    reclaimer = Reclaimer(alloc, usage)
    assert reclaimer.empty_zones(durable_commits=5) == []
    assert reclaimer.reset_empty(durable_commits=6) == [victim]
    assert dev.cond[victim] == Cond.EMPTY and usage.live_bytes(victim) == 0
    assert read_chunk(dev, locs[-1], chunks[-1][0]) == chunks[-1][1]


def test_uncommitted_appends_are_garbage_once_settled(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    """Records whose locations were never committed count in no live bytes: the zone is
    reset as soon as the append is settled (given up), never before."""
    locs = alloc.append_batch(SHORT, [fr for _, _, fr in make(ZONE_BLOCKS)])
    usage = ZoneUsage()
    reclaimer = Reclaimer(alloc, usage)
    z = locs[0].zone
    assert dev.cond[z] == Cond.FULL
    assert reclaimer.empty_zones(durable_commits=1) == []
    with pytest.raises(ZoneBusy, match="not settled"):
        reclaimer.reset(z, durable_commits=1)
    alloc.settle(locs)
    assert reclaimer.reset_empty(durable_commits=1) == [z]


def test_a_pinned_zone_is_not_reset(dev: EmulatedZonedDevice, alloc: ZoneAllocator) -> None:
    usage = ZoneUsage()
    _, locs = fill_two_zones(alloc, usage)
    z = locs[0].zone
    reclaimer = Reclaimer(alloc, usage)
    with usage.pin(z):
        for loc in locs[:ZONE_BLOCKS]:
            usage.remove(loc, commit=0)
        assert reclaimer.empty_zones(durable_commits=1) == []
        with pytest.raises(ZoneBusy, match="pinned") as exc:
            reclaimer.reset(z, durable_commits=1)
        assert exc.value.errno == errno.EBUSY
        assert read_record(dev, locs[0]) is not None
    assert not usage.pins
    reclaimer.reset(z, durable_commits=1)
    assert dev.cond[z] == Cond.EMPTY


def test_the_zone_being_written_is_no_victim_but_is_reset_when_empty(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    usage = ZoneUsage()
    locs = alloc.append_batch(SHORT, [fr for _, _, fr in make(4)])
    commit_all(alloc, usage, locs, SHORT)
    z = locs[0].zone
    usage.remove(locs[0], commit=0)
    reclaimer = Reclaimer(alloc, usage, low_mark=100, min_garbage=0.0)
    assert z in alloc.writing() and reclaimer.pick_victims() == []
    for loc in locs[1:]:
        usage.remove(loc, commit=0)
    assert reclaimer.reset_empty(durable_commits=1) == [z]
    assert dev.cond[z] == Cond.EMPTY and z not in alloc.writing()
    (loc,) = alloc.append_batch(SHORT, [make(1, tag="next")[0][2]])
    assert loc.offset == 0


def test_relocation_lists_unreadable_records(
    dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    usage = ZoneUsage()
    chunks, locs = fill_two_zones(alloc, usage)
    z = locs[0].zone
    bad = locs[3]
    os.pwrite(dev.fd, b"\xee" * 16, dev.zone_start(z) + bad.offset + 300)
    reclaimer = Reclaimer(alloc, usage)
    live = [(c[0], loc) for c, loc in zip(chunks, locs, strict=True) if loc.zone == z]
    result = reclaimer.relocate(z, live)
    assert [u[1] for u in result.unreadable] == [bad] and "checksum" in result.unreadable[0][2]
    assert len(result.moves) == ZONE_BLOCKS - 1
    for m in result.moves:
        usage.move(m.old, m.new, commit=0)
    alloc.settle([m.new for m in result.moves])
    with pytest.raises(ZoneBusy, match="live bytes"):
        reclaimer.reset(z, durable_commits=1)


# -- crash points


def test_crash_points_are_listed_and_reached(
    monkeypatch: pytest.MonkeyPatch, dev: EmulatedZonedDevice, alloc: ZoneAllocator
) -> None:
    names = ("cold-after-append", "reclaim-after-relocate", "reclaim-before-reset")
    assert all(n in POINTS for n in names)
    seen: list[str] = []
    monkeypatch.setattr(zones_mod, "crash_point", seen.append)
    monkeypatch.setattr(reclaim_mod, "crash_point", seen.append)
    usage = ZoneUsage()
    chunks, locs = fill_two_zones(alloc, usage)
    assert seen == ["cold-after-append"]
    z = locs[0].zone
    reclaimer = Reclaimer(alloc, usage)
    live = [(c[0], loc) for c, loc in zip(chunks, locs, strict=True) if loc.zone == z]
    result = reclaimer.relocate(z, live[:3])
    assert seen[1:] == ["reclaim-after-relocate"], "relocation appends are not migrations"
    for m in result.moves:
        usage.move(m.old, m.new, commit=0)
    for _, loc in live[3:]:
        usage.remove(loc, commit=0)
    alloc.settle([m.new for m in result.moves])
    reclaimer.reset(z, durable_commits=1)
    assert seen[2:] == ["reclaim-before-reset"]


# -- the stateful model


STATE_GEO = Geometry(**{**SMALL.__dict__, "nr_zones": 10})
"""Eight sequential zones: with a reserve of 2, a few dozen steps fill the store."""


class ColdStoreModel(RuleBasedStateMachine):
    """Append, free, reclaim, restart and power cuts against a dict of chunk -> location,
    committing every operation at once (durable) as the caller would."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tierfs-cold-"))
        self.path = self.dir / "z.img"
        self.dev = EmulatedZonedDevice.create(self.path, STATE_GEO)
        self.model: dict[bytes, tuple[bytes, Location, int]] = {}
        self.commits = 0
        self.serial = 0
        self._attach(ZoneUsage())

    def _attach(self, usage: ZoneUsage) -> None:
        self.alloc = ZoneAllocator(self.dev, reserve=2)
        self.usage = usage
        self.reclaimer = Reclaimer(self.alloc, usage, low_mark=6, min_garbage=0.0)

    def teardown(self) -> None:
        self.dev.close_device()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(blocks=st.integers(0, 60))
    def prefill(self, blocks: int) -> None:
        """Start part full, so that short runs reach the reserve and reclaim too."""
        for i in range(0, blocks, 6):
            self.append(SHORT if i % 12 else LONG, [ONE_BLOCK] * min(6, blocks - i))

    @rule(
        klass=st.sampled_from([SHORT, LONG]),
        sizes=st.lists(st.integers(1, 3 * LBA), min_size=1, max_size=6),
    )
    def append(self, klass: int, sizes: list[int]) -> None:
        chunks = []
        for n in sizes:
            self.serial += 1
            chunks.append(chunk(blob(n, self.serial)))
        try:
            locs = self.alloc.append_batch(klass, [fr for _, fr in chunks])
        except ColdFull:
            return
        for (cid, fr), loc in zip(chunks, locs, strict=True):
            self.model[cid] = (bytes(frame.decode(fr, cid)), loc, klass)
            self.usage.add(loc, klass)
        self.commits += 1
        self.alloc.settle(locs)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        ids = sorted(self.model)
        for cid in data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=8, unique=True)):
            _, loc, _ = self.model.pop(cid)
            self.usage.remove(loc, self.commits)
        self.commits += 1

    @rule()
    def reclaim(self) -> None:
        self.reclaimer.reset_empty(self.commits)
        for victim in self.reclaimer.pick_victims(limit=1):
            live = [(cid, loc) for cid, (_, loc, _) in self.model.items() if loc.zone == victim]
            result = self.reclaimer.relocate(victim, live)
            assert not result.unreadable
            for m in result.moves:
                data, old, klass = self.model[m.chunk_id]
                assert old == m.old
                self.model[m.chunk_id] = (data, m.new, klass)
                self.usage.move(m.old, m.new, self.commits)
            self.commits += 1
            self.alloc.settle([m.new for m in result.moves])
            if result.error is None:
                self.reclaimer.reset(victim, self.commits)
                assert self.dev.cond[victim] == Cond.EMPTY

    @rule(power_cut=st.booleans())
    def restart(self, power_cut: bool) -> None:
        if power_cut:
            self.dev.crash()
        else:
            self.dev.close_device()
        self.dev = EmulatedZonedDevice.open(self.path)
        assert not any(self.dev.cond[z].is_open for z in range(STATE_GEO.nr_zones))
        rows = [(loc.zone, loc.length, klass) for _, loc, klass in self.model.values()]
        self._attach(ZoneUsage.rebuild(rows))

    @invariant()
    def every_chunk_reads_back(self) -> None:
        for cid, (data, loc, _) in self.model.items():
            assert read_chunk(self.dev, loc, cid) == data

    @invariant()
    def live_bytes_match_the_model(self) -> None:
        expected: dict[int, int] = {}
        for _, loc, _ in self.model.values():
            expected[loc.zone] = expected.get(loc.zone, 0) + loc.length
        for z in self.alloc.zones:
            assert self.usage.live_bytes(z) == expected.get(z, 0)

    @invariant()
    def records_do_not_overlap_and_lie_below_the_write_pointer(self) -> None:
        by_zone: dict[int, list[Location]] = {}
        for _, loc, _ in self.model.values():
            by_zone.setdefault(loc.zone, []).append(loc)
        for z, locs in by_zone.items():
            locs.sort()
            assert self.alloc.zones[z].cond != Cond.EMPTY
            assert locs[-1].offset + locs[-1].length <= self.alloc.zones[z].used
            for a, b in itertools.pairwise(locs):
                assert a.offset + a.length <= b.offset

    @invariant()
    def active_limit_holds(self) -> None:
        assert self.dev.counts()[1] <= self.dev.max_active


TestColdStoreModel = ColdStoreModel.TestCase
TestColdStoreModel.settings = settings(max_examples=20, stateful_step_count=40, deadline=None)
