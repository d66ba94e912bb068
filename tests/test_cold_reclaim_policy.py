"""The cold store's reclaim policy at high fill (tierfs/tiers/cold), against the emulated
zoned device, with a caller that does what `ColdTier` does.

Two deadlocks of the old policy are reproduced and shown gone: garbage spread thinly below
`min_garbage` while only the reserve is EMPTY (reclaim waited for zones that never came),
and a batch larger than the EMPTY zones reclaim keeps (migration waited for room reclaim
never made). Also: partial appends, the low mark, zones passed over (no dead records, or
records that cannot be moved), and that urgent reclaim waits for resets already coming.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierfs.data import frame
from tierfs.tiers.cold import (
    ColdFull,
    Lifetime,
    Location,
    Reclaimer,
    ZoneAllocator,
    ZoneUsage,
    read_chunk,
    scan_zone,
)
from tierfs.tiers.cold import record as rec
from tierfs.tiers.zns.emulated import EmulatedZonedDevice
from tierfs.tiers.zns.model import Cond, Geometry

LBA = 4096
GEO = Geometry(
    lba_size=LBA,
    zone_size=64 * 1024,
    zone_capacity=48 * 1024,
    nr_zones=16,
    nr_conv=2,
    max_open=3,
    max_active=4,
    zone_append_max=16 * 1024,
)
ZONE_BLOCKS = GEO.zone_capacity // LBA  # 12
SEQ_ZONES = GEO.nr_zones - GEO.nr_conv  # 14
LONG = int(Lifetime.LONG)


def make_chunk(blocks: int, seed: object) -> tuple[bytes, bytes, bytes]:
    """(chunk id, plaintext, frame) whose record is exactly `blocks` blocks."""
    data = random.Random(str(seed)).randbytes(blocks * LBA - rec.HEADER_SIZE - frame.HEADER_SIZE)
    cid = hashlib.sha256(data).digest()
    return cid, data, frame.encode(cid, data, 0)[0]


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[EmulatedZonedDevice]:
    d = EmulatedZonedDevice.create(tmp_path / "zones.img", GEO)
    yield d
    d.close_device()


class Caller:
    """The index side, as `ColdTier` keeps it: chunk -> location, live bytes per zone, every
    commit durable at once; migration by partial appends, reclaim with or without `need`."""

    def __init__(
        self,
        dev: EmulatedZonedDevice,
        *,
        min_garbage: float = 0.25,
        low_mark: int | None = None,
        urgent: bool = True,
    ) -> None:
        self.dev = dev
        self.alloc = ZoneAllocator(dev, reserve=2)
        self.usage = ZoneUsage()
        self.reclaimer = Reclaimer(
            self.alloc, self.usage, min_garbage=min_garbage, low_mark=low_mark
        )
        self.urgent = urgent
        self.index: dict[bytes, tuple[bytes, Location]] = {}
        self.commits = 0
        self.need = 0
        self.relocated = 0
        self.resets = 0
        self.serial = 0

    def new_chunks(self, n: int, blocks: int = 1) -> list[tuple[bytes, bytes, bytes]]:
        out = []
        for _ in range(n):
            self.serial += 1
            out.append(make_chunk(blocks, self.serial))
        return out

    def commit(self, chunks: list[tuple[bytes, bytes, bytes]], locs: list[Location]) -> None:
        for (cid, data, _), loc in zip(chunks, locs, strict=False):
            self.index[cid] = (data, loc)
            self.usage.add(loc, LONG)
        self.commits += 1
        self.alloc.settle(locs)

    def free(self, cids: list[bytes]) -> None:
        for cid in cids:
            _, loc = self.index.pop(cid)
            self.usage.remove(loc, self.commits)
        self.commits += 1

    def migrate(self, chunks: list[tuple[bytes, bytes, bytes]], *, partial: bool = True) -> int:
        """Append the chunks as `ColdTier._store_batch` does (what fits; when blocked,
        one reclaim pass and one more try); the number migrated. Raises ColdFull."""
        done = 0
        reclaimed = False
        while chunks:
            try:
                locs = self.alloc.append_batch(LONG, [f for _, _, f in chunks], partial=partial)
            except ColdFull:
                if reclaimed:
                    raise
                locs = []
            self.commit(chunks, locs)
            done += len(locs)
            chunks = chunks[len(locs) :]
            if chunks:
                self.need = sum(len(f) for _, _, f in chunks) if self.urgent else 0
                self.reclaim()
                reclaimed = True
        self.need = 0
        return done

    def migrate_until_done(self, chunks: list[tuple[bytes, bytes, bytes]]) -> bool:
        """As the daemon's `migrate --now`: on ColdFull, sync (here: nothing to do), reclaim
        and go on while that reset zones. False when migration stalls for good."""
        while True:
            chunks = [c for c in chunks if c[0] not in self.index]  # what is still "hot"
            if not chunks:
                return True
            resets = self.resets
            try:
                self.migrate(chunks)
            except ColdFull:
                self.reclaim()
                if self.resets == resets:
                    return False

    def reclaim(self) -> None:
        self.resets += len(self.reclaimer.reset_empty(self.commits))
        for victim in self.reclaimer.pick_victims(need=self.need):
            self.relocate(victim)

    def relocate(self, victim: int) -> None:
        entries = list(scan_zone(self.dev, victim))
        if not self.reclaimer.worth_relocating(victim, entries):
            return
        live = [(cid, loc) for cid, (_, loc) in self.index.items() if loc.zone == victim]
        result = self.reclaimer.relocate(victim, live)
        for m in result.moves:
            data, old = self.index[m.chunk_id]
            assert old == m.old
            self.index[m.chunk_id] = (data, m.new)
            self.usage.move(m.old, m.new, self.commits)
        self.commits += 1
        self.alloc.settle([m.new for m in result.moves])
        self.relocated += len(result.moves)

    def check(self) -> None:
        """Every chunk reads back; live bytes match the index."""
        expected: dict[int, int] = {}
        for cid, (data, loc) in self.index.items():
            assert read_chunk(self.dev, loc, cid) == data
            expected[loc.zone] = expected.get(loc.zone, 0) + loc.length
        for z in self.alloc.zones:
            assert self.usage.live_bytes(z) == expected.get(z, 0), z


def fill_thinly(c: Caller) -> None:
    """Twelve zones of one-block chunks (only the reserve left EMPTY), then every ninth
    chunk freed: one or two blocks of garbage per zone, well below min_garbage."""
    assert c.migrate(c.new_chunks(12 * ZONE_BLOCKS)) == 12 * ZONE_BLOCKS
    assert len(c.alloc.free_zones()) == c.alloc.reserve
    by_place = sorted(c.index, key=lambda cid: c.index[cid][1])
    c.free(by_place[::9])
    share = max(c.reclaimer.garbage(z) / c.alloc.zones[z].used for z in c.usage.live)
    assert 0 < share < c.reclaimer.min_garbage


# -- the two deadlocks


def test_thin_garbage_deadlocked_the_old_policy(dev: EmulatedZonedDevice) -> None:
    c = Caller(dev, urgent=False)
    fill_thinly(c)
    assert c.reclaimer.pick_victims() == [], "no zone reaches min_garbage"
    assert not c.migrate_until_done(c.new_chunks(ZONE_BLOCKS)), "stuck for good"
    assert c.relocated == 0


def test_thin_garbage_no_longer_blocks_migration(dev: EmulatedZonedDevice) -> None:
    c = Caller(dev)
    fill_thinly(c)
    fresh = c.new_chunks(ZONE_BLOCKS)
    assert c.migrate_until_done(fresh)
    assert all(cid in c.index for cid, _, _ in fresh)
    assert c.relocated > 0
    c.check()


def batch_case(c: Caller) -> list[tuple[bytes, bytes, bytes]]:
    """Ten zones full (four EMPTY: the reserve and two, the old low mark), a third of every
    zone garbage, and a batch of three zones' worth to migrate."""
    assert c.migrate(c.new_chunks(10 * ZONE_BLOCKS)) == 10 * ZONE_BLOCKS
    assert len(c.alloc.free_zones()) == c.alloc.reserve + 2
    c.free(sorted(c.index)[::3])
    return c.new_chunks(3 * ZONE_BLOCKS)


def test_a_batch_larger_than_the_free_zones_deadlocked_the_old_policy(
    dev: EmulatedZonedDevice,
) -> None:
    c = Caller(dev, urgent=False)
    batch = batch_case(c)
    assert c.reclaimer.pick_victims() == [], "not below the low mark: reclaim rests"
    with pytest.raises(ColdFull):
        c.migrate(batch, partial=False)
    assert c.reclaimer.pick_victims() == [] and c.reclaimer.reset_empty(c.commits) == []


def test_a_batch_larger_than_the_free_zones_is_migrated(dev: EmulatedZonedDevice) -> None:
    c = Caller(dev)
    batch = batch_case(c)
    assert c.migrate_until_done(batch)
    assert all(cid in c.index for cid, _, _ in batch)
    c.check()


def test_a_batch_writes_what_fits_then_reclaim_takes_over(dev: EmulatedZonedDevice) -> None:
    """The part of the batch that fits fills the two zones beyond the reserve: that takes the
    EMPTY zones below the low mark, so even without hurrying reclaim goes on."""
    c = Caller(dev, urgent=False)
    batch = batch_case(c)
    locs = c.alloc.append_batch(LONG, [f for _, _, f in batch], partial=True)
    assert 2 * ZONE_BLOCKS - 1 <= len(locs) < len(batch)
    c.commit(batch, locs)
    assert len(c.alloc.free_zones()) == c.alloc.reserve
    assert c.reclaimer.pick_victims(), "below the low mark now"
    assert c.migrate_until_done(batch)
    c.check()


# -- the pieces


def test_partial_append_writes_what_fits(dev: EmulatedZonedDevice) -> None:
    alloc = ZoneAllocator(dev, reserve=2)
    usable = (SEQ_ZONES - 2) * ZONE_BLOCKS
    first = [f for _, _, f in (make_chunk(1, i) for i in range(usable - 3))]
    assert len(alloc.append_batch(LONG, first)) == usable - 3
    batch = [f for _, _, f in (make_chunk(1, f"b{i}") for i in range(5))]
    wps = list(dev.wp)
    with pytest.raises(ColdFull, match="beyond the reserve"):
        alloc.append_batch(LONG, batch)
    assert dev.wp == wps, "a whole batch that does not fit writes nothing"
    locs = alloc.append_batch(LONG, batch, partial=True)
    assert len(locs) == 3 and len(alloc.free_zones()) == alloc.reserve
    assert read_chunk(dev, locs[-1], make_chunk(1, "b2")[0]) == make_chunk(1, "b2")[1]
    with pytest.raises(ColdFull):
        alloc.append_batch(LONG, batch[3:], partial=True)
    assert alloc.append_batch(LONG, [], partial=True) == []
    assert alloc.append_batch(LONG, []) == []


def test_urgent_reclaim_takes_the_dirtiest_zones_within_the_room(
    dev: EmulatedZonedDevice,
) -> None:
    c = Caller(dev)
    fill_thinly(c)
    need = ZONE_BLOCKS * LBA
    short = c.reclaimer.shortfall(need)
    assert short == 2 * GEO.zone_capacity, "room for the need and back to the low mark"
    victims = c.reclaimer.pick_victims(need=need)
    garbage = [c.reclaimer.garbage(z) for z in victims]
    assert victims and garbage == sorted(garbage, reverse=True)
    others = set(c.usage.live) - set(victims)
    assert all(c.reclaimer.garbage(z) <= min(garbage) for z in others if z in c.alloc.zones)
    room = len(c.alloc.free_zones()) * GEO.zone_capacity
    assert sum(c.usage.live_bytes(z) for z in victims) <= room
    assert c.reclaimer.pick_victims(need=0) == [], "without a need, min_garbage holds"


def test_urgent_reclaim_waits_for_resets_already_coming(dev: EmulatedZonedDevice) -> None:
    c = Caller(dev)
    fill_thinly(c)
    zones = sorted({loc.zone for _, loc in c.index.values()})
    for z in zones[:3]:  # three zones emptied, their commit not durable yet
        doomed = [cid for cid, (_, loc) in c.index.items() if loc.zone == z]
        c.free(doomed)
    assert c.reclaimer.reset_empty(durable_commits=0) == []
    assert c.reclaimer.shortfall(ZONE_BLOCKS * LBA) <= 0
    assert c.reclaimer.pick_victims(need=ZONE_BLOCKS * LBA) == []


def test_a_zone_without_dead_records_is_passed_over(dev: EmulatedZonedDevice) -> None:
    """Five-block records in twelve-block zones: each zone ends with two unwritten blocks
    that no record fits. That garbage comes back with any relocation: no gain."""
    c = Caller(dev)
    assert c.migrate(c.new_chunks(4, blocks=5)) == 4
    full = sorted({loc.zone for _, loc in c.index.values()})[0]
    assert c.alloc.zones[full].cond == Cond.FULL and c.reclaimer.garbage(full) == 2 * LBA
    assert not c.reclaimer.worth_relocating(full, list(scan_zone(dev, full)))
    c.reclaimer.low_mark, c.reclaimer.min_garbage = 100, 0.0
    assert full not in c.reclaimer.pick_victims(limit=10)
    assert full not in c.reclaimer.pick_victims(need=100 * GEO.zone_capacity)
    # A record freed: dead bytes now, it is worth it again.
    c.free([cid for cid, (_, loc) in c.index.items() if loc.zone == full][:1])
    assert c.reclaimer.worth_relocating(full, list(scan_zone(dev, full)))
    assert full in c.reclaimer.pick_victims(limit=10)


def test_a_zone_finished_early_is_worth_relocating(dev: EmulatedZonedDevice) -> None:
    c = Caller(dev)
    c.migrate(c.new_chunks(3))
    (z,) = {loc.zone for _, loc in c.index.values()}
    c.alloc.finish(z)
    assert c.reclaimer.garbage(z) == (ZONE_BLOCKS - 3) * LBA
    assert c.reclaimer.worth_relocating(z, list(scan_zone(dev, z)))


def test_a_readonly_zone_that_cannot_be_drained_whole_is_not_picked_again(
    dev: EmulatedZonedDevice,
) -> None:
    """A READONLY zone with an unreadable record keeps live bytes after its drain; it used
    to be the first (with limit 1, the only) victim of every pass."""
    c = Caller(dev, low_mark=100)
    c.migrate(c.new_chunks(3 * ZONE_BLOCKS))
    zones = sorted({loc.zone for _, loc in c.index.values()})
    bad, dirty = zones[0], zones[1]
    c.free([cid for cid, (_, loc) in c.index.items() if loc.zone == dirty][::2])
    broken = next(loc for _, loc in c.index.values() if loc.zone == bad)
    os.pwrite(dev.fd, b"\xee" * 16, dev.zone_start(bad) + broken.offset + 300)
    dev.set_readonly(bad)
    c.alloc.refresh(bad)
    assert c.reclaimer.pick_victims() == [bad]
    c.relocate(bad)
    assert c.usage.live_bytes(bad) == broken.length, "the unreadable record stays"
    assert c.reclaimer.pick_victims() == [dirty], "the bad zone does not come first again"
    c.relocate(dirty)
    c.reclaim()
    assert dev.cond[dirty] == Cond.EMPTY


@pytest.mark.parametrize("seed", range(4))
def test_random_churn_at_high_fill_keeps_migrating(dev: EmulatedZonedDevice, seed: int) -> None:
    """~85% live, rounds of random frees and as many new chunks of mixed sizes: migration
    never stalls, and everything reads back."""
    rng = random.Random(seed)
    c = Caller(dev)
    blocks = int(0.85 * (SEQ_ZONES - 2) * ZONE_BLOCKS)
    chunks = []
    while blocks > 0:
        n = min(blocks, rng.choice((1, 1, 2, 3)))
        chunks += c.new_chunks(1, blocks=n)
        blocks -= n
    assert c.migrate_until_done(chunks)
    for _ in range(30):
        gone = rng.sample(sorted(c.index), max(1, len(c.index) // 10))
        blocks = sum(c.index[cid][1].length for cid in gone) // LBA
        c.free(gone)
        fresh = []
        while blocks > 0:
            n = min(blocks, rng.choice((1, 1, 2, 3)))
            fresh += c.new_chunks(1, blocks=n)
            blocks -= n
        assert c.migrate_until_done(fresh)
    c.check()
