"""The LMDB environment, opened once per process, with group commits.

Why group commits: a durable LMDB commit costs an fdatasync (~0.2 ms here), far more than the
metadata change itself (~2 us). The daemon therefore keeps one *group* write transaction open
and applies each filesystem operation to it as a nested child transaction (`op()`): the child
commits into the group on success and is aborted on any exception, so an operation is atomic
and a failed one leaves no trace. A committer task commits the group every
`metadata.commit_interval` seconds, when `max_batch_ops` changes have piled up, on `fsync` and
before any step that cannot be undone.

Rules that keep this correct (see docs/ARCHITECTURE.md, "Locks and threads"):

* The store is used from one thread only (the trio thread in the daemon). An operation's
  child transaction is opened, used and closed without an `await` in between, so operations
  never interleave inside the index. The group transaction lives across awaits, but only
  ever holds whole, finished operations.
* The environment is opened with `sync=True, metasync=False` (MDB_NOMETASYNC): a commit
  flushes the data pages before it writes the meta page, so a power failure at any moment
  leaves either the previous or the new committed state, never a torn one. `sync_meta()`
  flushes the last meta page too; `fsync` calls it so that an fsynced change cannot be undone.
* The data file is kept `preallocate_mb` ahead of its use (fallocate), so that a commit does
  not fail with ENOSPC when file data has filled the disk; file data stops at a reserve.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from tierfs.errors import ExitCode, TierfsError
from tierfs.meta import schema
from tierfs.meta.records import Inode

log = logging.getLogger(__name__)

MAP_SIZE = 1 << 40  # address space only; the file grows as used (and is preallocated ahead)
_SCHEMA = struct.Struct(">HH")
_I64 = struct.Struct(">q")


class MetaStore:
    """The metadata index of one data directory."""

    def __init__(self, env: Any, readonly: bool, preallocate_bytes: int) -> None:
        self.env = env
        self.readonly = readonly
        self.preallocate_bytes = preallocate_bytes
        self.meta = env.open_db(schema.DB_META, create=False)
        self.inodes = env.open_db(schema.DB_INODES, create=False)
        self.dirents = env.open_db(schema.DB_DIRENTS, create=False)
        self.cookies = env.open_db(schema.DB_COOKIES, create=False)
        self.xattrs = env.open_db(schema.DB_XATTRS, create=False)
        self.symlinks = env.open_db(schema.DB_SYMLINKS, create=False)
        self.staging = env.open_db(schema.DB_STAGING, create=False)
        self.orphans = env.open_db(schema.DB_ORPHANS, create=False)
        self.extents = env.open_db(schema.DB_EXTENTS, create=False)
        self.chunks = env.open_db(schema.DB_CHUNKS, create=False)
        self.segments = env.open_db(schema.DB_SEGMENTS, create=False)
        self.frees = env.open_db(schema.DB_FREES, create=False)
        # Opened once the schema version is known (_open_added).
        self.zones: Any = None
        self.snapshots: Any = None
        self.tree_cache: Any = None
        self.held: Any = None
        self.dead_trees: Any = None
        self.upstream: Any = None
        self.pack_intents: Any = None
        self.index_pending: Any = None
        self._group: Any = None
        self.pending_ops = 0
        self.commits = 0
        self.durable_commits = 0

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, site: str, preallocate_bytes: int = 64 << 20) -> MetaStore:
        """Create a fresh index with its root directory, durable before returning."""
        path.mkdir(parents=True, exist_ok=True)
        env = _open_env(path, readonly=False)
        with env.begin(write=True) as tx:
            for name in schema.ALL_DBS:
                env.open_db(name, txn=tx)
        store = cls(env, readonly=False, preallocate_bytes=preallocate_bytes)
        store._open_added_dbs()
        now = time.time_ns()
        with store.op() as tx:
            put = tx.put
            put(schema.K_MAGIC, schema.MAGIC, db=store.meta)
            put(
                schema.K_SCHEMA,
                _SCHEMA.pack(schema.SCHEMA_MAJOR, schema.SCHEMA_MINOR),
                db=store.meta,
            )
            put(schema.K_UUID, uuid.uuid4().bytes, db=store.meta)
            put(schema.K_FEATURES, ",".join(schema.FEATURES).encode(), db=store.meta)
            put(schema.K_CREATED, _I64.pack(now), db=store.meta)
            put(schema.K_SITE, site.encode(), db=store.meta)
            put(schema.K_NEXT_INO, schema.pack_u64(schema.FIRST_FREE_INO), db=store.meta)
            put(schema.K_NEXT_COOKIE, schema.pack_u64(1), db=store.meta)
            put(schema.K_NEXT_SEGMENT, schema.pack_u64(1), db=store.meta)
            root = Inode(schema.ROOT_INO, 0o40755, 0, 0, 2, 0, now, now, now, 0, schema.ROOT_INO)
            put(schema.ino_key(root.ino), root.encode(), db=store.inodes)
        store.commit()
        store.sync_meta()
        return store

    @classmethod
    def open(
        cls, path: Path, readonly: bool = False, preallocate_bytes: int = 64 << 20
    ) -> MetaStore:
        """Open an existing index; refuse one of an unknown newer schema."""
        if not (path / "data.mdb").exists():
            raise TierfsError(f"{path}: no metadata index here", ExitCode.NOT_A_FILESYSTEM)
        env = _open_env(path, readonly=readonly)
        if not readonly:
            stale = env.reader_check()
            if stale:
                log.info("cleared %d stale LMDB reader slots left by a killed process", stale)
        try:
            store = cls(env, readonly=readonly, preallocate_bytes=preallocate_bytes)
        except lmdb.Error as exc:
            env.close()
            raise TierfsError(
                f"{path}: metadata index is incomplete ({exc})", ExitCode.NOT_A_FILESYSTEM
            ) from None
        store._check_version(path)
        store._open_added()
        return store

    def _check_version(self, path: Path) -> None:
        with self.env.begin() as tx:
            magic = tx.get(schema.K_MAGIC, db=self.meta)
            version = tx.get(schema.K_SCHEMA, db=self.meta)
        if magic != schema.MAGIC or version is None:
            raise TierfsError(f"{path}: not a tierfs metadata index", ExitCode.NOT_A_FILESYSTEM)
        major, minor = _SCHEMA.unpack(version)
        if major > schema.SCHEMA_MAJOR:
            raise TierfsError(
                f"{path}: metadata schema {major}.{minor} is newer than this tierfs "
                f"({schema.SCHEMA_MAJOR}.{schema.SCHEMA_MINOR}); install a newer tierfs",
                ExitCode.VERSION,
            )
        if major < schema.SCHEMA_MAJOR:
            raise TierfsError(
                f"{path}: metadata schema {major}.{minor} is older than this tierfs reads "
                f"({schema.SCHEMA_MAJOR}); no upgrade path exists for it yet",
                ExitCode.VERSION,
            )

    def _open_added(self) -> None:
        """Databases of later minor versions: a read-write open of an older index creates
        them and records the current minor version; read-only, a missing one stays None
        (nothing in it)."""
        self._open_added_dbs()
        if self.readonly:
            return
        with self.env.begin(write=True) as tx:
            major, minor = _SCHEMA.unpack(tx.get(schema.K_SCHEMA, db=self.meta))
            if minor < schema.SCHEMA_MINOR:
                tx.put(
                    schema.K_SCHEMA,
                    _SCHEMA.pack(major, schema.SCHEMA_MINOR),
                    db=self.meta,
                )
                features = bytes(tx.get(schema.K_FEATURES, db=self.meta)).decode().split(",")
                added = [f for f in schema.FEATURES if f not in features]
                tx.put(schema.K_FEATURES, ",".join(features + added).encode(), db=self.meta)
                log.info(
                    "metadata schema upgraded from %d.%d to %d.%d",
                    major,
                    minor,
                    major,
                    schema.SCHEMA_MINOR,
                )

    def _open_added_dbs(self) -> None:
        self.zones = _open_added_db(self.env, schema.DB_ZONES, self.readonly)
        self.snapshots = _open_added_db(self.env, schema.DB_SNAPSHOTS, self.readonly)
        self.tree_cache = _open_added_db(self.env, schema.DB_TREE_CACHE, self.readonly)
        self.held = _open_added_db(self.env, schema.DB_HELD, self.readonly)
        self.dead_trees = _open_added_db(self.env, schema.DB_DEAD_TREES, self.readonly)
        self.upstream = _open_added_db(self.env, schema.DB_UPSTREAM, self.readonly)
        self.pack_intents = _open_added_db(self.env, schema.DB_PACK_INTENTS, self.readonly)
        self.index_pending = _open_added_db(self.env, schema.DB_INDEX_PENDING, self.readonly)

    def close(self) -> None:
        if self._group is not None:
            self.commit()
        if not self.readonly:
            self.sync_meta()
        self.env.close()

    # -- transactions --------------------------------------------------------------------

    @property
    def tx(self) -> Any:
        """The group transaction: read what operations have done so far (uncommitted too)."""
        if self._group is None:
            if self.readonly:
                self._group = self.env.begin(buffers=False)
            else:
                self._group = self.env.begin(write=True)
        return self._group

    @contextlib.contextmanager
    def op(self) -> Iterator[Any]:
        """One atomic operation: a child of the group transaction, rolled back on error."""
        child = self.env.begin(write=True, parent=self.tx)
        try:
            yield child
        except BaseException:
            child.abort()
            raise
        child.commit()
        self.pending_ops += 1

    @contextlib.contextmanager
    def single_put(self) -> Iterator[Any]:
        """An operation that only reads and then puts one record: no child transaction.

        A child transaction costs an allocation of LMDB's page lists; an operation whose
        only change is its last put cannot leave a partial change behind, so it may write
        to the group transaction directly.
        """
        yield self.tx
        self.pending_ops += 1

    @contextlib.contextmanager
    def reader(self) -> Iterator[Any]:
        """A read-only snapshot of the last commit (for tools, not for the daemon)."""
        with self.env.begin() as tx:
            yield tx

    def read_view(self) -> Any:
        """A read-only transaction on the last commit, for any one thread at a time.

        py-lmdb opens every environment with MDB_NOTLS, so a read transaction may be begun
        and used in a worker thread while the trio thread keeps its group write transaction
        (LMDB readers never block the writer). It sees the state of the last commit, never the
        group's uncommitted operations: commit first to include them. The caller must `abort()`
        it: while it lives, the pages of its state cannot be reused and the index grows.
        """
        return self.env.begin(buffers=False)

    def commit(self) -> None:
        """Commit the group: durable against crashes except for the last meta page."""
        if self._group is None:
            return
        group, self._group = self._group, None
        if self.readonly:
            group.abort()
            return
        group.commit()
        self.pending_ops = 0
        self.commits += 1
        # MDB_NOMETASYNC: this commit flushed the data pages, and with them every earlier
        # meta page; only this commit's own meta page may still be lost.
        self.durable_commits = self.commits - 1
        self._keep_preallocated()

    def sync_meta(self) -> None:
        """Flush everything committed so far, including the last meta page. Thread-safe."""
        self.env.sync(True)

    def _keep_preallocated(self) -> None:
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        data = os.path.join(self.env.path(), "data.mdb")
        try:
            size = os.stat(data).st_size
            if size < used + self.preallocate_bytes // 2:
                fd = os.open(data, os.O_WRONLY)
                try:
                    os.posix_fallocate(fd, 0, used + self.preallocate_bytes)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.warning("could not preallocate metadata space: %s", exc)

    # -- small helpers used by every layer ------------------------------------------------

    def get_inode(self, ino: int, tx: Any = None) -> Inode | None:
        data = (tx or self.tx).get(schema.ino_key(ino), db=self.inodes)
        return None if data is None else Inode.decode(ino, data)

    def put_inode(self, tx: Any, inode: Inode) -> None:
        try:
            data = inode.encode()
        except struct.error:
            raise ValueError(f"inode record out of range: {inode}") from None
        tx.put(schema.ino_key(inode.ino), data, db=self.inodes)

    def next_counter(self, tx: Any, key: bytes) -> int:
        """Hand out the counter's value and advance it (a counter added by a later minor
        version starts at 1 when absent)."""
        raw = tx.get(key, db=self.meta)
        value = 1 if raw is None else schema.unpack_u64(raw)
        tx.put(key, schema.pack_u64(value + 1), db=self.meta)
        return value

    def info(self, tx: Any = None) -> dict[str, Any]:
        t = tx or self.tx
        raw_uuid = t.get(schema.K_UUID, db=self.meta)
        major, minor = _SCHEMA.unpack(t.get(schema.K_SCHEMA, db=self.meta))
        return {
            "uuid": str(uuid.UUID(bytes=bytes(raw_uuid))),
            "schema": f"{major}.{minor}",
            "features": bytes(t.get(schema.K_FEATURES, db=self.meta)).decode().split(","),
            "site": bytes(t.get(schema.K_SITE, db=self.meta)).decode(),
        }


def _open_added_db(env: Any, name: bytes, readonly: bool) -> Any:
    """A database added in a later minor schema version: created on the first read-write
    open of an older index; read-only, None when it is not there yet (nothing in it)."""
    if not readonly:
        with env.begin(write=True) as tx:
            return env.open_db(name, txn=tx)
    try:
        return env.open_db(name, create=False)
    except lmdb.NotFoundError:
        return None


def _open_env(path: Path, readonly: bool) -> Any:
    try:
        return lmdb.open(
            str(path),
            map_size=MAP_SIZE,
            max_dbs=len(schema.ALL_DBS) + 2,
            readonly=readonly,
            sync=True,
            metasync=False,
            lock=True,
            subdir=True,
            create=not readonly,
            max_readers=256,
        )
    except lmdb.Error as exc:
        raise TierfsError(f"{path}: cannot open metadata index: {exc}", ExitCode.IO) from None
