"""Snapshots sent to a regional store: a real mount, SeaweedFS on 127.0.0.1 or a local store.

What is checked is what a restore will rely on: the manifest verifies with the domain key,
every object it needs is upstream, its tree decodes to the files as they were, no chunk is
stored twice in packs, and nothing is published before what it names.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Mount,
    cleanup_mount,
    configure,
    force_unmount,
    mounted,
    run_cli,
    wait_for_exit,
)
from tests.s3server import BUCKET, store_settings, unique_prefix
from tierfs.data import frame
from tierfs.data.chunker import Chunker
from tierfs.data.domain import load as load_domain
from tierfs.errors import ExitCode
from tierfs.snap import keys
from tierfs.snap import manifest as manifest_mod
from tierfs.snap import treeformat as tf
from tierfs.snap.keys import VerificationError
from tierfs.snap.tree import file_bytes, walk
from tierfs.upstream import pack as packfmt
from tierfs.upstream.objectstore import ObjectStore, StoreSettings, open_store
from tierfs.upstream.siteindex import RegionIndex
from tools.s3server import S3Server, start, stop

KiB, MiB = 1024, 1024 * 1024


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def upstream(m: Mount) -> dict[str, object]:
    doc = json.loads(run_cli("status", m.mnt, "--json").stdout)
    return dict(doc["upstream"])


def sync(m: Mount, *args: str) -> None:
    run_cli("sync", m.mnt, "--wait", "--timeout", "120", *args)


class Region:
    """Reading the regional store back as a restore would (no local index)."""

    def __init__(self, store: ObjectStore, data: Path) -> None:
        self.store = store
        self.index = RegionIndex(store)
        self.domain_key = keys.load_domain_keys(data).public_key
        self.content_id = Chunker(load_domain(data / "domain.json")).content_id

    def manifests(self) -> list[manifest_mod.Manifest]:
        names = sorted(n for n in self.store.list("sites/") if "/manifests/" in n)
        return [manifest_mod.verify(self.store.get(n), self.domain_key) for n in names]

    def fetch(self, chunk_id: bytes) -> bytes:
        where = self.index.lookup([chunk_id])[chunk_id]
        raw = packfmt.read_frame(self.store, where.pack, where.entry)
        return bytes(frame.decode(raw, chunk_id))

    def files(self, root_hex: str) -> dict[bytes, tf.Entry | bytes]:
        out: dict[bytes, tf.Entry | bytes] = {}
        root = bytes.fromhex(root_hex)
        for path, entry in walk(self.fetch, root, self.content_id):
            if entry.type is not tf.FileType.REG:
                out[path] = entry
                continue
            out[path] = file_bytes(self.fetch, entry, self.content_id)
        return out

    def packed_chunks(self) -> list[bytes]:
        """Every chunk id in every pack, with repeats (there must be none)."""
        out = []
        for name in self.store.list("packs/"):
            out += [e.chunk_id for e in packfmt.read_index(self.store, name)]
        return out


def s3_url_and_config(server: S3Server) -> tuple[str, dict[str, object]]:
    settings = {
        "regional__endpoint": server.endpoint,
        "regional__region": server.region,
        "regional__access_key_id": server.access_key,
        "regional__secret_access_key": server.secret_key,
        "regional__retries": 1,
        "regional__timeout": 3.0,
    }
    return f"s3://{BUCKET}/{unique_prefix()}", settings


def make_fs(tmp_path: Path, url: str, settings: dict[str, object], name: str = "data") -> Path:
    data = tmp_path / name
    run_cli("mkfs", data, "--site", f"site-{name}", "--regional", url)
    if settings:
        configure(data, **settings)
    return data


def open_region(data: Path, url: str, server: S3Server | None) -> Region:
    settings = store_settings(server) if server else StoreSettings()
    return Region(open_store(url, settings), data)


@pytest.fixture(params=["local", "s3"])
def regional(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Mount, Region, str]]:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        url, settings = s3_url_and_config(server)
    else:
        server, url, settings = None, f"file://{tmp_path / 'region'}", {}
    data = make_fs(tmp_path, url, settings)
    with mounted(tmp_path, data) as m:
        yield m, open_region(data, url, server), url


def fill(root: Path) -> None:
    (root / "docs").mkdir()
    (root / "docs" / "readme.txt").write_bytes(b"hello region\n" * 100)
    (root / "big.bin").write_bytes(payload("big", 3 * MiB))
    os.link(root / "big.bin", root / "docs" / "big-link.bin")
    with open(root / "sparse.bin", "wb") as f:
        f.seek(4 * MiB)
        f.write(b"end")
    os.symlink("docs/readme.txt", root / "link")
    for i in range(50):
        (root / "docs" / f"small{i}").write_bytes(payload(f"small{i}", 1000 + i))


def test_round_trip_through_the_region(regional: tuple[Mount, Region, str]) -> None:
    m, region, _ = regional
    fill(m.mnt)
    first = run_cli("snapshot", "create", m.mnt).stdout.strip()
    sync(m)
    (manifest,) = region.manifests()
    assert manifest.snapshot_id == first and manifest.parent is None
    files = region.files(manifest.root)
    assert files[b"big.bin"] == payload("big", 3 * MiB) == files[b"docs/big-link.bin"]
    big, link = (walk_entry(region, manifest.root, p) for p in (b"big.bin", b"docs/big-link.bin"))
    assert big.link_id == link.link_id != 0
    assert files[b"sparse.bin"] == bytes(4 * MiB) + b"end"
    assert files[b"docs/small7"] == payload("small7", 1007)
    target = files[b"link"]
    assert isinstance(target, tf.Entry) and target.target == b"docs/readme.txt"
    assert region.store.head(f"domains/{manifest.domain_id}/domain.json")
    first_bytes = upstream(m)["uploaded_bytes"]
    assert isinstance(first_bytes, int)

    (m.mnt / "docs" / "small7").write_bytes(b"changed")
    second = run_cli("snapshot", "create", m.mnt).stdout.strip()
    sync(m)
    manifests = region.manifests()
    assert [x.snapshot_id for x in manifests] == [first, second]
    assert manifests[1].parent == first
    assert region.files(manifests[1].root)[b"docs/small7"] == b"changed"
    packed = region.packed_chunks()
    assert len(packed) == len(set(packed)), "a chunk is stored twice in packs"
    sent_again = upstream(m)["uploaded_bytes"]
    assert isinstance(sent_again, int) and sent_again - first_bytes < 64 * KiB
    listed = json.loads(run_cli("snapshot", "list", m.mnt, "--json").stdout)
    assert [s["upstream"] for s in listed] == ["sent", "sent"]


def walk_entry(region: Region, root_hex: str, path: bytes) -> tf.Entry:
    return dict(walk(region.fetch, bytes.fromhex(root_hex)))[path]


def test_a_tampered_or_foreign_manifest_fails_verification(
    regional: tuple[Mount, Region, str], tmp_path: Path
) -> None:
    m, region, _ = regional
    (m.mnt / "f").write_bytes(b"x")
    run_cli("snapshot", "create", m.mnt)
    sync(m)
    (name,) = [n for n in region.store.list("sites/") if "/manifests/" in n]
    body = bytearray(region.store.get(name))
    body[len(body) // 3] ^= 0x01
    with pytest.raises(VerificationError):
        manifest_mod.verify(bytes(body), region.domain_key)
    other = tmp_path / "other"
    run_cli("mkfs", other, "--site", "elsewhere")
    with pytest.raises(VerificationError) as exc:
        manifest_mod.verify(region.store.get(name), keys.load_domain_keys(other).public_key)
    assert exc.value.exit_code == ExitCode.VERIFY_FAILED


def test_a_second_site_of_the_domain_uploads_almost_nothing_for_the_same_data(
    s3_server: S3Server, tmp_path: Path
) -> None:
    url, settings = s3_url_and_config(s3_server)
    first = make_fs(tmp_path, url, settings, "first")
    bundle = tmp_path / "domain.bundle"
    run_cli("key", "export", "--domain-only", "--no-passphrase", first, bundle)
    second = tmp_path / "second"
    run_cli("mkfs", second, "--site", "site-second", "--regional", url, "--domain", bundle)
    configure(second, **settings)
    data = payload("shared", 100 * MiB)
    sent = {}
    for name, directory in (("first", first), ("second", second)):
        (tmp_path / f"mnt-{name}").mkdir()
        with mounted(tmp_path / f"mnt-{name}", directory) as m:
            (m.mnt / "shared.bin").write_bytes(data)
            run_cli("snapshot", "create", m.mnt)
            sync(m)
            sent[name] = upstream(m)["uploaded_by_kind"]
    assert sent["first"]["data_pack"] >= 100 * MiB  # type: ignore[index]
    assert sent["second"]["data_pack"] < 1 * MiB  # type: ignore[index]
    region = open_region(second, url, s3_server)
    assert len(region.manifests()) == 2


def test_the_store_stopped_mid_sync_then_restarted(tmp_path: Path) -> None:
    directory = tmp_path / "seaweed"
    server = start(directory, bucket=BUCKET)
    try:
        port = int(server.endpoint.rsplit(":", 1)[1])
        url, settings = s3_url_and_config(server)
        # a slow link, so that the store can be stopped while packs are in flight
        data = make_fs(tmp_path, url, {**settings, "regional__bandwidth_mbit": 40.0})
        with mounted(tmp_path, data) as m:
            for i in range(6):
                (m.mnt / f"f{i}").write_bytes(payload(f"f{i}", 4 * MiB))
            run_cli("snapshot", "create", m.mnt)
            run_cli("sync", m.mnt)
            deadline = time.monotonic() + 30
            while not upstream(m)["requests"]["put"]:  # type: ignore[index]
                assert time.monotonic() < deadline, "no upload started"
            stop(directory)
            failed = run_cli("sync", m.mnt, "--wait", "--timeout", "8", check=False)
            assert failed.returncode == ExitCode.TIMEOUT, failed.stderr
            assert "still queued" in failed.stderr
            server = start(directory, bucket=BUCKET, port=port)
            sync(m)
            region = open_region(data, url, server)
            (manifest,) = region.manifests()
            files = region.files(manifest.root)
            assert all(files[f"f{i}".encode()] == payload(f"f{i}", 4 * MiB) for i in range(6))
            packed = region.packed_chunks()
            assert len(packed) == len(set(packed)), "a chunk is stored twice in packs"
    finally:
        stop(directory)


def test_with_the_store_unreachable_snapshots_queue_up_to_the_bound(tmp_path: Path) -> None:
    region_dir = tmp_path / "region"
    data = make_fs(tmp_path, f"file://{region_dir}", {"regional__queue_max": 2})
    hidden = tmp_path / "region-away"
    with mounted(tmp_path, data) as m:
        region_dir.rename(hidden)  # the WAN is down
        for i in range(4):
            (m.mnt / f"f{i}").write_bytes(payload(f"q{i}", 10 * KiB))
            run_cli("snapshot", "create", m.mnt, "--schedule", "hourly")
            run_cli("sync", m.mnt)
        doc = upstream(m)
        assert doc["last_error"] and doc["alarms"]
        states = [
            s["upstream"] for s in json.loads(run_cli("snapshot", "list", m.mnt, "--json").stdout)
        ]
        assert states.count("superseded") == 2 and states[-1] == "queued"
        assert (m.mnt / "f3").read_bytes() == payload("q3", 10 * KiB)  # the fs keeps working
        hidden.rename(region_dir)
        sync(m)
        region = Region(open_store(f"file://{region_dir}", StoreSettings()), data)
        manifests = region.manifests()
        assert len(manifests) == 2
        assert region.files(manifests[-1].root)[b"f0"] == payload("q0", 10 * KiB)


@pytest.mark.parametrize("point", ["upload-after-pack", "upload-before-manifest"])
def test_killed_during_a_sync_the_next_mount_finishes_it(point: str, tmp_path: Path) -> None:
    region_dir = tmp_path / "region"
    data = make_fs(tmp_path, f"file://{region_dir}", {"regional__pack_mb": 1})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(data, mnt, env=dict(os.environ, TIERFS_CRASH_POINT=point))
    m.mount()
    try:
        for i in range(4):
            (mnt / f"f{i}").write_bytes(payload(f"k{i}", 700 * KiB))
        run_cli("snapshot", "create", mnt)
        pid = m.daemon_pid()
        run_cli("sync", mnt, "--wait", "--timeout", "30", check=False)
        wait_for_exit(pid)
        assert f"crash point {point} reached" in (data / "log" / "tierfs.log").read_text()
        force_unmount(mnt)
        region = Region(open_store(f"file://{region_dir}", StoreSettings()), data)
        if point == "upload-before-manifest":
            assert region.manifests() == [], "a manifest was published early"
        m.env = dict(os.environ)
        m.mount()
        sync(m)
        (manifest,) = region.manifests()
        assert region.files(manifest.root)[b"f2"] == payload("k2", 700 * KiB)
        packed = region.packed_chunks()
        assert len(packed) == len(set(packed)), "a chunk is stored twice in packs"
        m.umount()
        assert run_cli("fsck", data, check=False).returncode == 0
    finally:
        cleanup_mount(m)


def test_status_warns_when_the_local_store_shares_the_data_disk(tmp_path: Path) -> None:
    data = make_fs(tmp_path, f"file://{tmp_path / 'region'}", {})
    with mounted(tmp_path, data) as m:
        alarms = upstream(m)["alarms"]
        assert isinstance(alarms, list)
        assert any("data directory's filesystem" in a for a in alarms)
