"""Read-only views of snapshots: `.snapshots/<id>/` in the live mount and `tierfs restore mount`.

What a view shows is compared with a copy (`cp -a`) made when the snapshot was taken: names,
types, modes, owners, sizes, mtimes, bytes, symlink targets, xattrs and hard links. The
`SnapshotView` itself is also driven directly (no FUSE) over a hand-made tree with extent-list
blobs, which files of a test mount are too small to need.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import random
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
import trio

from tests.conftest import Mount, configure, mounted, run_cli
from tierfs.data.extents import Extent
from tierfs.datadir import tierfs_mounts
from tierfs.fs.namespace import FsError
from tierfs.restore.snapdir import SNAPDIR_INO
from tierfs.restore.view import SnapshotView
from tierfs.snap import treeformat as tf
from tierfs.snap.tree import file_bytes

KiB, MiB = 1024, 1024 * 1024


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def fill(root: Path) -> None:
    """Every kind of entry a snapshot keeps: sparse and hard-linked files, a symlink, xattrs."""
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_bytes(b"first version\n")
    (root / "big.bin").write_bytes(payload("big", 3 * MiB))
    with open(root / "sparse.bin", "wb") as f:
        f.seek(2 * MiB)
        f.write(b"middle")
        f.seek(5 * MiB)
        f.write(b"tail")
    (root / "empty").write_bytes(b"")
    os.link(root / "big.bin", root / "docs" / "big-link.bin")
    os.symlink("docs/a.txt", root / "link")
    os.setxattr(root / "docs" / "a.txt", "user.colour", b"blue")
    os.setxattr(root / "docs", "user.dir", b"yes")
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "docs" / "deep" / "er" / "leaf").write_bytes(b"leaf")
    os.chmod(root / "docs" / "deep", 0o750)
    os.mkfifo(root / "fifo")


def change(root: Path) -> None:
    (root / "docs" / "a.txt").write_bytes(b"second version\n")
    os.setxattr(root / "docs" / "a.txt", "user.colour", b"red")
    os.unlink(root / "big.bin")
    os.chmod(root / "sparse.bin", 0o600)
    (root / "new.txt").write_bytes(b"new")
    shutil.rmtree(root / "docs" / "deep")


def tree_of(root: Path) -> dict[str, tuple[object, ...]]:
    """{relative path: what a snapshot must keep of it}, hard links as shared link groups."""
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        xattrs = (
            {}
            if stat.S_ISLNK(st.st_mode)
            else {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
        )
        fields: list[object] = [st.st_mode, st.st_uid, st.st_gid, xattrs]
        if stat.S_ISREG(st.st_mode):
            group = groups.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None
            fields += [st.st_size, st.st_mtime_ns, path.read_bytes(), group]
        elif stat.S_ISLNK(st.st_mode):
            fields += [os.readlink(path), st.st_mtime_ns]
        elif not stat.S_ISDIR(st.st_mode):
            fields += [st.st_mtime_ns]
        out[rel] = tuple(fields)
    return out


def snapshot(m: Mount, *args: str) -> str:
    return run_cli("snapshot", "create", m.mnt, *args).stdout.strip()


def raises_errno(err: int, fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        fn()
    assert info.value.errno == err, f"{info.value} is not {errno.errorcode[err]}"


@pytest.fixture
def view_fs(tmp_path: Path, data_dir: Path) -> Iterator[Mount]:
    with mounted(tmp_path, data_dir) as m:
        yield m


# -- .snapshots in the live mount ---------------------------------------------------------


def test_snapshots_dir_shows_each_snapshot_as_it_was(view_fs: Mount, tmp_path: Path) -> None:
    m = view_fs
    fill(m.mnt)
    before = tree_of(m.mnt)
    first = snapshot(m)
    change(m.mnt)
    second = snapshot(m)
    after = tree_of(m.mnt)

    snaps = m.mnt / ".snapshots"
    assert ".snapshots" not in os.listdir(m.mnt)
    assert stat.S_ISDIR(os.stat(snaps).st_mode) and os.stat(snaps).st_ino == SNAPDIR_INO
    assert sorted(os.listdir(snaps)) == sorted([first, second])
    assert tree_of(snaps / first) == before
    assert tree_of(snaps / second) == after
    # Hard links are one inode; inode numbers are the views' own.
    old = snaps / first
    assert os.stat(old / "big.bin").st_ino == os.stat(old / "docs" / "big-link.bin").st_ino
    assert os.stat(old / "big.bin").st_nlink == 2
    live = {p.lstat().st_ino for p in m.mnt.rglob("*")}
    inside = {p.lstat().st_ino for p in old.rglob("*")}
    assert not live & inside and min(inside) > SNAPDIR_INO
    assert os.stat(old / "..").st_ino == SNAPDIR_INO
    # `find` and `rsync -aH` walk a view like any tree.
    found = subprocess.run(["find", "."], cwd=old, capture_output=True, text=True, check=True)
    assert sorted(p[2:] for p in found.stdout.split() if p != ".") == sorted(before)
    copy = tmp_path / "copy"
    # rsync compares mtimes in whole seconds by default, and then leaves the creation time
    # on a FIFO or symlink made in the same second as the snapshot's: compare nanoseconds.
    rsync = ["rsync", "-aHX", "--modify-window=-1", f"{old}/", f"{copy}/"]
    subprocess.run(rsync, check=True, capture_output=True)
    assert tree_of(copy) == before


def test_snapshots_are_read_only(view_fs: Mount) -> None:
    m = view_fs
    fill(m.mnt)
    sid = snapshot(m)
    snaps = m.mnt / ".snapshots"
    old = snaps / sid
    raises_errno(errno.EROFS, lambda: os.open(old / "docs" / "a.txt", os.O_RDWR))
    raises_errno(errno.EROFS, lambda: os.open(old / "docs" / "new", os.O_CREAT | os.O_WRONLY))
    raises_errno(errno.EROFS, lambda: os.unlink(old / "empty"))
    raises_errno(errno.EROFS, lambda: os.chmod(old / "empty", 0o600))
    raises_errno(errno.EROFS, lambda: os.mkdir(old / "dir"))
    raises_errno(errno.EROFS, lambda: os.setxattr(old / "empty", "user.x", b"1"))
    raises_errno(errno.EROFS, lambda: os.rename(old / "empty", old / "empty2"))
    raises_errno(errno.EROFS, lambda: os.symlink("x", old / "sym"))
    raises_errno(errno.EROFS, lambda: os.mkdir(snaps / "mine"))
    raises_errno(errno.EXDEV, lambda: os.link(old / "empty", m.mnt / "linked"))
    raises_errno(errno.EXDEV, lambda: os.rename(old / "empty", m.mnt / "moved"))
    # The reserved name in the root: it exists, and cannot be removed or replaced.
    raises_errno(errno.EEXIST, lambda: os.mkdir(snaps))
    (m.mnt / "adir").mkdir()
    raises_errno(errno.EEXIST, lambda: os.rename(m.mnt / "adir", snaps))
    raises_errno(errno.EEXIST, lambda: os.link(m.mnt / "empty", snaps))
    raises_errno(errno.EPERM, lambda: os.rmdir(snaps))
    raises_errno(errno.EPERM, lambda: os.rename(snaps, m.mnt / "elsewhere"))
    assert (old / "docs" / "a.txt").read_bytes() == b"first version\n"
    assert not (old / "missing").exists() and not (old / "missing").exists()


def test_a_deleted_snapshot_disappears(view_fs: Mount) -> None:
    m = view_fs
    (m.mnt / "f").write_bytes(b"one")
    sid = snapshot(m)
    snaps = m.mnt / ".snapshots"
    assert (snaps / sid / "f").read_bytes() == b"one"
    run_cli("snapshot", "delete", m.mnt, sid)
    assert os.listdir(snaps) == []
    time.sleep(1.2)  # the kernel may keep a name it looked up for one second
    assert not (snaps / sid).exists()
    again = snapshot(m)
    assert os.listdir(snaps) == [again] and (snaps / again / "f").read_bytes() == b"one"


def test_snapshot_dir_name_and_listing_are_settings(tmp_path: Path, data_dir: Path) -> None:
    configure(data_dir, snapshots__dir_name="@snap", snapshots__show_dir=True)
    with mounted(tmp_path, data_dir) as m:
        (m.mnt / ".snapshots").mkdir()  # an ordinary name now
        sid = snapshot(m)
        assert sorted(os.listdir(m.mnt)) == [".snapshots", "@snap"]
        assert os.listdir(m.mnt / "@snap" / sid) == [".snapshots"]
        raises_errno(errno.EEXIST, lambda: os.mkdir(m.mnt / "@snap"))


# -- tierfs restore mount ---------------------------------------------------------------------


def iso(time_ns: int) -> str:
    when = datetime.datetime.fromtimestamp(time_ns // 10**9, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{time_ns % 10**9:09d}Z"


def test_restore_mount_from_the_region_and_the_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli("mkfs", data, "--site", "view-site", "--regional", f"file://{tmp_path / 'region'}")
    bundle = tmp_path / "key.bundle"
    run_cli("key", "export", data, bundle, "--no-passphrase")
    view = tmp_path / "view"
    view.mkdir()
    with mounted(tmp_path, data) as m:
        fill(m.mnt)
        before = tree_of(m.mnt)
        first = snapshot(m)
        change(m.mnt)
        snapshot(m, "--name", "after")
        after = tree_of(m.mnt)
        run_cli("sync", m.mnt, "--wait", "--timeout", "120")
        listed = json.loads(run_cli("snapshot", "list", m.mnt, "--json").stdout)
        first_ns = next(s["time_ns"] for s in listed if s["snapshot_id"] == first)

        region = f"file://{tmp_path / 'region'}"
        key = ["--key-file", str(bundle)]
        cases: list[tuple[list[str], dict[str, tuple[object, ...]]]] = [
            ([region, *key, first], before),
            ([region, *key, "--at", iso(first_ns)], before),
            ([region, *key, "--at", "2999-01-01"], after),
            ([str(data), "after"], after),
        ]
        for args, expected in cases:
            run_cli("restore", "mount", *args, view, "--log-file", tmp_path / "view.log")
            try:
                assert view.absolute() in tierfs_mounts()
                assert tree_of(view) == expected, args
                assert os.stat(view / "docs").st_ino != os.stat(m.mnt / "docs").st_ino
                raises_errno(errno.EROFS, lambda: os.open(view / "new", os.O_CREAT | os.O_WRONLY))
                raises_errno(errno.EROFS, lambda: os.unlink(view / "docs" / "a.txt"))
            finally:
                run_cli("umount", view)
            assert view.absolute() not in tierfs_mounts()
        failed = run_cli("restore", "mount", region, "no-such", view, *key, check=False)
        assert failed.returncode == 2 and "no snapshot" in failed.stderr


# -- SnapshotView without FUSE ------------------------------------------------------------------


class Blobs:
    """An in-memory content-addressed store: blobs by id, and a fetch that counts calls."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.fetched: list[bytes] = []

    def put(self, data: bytes) -> bytes:
        blob_id = blake3.blake3(data).digest()
        self.blobs[blob_id] = data
        return blob_id

    async def fetch(self, blob_id: bytes) -> bytes:
        self.fetched.append(blob_id)
        await trio.sleep(0)
        return self.blobs[blob_id]


def entry(name: bytes, kind: tf.FileType, **fields: object) -> tf.Entry:
    return tf.Entry(name, kind, 0o644, 1000, 1000, 1, 2, **fields)  # type: ignore[arg-type]


def big_file(blobs: Blobs, name: bytes) -> tuple[tf.Entry, tf.Entry]:
    """A file of 3000 extents with holes between them, in extent-list blobs; and its link."""
    rng = random.Random(7)
    extents = []
    pos = 0
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(1, 300))
        pos += rng.choice([0, 0, 17, 4000])
        chunk_off = rng.randrange(len(data))
        length = len(data) - chunk_off
        extents.append(Extent(pos, length, blobs.put(data), chunk_off))
        pos += length
    refs = []
    for a, b in tf.split_extents(extents):
        run = extents[a:b]
        blob_id = blobs.put(tf.encode_extent_list(run))
        refs.append(
            tf.ExtentListRef(run[0].file_off, run[-1].end - run[0].file_off, b - a, blob_id)
        )
    assert len(refs) > 1
    size = pos + 1000  # a hole at the end
    file = entry(name, tf.FileType.REG, size=size, link_id=42, extent_lists=tuple(refs))
    return file, entry(b"again", tf.FileType.REG, size=size, link_id=42, extent_lists=tuple(refs))


def test_view_reads_extent_lists_holes_and_keeps_inode_numbers() -> None:
    blobs = Blobs()
    file, link = big_file(blobs, b"big")
    sub = blobs.put(tf.encode_tree([link, entry(b"x", tf.FileType.SYMLINK, target=b"../big")]))
    top = blobs.put(tf.encode_tree([file, entry(b"sub", tf.FileType.DIR, tree_id=sub)]))
    root = blobs.put(tf.encode_tree([entry(b"", tf.FileType.DIR, tree_id=top)], tf.KIND_ROOT))
    expected = file_bytes(blobs.blobs.__getitem__, file)
    base = (1 << 62) + (5 << 40)

    async def main() -> None:
        view = SnapshotView(root, blobs.fetch, base=base, chunk_cache_bytes=64 * KiB)
        assert (await view.getattr(base)).st_ino == base
        assert (await view.lookup_or_negative(base, b"nope")).st_ino == 0
        big = await view.lookup(base, b"big")
        sub_attrs = await view.lookup(base, b"sub")
        again = await view.lookup(sub_attrs.st_ino, b"again")
        assert big.st_ino == again.st_ino and big.st_nlink == 2
        assert await view.readlink((await view.lookup(sub_attrs.st_ino, b"x")).st_ino) == b"../big"
        names = [n for n, _, _ in await view.readdir(base, 0)]
        assert names == [b"big", b"sub"] and [n for n, _, _ in await view.readdir(base, 1)] == [
            b"sub"
        ]
        rng = random.Random(3)
        for _ in range(200):
            off = rng.randrange(len(expected) + 10)
            size = rng.choice([1, 100, 4096, 128 * KiB])
            assert await view.read(big.st_ino, off, size) == expected[off : off + size]
        # A read at the start fetches the first extent list and its chunks, nothing else.
        cold = SnapshotView(root, blobs.fetch, base=base)
        blobs.fetched.clear()
        ino = (await cold.lookup(base, b"big")).st_ino
        await cold.read(ino, 0, 512)
        assert len(blobs.fetched) < 40
        with pytest.raises(FsError) as info:
            await view.open(big.st_ino, os.O_RDWR)
        assert info.value.errno == errno.EROFS
        # A sequential reader gets the same bytes with read-ahead running beside it.
        async with trio.open_nursery() as nursery:
            ahead = SnapshotView(root, blobs.fetch, base=base, chunk_cache_bytes=MiB)
            ahead.nursery = nursery
            ino = (await ahead.lookup(base, b"big")).st_ino
            got = bytearray()
            while len(got) < len(expected):
                got += await ahead.read(ino, len(got), 64 * KiB)
            assert got == expected
        # A forgotten entry gets a new number; a hard-linked one keeps its own.
        view.forget(sub_attrs.st_ino, 2)
        assert (await view.lookup(base, b"sub")).st_ino != sub_attrs.st_ino
        view.forget(big.st_ino, 10)
        assert (await view.lookup(base, b"big")).st_ino == big.st_ino

    trio.run(main)
