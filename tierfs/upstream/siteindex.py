"""Per-site index segments: how sites of one dedup domain find each other's chunks upstream.

There is no lock server. After its packs are durable, a site publishes immutable segments
listing, for each chunk it packed, where the frame lies (pack, offset, length, raw length).
A publication of at most `WHOLE_MAX_ENTRIES` entries is one object,
`index/all/<site uuid>/<epoch:08>-<seq:012>`; a larger one is split by chunk-id prefix,
each part its own object `index/<prefix>/...`, so that a site looking up a few chunks
fetches only the prefixes of the ids it asks about. A lookup lists `index/all/` and
`index/<prefix>/` (docs/FORMAT.md, "Index segments"):

    header   56 bytes  magic b"TFIX", version, prefix digits (0 or 2), 0, flags, site uuid, epoch,
                       seq, created_ns, pack count, entry count
    packs    33 each   pack kind and id (the pack's name, 33 bytes instead of ~90), ascending
    entries  52 each   chunk id, pack number, offset, frame length, raw length; ascending ids
    trailer  8 bytes   xxh3-64 of everything before

Entries are fixed-size and sorted, so a lookup binary-searches a segment's bytes as they were
fetched (checked once) instead of decoding them into objects: the region's index can be
large. `created_ns` is when the dedup decisions were made; garbage collection (later) honours
a grace period after it. Store calls block: run `RegionIndex.lookup` in a worker thread.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import re
import secrets
import struct
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

import xxhash

from tierfs.data import frame
from tierfs.errors import ExitCode, TierfsError
from tierfs.upstream import pack as packfmt
from tierfs.upstream.objectstore import ObjectMissing, ObjectStore

log = logging.getLogger(__name__)

MAGIC = b"TFIX"
VERSION = 1
KNOWN_FLAGS = 0  # reserved, as in packs: encryption, erasure-coded placement
# Two hex digits, 256 prefixes. One publication writes at most 256 objects however large it
# is (three digits would make it 4096 requests), while a lookup of a few ids, the common
# incremental case, reads 1/256 of each site's new index data per id (one digit: 1/16).
PREFIX_DIGITS = 2
# The name part of a segment that covers every prefix (its header says 0 prefix digits).
ALL = "all"
# A publication this small is one segment: 852 KiB at most, about 5 GiB of new data at the
# default chunk size. Most publications (one per send) are far smaller, and one object
# instead of up to 256 is what a send PUTs and what a restore, which needs the whole index,
# GETs; a lookup of a few chunks then fetches the whole (small) segment, once.
WHOLE_MAX_ENTRIES = 16_384
MAX_EPOCH = 10**8 - 1
MAX_SEQ = 10**12 - 1

_HEADER = struct.Struct(">4sBBHI16sIQQII")
_PACK = struct.Struct(">B32s")  # kind, pack id
_ENTRY = struct.Struct(">32sIQII")  # chunk id, pack number, offset, length, raw length
_TRAILER = 8
_NAME = re.compile(
    rf"index/({ALL}|[0-9a-f]{{{PREFIX_DIGITS}}})/([0-9a-f-]{{36}})/([0-9]{{8}})-([0-9]{{12}})"
)


class SegmentError(TierfsError):
    """A segment failed its checks (exit 12) or is of a version or feature we lack (8)."""

    def __init__(
        self, name: str, detail: str, exit_code: ExitCode = ExitCode.VERIFY_FAILED
    ) -> None:
        super().__init__(f"index segment {name}: {detail}", exit_code)


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentEntry:
    """One chunk a site put in a pack, as `encode_segments` takes it."""

    chunk_id: bytes
    pack: str
    offset: int
    length: int
    raw_len: int


@dataclasses.dataclass(frozen=True, slots=True)
class Location:
    """Where the region holds a chunk, and who published it when."""

    chunk_id: bytes
    site_uuid: str
    pack: str
    offset: int
    length: int
    raw_len: int
    created_ns: int
    epoch: int
    seq: int

    @property
    def entry(self) -> packfmt.PackEntry:
        """The pack entry, for `packfmt.read_frame(store, location.pack, location.entry)`."""
        return packfmt.PackEntry(self.chunk_id, self.offset, self.length, self.raw_len)


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentName:
    """What a segment's object name says: id prefix (or `ALL`), site, epoch, publication
    number."""

    prefix: str
    site_uuid: str
    epoch: int
    seq: int

    @property
    def digits(self) -> int:
        """The prefix digits its header must state."""
        return 0 if self.prefix == ALL else PREFIX_DIGITS


def segment_entries(name: str, entries: Iterable[packfmt.PackEntry]) -> list[SegmentEntry]:
    """The segment entries of a pack's frames (`BuiltPack.name`, `BuiltPack.entries`)."""
    return [SegmentEntry(e.chunk_id, name, e.offset, e.length, e.raw_len) for e in entries]


def prefix_of(chunk_id: bytes) -> str:
    return chunk_id.hex()[:PREFIX_DIGITS]


INDEX_ROOT = "index/"


def index_prefix(prefix: str) -> str:
    """The listing prefix of every site's segments for one id prefix (or `ALL`)."""
    return f"{INDEX_ROOT}{prefix}/"


def all_prefixes() -> list[str]:
    """Every id prefix a split publication may use, and `ALL`: the whole index."""
    return [f"{i:0{PREFIX_DIGITS}x}" for i in range(16**PREFIX_DIGITS)] + [ALL]


def segment_name(prefix: str, site_uuid: str, epoch: int, seq: int) -> str:
    return f"{index_prefix(prefix)}{uuid.UUID(site_uuid)}/{epoch:08d}-{seq:012d}"


def parse_segment_name(name: str) -> SegmentName:
    """The parts of a segment name; ValueError for anything else."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"not an index segment name: {name!r}")
    site = match.group(2)
    try:
        canonical = str(uuid.UUID(site)) == site
    except ValueError:
        canonical = False
    if not canonical:
        raise ValueError(f"not an index segment name (site uuid): {name!r}")
    return SegmentName(match.group(1), site, int(match.group(3)), int(match.group(4)))


def _sum(data: bytes | memoryview) -> bytes:
    return bytes(xxhash.xxh3_64(data).digest())


def encode_segments(
    site_uuid: str,
    epoch: int,
    seq: int,
    created_ns: int,
    entries: Iterable[SegmentEntry],
    whole_max: int = WHOLE_MAX_ENTRIES,
) -> dict[str, bytes]:
    """The segment objects of one publication, `{name: body}`: one `ALL` segment when it
    lists at most `whole_max` chunks, else one per id prefix present.

    `created_ns` is when the dedup decisions these entries record were made (see
    docs/FORMAT.md on the grace period). A chunk listed twice is a caller's bug.
    """
    if not 1 <= epoch <= MAX_EPOCH or not 0 <= seq <= MAX_SEQ or not 0 <= created_ns < 1 << 64:
        raise ValueError(f"epoch {epoch}, seq {seq} or created_ns {created_ns} out of range")
    ordered = sorted(entries, key=lambda e: e.chunk_id)
    groups: dict[str, list[SegmentEntry]] = {}
    for i, entry in enumerate(ordered):
        _check_entry(entry)
        if i and ordered[i - 1].chunk_id == entry.chunk_id:
            raise ValueError(f"chunk {entry.chunk_id.hex()} listed twice")
        groups.setdefault(prefix_of(entry.chunk_id), []).append(entry)
    if ordered and len(ordered) <= whole_max:
        groups = {ALL: ordered}
    site = uuid.UUID(site_uuid).bytes
    return {
        segment_name(prefix, site_uuid, epoch, seq): _encode(
            site, epoch, seq, created_ns, group, 0 if prefix == ALL else PREFIX_DIGITS
        )
        for prefix, group in groups.items()
    }


def _check_entry(entry: SegmentEntry) -> None:
    packfmt.parse_pack_name(entry.pack)
    if len(entry.chunk_id) != packfmt.ID_SIZE or entry.offset < packfmt.HEADER_SIZE:
        raise ValueError(f"bad segment entry {entry}")
    if not frame.HEADER_SIZE <= entry.length < 1 << 32 or not 0 <= entry.raw_len < 1 << 32:
        raise ValueError(f"bad segment entry {entry}")


def _encode(
    site: bytes, epoch: int, seq: int, created_ns: int, entries: list[SegmentEntry], digits: int
) -> bytes:
    packs = sorted({packfmt.parse_pack_name(entry.pack) for entry in entries})
    number = {packfmt.pack_name(kind, pid): i for i, (kind, pid) in enumerate(packs)}
    counts = (len(packs), len(entries))
    parts = [_HEADER.pack(MAGIC, VERSION, digits, 0, 0, site, epoch, seq, created_ns, *counts)]
    parts += [_PACK.pack(kind, pid) for kind, pid in packs]
    parts += [
        _ENTRY.pack(e.chunk_id, number[e.pack], e.offset, e.length, e.raw_len) for e in entries
    ]
    body = b"".join(parts)
    return body + _sum(body)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """A checked segment, kept as its bytes; `find` binary-searches the sorted entries."""

    name: str
    where: SegmentName
    created_ns: int
    packs: list[str]
    count: int
    body: bytes
    entries_at: int

    @property
    def order(self) -> tuple[int, str, int, int]:
        """Publication order: oldest decision first, then site and its own order."""
        return (self.created_ns, self.where.site_uuid, self.where.epoch, self.where.seq)

    def _id_at(self, i: int) -> bytes:
        start = self.entries_at + i * _ENTRY.size
        return self.body[start : start + packfmt.ID_SIZE]

    def location(self, i: int) -> Location:
        chunk_id, number, offset, length, raw_len = _ENTRY.unpack_from(
            self.body, self.entries_at + i * _ENTRY.size
        )
        w = self.where
        return Location(
            chunk_id,
            w.site_uuid,
            self.packs[number],
            offset,
            length,
            raw_len,
            self.created_ns,
            w.epoch,
            w.seq,
        )

    def find(self, chunk_id: bytes) -> Location | None:
        i = bisect.bisect_left(range(self.count), chunk_id, key=self._id_at)
        if i < self.count and self._id_at(i) == chunk_id:
            return self.location(i)
        return None

    def locations(self) -> list[Location]:
        return [self.location(i) for i in range(self.count)]


def oldest_location(segment_lists: Iterable[list[Segment]], chunk_id: bytes) -> Location | None:
    """The first published location of `chunk_id` in lists of segments each in publication
    order (a prefix's segments and the `ALL` ones)."""
    best: tuple[tuple[int, str, int, int], Location] | None = None
    for segments in segment_lists:
        for segment in segments:
            location = segment.find(chunk_id)
            if location is not None:
                if best is None or segment.order < best[0]:
                    best = (segment.order, location)
                break
    return best[1] if best is not None else None


def decode_segment(body: bytes, name: str) -> Segment:
    """Check a segment object against its name and everything it says; exit 12 if damaged.

    ValueError if `name` is not a segment name at all (the caller's listing filters)."""
    where = parse_segment_name(name)
    size = _HEADER.size + _TRAILER
    if len(body) < size or body[:4] != MAGIC:
        raise SegmentError(name, "not an index segment (truncated or bad magic)")
    if _sum(memoryview(body)[:-_TRAILER]) != body[-_TRAILER:]:
        raise SegmentError(name, "checksum mismatch")
    (_, version, digits, reserved, flags, site, epoch, seq, created_ns, npacks, count) = (
        _HEADER.unpack_from(body)
    )
    if version != VERSION or flags & ~KNOWN_FLAGS:
        raise SegmentError(
            name,
            f"format version {version}, flags {flags:#x}: install a newer tierfs",
            ExitCode.VERSION,
        )
    own = (str(uuid.UUID(bytes=site)), epoch, seq)
    if own != (where.site_uuid, where.epoch, where.seq) or digits != where.digits or reserved:
        raise SegmentError(name, "header does not agree with the object name")
    if epoch < 1:
        raise SegmentError(name, "epoch 0 (epochs start at 1)")
    if npacks < 1 or count < 1 or len(body) != size + npacks * _PACK.size + count * _ENTRY.size:
        raise SegmentError(name, f"length does not fit {npacks} packs and {count} entries")
    packs = _decode_packs(body, npacks, name)
    entries_at = _HEADER.size + npacks * _PACK.size
    segment = Segment(name, where, created_ns, packs, count, body, entries_at)
    _check_entries(segment, name)
    return segment


def _decode_packs(body: bytes, npacks: int, name: str) -> list[str]:
    refs = list(
        _PACK.iter_unpack(memoryview(body)[_HEADER.size : _HEADER.size + npacks * _PACK.size])
    )
    if any(kind not in packfmt.KIND_NAMES for kind, _ in refs):
        raise SegmentError(name, "unknown pack kind")
    if any(refs[i - 1] >= refs[i] for i in range(1, len(refs))):
        raise SegmentError(name, "packs out of order or repeated")
    return [packfmt.pack_name(kind, bytes(pid)) for kind, pid in refs]


def _check_entries(segment: Segment, name: str) -> None:
    """Ids strictly ascending and of the name's prefix, plausible places, every pack used."""
    used: set[int] = set()
    previous = b""
    prefix = None if segment.where.prefix == ALL else segment.where.prefix
    for chunk_id, number, offset, length, _ in _ENTRY.iter_unpack(
        memoryview(segment.body)[segment.entries_at : -_TRAILER]
    ):
        if chunk_id <= previous or (prefix is not None and prefix_of(chunk_id) != prefix):
            raise SegmentError(name, f"chunk {chunk_id.hex()} out of order or prefix")
        if (
            number >= len(segment.packs)
            or offset < packfmt.HEADER_SIZE
            or length < frame.HEADER_SIZE
        ):
            raise SegmentError(name, f"chunk {chunk_id.hex()}: impossible place in a pack")
        previous = chunk_id
        used.add(number)
    if len(used) != len(segment.packs):
        raise SegmentError(name, "lists a pack no entry uses")


class RegionIndex:
    """The region's segments, fetched per prefix (and `ALL`) as lookups need them, cached
    forever.

    Segments are immutable, so a segment fetched once (and checked) is valid for good: it is
    kept in memory and, with `cache_dir`, as a file there (the object name as the path), so a
    restart does not fetch it again. A segment that fails its checks is skipped, logged and
    kept in `corrupt` (retried at the next lookup): missing an entry only costs dedup, and
    a chunk found in another site's pack is read back and verified before it is relied on.
    Thread-safe; lookups are serialised.
    """

    def __init__(self, store: ObjectStore, cache_dir: Path | None = None) -> None:
        self._store = store
        self._cache_dir = cache_dir
        self._by_prefix: dict[str, list[Segment]] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.corrupt: dict[str, str] = {}

    def lookup(self, chunk_ids: Iterable[bytes]) -> dict[bytes, Location]:
        """Where the region holds each of `chunk_ids` that any site published (this one's
        earlier segments included): the oldest published location of each."""
        wanted: dict[str, set[bytes]] = {}
        for chunk_id in chunk_ids:
            wanted.setdefault(prefix_of(chunk_id), set()).add(chunk_id)
        found: dict[bytes, Location] = {}
        if not wanted:
            return found
        with self._lock:
            self._refresh(ALL)
            for prefix, ids in sorted(wanted.items()):
                self._refresh(prefix)
                for chunk_id in ids:
                    location = self._find(prefix, chunk_id)
                    if location is not None:
                        found[chunk_id] = location
        return found

    def add(self, name: str, body: bytes) -> None:
        """Take in a segment this site just published, saving the GET of a later lookup."""
        segment = decode_segment(body, name)
        with self._lock:
            if name not in self._seen:
                self._write_cache(name, body)
                self._insert(segment)

    def _find(self, prefix: str, chunk_id: bytes) -> Location | None:
        by_prefix = self._by_prefix
        return oldest_location((by_prefix.get(prefix, []), by_prefix.get(ALL, [])), chunk_id)

    def _refresh(self, prefix: str) -> None:
        """List the prefix and take in the segments not seen yet."""
        for name in self._store.list(index_prefix(prefix)):
            if name in self._seen:
                continue
            try:
                parse_segment_name(name)
            except ValueError:
                log.debug("ignoring %s: not an index segment name", name)
                continue
            segment = self._load(name)
            if segment is not None:
                self._insert(segment)

    def _insert(self, segment: Segment) -> None:
        segments = self._by_prefix.setdefault(segment.where.prefix, [])
        bisect.insort(segments, segment, key=lambda s: s.order)
        self._seen.add(segment.name)
        self.corrupt.pop(segment.name, None)

    def _load(self, name: str) -> Segment | None:
        cached = self._read_cache(name)
        if cached is not None:
            return cached
        try:
            body = self._store.get(name)
        except ObjectMissing:
            return None  # deleted since the listing (GC merged it): its data is elsewhere
        try:
            segment = decode_segment(body, name)
        except SegmentError as exc:
            if name not in self.corrupt:
                log.warning("%s; skipped", exc)
            self.corrupt[name] = str(exc)
            return None
        self._write_cache(name, body)
        return segment

    def _read_cache(self, name: str) -> Segment | None:
        if self._cache_dir is None:
            return None
        path = self._cache_dir / name
        try:
            return decode_segment(path.read_bytes(), name)
        except FileNotFoundError:
            return None
        except (OSError, SegmentError) as exc:
            log.warning("index cache %s unusable (%s); fetching it again", path, exc)
            path.unlink(missing_ok=True)
            return None

    def _write_cache(self, name: str, body: bytes) -> None:
        """Best effort, no fsync: a torn file fails its checks and is fetched again."""
        if self._cache_dir is None:
            return
        path = self._cache_dir / name
        temp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_bytes(body)
            os.replace(temp, path)
        except OSError as exc:
            log.warning("cannot cache index segment %s: %s", path, exc)
            temp.unlink(missing_ok=True)
