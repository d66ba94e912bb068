"""Pack objects: many chunk frames in one upstream object (docs/FORMAT.md, "Pack objects").

    header   48 bytes   magic b"TFPK", version, kind, flags, site uuid, created_ns, xxh3-64
    frames   ...        chunk frames (tierfs/data/frame.py) back to back, exactly as encoded
    index    48 each    per frame: chunk id, offset, frame length, raw length (pack order)
    footer   48 bytes   index offset, count, version, kind, flags, xxh3-64 of the index,
                        xxh3-64 of the header, xxh3-64 of the footer, magic b"TFPE"

Why packs: the regional tier is reached over a thin WAN where a request costs more than a
small chunk, so chunks travel and rest many to an object. Frames go in unchanged (already
compressed, self-checksummed, naming their chunk), so packing and unpacking never re-encode.

Why the index trails and the footer has a fixed size: the writer appends frames without
knowing the index in advance, and a reader that needs a few chunks fetches the tail (footer
and index) with ranged GETs, then only the frames it needs. The footer repeats the version,
kind and flags and holds the header's checksum, so a ranged reader that never sees the header
still refuses features it does not know (client-side encryption, erasure-coded placement are
reserved flag bits) and the tail is bound to its head.

A pack's name is `packs/<kind>/<id[:2]>/<id>`, `id` the unkeyed BLAKE3-256 of the whole body
in hex: the digest the S3 store already records in `x-amz-meta-tierfs-blake3`, so anyone (no
domain key needed) can check an object against its name, and a retried upload of the same
pack is the same name. Store calls block: run these functions in worker threads.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import uuid
from collections.abc import Iterable, Iterator

import blake3
import xxhash

from tierfs.data import frame
from tierfs.errors import ExitCode, TierfsError
from tierfs.upstream.objectstore import ObjectMissing, ObjectStore

MAGIC = b"TFPK"
FOOTER_MAGIC = b"TFPE"
VERSION = 1
KIND_DATA = 1  # file chunks
KIND_TREE = 2  # snapshot tree and extent-list blobs, in packs of their own
KIND_NAMES = {KIND_DATA: "data", KIND_TREE: "tree"}
FLAG_ENCRYPTED = 0x1  # reserved: client-side encryption with a domain key
FLAG_ERASURE_CODED = 0x2  # reserved: the body is one shard of an erasure-coded placement
KNOWN_FLAGS = 0  # this reader understands no flag yet: any set bit is refused
ID_SIZE = 32

_HEADER = struct.Struct(">4sBBHII16sQ")  # magic, version, kind, 0, flags, 0, site, created_ns
HEADER_SIZE = _HEADER.size + 8
_ENTRY = struct.Struct(">32sQII")  # chunk id, offset, frame length, raw length
ENTRY_SIZE = _ENTRY.size
_FOOTER = struct.Struct(">QIBBHI8s8s")  # index offset, count, version, kind, 0, flags, sums
FOOTER_SIZE = _FOOTER.size + 8 + len(FOOTER_MAGIC)
MIN_PACK_SIZE = HEADER_SIZE + frame.HEADER_SIZE + ENTRY_SIZE + FOOTER_SIZE
TAIL_READ = 64 << 10  # first ranged GET of `read_index`: the footer and, mostly, the index
_NAME = re.compile(r"packs/(data|tree)/([0-9a-f]{2})/([0-9a-f]{64})")


class PackError(TierfsError):
    """A pack failed its checks (exit 12), or uses a version or feature we lack (exit 8)."""

    def __init__(
        self,
        what: str,
        detail: str,
        chunk_id: bytes | None = None,
        exit_code: ExitCode = ExitCode.VERIFY_FAILED,
    ) -> None:
        chunk = f", chunk {chunk_id.hex()}" if chunk_id is not None else ""
        super().__init__(f"pack {what}{chunk}: {detail}", exit_code)


@dataclasses.dataclass(frozen=True, slots=True)
class PackEntry:
    """Where one frame lies in its pack; `raw_len` is its chunk's plaintext length."""

    chunk_id: bytes
    offset: int
    length: int
    raw_len: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclasses.dataclass(frozen=True, slots=True)
class PackHeader:
    """The pack's header fields (or the footer's copy of them, for a ranged reader)."""

    version: int
    kind: int
    flags: int
    site_uuid: str
    created_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class Footer:
    """The decoded footer: where the index is and what it must hash to."""

    index_offset: int
    count: int
    version: int
    kind: int
    flags: int
    index_sum: bytes
    header_sum: bytes

    @property
    def body_size(self) -> int:
        return self.index_offset + self.count * ENTRY_SIZE + FOOTER_SIZE


@dataclasses.dataclass(frozen=True, slots=True)
class BuiltPack:
    """A finished pack, ready for `store.put(name, body)`."""

    name: str
    kind: int
    body: bytes
    entries: list[PackEntry]


def pack_name(kind: int, pack_id: bytes) -> str:
    """`packs/<kind>/<first 2 hex digits>/<64 hex digits>`: fans out like the hot tier."""
    digits = pack_id.hex()
    return f"packs/{KIND_NAMES[kind]}/{digits[:2]}/{digits}"


def packs_prefix(kind: int) -> str:
    """The listing prefix of every pack of one kind (recovery, GC)."""
    return f"packs/{KIND_NAMES[kind]}/"


def parse_pack_name(name: str) -> tuple[int, bytes]:
    """(kind, pack id) of a pack name; ValueError for anything else."""
    match = _NAME.fullmatch(name)
    if match is None or match.group(3)[:2] != match.group(2):
        raise ValueError(f"not a pack name: {name!r}")
    kind = KIND_DATA if match.group(1) == "data" else KIND_TREE
    return kind, bytes.fromhex(match.group(3))


def _sum(*parts: bytes | memoryview) -> bytes:
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return bytes(digest.digest())


def _check_kind(kind: int) -> None:
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown pack kind {kind}")


class PackBuilder:
    """Collects frames for one pack until `full`, then `finish` lays out the body.

    A frame is checked when added (a whole frame of `chunk_id`, good checksum), so a frame
    damaged on the local disk is never uploaded as if it were good.
    """

    def __init__(self, kind: int, site_uuid: str, target_bytes: int) -> None:
        _check_kind(kind)
        if target_bytes < 1:
            raise ValueError("target_bytes must be positive")
        self.kind = kind
        self._site = uuid.UUID(site_uuid).bytes
        self._target = target_bytes
        self._frames: list[bytes] = []
        self._entries: list[PackEntry] = []
        self._ids: set[bytes] = set()
        self._offset = HEADER_SIZE

    def add(self, chunk_id: bytes, chunk_frame: bytes | memoryview) -> None:
        """Append one frame. A duplicate id or a frame of another chunk is a ValueError."""
        if len(chunk_id) != ID_SIZE:
            raise ValueError(f"chunk id must be {ID_SIZE} bytes")
        if chunk_id in self._ids:
            raise ValueError(f"chunk {chunk_id.hex()} is already in this pack")
        data = bytes(chunk_frame)
        try:
            info = frame.parse_header(data)
        except frame.FrameError as exc:
            raise ValueError(f"not a chunk frame: {exc}") from None
        if info.frame_len != len(data) or info.chunk_id != chunk_id:
            raise ValueError(f"not a whole frame of chunk {chunk_id.hex()}")
        entry = PackEntry(chunk_id, self._offset, len(data), info.raw_len)
        check_frame(data, entry, "being built")
        self._frames.append(data)
        self._entries.append(entry)
        self._ids.add(chunk_id)
        self._offset += len(data)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._ids

    @property
    def size(self) -> int:
        """The body size `finish` would produce now."""
        return self._offset + len(self._entries) * ENTRY_SIZE + FOOTER_SIZE

    @property
    def full(self) -> bool:
        return self.size >= self._target

    def finish(self, created_ns: int) -> BuiltPack:
        """The pack's body and name (no flag set: this tierfs writes none yet)."""
        if not self._entries:
            raise ValueError("an empty pack has nothing to send")
        if not 0 <= created_ns < 1 << 64:
            raise ValueError(f"created_ns {created_ns} out of range")
        head = _HEADER.pack(MAGIC, VERSION, self.kind, 0, 0, 0, self._site, created_ns)
        header = head + _sum(head)
        index = b"".join(
            _ENTRY.pack(e.chunk_id, e.offset, e.length, e.raw_len) for e in self._entries
        )
        counts = (self._offset, len(self._entries))
        foot = _FOOTER.pack(*counts, VERSION, self.kind, 0, 0, _sum(index), header[-8:])
        body = b"".join([header, *self._frames, index, foot, _sum(foot), FOOTER_MAGIC])
        return BuiltPack(pack_name(self.kind, pack_id(body)), self.kind, body, list(self._entries))


def pack_id(body: bytes | memoryview) -> bytes:
    """The pack's id: unkeyed BLAKE3-256 of the whole body."""
    return bytes(blake3.blake3(body).digest())


def decode_header(raw: bytes | memoryview, what: str) -> PackHeader:
    """Check and decode the first `HEADER_SIZE` bytes of a pack."""
    if len(raw) < HEADER_SIZE:
        raise PackError(what, "truncated header")
    magic, version, kind, reserved, flags, reserved2, site, created = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise PackError(what, "not a pack (bad magic)")
    if _sum(raw[: _HEADER.size]) != bytes(raw[_HEADER.size : HEADER_SIZE]):
        raise PackError(what, "header checksum mismatch")
    _check_features(what, version, flags)
    if kind not in KIND_NAMES or reserved or reserved2:
        raise PackError(what, f"bad header (kind {kind}, reserved bytes)")
    return PackHeader(version, kind, flags, str(uuid.UUID(bytes=bytes(site))), created)


def decode_footer(raw: bytes | memoryview, what: str) -> Footer:
    """Check and decode the last `FOOTER_SIZE` bytes of a pack."""
    if len(raw) != FOOTER_SIZE:
        raise PackError(what, "truncated footer")
    if bytes(raw[-len(FOOTER_MAGIC) :]) != FOOTER_MAGIC:
        raise PackError(what, "no pack footer (bad footer magic)")
    if _sum(raw[: _FOOTER.size]) != bytes(raw[_FOOTER.size : _FOOTER.size + 8]):
        raise PackError(what, "footer checksum mismatch")
    offset, count, version, kind, reserved, flags, index_sum, header_sum = _FOOTER.unpack_from(raw)
    _check_features(what, version, flags)
    if kind not in KIND_NAMES or reserved or count < 1 or offset < HEADER_SIZE:
        raise PackError(what, f"bad footer (kind {kind}, {count} entries, index at {offset})")
    return Footer(offset, count, version, kind, flags, index_sum, header_sum)


def _check_features(what: str, version: int, flags: int) -> None:
    """A newer pack is refused with exit 8: reading it as version 1 would misread it."""
    if version != VERSION:
        raise PackError(
            what,
            f"format version {version} (this tierfs reads {VERSION})",
            exit_code=ExitCode.VERSION,
        )
    if flags & ~KNOWN_FLAGS:
        raise PackError(
            what,
            f"unknown feature flags {flags:#x}; install a newer tierfs",
            exit_code=ExitCode.VERSION,
        )


def _decode_index(raw: bytes | memoryview, footer: Footer, what: str) -> list[PackEntry]:
    """The index entries, checked: checksum, frames back to back from the header to the
    index, each at least a frame header long, no chunk twice."""
    if len(raw) != footer.count * ENTRY_SIZE:
        raise PackError(what, "truncated index")
    if _sum(raw) != footer.index_sum:
        raise PackError(what, "index checksum mismatch")
    entries = [PackEntry(*fields) for fields in _ENTRY.iter_unpack(raw)]
    offset = HEADER_SIZE
    for entry in entries:
        if entry.offset != offset or entry.length < frame.HEADER_SIZE:
            raise PackError(what, "index entries are not back to back", entry.chunk_id)
        offset = entry.end
    if offset != footer.index_offset:
        raise PackError(what, "frames do not end where the index starts")
    if len({entry.chunk_id for entry in entries}) != len(entries):
        raise PackError(what, "a chunk is listed twice")
    return entries


def check_frame(data: bytes | memoryview, entry: PackEntry, what: str) -> None:
    """The frame is whole, is the entry's chunk and length, and its checksum holds.

    Not decompressed: the caller decodes when it needs the plaintext (frame.decode)."""
    try:
        info = frame.parse_header(data)
    except frame.FrameError as exc:
        raise PackError(what, str(exc), entry.chunk_id) from None
    if len(data) != entry.length or info.frame_len != entry.length:
        raise PackError(
            what, f"frame of {len(data)} bytes, index says {entry.length}", entry.chunk_id
        )
    if info.chunk_id != entry.chunk_id or info.raw_len != entry.raw_len:
        raise PackError(what, "frame holds another chunk than the index says", entry.chunk_id)
    view = memoryview(data)
    payload_sum = _sum(view[: frame.HEADER.size], view[frame.HEADER_SIZE :])
    if payload_sum != bytes(view[frame.HEADER.size : frame.HEADER_SIZE]):
        raise PackError(what, "frame checksum mismatch", entry.chunk_id)


def decode_pack(
    body: bytes | memoryview, name: str | None = None
) -> tuple[PackHeader, list[PackEntry]]:
    """Header and index of a whole pack body, checked (frames not: see `verify_pack`).

    With `name`, the body must also be that name's: same kind, BLAKE3 equal to the id."""
    what = name or f"body of {len(body)} bytes"
    if len(body) < MIN_PACK_SIZE:
        raise PackError(what, f"truncated: {len(body)} bytes")
    view = memoryview(body)
    header = decode_header(view[:HEADER_SIZE], what)
    footer = decode_footer(view[-FOOTER_SIZE:], what)
    if footer.body_size != len(body):
        raise PackError(what, f"{len(body)} bytes, its footer says {footer.body_size}")
    if (footer.version, footer.kind, footer.flags) != (header.version, header.kind, header.flags):
        raise PackError(what, "footer does not agree with the header")
    if footer.header_sum != bytes(view[_HEADER.size : HEADER_SIZE]):
        raise PackError(what, "footer belongs to another header")
    entries = _decode_index(view[footer.index_offset : -FOOTER_SIZE], footer, what)
    if name is not None:
        kind, expected = parse_pack_name(name)
        if kind != header.kind or pack_id(body) != expected:
            raise PackError(what, "content does not match the pack's name")
    return header, entries


def verify_pack(
    body: bytes | memoryview, name: str | None = None
) -> tuple[PackHeader, list[PackEntry]]:
    """`decode_pack`, plus every frame checked against its entry and its checksum."""
    header, entries = decode_pack(body, name)
    what = name or f"body of {len(body)} bytes"
    view = memoryview(body)
    for entry in entries:
        check_frame(view[entry.offset : entry.end], entry, what)
    return header, entries


def read_index(store: ObjectStore, name: str, size: int | None = None) -> list[PackEntry]:
    """A stored pack's index by ranged GETs: the tail, and the rest of the index if longer.

    `size` (the object's size, when the caller knows it) saves a HEAD. Checks the footer,
    its kind against the name, and the index; not the header or the frames."""
    kind = parse_pack_name(name)[0]
    if size is None:
        size = store.head(name)
        if size is None:
            raise ObjectMissing(store.url, name)
    if size < MIN_PACK_SIZE:
        raise PackError(name, f"truncated: {size} bytes")
    tail_start = max(0, size - TAIL_READ)
    tail = _get(store, name, tail_start, size)
    footer = decode_footer(tail[-FOOTER_SIZE:], name)
    if footer.body_size != size or footer.kind != kind:
        raise PackError(name, f"footer does not fit the object ({size} bytes, kind {kind})")
    if footer.index_offset >= tail_start:
        raw = tail[footer.index_offset - tail_start : -FOOTER_SIZE]
    else:
        raw = _get(store, name, footer.index_offset, tail_start) + tail[:-FOOTER_SIZE]
    return _decode_index(raw, footer, name)


def read_frame(store: ObjectStore, name: str, entry: PackEntry) -> bytes:
    """One frame by a ranged GET, checked against its entry (`frame.decode` gives the
    plaintext)."""
    data = _get(store, name, entry.offset, entry.end)
    check_frame(data, entry, name)
    return data


def read_frames(
    store: ObjectStore, name: str, entries: Iterable[PackEntry], max_span: int = 8 << 20
) -> Iterator[tuple[PackEntry, bytes]]:
    """Several frames of one pack, in offset order; neighbours share a GET.

    Entries that lie back to back are fetched together, up to `max_span` bytes a request,
    so restoring many small chunks of one pack costs a few requests, not one each."""
    for run in _runs(sorted(entries, key=lambda e: e.offset), max_span):
        data = _get(store, name, run[0].offset, run[-1].end)
        view = memoryview(data)
        for entry in run:
            chunk = view[entry.offset - run[0].offset : entry.end - run[0].offset]
            check_frame(chunk, entry, name)
            yield entry, bytes(chunk)


def _runs(entries: list[PackEntry], max_span: int) -> Iterator[list[PackEntry]]:
    run: list[PackEntry] = []
    for entry in entries:
        if run and (entry.offset != run[-1].end or entry.end - run[0].offset > max_span):
            yield run
            run = []
        run.append(entry)
    if run:
        yield run


def _get(store: ObjectStore, name: str, start: int, end: int) -> bytes:
    """A ranged GET that must return the whole range: a short object is a damaged pack."""
    data = store.get(name, start, end)
    if len(data) != end - start:
        raise PackError(name, f"object ends before byte {end} (truncated)")
    return data
