"""Pack objects: frames in, frames out, by whole body and by ranged reads, damage always caught.

Stored packs are tested against a local directory and a real S3 server (SeaweedFS,
`tests/s3server.py`); the byte-level checks work on bodies in memory.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from tests.s3server import BUCKET, store_settings, unique_prefix
from tierfs.data import frame
from tierfs.errors import ExitCode
from tierfs.upstream import pack
from tierfs.upstream.objectstore import ObjectMissing, ObjectStore, StoreSettings, open_store
from tools.s3server import S3Server

SITE = "be417d82-465e-4667-aaad-a924b55dc1e5"
KEY = b"k" * 32
CREATED = 1_795_705_200_123_456_789


class CountingStore(ObjectStore):
    """Passes every call through to `inner` and records it, to count requests."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: list[tuple[str, str]] = []

    def count(self, method: str) -> int:
        return sum(1 for called, _ in self.calls if called == method)

    def put(self, name: str, data: bytes) -> None:
        self.calls.append(("put", name))
        self.inner.put(name, data)

    def get(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        self.calls.append(("get", name))
        return self.inner.get(name, start, end)

    def head(self, name: str) -> int | None:
        self.calls.append(("head", name))
        return self.inner.head(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        self.calls.append(("list", prefix))
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.inner.delete(name)


def make_frame(data: bytes, level: int = 3) -> tuple[bytes, bytes]:
    """(chunk id, frame) as the sealer makes them: keyed BLAKE3 id, frame.encode."""
    chunk_id = blake3.blake3(data, key=KEY).digest()
    return chunk_id, frame.encode(chunk_id, data, level)[0]


def sample_chunks() -> list[bytes]:
    """Compressible and random chunks of several sizes, one empty."""
    return [b"log line %d\n" % i * 300 for i in range(3)] + [
        os.urandom(n) for n in (0, 1, 100, 70_000)
    ]


def build(chunks: list[bytes], kind: int = pack.KIND_DATA) -> pack.BuiltPack:
    builder = pack.PackBuilder(kind, SITE, 8 << 20)
    for data in chunks:
        builder.add(*make_frame(data))
    return builder.finish(CREATED)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        opened = open_store((tmp_path / "store").as_uri(), StoreSettings(), create=True)
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        opened = open_store(f"s3://{BUCKET}/{unique_prefix()}", store_settings(server))
    yield opened
    opened.close()


def local_store(path: Path) -> ObjectStore:
    return open_store(path.as_uri(), StoreSettings(), create=True)


def assert_refused(exc: pytest.ExceptionInfo[pack.PackError], code: ExitCode, *words: str) -> None:
    assert exc.value.exit_code == code, exc.value
    assert "\n" not in exc.value.message and exc.value.message.startswith("pack "), exc.value
    for word in words:
        assert word in exc.value.message, exc.value


# Round trips.


@pytest.mark.parametrize("kind", [pack.KIND_DATA, pack.KIND_TREE])
def test_round_trip_by_ranged_reads(store: ObjectStore, kind: int) -> None:
    chunks = sample_chunks()
    built = build(chunks, kind)
    pid = blake3.blake3(built.body).hexdigest()
    assert built.name == f"packs/{pack.KIND_NAMES[kind]}/{pid[:2]}/{pid}"
    assert pack.parse_pack_name(built.name) == (kind, bytes.fromhex(pid))
    store.put(built.name, built.body)
    counting = CountingStore(store)
    entries = pack.read_index(counting, built.name)
    assert entries == built.entries
    assert [c for c, _ in counting.calls] == ["head", "get"]  # a small index: one tail GET
    for data, entry in zip(chunks, entries, strict=True):
        assert entry.chunk_id == make_frame(data)[0] and entry.raw_len == len(data)
        assert frame.decode(pack.read_frame(store, built.name, entry)) == data
    assert pack.read_index(counting, built.name, size=len(built.body)) == entries
    assert counting.calls[-1][0] == "get" and counting.count("head") == 1


def test_whole_body_decodes_to_its_header_and_entries() -> None:
    built = build(sample_chunks(), pack.KIND_TREE)
    header, entries = pack.verify_pack(built.body, built.name)
    assert header == pack.PackHeader(pack.VERSION, pack.KIND_TREE, 0, SITE, CREATED)
    assert entries == built.entries
    assert built.body[:4] == b"TFPK" and built.body[-4:] == b"TFPE"
    assert entries[0].offset == pack.HEADER_SIZE == 48
    assert len(built.body) == entries[-1].end + 48 * len(entries) + pack.FOOTER_SIZE


@given(
    st.lists(st.binary(max_size=3000), max_size=12, unique=True),
    st.sampled_from([0, 1, 3]),
    st.sampled_from([pack.KIND_DATA, pack.KIND_TREE]),
)
def test_random_packs_round_trip(chunks: list[bytes], level: int, kind: int) -> None:
    builder = pack.PackBuilder(kind, SITE, 1 << 30)
    for data in chunks:
        builder.add(*make_frame(data, level))
    if not chunks:
        with pytest.raises(ValueError):
            builder.finish(CREATED)
        return
    built = builder.finish(CREATED)
    assert builder.size == len(built.body) and len(builder) == len(chunks)
    _, entries = pack.verify_pack(built.body, built.name)
    for data, entry in zip(chunks, entries, strict=True):
        assert frame.decode(built.body[entry.offset : entry.end], entry.chunk_id) == data


def test_an_index_longer_than_the_tail_read(tmp_path: Path) -> None:
    chunks = [b"%d" % i for i in range(2000)]  # 96 KB of index: more than the 64 KiB tail
    built = build(chunks)
    store = CountingStore(local_store(tmp_path / "s"))
    store.put(built.name, built.body)
    assert pack.read_index(store, built.name) == built.entries
    assert [c for c, _ in store.calls] == ["put", "head", "get", "get"]


def test_read_frames_shares_requests_between_neighbours(tmp_path: Path) -> None:
    chunks = [os.urandom(1000) for _ in range(10)]
    built = build(chunks)
    store = CountingStore(local_store(tmp_path / "s"))
    store.put(built.name, built.body)
    got = dict(pack.read_frames(store, built.name, reversed(built.entries)))
    assert [frame.decode(got[e]) for e in built.entries] == chunks
    assert store.count("get") == 1
    some = built.entries[:3] + built.entries[5:]  # one gap: two runs
    assert len(list(pack.read_frames(store, built.name, some))) == 8
    assert store.count("get") == 3
    list(pack.read_frames(store, built.name, built.entries, max_span=2500))
    assert store.count("get") == 3 + 5  # two frames of ~1056 bytes per request


def test_builder_fills_up_to_its_target() -> None:
    builder = pack.PackBuilder(pack.KIND_DATA, SITE, 4000)
    assert builder.size == pack.HEADER_SIZE + pack.FOOTER_SIZE and not builder.full
    while not builder.full:
        builder.add(*make_frame(os.urandom(500)))
    assert len(builder) == 7 and builder.size >= 4000
    assert builder.size == len(builder.finish(CREATED).body)


# What a builder refuses.


def test_builder_refuses_duplicates_and_foreign_frames() -> None:
    builder = pack.PackBuilder(pack.KIND_DATA, SITE, 1 << 20)
    chunk_id, chunk_frame = make_frame(b"hello")
    builder.add(chunk_id, chunk_frame)
    assert chunk_id in builder
    with pytest.raises(ValueError, match="already in this pack"):
        builder.add(chunk_id, chunk_frame)
    other_id, other_frame = make_frame(b"other")
    with pytest.raises(ValueError, match="whole frame"):
        builder.add(other_id, chunk_frame)
    with pytest.raises(ValueError, match="whole frame"):
        builder.add(other_id, other_frame + b"x")
    with pytest.raises(ValueError, match="not a chunk frame"):
        builder.add(other_id, b"nonsense")
    damaged = bytearray(other_frame)
    damaged[-1] ^= 1
    with pytest.raises(pack.PackError) as exc:
        builder.add(other_id, bytes(damaged))
    assert_refused(exc, ExitCode.VERIFY_FAILED, "checksum", other_id.hex())
    assert len(builder) == 1
    with pytest.raises(ValueError):
        pack.PackBuilder(3, SITE, 1)
    with pytest.raises(ValueError):
        pack.PackBuilder(pack.KIND_DATA, "not-a-uuid", 1)


# Damage.


def flipped(body: bytes, position: int) -> bytes:
    damaged = bytearray(body)
    damaged[position] ^= 0x40
    return bytes(damaged)


def test_any_flipped_byte_fails_verification() -> None:
    built = build([b"a" * 200, b"bc", os.urandom(50)])
    for position in range(len(built.body)):
        with pytest.raises(pack.PackError) as exc:
            pack.verify_pack(flipped(built.body, position))
        assert_refused(exc, ExitCode.VERIFY_FAILED)
        with pytest.raises(pack.PackError) as exc:
            pack.verify_pack(flipped(built.body, position), built.name)
        assert_refused(exc, ExitCode.VERIFY_FAILED, built.name)


@pytest.mark.parametrize("cut", [1, 4, 47, 48, 60, 1000])
def test_truncated_bodies_fail(cut: int) -> None:
    built = build([os.urandom(300), os.urandom(300)])
    for body in (built.body[:-cut], built.body[cut:], built.body + b"\0" * cut):
        with pytest.raises(pack.PackError) as exc:
            pack.decode_pack(body)
        assert_refused(exc, ExitCode.VERIFY_FAILED)


def test_wrong_name_fails() -> None:
    built = build([b"x"])
    other = build([b"y"])
    for name in (other.name, built.name.replace("/data/", "/tree/")):
        with pytest.raises(pack.PackError) as exc:
            pack.decode_pack(built.body, name)
        assert_refused(exc, ExitCode.VERIFY_FAILED, "name")
    with pytest.raises(ValueError):
        pack.parse_pack_name("packs/data/00/" + built.name[-64:])


def test_ranged_reads_catch_damage_where_they_read(tmp_path: Path) -> None:
    chunks = [os.urandom(400) for _ in range(3)]
    built = build(chunks)
    entry = built.entries[1]
    footer_at = len(built.body) - pack.FOOTER_SIZE
    index_at = built.entries[-1].end
    places = {
        "frame header": entry.offset + 10,
        "frame payload": entry.end - 1,
        "index": index_at + pack.ENTRY_SIZE + 40,
        "footer": footer_at + 3,
        "footer magic": len(built.body) - 1,
    }
    for i, (what, position) in enumerate(places.items()):
        store = local_store(tmp_path / str(i))
        store.put(built.name, flipped(built.body, position))
        with pytest.raises(pack.PackError) as exc:
            if what.startswith("frame"):
                pack.read_frame(store, built.name, entry)
            else:
                pack.read_index(store, built.name)
        assert_refused(exc, ExitCode.VERIFY_FAILED, built.name)
        if what.startswith("frame"):
            assert entry.chunk_id.hex() in exc.value.message
    store = local_store(tmp_path / "short")
    store.put(built.name, built.body[:-10])
    with pytest.raises(pack.PackError) as exc:
        pack.read_index(store, built.name)
    assert_refused(exc, ExitCode.VERIFY_FAILED)
    with pytest.raises(pack.PackError) as exc:
        pack.read_frame(store, built.name, pack.PackEntry(entry.chunk_id, footer_at, 99, 1))
    assert_refused(exc, ExitCode.VERIFY_FAILED, "truncated")
    with pytest.raises(ObjectMissing):
        pack.read_index(store, build([b"absent"]).name)


def test_stored_damage_is_caught_on_s3(s3_server: S3Server) -> None:
    built = build([os.urandom(400) for _ in range(3)])
    store = open_store(f"s3://{BUCKET}/{unique_prefix()}", store_settings(s3_server))
    store.put(built.name, flipped(built.body, len(built.body) - pack.FOOTER_SIZE - 5))
    with pytest.raises(pack.PackError) as exc:
        pack.read_index(store, built.name)
    assert_refused(exc, ExitCode.VERIFY_FAILED, "index checksum")
    store.close()


# Versions and features, patched in with the layout of docs/FORMAT.md.


def patched(body: bytes, *, flags: int | None = None, version: int | None = None) -> bytes:
    """The body with another flags word or version in header and footer, sums recomputed."""
    data = bytearray(body)
    foot = len(data) - pack.FOOTER_SIZE
    if flags is not None:
        struct.pack_into(">I", data, 8, flags)
        struct.pack_into(">I", data, foot + 16, flags)
    if version is not None:
        data[4] = data[foot + 12] = version
    data[40:48] = xxhash.xxh3_64(bytes(data[:40])).digest()
    data[foot + 28 : foot + 36] = data[40:48]
    data[foot + 36 : foot + 44] = xxhash.xxh3_64(bytes(data[foot : foot + 36])).digest()
    return bytes(data)


@pytest.mark.parametrize(
    "change", [{"flags": pack.FLAG_ENCRYPTED}, {"flags": 0x80000000}, {"version": 2}]
)
def test_unknown_version_or_flag_is_refused(tmp_path: Path, change: dict[str, int]) -> None:
    built = build([b"secret"])
    body = patched(built.body, **change)
    name = pack.pack_name(pack.KIND_DATA, pack.pack_id(body))
    with pytest.raises(pack.PackError) as exc:
        pack.verify_pack(body, name)
    assert_refused(exc, ExitCode.VERSION, "newer tierfs" if "flags" in change else "version 2")
    store = local_store(tmp_path / "s")
    store.put(name, body)
    with pytest.raises(pack.PackError) as exc:
        pack.read_index(store, name)
    assert_refused(exc, ExitCode.VERSION, name)


def test_patching_keeps_a_valid_pack() -> None:
    """The helper above follows the documented layout: with no change, the body is intact."""
    built = build([b"one", b"two"])
    assert patched(built.body, flags=0, version=1) == built.body


def test_header_and_site_fields() -> None:
    site = str(uuid.uuid4())
    builder = pack.PackBuilder(pack.KIND_DATA, site, 1)
    builder.add(*make_frame(b"z"))
    body = builder.finish(7).body
    assert body[16:32] == uuid.UUID(site).bytes
    assert struct.unpack_from(">Q", body, 32) == (7,)
    assert re.fullmatch(r"packs/data/[0-9a-f]{2}/[0-9a-f]{64}", builder.finish(7).name)
    assert pack.decode_pack(body)[0].site_uuid == site
