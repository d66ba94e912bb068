"""`tierfs restore list` and `tierfs restore extract`: a real mount, a real regional store.

The snapshot is taken of a mounted tierfs, sent with `tierfs sync --wait` to a local store or
SeaweedFS, and read back as an operator would after losing the site: with nothing but the
store URL and a recovery bundle. What is checked is what a restore promises: the same tree
(types, modes, owners, mtimes, xattrs, symlink targets, hard links, contents, holes), the
right version for a time, resumption, and that damage is reported per file and never
restored silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import Mount, configure, mounted
from tests.s3server import BUCKET, unique_prefix
from tierfs.cli import cli
from tierfs.data import domain as domain_mod
from tierfs.data.extents import Extent
from tierfs.errors import ExitCode
from tierfs.restore import extract as extract_mod
from tierfs.restore.extract import Extractor
from tierfs.restore.region import ChunkError, Result
from tierfs.restore.source import Job, Source, open_source, parse_time
from tierfs.snap import tree as treemod
from tierfs.snap import treeformat as tf
from tools.s3server import S3Server

KiB, MiB = 1024, 1024 * 1024
MTIME = 1_700_000_000_123_456_789


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def tierfs(*args: str | Path, check: bool = True, env: dict[str, str] | None = None) -> Ran:
    """`tierfs ARGS` in this process (the restore commands need no daemon): saves the
    second a fresh interpreter costs, which is most of these tests' time."""
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, prog_name="tierfs")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    ran = Ran(result.exit_code, result.stdout, result.stderr)
    if check and ran.returncode != 0:
        raise AssertionError(f"tierfs {args} exited {ran.returncode}:\n{ran.stdout}\n{ran.stderr}")
    return ran


class Site:
    """A mounted filesystem with a regional store, and how to reach the store from outside."""

    def __init__(self, m: Mount, url: str, env: dict[str, str], extra: list[str]) -> None:
        self.m = m
        self.url = url
        self.env = env  # the credentials, as an operator's environment would have them
        self.extra = extra  # --endpoint/--region for S3
        self.bundle = m.data.parent / "domain.bundle"

    def snapshot(self, name: str | None = None) -> str:
        args: list[str | Path] = ["snapshot", "create", self.m.mnt]
        args += ["--name", name] if name else []
        snap = tierfs(*args).stdout.strip()
        tierfs("sync", self.m.mnt, "--wait", "--timeout", "120")
        return snap

    def restore(self, *args: str | Path, check: bool = True) -> Ran:
        """`tierfs restore ARGS` against the store URL with the bundle."""
        command, rest = args[0], args[1:]
        full = ["restore", command, self.url, *rest, "--key-file", self.bundle, *self.extra]
        return tierfs(*full, check=check, env=self.env)


@pytest.fixture(params=["local", "s3"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    """A mounted tierfs whose snapshots go to a local store or to SeaweedFS."""
    env: dict[str, str] = {}  # added to the environment: the credentials, for S3
    extra: list[str] = []
    settings: dict[str, object] = {}
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        url = f"s3://{BUCKET}/{unique_prefix()}"
        settings = {
            "regional__endpoint": server.endpoint,
            "regional__region": server.region,
            "regional__access_key_id": server.access_key,
            "regional__secret_access_key": server.secret_key,
            "regional__retries": 1,
            "regional__timeout": 3.0,
        }
        env = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
        extra = ["--endpoint", server.endpoint, "--region", server.region]
    else:
        url = f"file://{tmp_path / 'region'}"
    yield from _site(tmp_path, url, settings, env, extra)


@pytest.fixture
def local_site(tmp_path: Path) -> Iterator[Site]:
    """The same with a local store only: tests that damage objects on disk."""
    yield from _site(tmp_path, f"file://{tmp_path / 'region'}", {}, {}, [])


def _site(
    tmp_path: Path, url: str, settings: dict[str, object], env: dict[str, str], extra: list[str]
) -> Iterator[Site]:
    data = tmp_path / "data"
    tierfs("mkfs", data, "--site", "store-042", "--regional", url)
    if settings:
        configure(data, **settings)
    with mounted(tmp_path, data) as m:
        s = Site(m, url, env, extra)
        tierfs("key", "export", "--domain-only", "--no-passphrase", data, s.bundle)
        yield s


def fill(root: Path) -> None:
    """Every kind of entry a restore must bring back, with odd attributes."""
    (root / "docs").mkdir()
    (root / "docs" / "readme.txt").write_bytes(b"hello region\n" * 100)
    (root / "big.bin").write_bytes(payload("big", 3 * MiB))
    os.link(root / "big.bin", root / "docs" / "big-link.bin")
    os.link(root / "big.bin", root / "big-link2.bin")
    with open(root / "sparse.bin", "wb") as f:
        f.seek(2 * MiB)
        f.write(payload("sparse", 100 * KiB))
        f.truncate(5 * MiB)  # a hole at the end as well
    os.symlink("docs/readme.txt", root / "link")
    os.symlink("nowhere", root / "docs" / "dangling")
    for i in range(40):
        (root / "docs" / f"small{i}").write_bytes(payload(f"small{i}", 500 + i))
    (root / "empty").write_bytes(b"")
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4751)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "private").write_bytes(b"secret")
    os.chmod(root / "private", 0o400)
    os.chown(root / "private", 1234, 5678)
    os.mkfifo(root / "fifo", 0o640)
    os.setxattr(root / "docs" / "readme.txt", b"user.origin", b"site 42")
    os.setxattr(root / "docs", b"user.dir", b"\x00\xffbinary")
    os.utime(root / "docs" / "readme.txt", ns=(MTIME, MTIME))
    os.utime(root / "docs", ns=(MTIME + 1, MTIME + 1))


def describe(root: Path) -> dict[str, dict[str, Any]]:
    """Everything a restore restores, per path: the comparison is of these dictionaries."""
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[int, list[str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        rel = str(path.relative_to(root))
        st = path.lstat()
        info: dict[str, Any] = {
            "type": stat.S_IFMT(st.st_mode),
            "mode": stat.S_IMODE(st.st_mode),
            "owner": (st.st_uid, st.st_gid),
            "xattrs": sorted(
                (n, os.getxattr(path, n, follow_symlinks=False))
                for n in os.listxattr(path, follow_symlinks=False)
                if n.startswith("user.")
            ),
        }
        if not stat.S_ISLNK(st.st_mode):
            info["mtime"] = st.st_mtime_ns
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info["rdev"] = st.st_rdev
        if stat.S_ISLNK(st.st_mode):
            info["target"] = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            info["size"] = st.st_size
            info["data"] = path.read_bytes()
            if st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
        out[rel] = info
    for names in inodes.values():
        for name in names:
            out[name]["links"] = sorted(names)
    return out


def assert_same_tree(source: Path, dest: Path) -> None:
    want, got = describe(source), describe(dest)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert got[rel] == want[rel], rel


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """Where the file has data (SEEK_DATA/SEEK_HOLE): holes must stay holes."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def listing(site: Site, *args: str) -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads(site.restore("list", "--json", *args).stdout)
    return doc


# -- the whole tree, from the store and from the data directory -------------------------------


def test_list_and_extract_a_whole_snapshot(site: Site, tmp_path: Path) -> None:
    fill(site.m.mnt)
    snap = site.snapshot(name="first")
    (entry,) = listing(site)
    assert entry["snapshot_id"] == snap and entry["verified"] and entry["error"] is None
    assert entry["site_name"] == "store-042" and entry["name"] == "first"
    assert entry["stats"]["logical_bytes"] >= 3 * MiB
    table = site.restore("list").stdout
    assert snap in table and "verified" in table and "store-042" in table
    local = json.loads(tierfs("restore", "list", site.m.data, "--json").stdout)
    assert [s["snapshot_id"] for s in local] == [snap]

    dest = tmp_path / "dest"
    done = site.restore("extract", snap, dest)
    assert "restored" in done.stdout, done.stdout
    assert_same_tree(site.m.mnt, dest)
    # holes stay holes: only the written 100 KiB (rounded to blocks) holds data
    ranges = data_ranges(dest / "sparse.bin")
    assert ranges and ranges[0][0] >= 2 * MiB - 64 * KiB and ranges[-1][1] <= 2 * MiB + 256 * KiB
    assert (dest / "sparse.bin").stat().st_blocks * 512 < 1 * MiB
    assert not list(dest.rglob("*.tierfs-partial"))

    from_data_dir = tmp_path / "from-data-dir"
    tierfs("restore", "extract", site.m.data, "first", from_data_dir)
    assert_same_tree(site.m.mnt, from_data_dir)


def test_a_tree_of_many_batches_is_extracted_whole(
    local_site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are read while the walk goes on; with a batch of two files, most files of
    the tree are in a batch that starts before the previous one has finished."""
    monkeypatch.setattr(extract_mod, "BATCH_FILES", 2)
    monkeypatch.setattr(extract_mod, "BATCH_BYTES", 1 * MiB)
    site = local_site
    fill(site.m.mnt)
    for i in range(12):
        (site.m.mnt / f"small-{i}").write_bytes(os.urandom(1000 + i))
    snap = site.snapshot()
    dest = tmp_path / "dest"
    site.restore("extract", snap, dest)
    assert_same_tree(site.m.mnt, dest)
    assert not list(dest.rglob("*.tierfs-partial"))


# -- versions, subtrees, resuming -------------------------------------------------------------


def test_at_picks_the_version_and_a_path_picks_a_subtree(local_site: Site, tmp_path: Path) -> None:
    site = local_site
    mnt = site.m.mnt
    (mnt / "dir").mkdir()
    (mnt / "dir" / "f").write_bytes(b"version one")
    (mnt / "other").write_bytes(b"other")
    first = site.snapshot()
    time.sleep(0.05)
    (mnt / "dir" / "f").write_bytes(b"version two, longer")
    (mnt / "dir" / "new").write_bytes(payload("new", 300 * KiB))
    second = site.snapshot()
    snaps = listing(site)
    assert [s["snapshot_id"] for s in snaps] == [first, second]
    between = snaps[0]["time"]  # the first one's own time: "at or before" includes it

    old = tmp_path / "old"
    site.restore("extract", "--at", between, old)
    assert (old / "dir" / "f").read_bytes() == b"version one"
    assert not (old / "dir" / "new").exists()
    new = tmp_path / "new"
    site.restore("extract", "--at", "2999-01-01T00:00:00+02:00", new)
    assert (new / "dir" / "f").read_bytes() == b"version two, longer"
    assert_same_tree(mnt, new)

    sub = tmp_path / "sub"
    site.restore("extract", f"{second}:dir", sub)
    assert sorted(p.name for p in sub.iterdir()) == ["f", "new"]
    assert (sub / "new").read_bytes() == payload("new", 300 * KiB)
    assert sub.stat().st_mtime_ns == (mnt / "dir").stat().st_mtime_ns
    one = tmp_path / "one"
    site.restore("extract", "--at", between, ":dir/f", one)
    assert (one / "f").read_bytes() == b"version one"

    early = site.restore("extract", "--at", "2000-01-01", tmp_path / "x", check=False)
    assert early.returncode == ExitCode.USAGE and "no snapshot at or before" in early.stderr
    bad = site.restore("extract", "--at", "yesterday", tmp_path / "x", check=False)
    assert bad.returncode == ExitCode.USAGE and "bad time" in bad.stderr
    missing = site.restore("extract", f"{second}:no/such", tmp_path / "x", check=False)
    assert missing.returncode == ExitCode.USAGE and "no/such" in missing.stderr


def test_a_rerun_resumes_an_interrupted_extract(local_site: Site, tmp_path: Path) -> None:
    site = local_site
    mnt = site.m.mnt
    for i in range(12):
        (mnt / f"f{i}").write_bytes(payload(f"f{i}", 200 * KiB + i))
    os.link(mnt / "f0", mnt / "f0-link")
    snap = site.snapshot()
    dest = tmp_path / "dest"
    site.restore("extract", snap, dest)
    # An interrupted run: some files missing, one cut short, a partial file left behind,
    # a hard link not made yet.
    (dest / "f3").unlink()
    (dest / "f0-link").unlink()
    with open(dest / "f5", "r+b") as f:
        f.truncate(1000)
    (dest / "f7").unlink()
    (dest / "f7.tierfs-partial").write_bytes(b"half of f7")
    again = site.restore("extract", snap, dest)
    assert "9 already complete" in again.stdout, again.stdout
    assert_same_tree(mnt, dest)
    assert not list(dest.glob("*.tierfs-partial"))


# -- damage -----------------------------------------------------------------------------------


def _chunk_of(site: Site, path: bytes) -> tuple[bytes, Any]:
    """The first chunk of the file at `path` in the latest snapshot, and where it is upstream."""
    with open_source(site.url, key_file=site.bundle) as src:
        info = src.pick(None, None)
        entries = dict(treemod.walk(src.fetch, info.root))
        chunk_id = next(iter(treemod.file_extents(src.fetch, entries[path]))).chunk_id
        return chunk_id, src.locate([chunk_id])[chunk_id]


def test_a_damaged_chunk_fails_only_the_files_that_use_it(local_site: Site, tmp_path: Path) -> None:
    site = local_site
    mnt = site.m.mnt
    (mnt / "a.bin").write_bytes(payload("a", 200 * KiB))
    (mnt / "copy-of-a.bin").write_bytes(payload("a", 200 * KiB))  # the same chunk
    (mnt / "b.bin").write_bytes(payload("b", 200 * KiB))
    (mnt / "dir").mkdir()
    (mnt / "dir" / "c.txt").write_bytes(b"fine")
    snap = site.snapshot()
    chunk_id, where = _chunk_of(site, b"a.bin")
    pack_file = tmp_path / "region" / where.pack
    with open(pack_file, "r+b") as f:
        f.seek(where.offset + where.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))

    dest = tmp_path / "dest"
    result = site.restore("extract", snap, dest, check=False)
    assert result.returncode == ExitCode.VERIFY_FAILED, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tierfs: error:")]
    named = [line for line in errors if chunk_id.hex()[:16] in line]
    assert len(named) == 2, result.stderr
    assert any("/a.bin:" in line for line in named)
    assert any("/copy-of-a.bin:" in line for line in named)
    assert (dest / "b.bin").read_bytes() == payload("b", 200 * KiB)
    assert (dest / "dir" / "c.txt").read_bytes() == b"fine"
    assert not (dest / "a.bin").exists() and not (dest / "copy-of-a.bin").exists()
    assert not list(dest.rglob("*.tierfs-partial"))


def test_a_tampered_manifest_is_listed_as_failed_and_never_restored(
    local_site: Site, tmp_path: Path
) -> None:
    site = local_site
    (site.m.mnt / "f").write_bytes(b"x")
    snap = site.snapshot()
    (manifest,) = (tmp_path / "region" / "sites").rglob("manifests/*")
    body = bytearray(manifest.read_bytes())
    body[len(body) // 3] ^= 0x01
    manifest.write_bytes(bytes(body))
    listed = site.restore("list", check=False)
    assert listed.returncode == ExitCode.VERIFY_FAILED
    assert snap in listed.stdout and "FAILED: " in listed.stdout
    refused = site.restore("extract", snap, tmp_path / "dest", check=False)
    assert refused.returncode == ExitCode.VERIFY_FAILED
    assert "refusing to restore" in refused.stderr
    assert not (tmp_path / "dest").exists()


# -- usage errors -----------------------------------------------------------------------------


def test_sources_that_are_not_there(tmp_path: Path) -> None:
    gone = tierfs("restore", "list", tmp_path / "nothing", check=False)
    assert gone.returncode == ExitCode.NOT_A_FILESYSTEM, gone.stderr
    url = f"file://{tmp_path / 'nothing'}"
    keyless = tierfs("restore", "list", url, check=False)
    assert keyless.returncode == ExitCode.USAGE and "--key-file" in keyless.stderr
    no_bundle = tierfs("restore", "list", url, "--key-file", tmp_path / "b", check=False)
    assert no_bundle.returncode == ExitCode.CONFIG, no_bundle.stderr


def test_parse_time() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == 10**9
    assert parse_time("1970-01-01T01:00:01+01:00") == 10**9
    assert parse_time("1970-01-01 00:00:01.5") == 1_500_000_000
    assert parse_time("2026-11-26T15:00:00.123456789Z") % 10**9 == 123456789
    assert tf.FileType.REG  # the tree format is what extract reads


def test_a_data_directory_reads_evicted_chunks_from_its_store(
    local_site: Site, tmp_path: Path
) -> None:
    site = local_site
    mnt = site.m.mnt
    (mnt / "kept.bin").write_bytes(payload("kept", 400 * KiB))
    (mnt / "gone.bin").write_bytes(payload("gone", 400 * KiB))
    snap = site.snapshot()
    evicted = tierfs("evict", mnt, mnt / "gone.bin", check=False)
    if evicted.returncode != 0:
        pytest.skip(f"tierfs evict is not usable here: {evicted.stderr.strip()}")
    assert not evicted.stdout.startswith("evicted 0 chunks"), evicted.stdout
    dest = tmp_path / "dest"
    tierfs("restore", "extract", site.m.data, snap, dest)
    assert (dest / "gone.bin").read_bytes() == payload("gone", 400 * KiB)
    assert (dest / "kept.bin").read_bytes() == payload("kept", 400 * KiB)


def test_an_encrypted_bundle_needs_its_passphrase(local_site: Site, tmp_path: Path) -> None:
    site = local_site
    (site.m.mnt / "f").write_bytes(b"x")
    snap = site.snapshot()
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("correct horse\n")
    bad.write_text("wrong horse\n")
    site.bundle = tmp_path / "encrypted.bundle"
    tierfs("key", "export", "--domain-only", "--passphrase-file", good, site.m.data, site.bundle)
    listed = json.loads(site.restore("list", "--json", "--passphrase-file", good).stdout)
    assert [s["snapshot_id"] for s in listed] == [snap]
    wrong = site.restore("list", "--passphrase-file", bad, check=False)
    assert wrong.returncode == ExitCode.VERIFY_FAILED, wrong.stderr
    asked = site.restore("list", check=False)  # no terminal to ask on
    assert asked.returncode == ExitCode.USAGE and "--passphrase-file" in asked.stderr


# -- the extractor over a hand-made tree (no FUSE): extent lists, many extents ----------------


class MemorySource(Source):
    """Blobs and chunks from a dict, checked like any source; `broken` ids fail."""

    def __init__(self) -> None:
        super().__init__("memory", domain_mod.generate("test"), None, 4)
        self.objects: dict[bytes, bytes] = {}
        self.broken: set[bytes] = set()

    def put(self, data: bytes) -> bytes:
        chunk_id = self.content_id(data)
        self.objects[chunk_id] = data
        return chunk_id

    def read_jobs(self, chunk_ids: Iterable[bytes]) -> list[Job]:
        def result(c: bytes) -> Result:
            if c in self.broken:
                return c, ChunkError(c, "damaged", ExitCode.VERIFY_FAILED)
            return c, self.objects[c]

        ids = list(dict.fromkeys(chunk_ids))
        return [functools.partial(_results, result, ids[i : i + 7]) for i in range(0, len(ids), 7)]


def _results(result: Callable[[bytes], Result], part: list[bytes]) -> list[Result]:
    return [result(c) for c in part]


def _entry(name: bytes, kind: tf.FileType, mode: int = 0o640, **payload: Any) -> tf.Entry:
    return tf.Entry(name, kind, mode, 0, 0, MTIME, MTIME, **payload)


def test_extent_lists_and_sparse_extents_from_a_hand_made_tree(tmp_path: Path) -> None:
    src = MemorySource()
    pieces = [payload(f"p{i}", 100 + i) for i in range(600)]
    extents, pos, expected = [], 0, bytearray()
    for i, piece in enumerate(pieces):
        gap = 50 if i % 3 == 0 else 0  # holes between some extents
        expected += bytes(gap) + piece[10:]
        pos += gap
        extents.append(Extent(pos, len(piece) - 10, src.put(piece), 10))
        pos += len(piece) - 10
    size = pos + 1000
    expected += bytes(1000)
    refs = []
    for a, b in tf.split_extents(extents) or [(0, len(extents))]:
        run = extents[a:b]
        blob_id = src.put(tf.encode_extent_list(run))
        refs.append(
            tf.ExtentListRef(run[0].file_off, run[-1].end - run[0].file_off, b - a, blob_id)
        )
    big = _entry(b"big", tf.FileType.REG, size=size, extent_lists=tuple(refs))
    abc = (Extent(0, 3, src.put(b"abc"), 0),)
    small = _entry(b"small", tf.FileType.REG, size=3, link_id=7, extents=abc)
    bad_id = src.put(b"will not verify")
    src.broken.add(bad_id)
    bad = _entry(b"bad", tf.FileType.REG, size=15, extents=(Extent(0, 15, bad_id, 0),))
    alias = dataclasses.replace(small, name=b"z-alias")
    tree_id = src.put(tf.encode_tree([big, small, bad, alias]))
    root_entry = _entry(b"", tf.FileType.DIR, 0o750, tree_id=tree_id)
    root_id = src.put(tf.encode_tree([root_entry], tf.KIND_ROOT))

    dest = tmp_path / "dest"
    result = Extractor(src, dest, workers=3).run(root_id)
    assert [(f.path, f.error.exit_code) for f in result.failures] == [
        (str(dest / "bad"), ExitCode.VERIFY_FAILED)
    ]
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert (dest / "big").read_bytes() == bytes(expected)
    assert (dest / "big").stat().st_mtime_ns == MTIME
    assert (dest / "small").stat().st_ino == (dest / "z-alias").stat().st_ino
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750 and dest.stat().st_mtime_ns == MTIME
    assert not (dest / "bad").exists() and not list(dest.glob("*.tierfs-partial"))
    again = Extractor(src, dest, workers=3).run(root_id, "big")
    assert again.progress.files_skipped == 1 and not again.failures


def test_a_file_reopened_after_its_descriptor_was_evicted_keeps_what_was_written(
    tmp_path: Path,
) -> None:
    """Files are created by their first write; one whose descriptor was closed to make room
    for others (more files in flight than descriptors kept) is reopened, not truncated."""
    fds = extract_mod._Fds(max_open=1)
    a, b = bytes(tmp_path / "a"), bytes(tmp_path / "b")
    fds.write(a, memoryview(b"first"), 0, 20)
    fds.write(b, memoryview(b"other"), 5, 10)  # closes a's descriptor
    fds.write(a, memoryview(b"second"), 10, 20)
    fds.close_all()
    assert (tmp_path / "a").read_bytes() == b"first" + bytes(5) + b"second" + bytes(4)
    assert (tmp_path / "b").read_bytes() == bytes(5) + b"other"
    fds.close(a)  # done: a later run's first write starts the file afresh
    fds.write(a, memoryview(b"new"), 0, 3)
    fds.close_all()
    assert (tmp_path / "a").read_bytes() == b"new"
