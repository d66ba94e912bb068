"""Snapshot trees (tierfs/snap/tree.py, treeformat.py), built from real tierfs indexes.

One filesystem is made, filled, flushed and unmounted per module; tests that change it work
on a copy of its data directory. Synthetic extent lists test the split rule at scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest

from tests.conftest import mounted, run_cli
from tierfs.data import frame
from tierfs.data.chunker import Chunker
from tierfs.data.domain import load as load_domain
from tierfs.data.extents import Extent
from tierfs.errors import ExitCode
from tierfs.meta import schema
from tierfs.meta.records import ChunkRecord, Inode
from tierfs.meta.store import MetaStore
from tierfs.snap import treeformat as tf
from tierfs.snap.tree import (
    TreeBuildError,
    TreeCache,
    TreeResult,
    build_tree,
    file_extents,
    open_view,
    walk,
)
from tierfs.tiers.hot import HotStore

KiB, MiB = 1024, 1024 * 1024
SEED = 4242


def payload(name: str, size: int) -> bytes:
    """The deterministic content of a test file (random, so it does not compress)."""
    return random.Random(f"{SEED}-{name}").randbytes(size)


CONTENTS = {
    b"zeta": b"created first, listed last",
    b"alpha.txt": payload("alpha", 5000),
    b"a/b/c/deep.txt": payload("deep", 70 * KiB),
    b"e/big.bin": payload("big", 3 * MiB),
    b"a/big-link.bin": payload("big", 3 * MiB),
}
SPARSE = {0: payload("s0", 100 * KiB), 8 * MiB: payload("s1", 100 * KiB)}
SPARSE_SIZE = 20 * MiB
DIRS = [b"", b"a", b"a/b", b"a/b/c", b"d", b"e"]


@dataclasses.dataclass
class Built:
    """A filled, flushed, unmounted filesystem and what the kernel reported about it."""

    data: Path
    lstat: dict[bytes, os.stat_result]
    xattrs: dict[bytes, dict[bytes, bytes]]


def populate(root: Path) -> None:
    """Every kind of entry tierfs stores, created out of name order."""
    (root / "zeta").write_bytes(CONTENTS[b"zeta"])
    os.utime(root / "zeta", ns=(1_000_000_000, 1_700_000_000_123_456_789))
    (root / "alpha.txt").write_bytes(CONTENTS[b"alpha.txt"])
    os.chmod(root / "alpha.txt", 0o640)
    os.setxattr(root / "alpha.txt", "user.color", b"blue")
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(CONTENTS[b"a/b/c/deep.txt"])
    os.setxattr(root / "a", "user.z", b"last")
    os.setxattr(root / "a", "user.a", b"\x00binary\xff")
    (root / "d").mkdir(mode=0o750)
    os.chmod(root / "d", 0o2750)
    (root / "e").mkdir()
    (root / "e" / "big.bin").write_bytes(CONTENTS[b"e/big.bin"])
    os.link(root / "e" / "big.bin", root / "a" / "big-link.bin")
    os.symlink("alpha.txt", root / "link")
    os.symlink("../nowhere", root / "a" / "dangling")
    os.mkfifo(root / "fifo", 0o600)
    os.mknod(root / "sock", stat.S_IFSOCK | 0o644)
    with open(root / "sparse.bin", "wb") as f:
        for off, data in SPARSE.items():
            f.seek(off)
            f.write(data)
        f.truncate(SPARSE_SIZE)
    if os.geteuid() == 0:
        os.chown(root / "a" / "b" / "c" / "deep.txt", 1234, 5678)


def capture(root: Path) -> tuple[dict[bytes, os.stat_result], dict[bytes, dict[bytes, bytes]]]:
    """lstat and xattrs of every path (nothing that reads file data, so atimes stay)."""
    stats: dict[bytes, os.stat_result] = {b"": os.lstat(root)}
    xattrs: dict[bytes, dict[bytes, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stats[bytes(path.relative_to(root))] = os.lstat(path)
    for rel, st in stats.items():
        if not stat.S_ISLNK(st.st_mode):
            path = root / rel.decode()
            xattrs[rel] = {
                n.encode(): os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path)
            }
    return stats, xattrs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("tree")
    data = tmp / "data"
    run_cli("mkfs", data, "--site", "tree-site")
    with mounted(tmp, data) as m:
        populate(m.mnt)
        run_cli("flush", m.mnt)
        lstat, xattrs = capture(m.mnt)
    return Built(data, lstat, xattrs)


def content_id_of(data: Path) -> Callable[[bytes], bytes]:
    return Chunker(load_domain(data / "domain.json")).content_id


@contextlib.contextmanager
def index(data: Path) -> Iterator[MetaStore]:
    store = MetaStore.open(data / "meta", readonly=True)
    try:
        yield store
    finally:
        store.close()


def build(data: Path, previous: TreeCache | None = None) -> TreeResult:
    with index(data) as store, open_view(store) as view:
        return build_tree(view, previous, content_id=content_id_of(data))


def fetcher(*results: TreeResult) -> Callable[[bytes], bytes]:
    blobs: dict[bytes, bytes] = {}
    for r in results:
        blobs.update(r.blobs)
    return blobs.__getitem__


def read_extents(data: Path, extents: list[Extent], size: int) -> bytes:
    """A file's bytes rebuilt from its tree extents and the hot tier's chunk frames."""
    out = bytearray(size)
    hot = HotStore(data / "hot")
    with index(data) as store, store.reader() as tx:
        for x in extents:
            record = ChunkRecord.decode(bytes(tx.get(x.chunk_id, db=store.chunks)))
            seg, off = record.hot_location() or (0, 0)
            chunk = frame.decode(hot.read(seg, off, record.frame_len), x.chunk_id)
            out[x.file_off : x.end] = chunk[x.chunk_off : x.chunk_off + x.length]
    hot.close()
    return bytes(out)


def inodes(data: Path) -> dict[int, Inode]:
    with index(data) as store, store.reader() as tx:
        return {
            schema.key_ino(k): Inode.decode(schema.key_ino(k), bytes(v))
            for k, v in tx.cursor(db=store.inodes)
        }


# -- built from a real filesystem ----------------------------------------------------------------


def test_round_trip_of_every_attribute_and_content(built: Built) -> None:
    result = build(built.data)
    cid = content_id_of(built.data)
    fetch = fetcher(result)
    listed = dict(walk(fetch, result.root_id, cid))
    assert set(listed) == set(built.lstat)
    for path, entry in listed.items():
        st = built.lstat[path]
        assert entry.st_mode == st.st_mode, path
        assert (entry.uid, entry.gid) == (st.st_uid, st.st_gid), path
        assert (entry.mtime_ns, entry.ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns), path
        assert entry.size == st.st_size or entry.type is tf.FileType.DIR, path
        assert dict(entry.xattrs) == built.xattrs.get(path, {}), path
        if entry.type is tf.FileType.REG and path in CONTENTS:
            extents = list(file_extents(fetch, entry, cid))
            assert read_extents(built.data, extents, entry.size) == CONTENTS[path]
    assert listed[b"link"].target == b"alpha.txt"
    assert listed[b"a/dangling"].target == b"../nowhere"
    assert listed[b"zeta"].mtime_ns == 1_700_000_000_123_456_789
    assert listed[b"d"].mode == 0o2750
    assert listed[b"fifo"].type is tf.FileType.FIFO
    assert listed[b"sock"].type is tf.FileType.SOCK
    assert result.stats.dirs == len(DIRS)
    assert result.stats.trees_built == len(DIRS) + 1  # and the root blob
    assert result.stats.trees_reused == 0


def test_holes_are_absent_and_hard_links_share_their_identity(built: Built) -> None:
    result = build(built.data)
    listed = dict(walk(fetcher(result), result.root_id))
    sparse = listed[b"sparse.bin"]
    assert sparse.size == SPARSE_SIZE
    covered = [(x.file_off, x.end) for x in sparse.extents]
    assert covered[0][0] == 0 and covered[-1][1] == 8 * MiB + 100 * KiB
    assert sum(b - a for a, b in covered) == 200 * KiB, "only the written bytes have extents"
    assert not any(a < 8 * MiB < b or 100 * KiB < b <= 8 * MiB for a, b in covered)
    data = read_extents(built.data, list(sparse.extents), SPARSE_SIZE)
    for off, chunk in SPARSE.items():
        assert data[off : off + len(chunk)] == chunk
    assert data[100 * KiB : 8 * MiB] == bytes(8 * MiB - 100 * KiB)

    big, link = listed[b"e/big.bin"], listed[b"a/big-link.bin"]
    assert big.link_id != 0 and big.link_id == link.link_id == built.lstat[b"e/big.bin"].st_ino
    assert big.extents == link.extents
    assert all(
        e.link_id == 0 for p, e in listed.items() if p not in (b"e/big.bin", b"a/big-link.bin")
    )
    assert result.stats.hard_links == 2
    assert (
        result.stats.logical_bytes
        == sum(len(v) for k, v in CONTENTS.items() if k != b"a/big-link.bin") + SPARSE_SIZE
    )


def test_canonical_twice_the_same_and_names_in_order(built: Built) -> None:
    first, second = build(built.data), build(built.data)
    assert first.root_id == second.root_id
    assert first.blobs == second.blobs
    assert first.cache == second.cache
    for blob in first.blobs.values():
        if blob.startswith(tf.TREE_MAGIC):
            names = [e.name for e in tf.decode_tree(blob)]
            assert names == sorted(names)
    root_names = [p for p, _ in walk(fetcher(first), first.root_id) if b"/" not in p and p]
    assert root_names == sorted(root_names) and root_names.index(b"zeta") == len(root_names) - 1
    (root,) = tf.decode_tree(first.blobs[first.root_id], tf.KIND_ROOT)
    entries = tf.decode_tree(first.blobs[root.tree_id])
    shuffled = list(reversed(entries))
    assert tf.encode_tree(shuffled) == tf.encode_tree(entries)


def test_reading_files_changes_atime_but_no_tree_id(built: Built, tmp_path: Path) -> None:
    before = build(built.data)
    atimes = {ino: i.atime_ns for ino, i in inodes(built.data).items()}
    with mounted(tmp_path, built.data) as m:
        for rel, content in CONTENTS.items():
            assert (m.mnt / rel.decode()).read_bytes() == content
        (m.mnt / "sparse.bin").read_bytes()
    after_inodes = inodes(built.data)
    changed = [ino for ino, i in after_inodes.items() if i.atime_ns != atimes.get(ino)]
    assert len(changed) >= len(CONTENTS) - 1, "reading should have set atimes"
    reused = build(built.data, before.cache)
    assert reused.root_id == before.root_id
    assert reused.stats.trees_reused == len(DIRS)
    assert reused.stats.trees_built == 1  # only the root blob, with the same bytes
    assert reused.stats.extents == 0, "nothing below a reused directory is read"
    assert build(built.data).root_id == before.root_id


def test_a_deep_change_rebuilds_only_the_path_to_the_root(built: Built, tmp_path: Path) -> None:
    data = tmp_path / "copy"
    subprocess.run(["cp", "-a", built.data, data], check=True)  # keeps sparse files sparse
    before = build(data)
    with mounted(tmp_path, data) as m:
        deep = m.mnt / "a" / "b" / "c" / "deep.txt"
        with open(deep, "ab") as f:
            f.write(b"appended")
            f.flush()
            os.fsync(f.fileno())
            with pytest.raises(TreeBuildError, match="unsealed data"):
                build(data, before.cache)  # the daemon committed staged ranges: refused
        run_cli("flush", m.mnt)
    after = build(data, before.cache)
    path_dirs = {1} | {built.lstat[p].st_ino for p in (b"a", b"a/b", b"a/b/c")}
    assert after.stats.trees_reused == len(DIRS) - len(path_dirs)
    assert after.stats.trees_built == len(path_dirs) + 1
    for ino, (_, tree_id) in after.cache.items():
        assert (tree_id != before.cache[ino][1]) == (ino in path_dirs), ino
    assert after.root_id != before.root_id
    fresh = build(data)
    assert fresh.root_id == after.root_id, "reuse must give the ids a full build gives"
    listed = dict(walk(fetcher(before, after), after.root_id, content_id_of(data)))
    deep_entry = listed[b"a/b/c/deep.txt"]
    extents = list(file_extents(fetcher(after), deep_entry))
    assert read_extents(data, extents, deep_entry.size) == CONTENTS[b"a/b/c/deep.txt"] + b"appended"


# -- synthetic extent lists: the split rule at scale ----------------------------------------------

ID_KEY = bytes(range(32))


def synthetic_id(blob: bytes) -> bytes:
    return blake3.blake3(blob, key=ID_KEY).digest()


@dataclasses.dataclass
class FakeView:
    """An index holding one directory: a huge file (ino 2) and a small one (ino 3)."""

    huge: list[Extent]

    def inode(self, ino: int) -> Inode | None:
        if ino == 1:
            return Inode(1, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, 10, 10, 0, 1)
        size = self.huge[-1].end if ino == 2 else 3
        return Inode(ino, stat.S_IFREG | 0o644, 0, 0, 1, size, 0, 20, 20)

    def dirents(self, ino: int) -> list[tuple[bytes, int]]:
        return [(b"huge", 2), (b"small", 3)] if ino == 1 else []

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        return []

    def symlink(self, ino: int) -> bytes | None:
        return None

    def extents(self, ino: int) -> list[Extent]:
        return self.huge if ino == 2 else [Extent(0, 3, bytes(32), 0)]

    def has_staged(self, ino: int) -> bool:
        return False


def random_extents(rng: random.Random, n: int, start: int = 0) -> list[Extent]:
    out, pos = [], start
    for _ in range(n):
        length = rng.randrange(64 * KiB, MiB)
        out.append(Extent(pos, length, rng.randbytes(32), 0))
        pos += length
    return out


def relaid(extents: list[Extent]) -> list[Extent]:
    """The same extents back to back from offset 0 (what an insertion does to the tail)."""
    out, pos = [], 0
    for x in extents:
        out.append(Extent(pos, x.length, x.chunk_id, x.chunk_off))
        pos += x.length
    return out


def list_ids(extents: list[Extent]) -> tuple[list[bytes], TreeResult]:
    result = build_tree(FakeView(extents), content_id=synthetic_id)
    (huge,) = [e for _, e in walk(fetcher(result), result.root_id) if e.name == b"huge"]
    assert list(file_extents(fetcher(result), huge, synthetic_id)) == extents
    return [r.blob_id for r in huge.extent_lists], result


def test_a_large_extent_list_is_split_and_an_edit_changes_at_most_two_blobs() -> None:
    rng = random.Random(SEED)
    extents = random_extents(rng, 12_000)
    ids, result = list_ids(extents)
    assert len(ids) >= 4, "12,000 extents should make several extent-list blobs"
    runs = tf.split_extents(extents)
    assert all(tf.SPLIT_MIN <= b - a <= tf.SPLIT_MAX for a, b in runs[:-1])
    assert result.stats.extent_lists_built == len(ids)
    old = set(ids)

    def changed(new_extents: list[Extent]) -> tuple[int, int]:
        new = set(list_ids(new_extents)[0])
        return len(old - new), len(new - old)

    for _ in range(8):
        i = rng.randrange(len(extents))
        edited = list(extents)
        x = edited[i]
        edited[i] = Extent(x.file_off, x.length, rng.randbytes(32), 0)  # rewritten in place
        assert max(changed(edited)) <= 2
        inserted = relaid([*extents[:i], Extent(0, 100, rng.randbytes(32), 0), *extents[i:]])
        assert max(changed(inserted)) <= 2, "an insertion shifts offsets, not blobs"
        assert max(changed(relaid(extents[:i] + extents[i + 1 :]))) <= 2
    # Editing the extent that ends a run merges two runs: still two blobs.
    end = runs[1][1] - 1
    merged = list(extents)
    merged[end] = Extent(extents[end].file_off, extents[end].length, b"\xff" * 32, 0)
    assert changed(merged) == (2, 1)
    # Appending changes the last blob only, and adds new ones.
    appended = extents + random_extents(rng, 3000, extents[-1].end)
    assert changed(appended)[0] <= 1


def test_identical_extents_make_full_runs_not_tiny_ones() -> None:
    zeros = [Extent(i * MiB, MiB, b"\x00" * 32, 0) for i in range(40_000)]
    runs = tf.split_extents(zeros)
    assert all(b - a >= tf.SPLIT_MIN for a, b in runs[:-1])
    blobs = {tf.encode_extent_list(zeros[a:b]) for a, b in runs}
    assert len(blobs) <= 3, "runs of one repeated extent deduplicate"


# -- the format ----------------------------------------------------------------------------------


def every_kind_of_entry() -> list[tf.Entry]:
    cid = bytes(range(32))
    reg = tf.Entry(b"reg", tf.FileType.REG, 0o644, 7, 8, mtime_ns=-5, ctime_ns=2**62, size=100)
    refs = (tf.ExtentListRef(0, 10, 2, cid), tf.ExtentListRef(50, 7, 1, cid))
    ft = tf.FileType
    return [
        dataclasses.replace(reg, extents=(Extent(10, 5, cid, 3),)),
        dataclasses.replace(reg, name=b"reg-big", size=10**12, link_id=99, extent_lists=refs),
        dataclasses.replace(
            reg, name=b"dir", type=ft.DIR, tree_id=cid, xattrs=((b"a", b""), (b"b", b"1"))
        ),
        dataclasses.replace(reg, name=b"sym", type=ft.SYMLINK, size=3, target=b"x/y"),
        dataclasses.replace(reg, name=b"fifo", type=ft.FIFO, size=0),
        dataclasses.replace(reg, name=b"chr", type=ft.CHR, size=0, rdev=0x0501),
        dataclasses.replace(reg, name=b"blk", type=ft.BLK, size=0, rdev=0x0801),
        dataclasses.replace(reg, name=b"sock", type=ft.SOCK, size=0),
    ]


def test_every_type_round_trips_through_the_format() -> None:
    entries = every_kind_of_entry()
    blob = tf.encode_tree(entries)
    assert tf.decode_tree(blob) == sorted(entries, key=lambda e: e.name)
    assert tf.decode_tree(blob, tf.KIND_DIR)[0].st_mode == stat.S_IFBLK | 0o644
    bad = [
        dataclasses.replace(entries[2], link_id=5),  # a hard-linked directory
        dataclasses.replace(entries[2], xattrs=((b"b", b""), (b"a", b""))),
        dataclasses.replace(entries[0], size=14),  # an extent past the size
        dataclasses.replace(entries[0], mode=0o10644),
        dataclasses.replace(entries[4], target=b"x"),
        dataclasses.replace(entries[0], name=b"a/b"),
    ]
    for entry in bad:
        with pytest.raises(tf.TreeFormatError):
            tf.encode_tree([entry])
    with pytest.raises(tf.TreeFormatError, match="out of order or repeated"):
        tf.encode_tree([entries[0], entries[0]])


def test_bad_blobs_raise_clear_errors() -> None:
    entries = every_kind_of_entry()
    blob = tf.encode_tree(entries)
    cases: list[tuple[bytes, str, ExitCode]] = [
        (blob[:-1], "truncated", ExitCode.VERIFY_FAILED),
        (blob[:10], "truncated", ExitCode.VERIFY_FAILED),
        (blob[:4] + b"\x02" + blob[5:], "version 2 is not supported", ExitCode.VERSION),
        (b"XXXX" + blob[4:], "bad magic", ExitCode.VERIFY_FAILED),
        (blob + b"\x00", "1 bytes too many", ExitCode.VERIFY_FAILED),
        (blob[:6] + b"\x00\x01" + blob[8:], "reserved", ExitCode.VERIFY_FAILED),
    ]
    # Two valid entries in the wrong order.
    one, two = (tf.encode_tree([e])[12:] for e in sorted(entries, key=lambda e: e.name)[:2])
    swapped = struct.pack(">4sBBHI", tf.TREE_MAGIC, 1, tf.KIND_DIR, 0, 2) + two + one
    cases.append((swapped, "out of order", ExitCode.VERIFY_FAILED))
    for bad, message, code in cases:
        with pytest.raises(tf.TreeFormatError, match=message) as info:
            tf.decode_tree(bad)
        assert info.value.exit_code == code
    with pytest.raises(tf.TreeFormatError, match="kind 1, expected 2"):
        tf.decode_tree(blob, tf.KIND_ROOT)

    extents = random_extents(random.Random(1), 3, start=4096)
    xl = tf.encode_extent_list(extents)
    assert tf.decode_extent_list(xl, 4096) == extents
    for bad, message in [
        (xl[:-3], "truncated"),
        (xl[:4] + b"\x07" + xl[5:], "version 7"),
        (xl[:12] + struct.pack(">Q", 1) + xl[20:], "first extent has a gap"),
    ]:
        with pytest.raises(tf.TreeFormatError, match=message):
            tf.decode_extent_list(bad, 4096)


def test_walk_checks_ids_and_refuses_cycles() -> None:
    loop_id = b"\x01" * 32
    loop = tf.encode_tree([dataclasses.replace(every_kind_of_entry()[2], tree_id=loop_id)])
    root = tf.encode_tree(
        [dataclasses.replace(every_kind_of_entry()[2], name=b"", xattrs=(), tree_id=loop_id)],
        tf.KIND_ROOT,
    )
    blobs = {b"\x00" * 32: root, loop_id: loop}
    with pytest.raises(tf.TreeFormatError, match="contains itself"):
        list(walk(blobs.__getitem__, b"\x00" * 32))
    with pytest.raises(tf.TreeFormatError, match="does not match its id"):
        list(walk(blobs.__getitem__, b"\x00" * 32, synthetic_id))
