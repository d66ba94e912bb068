"""Index segments: split by prefix, checked against their names, found across sites, cached.

Region lookups run against a local directory and a real S3 server (SeaweedFS,
`tests/s3server.py`); the byte-level checks work on bodies in memory.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from tests.s3server import BUCKET, store_settings, unique_prefix
from tests.test_upstream_pack import CountingStore, make_frame
from tierfs.data import frame
from tierfs.errors import ExitCode
from tierfs.restore.region import LIST_ALL_AT, RegionLocator
from tierfs.upstream import pack, siteindex
from tierfs.upstream.objectstore import ObjectStore, StoreSettings, open_store
from tierfs.upstream.siteindex import RegionIndex, SegmentEntry, SegmentError
from tools.s3server import S3Server

SITE_A = "be417d82-465e-4667-aaad-a924b55dc1e5"
SITE_B = "0b7f6a64-2c3e-4f55-9d1a-6a3c8e0f4b21"
T0 = 1_795_705_200_000_000_000
PACK = pack.pack_name(pack.KIND_DATA, bytes(range(32)))
TREE_PACK = pack.pack_name(pack.KIND_TREE, bytes(32))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        opened = open_store((tmp_path / "store").as_uri(), StoreSettings(), create=True)
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        opened = open_store(f"s3://{BUCKET}/{unique_prefix()}", store_settings(server))
    yield opened
    opened.close()


def entry(chunk_id: bytes, pack_name: str = PACK, offset: int = 48) -> SegmentEntry:
    return SegmentEntry(chunk_id, pack_name, offset, 100, 80)


def ids(*prefixes: int) -> list[bytes]:
    """One random id starting with each given byte."""
    return [bytes([p]) + os.urandom(31) for p in prefixes]


def publish(
    store: ObjectStore,
    site: str,
    chunks: list[bytes],
    seq: int,
    created_ns: int,
    whole_max: int = siteindex.WHOLE_MAX_ENTRIES,
) -> pack.BuiltPack:
    """What a replicator does: pack the chunks, upload the pack, then its segments."""
    builder = pack.PackBuilder(pack.KIND_DATA, site, 1 << 20)
    for data in chunks:
        builder.add(*make_frame(data))
    built = builder.finish(created_ns)
    store.put(built.name, built.body)
    entries = siteindex.segment_entries(built.name, built.entries)
    segments = siteindex.encode_segments(site, 1, seq, created_ns, entries, whole_max)
    for name, body in segments.items():
        store.put(name, body)
    return built


# Encoding.


def test_a_small_publication_is_one_segment_and_a_large_one_is_split() -> None:
    chunks = ids(*range(256), 7)
    entries = [entry(c) for c in chunks]
    ((name, body),) = siteindex.encode_segments(SITE_A, 2, 5, T0, entries, whole_max=257).items()
    assert name == f"index/all/{SITE_A}/00000002-000000000005"
    segment = siteindex.decode_segment(body, name)
    assert segment.where == siteindex.SegmentName("all", SITE_A, 2, 5)
    assert body[5] == 0  # prefix digits: it covers every prefix
    assert [loc.chunk_id for loc in segment.locations()] == sorted(chunks)
    split = siteindex.encode_segments(SITE_A, 2, 5, T0, entries, whole_max=256)
    assert len(split) == 256 and all(name[6:8] != "al" for name in split)
    default = siteindex.encode_segments(SITE_A, 2, 5, T0, entries)
    assert list(default) == [name]  # the default keeps publications of this size whole


def test_segments_are_split_by_prefix() -> None:
    chunks = ids(0xAB, 0x01, 0xAB, 0xFF)
    entries = [entry(c, TREE_PACK if i == 3 else PACK) for i, c in enumerate(chunks)]
    segments = siteindex.encode_segments(SITE_A, 3, 42, T0, reversed(entries), whole_max=0)
    assert sorted(segments) == [
        f"index/01/{SITE_A}/00000003-000000000042",
        f"index/ab/{SITE_A}/00000003-000000000042",
        f"index/ff/{SITE_A}/00000003-000000000042",
    ]
    found: dict[bytes, siteindex.Location] = {}
    for name, body in segments.items():
        assert body[:4] == b"TFIX"
        segment = siteindex.decode_segment(body, name)
        assert segment.where == siteindex.SegmentName(name[6:8], SITE_A, 3, 42)
        ids_in = [loc.chunk_id for loc in segment.locations()]
        assert ids_in == sorted(ids_in)
        found |= {loc.chunk_id: loc for loc in segment.locations()}
    assert len(found) == 4
    for e in entries:
        loc = found[e.chunk_id]
        assert (loc.pack, loc.offset, loc.length, loc.raw_len) == (e.pack, 48, 100, 80)
        assert (loc.site_uuid, loc.created_ns, loc.epoch, loc.seq) == (SITE_A, T0, 3, 42)
    assert siteindex.encode_segments(SITE_A, 1, 0, T0, []) == {}


def test_segment_layout() -> None:
    """The sizes of docs/FORMAT.md: 56-byte header, 33 per pack, 52 per entry, 8 trailer."""
    chunks = sorted(ids(7, 7, 7))
    entries = [entry(chunks[0]), entry(chunks[1], TREE_PACK), entry(chunks[2], offset=5000)]
    ((name, body),) = siteindex.encode_segments(SITE_A, 1, 2, T0, entries, whole_max=0).items()
    assert name == siteindex.segment_name("07", SITE_A, 1, 2)
    assert len(body) == 56 + 2 * 33 + 3 * 52 + 8
    fields = struct.unpack_from(">4sBBHI16sIQQII", body)
    assert fields == (b"TFIX", 1, 2, 0, 0, uuid.UUID(SITE_A).bytes, 1, 2, T0, 2, 3)
    assert body[56:89] == b"\x01" + bytes(range(32))  # packs ascending: data before tree
    assert body[89:122] == b"\x02" + bytes(32)
    assert struct.unpack_from(">32sIQII", body, 122 + 52) == (chunks[1], 1, 48, 100, 80)
    assert body[-8:] == xxhash.xxh3_64(body[:-8]).digest()


def test_encoding_refuses_bad_input() -> None:
    (chunk,) = ids(1)
    with pytest.raises(ValueError, match="twice"):
        siteindex.encode_segments(SITE_A, 1, 1, T0, [entry(chunk), entry(chunk, TREE_PACK)])
    bad = [
        SegmentEntry(chunk, "packs/data/zz", 48, 100, 1),
        SegmentEntry(chunk, PACK, 10, 100, 1),
        SegmentEntry(chunk, PACK, 48, 10, 1),
        SegmentEntry(chunk[:31], PACK, 48, 100, 1),
    ]
    for wrong in bad:
        with pytest.raises(ValueError):
            siteindex.encode_segments(SITE_A, 1, 1, T0, [wrong])
    for epoch, seq in ((0, 1), (10**8, 1), (1, 10**12), (1, -1)):
        with pytest.raises(ValueError):
            siteindex.encode_segments(SITE_A, epoch, seq, T0, [entry(chunk)])


@given(
    st.lists(st.binary(min_size=32, max_size=32), max_size=40, unique=True),
    st.integers(min_value=0, max_value=41),
)
def test_random_segments_round_trip_and_find(chunks: list[bytes], whole_max: int) -> None:
    entries = [entry(c, offset=48 + i) for i, c in enumerate(chunks)]
    segments = siteindex.encode_segments(SITE_B, 9, 9, T0, entries, whole_max)
    decoded = [siteindex.decode_segment(body, name) for name, body in segments.items()]
    assert sum(s.count for s in decoded) == len(chunks)
    assert len(decoded) == 1 or not chunks or len(chunks) > whole_max
    for i, chunk in enumerate(chunks):
        (segment,) = [s for s in decoded if s.where.prefix in (chunk.hex()[:2], "all")]
        location = segment.find(chunk)
        assert location is not None and location.offset == 48 + i
        assert location.entry == pack.PackEntry(chunk, 48 + i, 100, 80)
        absent = chunk[:31] + bytes([chunk[31] ^ 1])
        assert absent in chunks or segment.find(absent) is None


def test_names() -> None:
    name = siteindex.segment_name("0f", SITE_A, 12, 345)
    assert name == f"index/0f/{SITE_A}/00000012-000000000345"
    assert siteindex.parse_segment_name(name) == siteindex.SegmentName("0f", SITE_A, 12, 345)
    whole = siteindex.segment_name("all", SITE_A, 1, 2)
    assert siteindex.parse_segment_name(whole) == siteindex.SegmentName("all", SITE_A, 1, 2)
    for wrong in (
        f"index/al/{SITE_A}/00000012-000000000345",
        f"index/All/{SITE_A}/00000012-000000000345",
        f"index/0f/{SITE_A.upper()}/00000012-000000000345",
        f"index/0F/{SITE_A}/00000012-000000000345",
        f"index/0f0/{SITE_A}/00000012-000000000345",
        f"index/0f/{SITE_A}/0000012-000000000345",
        f"index/0f/{SITE_A}/00000012-000000000345/x",
        "index/0f/not-a-uuid-----------------------/00000012-000000000345",
    ):
        with pytest.raises(ValueError):
            siteindex.parse_segment_name(wrong)


# Damage, versions, names.


def one_segment() -> tuple[str, bytes]:
    entries = [entry(c) for c in ids(0x5A, 0x5A)]
    ((name, body),) = siteindex.encode_segments(SITE_A, 1, 7, T0, entries, whole_max=0).items()
    return name, body


def assert_refused(exc: pytest.ExceptionInfo[SegmentError], code: ExitCode, name: str) -> None:
    assert exc.value.exit_code == code, exc.value
    assert "\n" not in exc.value.message and name in exc.value.message


def test_any_flipped_byte_or_cut_is_caught() -> None:
    name, body = one_segment()
    for position in range(len(body)):
        damaged = bytearray(body)
        damaged[position] ^= 0x10
        with pytest.raises(SegmentError) as exc:
            siteindex.decode_segment(bytes(damaged), name)
        assert_refused(exc, ExitCode.VERIFY_FAILED, name)
    for cut in (body[:-1], body[:60], body[1:], body + b"\0"):
        with pytest.raises(SegmentError) as exc:
            siteindex.decode_segment(cut, name)
        assert_refused(exc, ExitCode.VERIFY_FAILED, name)


def resummed(body: bytearray) -> bytes:
    body[-8:] = xxhash.xxh3_64(bytes(body[:-8])).digest()
    return bytes(body)


def test_a_valid_body_under_another_name_is_refused() -> None:
    _, body = one_segment()
    for other in (
        siteindex.segment_name("5a", SITE_B, 1, 7),
        siteindex.segment_name("5a", SITE_A, 2, 7),
        siteindex.segment_name("5a", SITE_A, 1, 8),
        siteindex.segment_name("5b", SITE_A, 1, 7),
        siteindex.segment_name("all", SITE_A, 1, 7),  # says 2 prefix digits, not 0
    ):
        with pytest.raises(SegmentError) as exc:
            siteindex.decode_segment(body, other)
        assert_refused(exc, ExitCode.VERIFY_FAILED, other)


def test_checksummed_but_inconsistent_bodies_are_refused() -> None:
    name, body = one_segment()
    entries_at = 56 + 33
    changes = {
        "prefix digits": (5, b"\x03"),
        "reserved": (6, b"\x01"),
        "pack kind": (56, b"\x09"),
        "pack number": (entries_at + 35, b"\x01"),
        "offset": (entries_at + 36, bytes(8)),
        "length": (entries_at + 44, bytes(4)),
        "order": (entries_at + 52, body[entries_at : entries_at + 32]),
        "prefix": (entries_at, b"\x5b"),
    }
    for position, value in changes.values():
        damaged = bytearray(body)
        damaged[position : position + len(value)] = value
        with pytest.raises(SegmentError) as exc:
            siteindex.decode_segment(resummed(damaged), name)
        assert_refused(exc, ExitCode.VERIFY_FAILED, name)


@pytest.mark.parametrize(("position", "value"), [(4, 2), (11, 1), (8, 0x80)])
def test_unknown_version_or_flag_is_refused(position: int, value: int) -> None:
    name, body = one_segment()
    damaged = bytearray(body)
    damaged[position] = value
    with pytest.raises(SegmentError) as exc:
        siteindex.decode_segment(resummed(damaged), name)
    assert_refused(exc, ExitCode.VERSION, name)


# The region index.


def test_two_sites_find_each_others_chunks(store: ObjectStore) -> None:
    shared, only_a, only_b = os.urandom(5000), b"a" * 3000, os.urandom(100)
    built_a = publish(store, SITE_A, [shared, only_a], seq=0, created_ns=T0)
    publish(store, SITE_B, [only_b], seq=0, created_ns=T0 + 1)
    shared_id, a_id, b_id = (make_frame(d)[0] for d in (shared, only_a, only_b))
    missing = make_frame(b"nobody has this")[0]
    index = RegionIndex(store)
    found = index.lookup([shared_id, a_id, b_id, missing])
    assert set(found) == {shared_id, a_id, b_id}
    assert found[shared_id].site_uuid == SITE_A and found[shared_id].pack == built_a.name
    assert found[b_id].site_uuid == SITE_B and found[b_id].created_ns == T0 + 1
    for chunk_id, data in ((shared_id, shared), (b_id, only_b)):
        location = found[chunk_id]
        chunk_frame = pack.read_frame(store, location.pack, location.entry)
        assert frame.decode(chunk_frame, chunk_id) == data
    assert index.lookup([]) == {} and index.corrupt == {}


def test_the_oldest_publication_wins(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri(), StoreSettings())
    data = os.urandom(1000)
    chunk_id = make_frame(data)[0]
    late = publish(store, SITE_A, [data], seq=5, created_ns=T0 + 100)
    index = RegionIndex(store)
    assert index.lookup([chunk_id])[chunk_id].pack == late.name  # this site's own segment
    early = publish(store, SITE_B, [data, b"x"], seq=1, created_ns=T0)
    assert early.name != late.name
    assert index.lookup([chunk_id])[chunk_id].pack == early.name
    assert RegionIndex(store).lookup([chunk_id])[chunk_id].pack == early.name


@pytest.mark.parametrize("split_first", [True, False])
def test_the_oldest_wins_across_whole_and_split_segments(tmp_path: Path, split_first: bool) -> None:
    store = open_store(tmp_path.as_uri(), StoreSettings())
    data = os.urandom(1000)
    chunk_id = make_frame(data)[0]
    first, second = (0, siteindex.WHOLE_MAX_ENTRIES) if split_first else (1 << 20, 0)
    early = publish(store, SITE_A, [data, b"a"], seq=1, created_ns=T0, whole_max=first)
    late = publish(store, SITE_B, [data, b"b"], seq=1, created_ns=T0 + 5, whole_max=second)
    names = list(store.list("index/"))
    assert any("/all/" in n for n in names) and any("/all/" not in n for n in names)
    assert early.name != late.name
    assert RegionIndex(store).lookup([chunk_id])[chunk_id].pack == early.name


def test_lookup_reads_only_the_prefixes_it_needs(tmp_path: Path) -> None:
    inner = open_store(tmp_path.as_uri(), StoreSettings())
    chunks = ids(*range(256))
    segments = siteindex.encode_segments(SITE_A, 1, 1, T0, [entry(c) for c in chunks], 0)
    assert len(segments) == 256
    for name, body in segments.items():
        inner.put(name, body)
    store = CountingStore(inner)
    found = RegionIndex(store).lookup([chunks[0x12], chunks[0xE0], ids(0x12)[0]])
    assert set(found) == {chunks[0x12], chunks[0xE0]}
    assert sorted(store.calls) == [
        ("get", siteindex.segment_name("12", SITE_A, 1, 1)),
        ("get", siteindex.segment_name("e0", SITE_A, 1, 1)),
        ("list", "index/12/"),
        ("list", "index/all/"),
        ("list", "index/e0/"),
    ]


def test_segments_are_fetched_once_and_cached_on_disk(tmp_path: Path) -> None:
    store = CountingStore(open_store((tmp_path / "s").as_uri(), StoreSettings(), create=True))
    cache = tmp_path / "cache"
    data = [os.urandom(200) for _ in range(20)]
    chunk_ids = [make_frame(d)[0] for d in data]
    publish(store, SITE_A, data[:10], seq=1, created_ns=T0)
    first = RegionIndex(store, cache)
    assert len(first.lookup(chunk_ids)) == 10
    gets = store.count("get")
    assert gets == 1  # a publication this small is one segment
    assert len(first.lookup(chunk_ids)) == 10
    assert store.count("get") == gets  # known segments are not fetched again
    publish(store, SITE_B, data[10:], seq=1, created_ns=T0 + 1)
    assert len(first.lookup(chunk_ids)) == 20
    gets = store.count("get")
    restarted = RegionIndex(store, cache)
    assert restarted.lookup(chunk_ids) == first.lookup(chunk_ids)
    assert store.count("get") == gets  # everything came from the cache directory
    cached = next((cache / "index").rglob("00000001-000000000001"))
    cached.write_bytes(cached.read_bytes()[:-1])  # a torn cache file is fetched again
    assert RegionIndex(store, cache).lookup(chunk_ids) == first.lookup(chunk_ids)
    assert store.count("get") == gets + 1
    assert not list(cache.rglob(".tmp-*"))


def test_a_corrupt_segment_is_skipped_and_reported(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri(), StoreSettings())
    good = ids(0x33)[0]
    segments = siteindex.encode_segments(SITE_A, 1, 1, T0, [entry(good)])
    bad = ids(0x33)[0]
    ((name, body),) = siteindex.encode_segments(SITE_B, 1, 1, T0, [entry(bad)]).items()
    for segment_name, segment_body in segments.items():
        store.put(segment_name, segment_body)
    store.put(name, body[:-3] + b"zzz")
    store.put("index/33/README", b"not a segment")
    index = RegionIndex(store, tmp_path / "cache")
    assert set(index.lookup([good, bad])) == {good}
    assert list(index.corrupt) == [name] and "checksum" in index.corrupt[name]
    assert not (tmp_path / "cache" / name).exists()
    with pytest.raises(SegmentError):
        siteindex.decode_segment(store.get(name), name)


def test_own_segments_can_be_added_without_a_fetch(tmp_path: Path) -> None:
    store = CountingStore(open_store(tmp_path.as_uri(), StoreSettings()))
    chunk = ids(0x77)[0]
    segments = siteindex.encode_segments(SITE_A, 1, 1, T0, [entry(chunk)])
    index = RegionIndex(store)
    for name, body in segments.items():
        store.put(name, body)
        index.add(name, body)
    assert index.lookup([chunk])[chunk].site_uuid == SITE_A
    assert store.count("get") == 0


# The restore's locator: the same segments, listed once for a whole tree.


def test_a_restore_finds_chunks_in_whole_and_split_segments(tmp_path: Path) -> None:
    inner = open_store(tmp_path.as_uri(), StoreSettings())
    shared = os.urandom(700)
    split_data = [shared] + [os.urandom(300) for _ in range(60)]
    whole_data = [shared] + [os.urandom(300) for _ in range(5)]
    split = publish(inner, SITE_A, split_data, seq=1, created_ns=T0 + 10, whole_max=0)
    whole = publish(inner, SITE_B, whole_data, seq=1, created_ns=T0)
    split_ids = [make_frame(d)[0] for d in split_data]
    whole_ids = [make_frame(d)[0] for d in whole_data]
    expected = RegionIndex(inner).lookup(split_ids + whole_ids)
    assert expected[split_ids[0]].pack == whole.name  # the older publication wins
    assert {expected[c].pack for c in split_ids[1:]} == {split.name}

    few = CountingStore(inner)
    wanted = [split_ids[1], whole_ids[1]]
    assert RegionLocator(few).locate(wanted) == {c: expected[c] for c in wanted}
    listed = sorted(prefix for call, prefix in few.calls if call == "list")
    assert listed == sorted({f"index/{c.hex()[:2]}/" for c in wanted} | {"index/all/"})

    many = CountingStore(inner)
    locator = RegionLocator(many)
    assert len({c.hex()[:2] for c in split_ids}) > LIST_ALL_AT
    assert locator.locate(split_ids + whole_ids) == expected
    assert [call for call in many.calls if call[0] == "list"] == [("list", "index/")]
    segment_gets = [name for call, name in many.calls if call == "get"]
    assert sorted(segment_gets) == sorted(inner.list("index/"))  # each segment once

    late = os.urandom(500)
    late_id = make_frame(late)[0]
    publish(inner, SITE_B, [late], seq=2, created_ns=T0 + 20)
    assert locator.locate([late_id])[late_id].seq == 2  # published since: listed again
    missing = make_frame(b"nobody has this")[0]
    assert locator.locate([missing]) == {}
