"""`tierfs fsck`: check the metadata index and staging against each other, and repair.

Checks (one function each): inode records decode; every entry points at an existing inode;
every inode (except the root and orphans) is reachable; link counts match the entries;
directory parents match and there are no loops; readdir cookies match the entries; staging
files have an owning inode; per-inode records (symlink targets, xattrs, staged ranges) have
an inode. `--repair` fixes what it safely can and says what it did; it never deletes data
that an entry still points at.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from tierfs.fs.staging import Staging
from tierfs.fsck_data import DataChecker
from tierfs.meta import schema
from tierfs.meta.records import Inode, decode_dirent, decode_staged
from tierfs.meta.store import MetaStore


@dataclass
class Finding:
    problem: str
    repair: str = ""
    repaired: bool = False


@dataclass
class FsckResult:
    findings: list[Finding] = field(default_factory=list)
    inodes: int = 0
    entries: int = 0

    def add(self, problem: str, repair: str = "") -> Finding:
        finding = Finding(problem, repair)
        self.findings.append(finding)
        return finding


class Checker:
    def __init__(self, store: MetaStore, staging: Staging, repair: bool) -> None:
        self.store = store
        self.staging = staging
        self.repair = repair
        self.result = FsckResult()
        self.tx: Any = None
        self.inodes: dict[int, Inode] = {}
        self.undecodable: set[int] = set()
        self.entries: dict[int, list[tuple[bytes, int, int]]] = {}

    def run(self) -> FsckResult:
        with self.store.env.begin(write=self.repair) as tx:
            self.tx = tx
            self._load()
            self._check_entries()
            self._check_reachability()
            self._check_link_counts()
            self._check_cookies()
            self._check_per_inode_records()
            self._check_staging_files()
            DataChecker(self).run()
        if self.repair:
            self.store.sync_meta()
        return self.result

    def known(self, ino: int) -> bool:
        """The inode exists (even if its record does not decode: never repair it away)."""
        return ino in self.inodes or ino in self.undecodable

    def _fix(self, problem: str, repair: str) -> bool:
        finding = self.result.add(problem, repair)
        finding.repaired = self.repair
        return self.repair

    def _load(self) -> None:
        s = self.store
        with self.tx.cursor(db=s.inodes) as cur:
            for key, value in cur:
                ino = schema.key_ino(bytes(key))
                try:
                    self.inodes[ino] = Inode.decode(ino, bytes(value))
                except Exception:
                    self.undecodable.add(ino)
                    self.result.add(f"inode {ino}: record does not decode (left alone)")
        with self.tx.cursor(db=s.dirents) as cur:
            for key, value in cur:
                parent = schema.key_ino(bytes(key))
                child, cookie = decode_dirent(bytes(value))
                self.entries.setdefault(parent, []).append((bytes(key[8:]), child, cookie))
        self.result.inodes = len(self.inodes)
        self.result.entries = sum(len(v) for v in self.entries.values())
        if schema.ROOT_INO not in self.inodes:
            self.result.add("root directory inode is missing")

    def _check_entries(self) -> None:
        for parent, items in list(self.entries.items()):
            parent_inode = self.inodes.get(parent)
            for name, child, cookie in list(items):
                path = f"entry {name.decode(errors='replace')!r} in directory {parent}"
                if parent_inode is None or not parent_inode.is_dir:
                    if self._fix(f"{path}: parent is not a directory", "entry removed"):
                        self._delete_entry(parent, name, cookie)
                    items.remove((name, child, cookie))
                elif child in self.undecodable:
                    items.remove((name, child, cookie))
                elif child not in self.inodes:
                    if self._fix(f"{path}: points at missing inode {child}", "entry removed"):
                        self._delete_entry(parent, name, cookie)
                    items.remove((name, child, cookie))

    def _delete_entry(self, parent: int, name: bytes, cookie: int) -> None:
        self.tx.delete(schema.dirent_key(parent, name), db=self.store.dirents)
        self.tx.delete(schema.cookie_key(parent, cookie), db=self.store.cookies)

    def _check_reachability(self) -> None:
        """Walk from the root: find unreachable inodes, loops and wrong parent pointers."""
        seen = {schema.ROOT_INO}
        stack = [schema.ROOT_INO]
        while stack:
            parent = stack.pop()
            for _name, child, _ in self.entries.get(parent, []):
                inode = self.inodes[child]
                if inode.is_dir:
                    if child in seen:
                        self.result.add(f"directory {child} is linked more than once (loop?)")
                        continue
                    if inode.parent != parent and self._fix(
                        f"directory {child}: parent pointer {inode.parent}, entry in {parent}",
                        "parent pointer corrected",
                    ):
                        inode.parent = parent
                        self.store.put_inode(self.tx, inode)
                    stack.append(child)
                seen.add(child)
        with self.tx.cursor(db=self.store.orphans) as cur:
            orphans = {schema.key_ino(bytes(k)) for k in cur.iternext(keys=True, values=False)}
        for ino, inode in self.inodes.items():
            if ino in seen or ino in orphans:
                continue
            if self._fix(
                f"inode {ino}: not reachable from the root",
                "moved to the orphan list (removed at mount)",
            ):
                inode.nlink = 0
                self.store.put_inode(self.tx, inode)
                self.tx.put(schema.ino_key(ino), b"", db=self.store.orphans)

    def _check_link_counts(self) -> None:
        links: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        for parent, items in self.entries.items():
            for _, child, _ in items:
                links[child] = links.get(child, 0) + 1
                if self.inodes[child].is_dir:
                    subdirs[parent] = subdirs.get(parent, 0) + 1
        for ino, inode in self.inodes.items():
            if inode.is_dir:
                expected = (
                    2 + subdirs.get(ino, 0) if (ino == schema.ROOT_INO or links.get(ino)) else 0
                )
            else:
                expected = links.get(ino, 0)
            if (
                inode.nlink != expected
                and expected > 0
                and self._fix(
                    f"inode {ino}: link count {inode.nlink}, expected {expected}",
                    "link count corrected",
                )
            ):
                inode.nlink = expected
                self.store.put_inode(self.tx, inode)

    def _check_cookies(self) -> None:
        expected = {
            schema.cookie_key(parent, cookie): name
            for parent, items in self.entries.items()
            for name, _, cookie in items
        }
        found: dict[bytes, bytes] = {}
        with self.tx.cursor(db=self.store.cookies) as cur:
            for key, value in cur:
                found[bytes(key)] = bytes(value)
        for key, name in found.items():
            if expected.get(key) != name and self._fix(
                f"readdir cookie {key.hex()} has no matching entry", "stale cookie removed"
            ):
                self.tx.delete(key, db=self.store.cookies)
        for key, name in expected.items():
            if key not in found and self._fix(
                f"entry {name!r} has no readdir cookie", "cookie recreated"
            ):
                self.tx.put(key, name, db=self.store.cookies)

    def _check_per_inode_records(self) -> None:
        for db, what in (
            (self.store.symlinks, "symlink target"),
            (self.store.staging, "staged range list"),
            (self.store.xattrs, "extended attribute"),
        ):
            stale = []
            with self.tx.cursor(db=db) as cur:
                for key in cur.iternext(keys=True, values=False):
                    if not self.known(schema.key_ino(bytes(key))):
                        stale.append(bytes(key))
            for key in stale:
                if self._fix(f"{what} of missing inode {schema.key_ino(key)}", "record removed"):
                    self.tx.delete(key, db=db)
        for ino, inode in self.inodes.items():
            if (
                inode.is_symlink
                and self.tx.get(schema.ino_key(ino), db=self.store.symlinks) is None
            ):
                self.result.add(f"symlink {ino} has no target")

    def _check_staging_files(self) -> None:
        for ino, generation, path in self.staging.all_files():
            if not self.known(ino):
                problem = f"staging file {path.name} has no owning inode"
            elif generation != self._staged_generation(ino):
                problem = f"staging file {path.name} is of a stale generation"
            else:
                continue
            if self._fix(problem, "staging file removed"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _staged_generation(self, ino: int) -> int:
        raw = self.tx.get(schema.ino_key(ino), db=self.store.staging)
        return decode_staged(bytes(raw))[0] if raw else 0


def check(store: MetaStore, staging: Staging, repair: bool) -> FsckResult:
    return Checker(store, staging, repair).run()
