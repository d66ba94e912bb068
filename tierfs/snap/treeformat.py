"""Snapshot tree blobs: the canonical, versioned encoding of directories and extent lists.

A snapshot is a Merkle tree. Each directory is one *tree blob*: its entries sorted by name,
each with its attributes (no atime) and, for a subdirectory, the id of that directory's tree
blob. A regular file's extents are listed in its entry, or, above `INLINE_MAX` extents, in
*extent-list blobs* the entry names, cut so that an edit to one region of a huge file changes
one or two of them (`split_extents`). Every blob is named by the domain's keyed BLAKE3 content
id, like a chunk, so identical blobs deduplicate like chunks do.

Layouts, byte by byte: docs/FORMAT.md, "Snapshot trees". The encoding is canonical: every
field has one valid form (fixed widths, no padding, reserved bytes zero, entries and xattrs
strictly sorted, nothing after the last entry), so one directory state has one id and a
decoder refuses any other byte string.
"""

from __future__ import annotations

import dataclasses
import enum
import stat
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from tierfs.data.extents import Extent
from tierfs.errors import ExitCode, TierfsError

TREE_MAGIC = b"TFTR"
TREE_VERSION = 1
EXTENT_LIST_MAGIC = b"TFXL"
EXTENT_LIST_VERSION = 1
KIND_DIR = 1  # a directory's entries
KIND_ROOT = 2  # one nameless entry: the root directory itself (its attributes, its tree id)
FORM_INLINE = 0  # the entry holds the extents
FORM_LISTS = 1  # the entry holds references to extent-list blobs
ID_SIZE = 32
NAME_MAX = 255
MODE_BITS = 0o7777

# The extent-list policy (a writer's choice: readers accept any split).
INLINE_MAX = 256  # at most this many extents are kept in the entry itself
SPLIT_MIN = 64  # a natural boundary needs no other one in the 63 extents before it
SPLIT_MAX = 8192  # a list is cut after this many extents without a boundary
SPLIT_SHIFT = 54  # natural boundary: key < 2**54, one extent in 1024
_GOLDEN = 0x9E3779B97F4A7C15
_U64_MASK = (1 << 64) - 1

_TREE_HEAD = struct.Struct(">4sBBHI")  # magic, version, kind, reserved, entry count
_LIST_HEAD = struct.Struct(">4sB3sI")  # magic, version, reserved, extent count
_ENTRY_FIXED = struct.Struct(">BHIIqqQQQI")  # type .. xattr count, after the name
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_XATTR_HEAD = struct.Struct(">BI")  # name length, value length
_FORM_HEAD = struct.Struct(">BI")  # extent form, count
_EXTENT = struct.Struct(">Q32sII")  # gap, chunk id, offset in chunk, length
_REF = struct.Struct(">QQI32s")  # start, span, extent count, blob id


class TreeFormatError(TierfsError):
    """A tree or extent-list blob is damaged, not canonical, or of an unknown version."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.VERIFY_FAILED) -> None:
        super().__init__(message, exit_code)


class FileType(enum.IntEnum):
    """The entry type byte; the permission bits are stored apart from it."""

    REG = 1
    DIR = 2
    SYMLINK = 3
    FIFO = 4
    CHR = 5
    BLK = 6
    SOCK = 7

    @classmethod
    def of_mode(cls, mode: int) -> FileType:
        """The type of an `st_mode`; a mode of no known type is refused."""
        kind = _TYPE_OF_FMT.get(stat.S_IFMT(mode))
        if kind is None:
            raise TreeFormatError(f"mode {mode:o} has no file type", ExitCode.INTERNAL)
        return kind

    @property
    def fmt(self) -> int:
        """The `S_IF*` bits of this type, to rebuild an `st_mode`."""
        return _FMT_OF_TYPE[self]


_FMT_OF_TYPE = {
    FileType.REG: stat.S_IFREG,
    FileType.DIR: stat.S_IFDIR,
    FileType.SYMLINK: stat.S_IFLNK,
    FileType.FIFO: stat.S_IFIFO,
    FileType.CHR: stat.S_IFCHR,
    FileType.BLK: stat.S_IFBLK,
    FileType.SOCK: stat.S_IFSOCK,
}
_TYPE_OF_FMT = {fmt: kind for kind, fmt in _FMT_OF_TYPE.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class ExtentListRef:
    """One extent-list blob of a file: where its extents lie, how many, and its id.

    `start` is the file offset of its first extent (the blob itself holds only gaps, so the
    same run of extents encodes to the same blob wherever it lies in the file); `span` is the
    end of its last extent minus `start`. Both let a reader find the blob covering an offset
    without fetching the others.
    """

    start: int
    span: int
    count: int
    blob_id: bytes

    @property
    def end(self) -> int:
        return self.start + self.span


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory, with what a restore needs to recreate it.

    `link_id` is 0 unless the inode has several links: then it is the inode number, an id
    that only means "same file" among the entries of one snapshot (restore links entries
    with equal ids; the number itself is not recreated). `tree_id` is set for directories,
    `target` for symlinks, and `extents` (inline) or `extent_lists` for regular files.
    """

    name: bytes
    type: FileType
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    size: int = 0
    rdev: int = 0
    link_id: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    target: bytes = b""
    tree_id: bytes = b""
    extents: tuple[Extent, ...] = ()
    extent_lists: tuple[ExtentListRef, ...] = ()

    @property
    def st_mode(self) -> int:
        return self.type.fmt | self.mode


# -- encoding ---------------------------------------------------------------------------------


def encode_tree(entries: Iterable[Entry], kind: int = KIND_DIR) -> bytes:
    """The canonical tree blob of a directory: entries sorted by name, whatever their order."""
    ordered = sorted(entries, key=lambda e: e.name)
    check_tree(ordered, kind)
    parts = [_TREE_HEAD.pack(TREE_MAGIC, TREE_VERSION, kind, 0, len(ordered))]
    parts.extend(_encode_entry(e) for e in ordered)
    return b"".join(parts)


def _encode_entry(e: Entry) -> bytes:
    attrs = (e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.ctime_ns, e.size, e.rdev, e.link_id)
    fixed = _ENTRY_FIXED.pack(*attrs, len(e.xattrs))
    parts = [_U16.pack(len(e.name)), e.name, fixed]
    for name, value in e.xattrs:
        parts += [_XATTR_HEAD.pack(len(name), len(value)), name, value]
    parts.append(_encode_payload(e))
    return b"".join(parts)


def _encode_payload(e: Entry) -> bytes:
    """What follows the xattrs: depends on the type (nothing for FIFOs, devices, sockets)."""
    if e.type is FileType.DIR:
        return e.tree_id
    if e.type is FileType.SYMLINK:
        return _U32.pack(len(e.target)) + e.target
    if e.type is not FileType.REG:
        return b""
    if e.extent_lists:
        refs = [_REF.pack(r.start, r.span, r.count, r.blob_id) for r in e.extent_lists]
        return _FORM_HEAD.pack(FORM_LISTS, len(refs)) + b"".join(refs)
    return _FORM_HEAD.pack(FORM_INLINE, len(e.extents)) + _encode_extents(e.extents, 0)


def _encode_extents(extents: Sequence[Extent], base: int) -> bytes:
    """Extents as gaps from the previous extent's end (the first from `base`)."""
    out = []
    pos = base
    for x in extents:
        out.append(_EXTENT.pack(x.file_off - pos, x.chunk_id, x.chunk_off, x.length))
        pos = x.end
    return b"".join(out)


def encode_extent_list(extents: Sequence[Extent]) -> bytes:
    """An extent-list blob: position-free, so a shifted run of extents is the same blob."""
    if not extents:
        raise TreeFormatError("an extent list cannot be empty", ExitCode.INTERNAL)
    _check_extents(extents, extents[0].file_off, None, "extent list")
    head = _LIST_HEAD.pack(EXTENT_LIST_MAGIC, EXTENT_LIST_VERSION, b"\0\0\0", len(extents))
    return head + _encode_extents(extents, extents[0].file_off)


# -- the split rule -----------------------------------------------------------------------------


def boundary_key(x: Extent) -> int:
    """A 64-bit key from what an extent is (chunk, offset in chunk, length), not where it is.

    The chunk id is already a keyed hash, so its first 8 bytes are uniform; the multiply
    mixes in the offset and length so that pieces of one chunk get different keys.
    """
    mix = (((x.chunk_off << 32) | x.length) * _GOLDEN) & _U64_MASK
    return int.from_bytes(x.chunk_id[:8], "big") ^ mix


def split_extents(extents: Sequence[Extent]) -> list[tuple[int, int]]:
    """Cut a file's extent list into runs [a, b) for extent-list blobs.

    Extent i ends a run when it is a *natural boundary*: its key is below 2**54 (one extent in
    1024) and no extent among the 63 before it has such a key (the list's start counts as
    one, so i >= 63); or when the run has reached `SPLIT_MAX` extents. Whether an extent is a
    natural boundary depends only on itself and the 63 extents before it, never on file
    offsets or on earlier cuts, so an edit (or insertion, or deletion) at extent i can move
    boundaries only among extents i to i + 63: it changes the run it falls in and at most the
    next one, and every other run keeps its bytes, hence its blob id. Runs hold at least
    `SPLIT_MIN` extents (but the last, and rarely one after a forced cut); in a file of one
    repeated extent (zeros) none is a natural boundary, and the equal runs cut at `SPLIT_MAX`
    deduplicate.
    """
    runs = []
    start = 0
    last_key_hit = -1  # the last extent with a low key, natural or not (the start counts)
    for i, x in enumerate(extents):
        low = boundary_key(x) >> SPLIT_SHIFT == 0
        natural = low and i - last_key_hit >= SPLIT_MIN
        if low:
            last_key_hit = i
        if natural or i + 1 - start == SPLIT_MAX:
            runs.append((start, i + 1))
            start = i + 1
    if start < len(extents):
        runs.append((start, len(extents)))
    return runs


# -- decoding ---------------------------------------------------------------------------------


class _Reader:
    """Sequential reads from a blob that fail with a clear error when it is too short."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TreeFormatError(f"{self.what} is truncated (at byte {self.pos} of {n} more)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise TreeFormatError(f"{self.what} has {len(self.data) - self.pos} bytes too many")


def _check_head(
    magic: bytes, version: int, want_magic: bytes, want_version: int, what: str
) -> None:
    if magic != want_magic:
        raise TreeFormatError(f"{what}: bad magic {magic!r}")
    if version != want_version:
        raise TreeFormatError(
            f"{what}: format version {version} is not supported (this tierfs reads "
            f"{want_version}); install a newer tierfs",
            ExitCode.VERSION,
        )


def decode_tree(blob: bytes, kind: int | None = None) -> list[Entry]:
    """The entries of a tree blob, after checking that it is canonical.

    `kind` (KIND_DIR or KIND_ROOT), when given, must be the blob's.
    """
    r = _Reader(bytes(blob), "tree blob")
    magic, version, blob_kind, reserved, count = r.unpack(_TREE_HEAD)
    _check_head(magic, version, TREE_MAGIC, TREE_VERSION, "tree blob")
    if reserved != 0:
        raise TreeFormatError("tree blob: reserved bytes are not zero")
    if blob_kind not in (KIND_DIR, KIND_ROOT) or (kind is not None and blob_kind != kind):
        raise TreeFormatError(f"tree blob: kind {blob_kind}, expected {kind or 'a known kind'}")
    entries = [_decode_entry(r) for _ in range(count)]
    r.finish()
    check_tree(entries, blob_kind)
    return entries


def _decode_entry(r: _Reader) -> Entry:
    (name_len,) = r.unpack(_U16)
    name = r.take(name_len)
    type_byte, mode, uid, gid, mtime, ctime, size, rdev, link_id, nx = r.unpack(_ENTRY_FIXED)
    try:
        kind = FileType(type_byte)
    except ValueError:
        raise TreeFormatError(f"tree blob: entry {name!r} has unknown type {type_byte}") from None
    xattrs = []
    for _ in range(nx):
        xname_len, value_len = r.unpack(_XATTR_HEAD)
        xattrs.append((r.take(xname_len), r.take(value_len)))
    entry = Entry(name, kind, mode, uid, gid, mtime, ctime, size, rdev, link_id, tuple(xattrs))
    return _decode_payload(r, entry)


def _decode_payload(r: _Reader, e: Entry) -> Entry:
    if e.type is FileType.DIR:
        return dataclasses.replace(e, tree_id=r.take(ID_SIZE))
    if e.type is FileType.SYMLINK:
        (n,) = r.unpack(_U32)
        return dataclasses.replace(e, target=r.take(n))
    if e.type is not FileType.REG:
        return e
    form, count = r.unpack(_FORM_HEAD)
    if form == FORM_INLINE:
        return dataclasses.replace(e, extents=tuple(_decode_extents(r, count, 0)))
    if form == FORM_LISTS:
        refs = []
        for _ in range(count):
            start, span, n, blob_id = _REF.unpack(r.take(_REF.size))
            refs.append(ExtentListRef(start, span, n, blob_id))
        return dataclasses.replace(e, extent_lists=tuple(refs))
    raise TreeFormatError(f"tree blob: entry {e.name!r} has unknown extent form {form}")


def _decode_extents(r: _Reader, count: int, base: int) -> list[Extent]:
    out = []
    pos = base
    for _ in range(count):
        gap, chunk_id, chunk_off, length = _EXTENT.unpack(r.take(_EXTENT.size))
        out.append(Extent(pos + gap, length, chunk_id, chunk_off))
        pos += gap + length
    return out


def decode_extent_list(blob: bytes, start: int = 0) -> list[Extent]:
    """The extents of an extent-list blob, placed at file offset `start` (its ref's start)."""
    r = _Reader(bytes(blob), "extent-list blob")
    magic, version, reserved, count = r.unpack(_LIST_HEAD)
    _check_head(magic, version, EXTENT_LIST_MAGIC, EXTENT_LIST_VERSION, "extent-list blob")
    if reserved != b"\0\0\0":
        raise TreeFormatError("extent-list blob: reserved bytes are not zero")
    if count == 0:
        raise TreeFormatError("extent-list blob: no extents")
    extents = _decode_extents(r, count, start)
    r.finish()
    if extents[0].file_off != start:
        raise TreeFormatError("extent-list blob: the first extent has a gap")
    _check_extents(extents, start, None, "extent-list blob")
    return extents


def check_ref(ref: ExtentListRef, extents: Sequence[Extent]) -> None:
    """Refuse an extent-list blob that does not match the reference that named it."""
    if len(extents) != ref.count or extents[-1].end != ref.end:
        raise TreeFormatError(
            f"extent-list blob {ref.blob_id.hex()}: {len(extents)} extents ending at "
            f"{extents[-1].end}, its reference says {ref.count} ending at {ref.end}"
        )


# -- validation (shared by the encoder and the decoder) -------------------------------------------


def check_tree(entries: Sequence[Entry], kind: int) -> None:
    """Everything that makes a list of entries canonical; TreeFormatError if not."""
    if kind == KIND_ROOT:
        if len(entries) != 1 or entries[0].name != b"" or entries[0].type is not FileType.DIR:
            raise TreeFormatError("root tree blob: must hold one nameless directory entry")
        _check_entry(entries[0])
        return
    previous: bytes | None = None
    for e in entries:
        _check_name(e.name)
        if previous is not None and e.name <= previous:
            raise TreeFormatError(f"tree blob: entry {e.name!r} is out of order or repeated")
        previous = e.name
        _check_entry(e)


def _check_name(name: bytes) -> None:
    if not 0 < len(name) <= NAME_MAX or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise TreeFormatError(f"tree blob: invalid entry name {name!r}")


def _check_entry(e: Entry) -> None:
    where = f"tree blob: entry {e.name!r}"
    if not 0 <= e.mode <= MODE_BITS:
        raise TreeFormatError(f"{where}: mode {e.mode:o} has bits beyond 7777")
    if e.type is FileType.DIR and e.link_id:
        raise TreeFormatError(f"{where}: a directory cannot be hard-linked")
    _check_xattrs(e.xattrs, where)
    if e.type is FileType.DIR and len(e.tree_id) != ID_SIZE:
        raise TreeFormatError(f"{where}: a directory needs a {ID_SIZE}-byte tree id")
    if e.type is not FileType.DIR and e.tree_id:
        raise TreeFormatError(f"{where}: only a directory has a tree id")
    if e.type is not FileType.SYMLINK and e.target:
        raise TreeFormatError(f"{where}: only a symlink has a target")
    if e.type is not FileType.REG and (e.extents or e.extent_lists):
        raise TreeFormatError(f"{where}: only a regular file has extents")
    if e.extents and e.extent_lists:
        raise TreeFormatError(f"{where}: extents both inline and in lists")
    if e.extents:
        _check_extents(e.extents, 0, e.size, where)
    if e.extent_lists:
        _check_refs(e.extent_lists, e.size, where)


def _check_xattrs(xattrs: Sequence[tuple[bytes, bytes]], where: str) -> None:
    previous: bytes | None = None
    for name, _ in xattrs:
        if not 0 < len(name) <= NAME_MAX:
            raise TreeFormatError(f"{where}: invalid xattr name {name!r}")
        if previous is not None and name <= previous:
            raise TreeFormatError(f"{where}: xattr {name!r} is out of order or repeated")
        previous = name


def _check_extents(extents: Sequence[Extent], base: int, size: int | None, where: str) -> None:
    """Extents in file order, not overlapping, none empty, none past the file's size."""
    pos = base
    for x in extents:
        if x.file_off < pos or x.length <= 0 or len(x.chunk_id) != ID_SIZE:
            raise TreeFormatError(f"{where}: extents overlap, are empty or out of order")
        pos = x.end
    if size is not None and pos > size:
        raise TreeFormatError(f"{where}: an extent ends at {pos}, past the size {size}")


def _check_refs(refs: Sequence[ExtentListRef], size: int, where: str) -> None:
    pos = 0
    for ref in refs:
        if ref.start < pos or ref.span <= 0 or ref.count <= 0 or len(ref.blob_id) != ID_SIZE:
            raise TreeFormatError(f"{where}: extent-list references overlap or are empty")
        pos = ref.end
    if pos > size:
        raise TreeFormatError(f"{where}: an extent list ends at {pos}, past the size {size}")
