"""`tierfs restore site`: a lost site rebuilt on a new machine from its regional store.

The flow an operator follows: a site snapshots and syncs, its recovery bundle is kept
off-site, the machine is lost (its data directory removed), and `restore site` rebuilds the
index from the snapshot in the region. The rebuilt filesystem must pass fsck, mount, show
the same tree (names, modes, sizes, times, xattrs, links), read its files from the region,
and go on snapshotting as a new epoch without touching an object of the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fuse_available, mounted, run_cli
from tests.s3server import store_settings
from tests.test_replication import make_fs, payload, s3_url_and_config, sync
from tierfs.errors import ExitCode
from tierfs.meta.records import ChunkRecord
from tierfs.meta.store import MetaStore
from tierfs.restore import site as site_mod
from tierfs.snap import keys
from tierfs.snap import manifest as manifest_mod
from tierfs.upstream.objectstore import ObjectStore, StoreSettings, open_store
from tierfs.upstream.pack import read_index
from tierfs.upstream.state import COMPLETE, UPLOADED, UpstreamState
from tools.s3server import S3Server

KiB, MiB = 1024, 1024 * 1024
SITE = "site-data"  # make_fs names the site after the directory


def fill(root: Path) -> None:
    """Directories, a sparse file, a file of many extents (extent-list blobs), hard links,
    symlinks, xattrs, an empty file, a FIFO, odd modes and times."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir(mode=0o700)
    (root / "docs" / "readme.txt").write_bytes(b"hello region\n" * 100)
    (root / "big.bin").write_bytes(payload("big", 3 * MiB))
    os.link(root / "big.bin", root / "docs" / "big-link.bin")
    os.link(root / "big.bin", root / "docs" / "deep" / "big-link2.bin")
    with open(root / "sparse.bin", "wb") as f:
        f.seek(4 * MiB)
        f.write(b"end")
    with open(root / "pieces.bin", "wb") as f:  # > 256 extents: kept in extent-list blobs
        for i in range(300):
            f.seek(i * 8 * KiB)
            f.write(payload(f"piece{i}", 100))
    os.symlink("docs/readme.txt", root / "link")
    os.symlink("/nowhere/at/all", root / "docs" / "dangling")
    (root / "empty").touch()
    os.mkfifo(root / "docs" / "fifo")
    for i in range(40):
        (root / "docs" / "deep" / "er" / f"small{i}").write_bytes(payload(f"s{i}", 1000 + i))
    os.setxattr(root / "docs" / "readme.txt", "user.colour", b"blue")
    os.setxattr(root / "docs", "user.dir-attr", b"\x00\x01binary")
    os.chmod(root / "docs" / "readme.txt", 0o640)
    os.utime(root / "docs" / "deep" / "er" / "small3", ns=(1_600_000_000_123_456_789,) * 2)


@dataclass(frozen=True)
class Node:
    """What the restored tree must repeat of one path (atime excepted: trees have none;
    st_blocks too: the source counts staged bytes in it, which a snapshot may have copied)."""

    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]
    target: str | None


def capture(root: Path) -> tuple[dict[str, Node], set[frozenset[str]]]:
    """Every path's metadata, and which paths are one file (hard links)."""
    nodes: dict[str, Node] = {}
    by_ino: dict[int, set[str]] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for path in paths:
        st = path.lstat()
        rel = str(path.relative_to(root))
        link = stat.S_ISLNK(st.st_mode)
        xattrs = (
            () if link else tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)))
        )
        nodes[rel] = Node(
            st.st_mode,
            st.st_size,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_ctime_ns,
            xattrs,
            os.readlink(path) if link else None,
        )
        if not stat.S_ISDIR(st.st_mode):
            by_ino.setdefault(st.st_ino, set()).add(rel)
    return nodes, {frozenset(group) for group in by_ino.values()}


def contents(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if stat.S_ISREG(path.lstat().st_mode):
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def objects(store: ObjectStore) -> dict[str, str]:
    return {n: hashlib.sha256(store.get(n)).hexdigest() for n in store.list("")}


@dataclass
class Published:
    """A site that snapshotted, synced and was lost: what the operator still has."""

    url: str
    region: Path | None  # the local store's directory
    bundle: Path
    domain_bundle: Path
    nodes: dict[str, Node]
    links: set[frozenset[str]]
    contents: dict[str, str]
    snapshot_id: str
    env: dict[str, str]
    restore_args: tuple[str, ...]
    settings: StoreSettings


def publish(tmp: Path, url: str, config: dict[str, object], settings: StoreSettings) -> Published:
    data = make_fs(tmp, url, config)
    with mounted(tmp, data) as m:
        fill(m.mnt)
        snapshot_id = run_cli("snapshot", "create", m.mnt).stdout.strip()
        sync(m)
        nodes, links = capture(m.mnt)
        files = contents(m.mnt)
    bundle, domain_bundle = tmp / "site.bundle", tmp / "domain.bundle"
    run_cli("key", "export", data, bundle, "--no-passphrase")
    run_cli("key", "export", data, domain_bundle, "--no-passphrase", "--domain-only")
    shutil.rmtree(data)  # the machine is lost
    region = Path(url.removeprefix("file://")) if url.startswith("file://") else None
    env = os.environ.copy()
    args: tuple[str, ...] = ()
    if settings.endpoint:
        env["AWS_ACCESS_KEY_ID"] = settings.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = settings.secret_access_key
        args = ("--endpoint", settings.endpoint, "--region", settings.region)
    return Published(
        url,
        region,
        bundle,
        domain_bundle,
        nodes,
        links,
        files,
        snapshot_id,
        env,
        args,
        settings,
    )


def restore(
    p: Published, target: Path, *extra: str | Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "restore",
        "site",
        p.url,
        target,
        "--site",
        SITE,
        "--key-file",
        p.bundle,
        "--zone-device",
        "none",
        *p.restore_args,
        *extra,
        check=check,
        env=p.env,
    )


def fsck_problems(data: Path) -> list[str]:
    """fsck's problem lines."""
    result = run_cli("fsck", data, check=False)
    return [line for line in result.stdout.splitlines() if line.startswith("problem:")]


@pytest.fixture(scope="module")
def local_site(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One published site in a local store, copied by each test that writes to it."""
    if not fuse_available():
        pytest.skip("needs FUSE")
    tmp = tmp_path_factory.mktemp("published")
    return publish(tmp, f"file://{tmp / 'region'}", {}, StoreSettings())


@pytest.fixture
def site_copy(local_site: Published, tmp_path: Path) -> Published:
    """The published site with a region of its own (a rebuild publishes into it)."""
    assert local_site.region is not None
    region = tmp_path / "region"
    shutil.copytree(local_site.region, region)
    return Published(**{**local_site.__dict__, "url": f"file://{region}", "region": region})


def check_rebuilt(p: Published, tmp_path: Path, store: ObjectStore) -> None:
    """Rebuild, fsck, mount, compare, read, then snapshot and sync as the new epoch."""
    before = objects(store)
    new = tmp_path / "rebuilt"
    result = restore(p, new)
    assert "rebuilding site" in result.stderr
    assert f"from snapshot {p.snapshot_id}" in result.stdout
    assert fsck_problems(new) == []
    assert keys.load_site_keys(new).epoch == 2
    toml = (new / "tierfs.toml").read_text()
    assert f'url = "{p.url}"' in toml and f'name = "{SITE}"' in toml
    with mounted(tmp_path, new) as m:
        nodes, links = capture(m.mnt)
        assert nodes == p.nodes
        assert links == p.links
        assert contents(m.mnt) == p.contents
        # st_blocks counts sealed bytes (and staged ones, which the source may still have had)
        assert (m.mnt / "sparse.bin").stat().st_blocks * 512 < 64 * KiB
        assert (m.mnt / "big.bin").stat().st_blocks * 512 >= 3 * MiB
        (m.mnt / "after-rebuild.txt").write_bytes(b"the new machine writes")
        os.rename(m.mnt / "docs" / "readme.txt", m.mnt / "docs" / "read-me.txt")
        os.setxattr(m.mnt / "big.bin", "user.new", b"epoch 2")
        second = run_cli("snapshot", "create", m.mnt).stdout.strip()
        sync(m)
        m.umount()
    assert fsck_problems(new) == []
    after = objects(store)
    assert {n: h for n, h in after.items() if n in before} == before, "an object was replaced"
    added = sorted(set(after) - set(before))
    uuid = keys.load_site_keys(new).site_uuid
    manifests = [n for n in added if "/manifests/" in n]
    assert [manifest_mod.parse_manifest_name(n).epoch for n in manifests] == [2]
    assert all(n.split("/")[-1].startswith("00000002-") for n in added if n.startswith("index/"))
    assert all(uuid in n for n in added if n.startswith(("index/", "sites/")))
    new_data = [e for n in added if n.startswith("packs/data/") for e in read_index(store, n)]
    assert len(new_data) == 1, "the sync after the rebuild sent chunks the region had"
    (name,) = manifests
    domain_key = keys.read_bundle(p.bundle).domain_keys.public_key
    manifest = manifest_mod.verify(store.get(name), domain_key)
    assert manifest.snapshot_id == second and manifest.counter == 2


def test_a_lost_site_is_rebuilt_from_a_local_store(site_copy: Published, tmp_path: Path) -> None:
    store = open_store(site_copy.url, StoreSettings())
    check_rebuilt(site_copy, tmp_path, store)


def test_a_lost_site_is_rebuilt_from_s3(s3_server: S3Server, tmp_path: Path) -> None:
    if not fuse_available():
        pytest.skip("needs FUSE")
    url, config = s3_url_and_config(s3_server)
    p = publish(tmp_path, url, config, store_settings(s3_server))
    check_rebuilt(p, tmp_path, open_store(url, p.settings))
    assert ((tmp_path / "rebuilt" / "tierfs.toml").stat().st_mode & 0o777) == 0o600


def test_the_index_holds_evicted_chunks_and_the_upstream_state(
    site_copy: Published, tmp_path: Path
) -> None:
    new = tmp_path / "rebuilt"
    restore(site_copy, new)
    store = MetaStore.open(new / "meta", readonly=True)
    try:
        with store.reader() as tx:
            records = {bytes(k): ChunkRecord.decode(bytes(v)) for k, v in tx.cursor(store.chunks)}
            state = UpstreamState(store)
            flags = {cid: state.get(cid, tx) for cid in records}
            blobs = [bytes(k) for k in tx.cursor(store.upstream).iternext(values=False)]
            counters = bytes(tx.get(b"chunk_stats", db=store.meta))
            snapshots = tx.stat(store.snapshots)["entries"]
            next_snapshot = int.from_bytes(tx.get(b"next_snapshot", db=store.meta), "big")
            tree_flags = [state.get(b, tx) for b in blobs if b not in records]
    finally:
        store.env.close()
    assert records and all(r.locations == [] and r.flags == 0 for r in records.values())
    assert all(f is not None and f.flags == UPLOADED for f in flags.values())
    assert tree_flags and all(f is not None and f.flags == UPLOADED | COMPLETE for f in tree_flags)
    chunks, raw, stored, referenced = (
        int.from_bytes(counters[i : i + 8], "big") for i in range(0, 32, 8)
    )
    assert chunks == len(records) and stored == sum(r.frame_len for r in records.values())
    assert raw == sum(r.raw_len for r in records.values()) and referenced > 3 * MiB
    assert snapshots == 0 and next_snapshot == 2


def test_refusals(site_copy: Published, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    result = restore(site_copy, busy, check=False)
    assert result.returncode == ExitCode.ALREADY_EXISTS, result.stderr
    assert (busy / "something").read_text() == "x"

    target = tmp_path / "new"
    domain_only = dict(site_copy.__dict__, bundle=site_copy.domain_bundle)
    result = restore(Published(**domain_only), target, check=False)
    assert result.returncode == ExitCode.CONFIG and "domain-only" in result.stderr
    assert not target.exists()

    result = restore(site_copy, target, "--site", "someone-else", check=False)
    assert result.returncode == ExitCode.CONFIG, result.stderr

    assert site_copy.region is not None
    (name,) = [n for n in (site_copy.region / "sites").rglob("*") if n.parent.name == "manifests"]
    body = bytearray(name.read_bytes())
    body[-1] ^= 1  # in the signature: the manifest still names its site, and fails to verify
    name.chmod(0o600)
    name.write_bytes(bytes(body))
    result = restore(site_copy, target, check=False)
    assert result.returncode == ExitCode.VERIFY_FAILED, result.stderr
    assert not target.exists()


def test_an_existing_filesystem_is_replaced_only_with_force(
    site_copy: Published, tmp_path: Path
) -> None:
    target = tmp_path / "other"
    run_cli("mkfs", target, "--site", "other", "--zone-device", "none")
    result = restore(site_copy, target, check=False)
    assert result.returncode == ExitCode.ALREADY_EXISTS
    restore(site_copy, target, "--force")
    assert keys.load_site_keys(target).site_name == SITE


def test_the_epoch_is_above_any_the_site_published(site_copy: Published, tmp_path: Path) -> None:
    """A second rebuild (the first new machine lost too) takes the next epoch again, even
    when the first published only index segments of its epoch."""
    first = tmp_path / "first"
    restore(site_copy, first)
    assert keys.load_site_keys(first).epoch == 2
    store = open_store(site_copy.url, StoreSettings())
    uuid = keys.load_site_keys(first).site_uuid
    seen = site_mod.published(store, uuid)
    assert seen.epoch == 1
    store.put(f"index/ab/{uuid}/00000005-000000000001", b"not even a segment")
    second = tmp_path / "second"
    restore(site_copy, second)
    assert keys.load_site_keys(second).epoch == 6


def test_help_has_examples() -> None:
    out = run_cli("restore", "site", "--help").stdout
    assert "Examples:" in out and "--key-file" in out


def test_status_of_a_rebuilt_site_counts_evicted_chunks(
    site_copy: Published, tmp_path: Path
) -> None:
    new = tmp_path / "rebuilt"
    restore(site_copy, new)
    doc = json.loads(run_cli("status", new, "--json").stdout)
    assert doc["chunks"]["count"] > 0 and doc["chunks"]["stored_bytes"] > 0


def test_an_evicted_file_can_be_overwritten(site_copy: Published, tmp_path: Path) -> None:
    new = tmp_path / "rebuilt"
    restore(site_copy, new)
    with mounted(tmp_path, new) as m:
        (m.mnt / "docs" / "readme.txt").write_bytes(b"changed on the new machine")
        (m.mnt / "big.bin").unlink()
        assert (m.mnt / "docs" / "readme.txt").read_bytes() == b"changed on the new machine"


def test_an_encrypted_bundle_is_read_with_its_passphrase_file(
    site_copy: Published, tmp_path: Path
) -> None:
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    encrypted = tmp_path / "enc.bundle"
    bundle = keys.read_bundle(site_copy.bundle)
    keys.write_file(encrypted, keys.encode_bundle(bundle, "correct horse"), 0o600)
    p = Published(**{**site_copy.__dict__, "bundle": encrypted})
    without = restore(p, tmp_path / "a", check=False)
    assert without.returncode == ExitCode.USAGE, without.stderr
    restore(p, tmp_path / "b", "--passphrase-file", secret)
    assert keys.load_site_keys(tmp_path / "b").epoch == 2


@dataclass
class FakeInfo:
    snapshot_id: str
    time_ns: int
    stats: dict[str, object]
    verified: bool = True


class FakeSource:
    """Snapshots only: what `choose` looks at."""

    def __init__(self, infos: list[FakeInfo]) -> None:
        self.infos = infos

    def snapshots(self, site: str | None = None) -> list[FakeInfo]:
        return self.infos

    def pick(self, key: str | None, at: str | None, site: str | None = None) -> FakeInfo:
        if key is not None:
            return next(i for i in self.infos if i.snapshot_id == key)
        return self.infos[-1]


def test_the_default_snapshot_is_the_latest_of_the_whole_filesystem() -> None:
    from tierfs.cli.restore_site import choose

    infos = [
        FakeInfo("1-nightly", 10**18, {"paths": ["/"]}),
        FakeInfo("2-nightly", 2 * 10**18, {"paths": ["/"]}),
        FakeInfo("3-critical", 3 * 10**18, {"paths": ["/db"]}),
    ]
    src: Any = FakeSource(infos)
    assert choose(src, None, None, SITE).snapshot_id == "2-nightly"
    assert choose(src, "3-critical", None, SITE).snapshot_id == "3-critical"
    assert choose(src, None, "2001-09-09T01:46:41Z", SITE).snapshot_id == "1-nightly"
