"""The command line as an operator uses it: outputs, one-line errors and exit codes."""

from __future__ import annotations

import json
import os
import socket
import struct
import tomllib
from pathlib import Path

import lmdb
import pytest

from tests.conftest import Mount, cleanup_mount, run_cli
from tierfs.config import SETTINGS
from tierfs.errors import ExitCode
from tierfs.meta import schema

COMMANDS = ["mkfs", "mount", "umount", "status", "fsck"]


def assert_one_line_error(result: object, code: ExitCode) -> None:
    rc = result.returncode  # type: ignore[attr-defined]
    err = result.stderr  # type: ignore[attr-defined]
    assert rc == code, f"exit {rc}, expected {int(code)}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tierfs: error: "), err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_has_an_example(command: str) -> None:
    out = run_cli(command, "--help").stdout
    assert "Example" in out and f"tierfs {command}" in out


def test_mkfs_writes_every_setting_with_its_default(data_dir: Path) -> None:
    text = (data_dir / "tierfs.toml").read_text()
    raw = tomllib.loads(text)
    for s in SETTINGS:
        assert s.key in raw[s.section], f"{s.section}.{s.key} missing"
        assert f"{s.key} = " in text
    assert raw["site"]["name"] == "test-site"
    assert text.count("Default:") == len(SETTINGS)


def test_mkfs_site_defaults_to_host_name(tmp_path: Path) -> None:
    run_cli("mkfs", tmp_path / "d")
    raw = tomllib.loads((tmp_path / "d" / "tierfs.toml").read_text())
    assert raw["site"]["name"] == socket.gethostname().split(".")[0]


def test_mkfs_refuses_existing_filesystem_without_force(data_dir: Path) -> None:
    result = run_cli("mkfs", data_dir, check=False)
    assert_one_line_error(result, ExitCode.ALREADY_EXISTS)
    run_cli("mkfs", data_dir, "--force", "--site", "other")
    assert tomllib.loads((data_dir / "tierfs.toml").read_text())["site"]["name"] == "other"


def test_newer_schema_is_refused(data_dir: Path, tmp_path: Path) -> None:
    env = lmdb.open(str(data_dir / "meta"), max_dbs=16)
    with env.begin(write=True) as tx:
        tx.put(schema.K_SCHEMA, struct.pack(">HH", 99, 0), db=env.open_db(schema.DB_META, txn=tx))
    env.close()
    (tmp_path / "mnt").mkdir()
    result = run_cli("mount", data_dir, tmp_path / "mnt", check=False)
    assert_one_line_error(result, ExitCode.VERSION)
    assert "newer" in result.stderr
    assert_one_line_error(run_cli("status", data_dir, check=False), ExitCode.VERSION)
    assert_one_line_error(run_cli("mkfs", data_dir, check=False), ExitCode.ALREADY_EXISTS)


def test_broken_config_gives_config_error(data_dir: Path) -> None:
    cfg = data_dir / "tierfs.toml"
    cfg.write_text(cfg.read_text().replace("commit_interval = 0.5", 'commit_interval = "soon"'))
    result = run_cli("fsck", data_dir, check=False)
    assert_one_line_error(result, ExitCode.CONFIG)
    assert "metadata.commit_interval" in result.stderr
    cfg.write_text(cfg.read_text() + "\n[nonsense]\nkey = 1\n")
    assert_one_line_error(run_cli("fsck", data_dir, check=False), ExitCode.CONFIG)


def test_not_a_filesystem(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("status", tmp_path, check=False), ExitCode.NOT_A_FILESYSTEM)
    assert_one_line_error(
        run_cli("fsck", tmp_path / "nope", check=False), ExitCode.NOT_A_FILESYSTEM
    )


def test_second_mount_of_same_data_dir_is_refused(fs: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    result = run_cli("mount", fs.data, other, check=False)
    assert_one_line_error(result, ExitCode.BUSY)
    assert not os.path.ismount(other)


def test_mount_on_missing_mountpoint_fails_cleanly(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli("mount", data_dir, tmp_path / "missing", check=False)
    assert_one_line_error(result, ExitCode.MOUNT_FAILED)
    (tmp_path / "mnt").mkdir()
    m = Mount(data_dir, tmp_path / "mnt")
    m.mount()
    try:
        assert (m.mnt / "x").write_text("ok") == 2
    finally:
        cleanup_mount(m)


def test_umount_of_something_else_is_refused(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("umount", tmp_path, check=False), ExitCode.NOT_MOUNTED)


def test_fsck_refuses_a_mounted_filesystem(fs: Mount) -> None:
    assert_one_line_error(run_cli("fsck", fs.data, check=False), ExitCode.BUSY)


def test_status_json_from_mountpoint_and_data_dir(fs: Mount) -> None:
    (fs.mnt / "f").write_bytes(b"x" * 10000)
    (fs.mnt / "d").mkdir()
    doc = json.loads(run_cli("status", fs.mnt, "--json").stdout)
    assert doc["schema_version"] == "1.0"
    assert doc["site"] == "test-site"
    assert doc["mounted"] is True
    assert doc["mountpoint"] == str(fs.mnt)
    assert doc["logical_bytes"] == 10000
    assert set(doc["tiers"]) == {"staging", "hot", "cold", "regional", "cloud"}
    assert doc["tiers"]["staging"]["bytes"] >= 10000
    assert all("bytes" in t for t in doc["tiers"].values())
    assert {"count", "stored_bytes", "unique_bytes", "dedup_ratio", "compression_ratio"} <= set(
        doc["chunks"]
    )
    assert doc["queue"]["pending_bytes"] == 0
    assert doc["snapshots"]["count"] == 0 and doc["snapshots"]["latest"] is None
    assert doc["upstream"]["url"] is None  # mkfs without --regional
    assert isinstance(doc["errors"], dict)
    same = json.loads(run_cli("status", fs.data, "--json").stdout)
    assert same["logical_bytes"] == 10000
    fs.umount()
    offline = json.loads(run_cli("status", fs.data, "--json").stdout)
    assert offline["mounted"] is False and offline["logical_bytes"] == 10000
    assert offline["upstream"] == {"url": None}
    assert "site" in run_cli("status", fs.data).stdout


def mount_options(mnt: Path) -> list[str]:
    """The per-superblock options of the mount at `mnt`, from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4] == str(mnt):
            return line.split(" - ")[1].split()[2].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def test_allow_other_default_and_opt_out(fs: Mount) -> None:
    assert "allow_other" in mount_options(fs.mnt)
    fs.umount()
    fs.mount("noallow_other")
    assert "allow_other" not in mount_options(fs.mnt)


def test_fsck_finds_and_repairs_planted_problems(data_dir: Path) -> None:
    assert run_cli("fsck", data_dir).returncode == 0
    stray = data_dir / "staging" / "ab" / f"{0xAB:016x}"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"nobody owns me")
    env = lmdb.open(str(data_dir / "meta"), max_dbs=16)
    with env.begin(write=True) as tx:
        dirents = env.open_db(schema.DB_DIRENTS, txn=tx)
        tx.put(
            schema.dirent_key(schema.ROOT_INO, b"ghost"), struct.pack(">QQ", 999, 77), db=dirents
        )
        inodes = env.open_db(schema.DB_INODES, txn=tx)
        root = bytearray(tx.get(schema.ino_key(schema.ROOT_INO), db=inodes) or b"")
        struct.pack_into(">I", root, 13, 7)
        tx.put(schema.ino_key(schema.ROOT_INO), bytes(root), db=inodes)
    env.close()
    check = run_cli("fsck", data_dir, check=False)
    assert check.returncode == ExitCode.PROBLEMS_FOUND, check.stdout
    assert "no owning inode" in check.stdout
    assert "missing inode 999" in check.stdout
    assert "link count 7" in check.stdout
    repair = run_cli("fsck", data_dir, "--repair", check=False)
    assert repair.returncode == 0, repair.stdout
    assert "repaired" in repair.stdout
    assert not stray.exists()
    assert run_cli("fsck", data_dir).returncode == 0
