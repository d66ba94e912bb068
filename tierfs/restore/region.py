"""Finding and reading chunks in a regional store, for restores.

`RegionLocator` answers "where does the region hold this chunk" from the index segments of
every site (docs/FORMAT.md, "Index segments"). Unlike `siteindex.RegionIndex`, which lists a
prefix again at every lookup (the replicator needs to see new publications), a restore lists
each prefix once and only lists it again when an id is not found: a verified manifest is
published after every segment it depends on, so one listing taken after the manifest was
read finds everything, and a restore of a large tree asks for many ids of the same prefix.
Segments of whole publications (`index/all/`) count as a prefix of their own, listed with
every lookup's first listing. When a lookup needs many prefixes at once (a whole tree), one
listing of the whole index replaces a listing per prefix: a large publication writes up to
256 segments, and 256 LISTs cost more than the GETs of what they find.

`read_run` reads several frames of one pack with one ranged GET and checks each frame on
its own, so that one damaged frame fails its chunk only, not its neighbours.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator

from tierfs.data import frame
from tierfs.errors import ExitCode, TierfsError
from tierfs.upstream import siteindex
from tierfs.upstream.objectstore import ObjectMissing, ObjectStore
from tierfs.upstream.siteindex import Location, Segment

log = logging.getLogger(__name__)

ContentId = Callable[[bytes | memoryview], bytes]
MAX_RUN = 16 << 20  # bytes one ranged GET may cover (adjacent frames share a request)
# A run also ends at a gap up to this size: reading a few unneeded bytes costs less than a
# second request.
MAX_GAP = 64 << 10
# A lookup that needs more unloaded prefixes than this lists the whole index once.
LIST_ALL_AT = 16
# Segments are small (a few KiB to a MiB): more GETs in flight than chunk reads pay off.
MIN_SEGMENT_FETCHES = 16


def short(chunk_id: bytes) -> str:
    """How error lines name a chunk: 16 hex digits, enough to grep the index with."""
    return chunk_id.hex()[:16]


class ChunkError(TierfsError):
    """One chunk could not be had: damaged (exit 12) or missing or unreachable (exit 10)."""

    def __init__(self, chunk_id: bytes, detail: str, exit_code: ExitCode) -> None:
        super().__init__(f"chunk {short(chunk_id)}: {detail}", exit_code)
        self.chunk_id = chunk_id


class RegionLocator:
    """Where the region's sites packed chunks, from their index segments, cached per prefix.

    Thread-safe: prefixes load under their own lock, so lookups of different prefixes run
    in parallel. A segment that fails its checks is skipped and reported (`corrupt`); a
    chunk then found nowhere is "missing", which the caller reports with the chunk's id.
    """

    def __init__(self, store: ObjectStore, workers: int = 8) -> None:
        self._store = store
        self._workers = workers
        self._lock = threading.Lock()
        self._prefix_locks: dict[str, threading.Lock] = {}
        self._segments: dict[str, list[Segment]] = {}
        self._seen: set[str] = set()
        self.corrupt: dict[str, str] = {}

    def locate(self, chunk_ids: Iterable[bytes]) -> dict[bytes, Location]:
        """The oldest published location of each id the region holds (others are left out)."""
        wanted: dict[str, list[bytes]] = {}
        for chunk_id in chunk_ids:
            wanted.setdefault(siteindex.prefix_of(chunk_id), []).append(chunk_id)
        if not wanted:
            return {}
        unloaded = [p for p in [*wanted, siteindex.ALL] if p not in self._segments]
        if len(unloaded) > LIST_ALL_AT:
            self._load_all()
            fresh = set(unloaded)
        else:
            fresh = self._load_prefixes(unloaded)
        found: dict[bytes, Location] = {}
        again: list[str] = []
        for prefix, ids in wanted.items():
            missing = self._find_into(prefix, ids, found)
            if missing and not {prefix, siteindex.ALL} <= fresh:
                again.append(prefix)
        if again:  # published since our listing: list those prefixes once more
            relist = again if siteindex.ALL in fresh else [*again, siteindex.ALL]
            self._load_prefixes(relist, relist=True)
            for prefix in again:
                self._find_into(prefix, wanted[prefix], found)
        return found

    def _find_into(self, prefix: str, ids: list[bytes], found: dict[bytes, Location]) -> bool:
        """Fill `found`; True when some id of `ids` is nowhere."""
        missing = False
        lists = (self._segments.get(prefix, []), self._segments.get(siteindex.ALL, []))
        for chunk_id in ids:
            location = siteindex.oldest_location(lists, chunk_id)
            if location is None:
                missing = True
            else:
                found[chunk_id] = location
        return missing

    def _load_prefixes(self, prefixes: list[str], relist: bool = False) -> set[str]:
        """List and fetch the segments of `prefixes`, several prefixes at once."""
        if not prefixes:
            return set()
        if len(prefixes) == 1:
            self._load(prefixes[0], relist)
            return set(prefixes)
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            for future in [pool.submit(self._load, p, relist) for p in prefixes]:
                future.result()
        return set(prefixes)

    def _load_all(self) -> None:
        """One listing of the whole index, its new segments fetched together: after it,
        every prefix counts as loaded (a prefix without segments holds nothing yet)."""
        names: dict[str, list[str]] = {prefix: [] for prefix in siteindex.all_prefixes()}
        for name in self._store.list(siteindex.INDEX_ROOT):
            prefix = name[len(siteindex.INDEX_ROOT) :].split("/", 1)[0]
            if prefix in names and name not in self._seen:
                names[prefix].append(name)
        todo = [name for group in names.values() for name in group]
        with concurrent.futures.ThreadPoolExecutor(max(self._workers, MIN_SEGMENT_FETCHES)) as pool:
            fetched = dict(zip(todo, pool.map(self._fetch, todo), strict=True))
        for prefix, group in names.items():
            with self._prefix_lock(prefix):
                self._install(prefix, [fetched[n] for n in group])

    def _prefix_lock(self, prefix: str) -> threading.Lock:
        with self._lock:
            return self._prefix_locks.setdefault(prefix, threading.Lock())

    def _load(self, prefix: str, relist: bool) -> None:
        with self._prefix_lock(prefix):
            if prefix in self._segments and not relist:
                return
            new = self._store.list(siteindex.index_prefix(prefix))
            self._install(prefix, [self._fetch(n) for n in new if n not in self._seen])

    def _install(self, prefix: str, fetched: list[Segment | None]) -> None:
        """Add a prefix's newly fetched segments, in publication order (its lock held)."""
        segments = list(self._segments.get(prefix, []))
        for segment in fetched:
            if segment is not None:
                bisect.insort(segments, segment, key=lambda s: s.order)
                with self._lock:
                    self._seen.add(segment.name)
        self._segments[prefix] = segments

    def _fetch(self, name: str) -> Segment | None:
        try:
            siteindex.parse_segment_name(name)
        except ValueError:
            log.debug("ignoring %s: not an index segment name", name)
            return None
        try:
            return siteindex.decode_segment(self._store.get(name), name)
        except ObjectMissing:
            return None  # merged away since the listing: its entries are elsewhere
        except siteindex.SegmentError as exc:
            if name not in self.corrupt:
                log.warning("%s; skipped", exc)
            self.corrupt[name] = str(exc)
            return None


@dataclasses.dataclass(frozen=True, slots=True)
class PackRead:
    """One chunk to read from a pack: where its frame is."""

    chunk_id: bytes
    pack: str
    offset: int
    length: int
    raw_len: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @classmethod
    def of(cls, location: Location) -> PackRead:
        loc = location
        return cls(loc.chunk_id, loc.pack, loc.offset, loc.length, loc.raw_len)


def runs(reads: Iterable[PackRead], max_span: int = MAX_RUN) -> Iterator[list[PackRead]]:
    """Group reads into runs of one pack that one ranged GET can cover, in pack order."""
    by_pack: dict[str, list[PackRead]] = {}
    for read in reads:
        by_pack.setdefault(read.pack, []).append(read)
    for pack in sorted(by_pack):
        run: list[PackRead] = []
        for read in sorted(by_pack[pack], key=lambda r: r.offset):
            if run and (
                read.offset < run[-1].end  # the same chunk twice, or a bad index
                or read.offset - run[-1].end > MAX_GAP
                or read.end - run[0].offset > max_span
            ):
                yield run
                run = []
            run.append(read)
        if run:
            yield run


Result = tuple[bytes, bytes | memoryview | TierfsError]


def read_run(store: ObjectStore, run: list[PackRead], content_id: ContentId) -> list[Result]:
    """(chunk id, plaintext or error) of each read of `run`, fetched with one ranged GET.

    Each frame is checked on its own (header, length, chunk id, checksum, plaintext length)
    and its plaintext against the keyed content id, so a damaged frame fails its chunk only.
    A failed GET fails every chunk of the run with the store's error (exit 10).
    """
    start, end = run[0].offset, max(r.end for r in run)
    pack = run[0].pack
    try:
        data = store.get(pack, start, end)
    except TierfsError as exc:
        return [(r.chunk_id, ChunkError(r.chunk_id, exc.message, ExitCode.IO)) for r in run]
    view = memoryview(data)
    out: list[Result] = []
    for r in run:
        piece = view[r.offset - start : r.end - start]
        if len(piece) != r.length:
            detail = f"pack {pack} ends before byte {r.end} (truncated)"
            out.append((r.chunk_id, ChunkError(r.chunk_id, detail, ExitCode.VERIFY_FAILED)))
            continue
        out.append((r.chunk_id, decode_checked(piece, r.chunk_id, r.raw_len, content_id, pack)))
    return out


def decode_checked(
    raw: bytes | memoryview,
    chunk_id: bytes,
    raw_len: int | None,
    content_id: ContentId,
    where: str,
) -> bytes | memoryview | ChunkError:
    """A frame's plaintext once the frame and the keyed content id check out; else the error."""
    try:
        plain = frame.decode(raw, chunk_id)
    except frame.FrameError as exc:
        return ChunkError(chunk_id, f"damaged frame in {where}: {exc}", ExitCode.VERIFY_FAILED)
    if raw_len is not None and len(plain) != raw_len:
        detail = f"{where}: {len(plain)} bytes, the index says {raw_len}"
        return ChunkError(chunk_id, detail, ExitCode.VERIFY_FAILED)
    if content_id(plain) != chunk_id:
        detail = f"{where}: content does not match its id (altered or of another domain)"
        return ChunkError(chunk_id, detail, ExitCode.VERIFY_FAILED)
    return plain
