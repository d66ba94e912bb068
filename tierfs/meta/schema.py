"""The LMDB key schema, in one place (docs/FORMAT.md describes the same table for humans).

Integers in keys are big-endian so that LMDB's byte order is numeric order.
"""

from __future__ import annotations

import struct

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 2  # 1: DB_ZONES and TIER_COLD locations (the cold tier); 2: snapshots
MAGIC = b"TIERFS-META"

# Named databases of the single environment.
DB_META = b"meta"  # bytes key -> value: schema version, uuid, features, counters
DB_INODES = b"inodes"  # ino(8) -> inode record (records.Inode)
DB_DIRENTS = b"dirents"  # parent ino(8) + name -> child ino(8) + cookie(8)
DB_COOKIES = b"cookies"  # parent ino(8) + cookie(8) -> name   (stable readdir offsets)
DB_XATTRS = b"xattrs"  # ino(8) + name -> value
DB_SYMLINKS = b"symlinks"  # ino(8) -> target
DB_STAGING = b"staging"  # ino(8) -> staging generation + staged ranges (records.encode_staged)
DB_ORPHANS = b"orphans"  # ino(8) -> b"" : nlink 0 but still open when last committed
DB_EXTENTS = b"extents"  # ino(8) + file offset(8) -> chunk id(32) + offset in chunk(4) + length(4)
DB_CHUNKS = b"chunks"  # chunk id(32) -> chunk record (records.ChunkRecord)
DB_SEGMENTS = b"segments"  # segment id(8) -> segment record (records.SegmentRecord)
DB_FREES = b"frees"  # segment id(8) + offset(8) -> length(">q"; -1: the whole segment)
DB_ZONES = b"zones"  # zone number(8) -> zone record (records.ZoneRecord): class, live bytes
DB_SNAPSHOTS = b"snapshots"  # snapshot counter(8) -> snapshot record (snap.catalog), JSON
DB_TREE_CACHE = b"tree_cache"  # directory ino(8) -> stamp(32) + tree id(32) of the last build
DB_HELD = b"held"  # chunk id(32) -> b"": refcount reached 0 while a snapshot was being taken
DB_DEAD_TREES = b"dead_trees"  # chunk id(32) -> b"": a tree blob at refcount 0, to reap
DB_UPSTREAM = b"upstream"  # chunk id(32) -> where the regional store holds it (upstream.state)
DB_PACK_INTENTS = b"pack_intents"  # pack name -> its entries, JSON: recorded before the upload
DB_INDEX_PENDING = b"index_pending"  # chunk id(32) -> segment entry not published yet

ALL_DBS = (
    DB_META,
    DB_INODES,
    DB_DIRENTS,
    DB_COOKIES,
    DB_XATTRS,
    DB_SYMLINKS,
    DB_STAGING,
    DB_ORPHANS,
    DB_EXTENTS,
    DB_CHUNKS,
    DB_SEGMENTS,
    DB_FREES,
    DB_ZONES,
    DB_SNAPSHOTS,
    DB_TREE_CACHE,
    DB_HELD,
    DB_DEAD_TREES,
    DB_UPSTREAM,
    DB_PACK_INTENTS,
    DB_INDEX_PENDING,
)

# Keys of DB_META.
K_MAGIC = b"magic"
K_SCHEMA = b"schema_version"  # struct ">HH": major, minor
K_UUID = b"fs_uuid"  # 16 bytes
K_FEATURES = b"features"  # utf-8, comma separated feature flags
K_CREATED = b"created_ns"  # ">q"
K_NEXT_INO = b"next_ino"  # ">Q": next inode number to hand out (never reused)
K_NEXT_COOKIE = b"next_cookie"  # ">Q": next readdir cookie (never reused)
K_SITE = b"site"  # utf-8 site name as given to mkfs
K_DOMAIN_ID = b"domain_id"  # utf-8 UUID of the dedup domain (DATA_DIR/domain.json)
K_NEXT_SEGMENT = b"next_segment"  # ">Q": next hot segment id (never reused)
K_CHUNK_STATS = b"chunk_stats"  # ">QQQQ": chunks, plaintext bytes, stored bytes, referenced bytes
K_NEXT_SNAPSHOT = b"next_snapshot"  # ">Q": next snapshot counter (never reused; 1 when absent)
K_NEXT_INDEX_SEQ = b"next_index_seq"  # ">Q": next index segment number (1 when absent)
K_TREE_CACHE_OF = b"tree_cache_of"  # ">Q": the snapshot whose build DB_TREE_CACHE holds

FEATURES: tuple[str, ...] = ("staging-v1", "chunks-v1", "cold-v1", "snapshots-v1")

ROOT_INO = 1
FIRST_FREE_INO = 2

_U64 = struct.Struct(">Q")


def ino_key(ino: int) -> bytes:
    return _U64.pack(ino)


def key_ino(key: bytes) -> int:
    return int(_U64.unpack_from(key)[0])


def dirent_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


def cookie_key(parent: int, cookie: int) -> bytes:
    return _U64.pack(parent) + _U64.pack(cookie)


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(data: bytes, offset: int = 0) -> int:
    return int(_U64.unpack_from(data, offset)[0])
