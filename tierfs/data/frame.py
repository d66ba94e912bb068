"""The chunk frame: how one chunk is stored on any tier (docs/FORMAT.md, "Chunk frame").

    offset size  field
    0      4     magic b"TFCH"
    4      1     format version (1)
    5      1     codec: 0 = raw, 1 = zstd
    6      2     reserved, 0
    8      4     plaintext length (u32, big-endian)
    12     4     payload length (u32)
    16     32    content id (keyed BLAKE3-256 of the plaintext)
    48     8     xxh3-64 of bytes 0..47 and the payload
    56     ...   payload

Frames are self-describing so that a tier can be scanned and checked without the index.
Compression is skipped when it does not save at least 1/16 of the chunk, and not tried on a
chunk of 64 KiB or more when none of three 4 KiB samples of it would save that much.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import xxhash
import zstandard

MAGIC = b"TFCH"
VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
HEADER = struct.Struct(">4sBBHII32s")
HEADER_SIZE = HEADER.size + 8


class FrameError(Exception):
    """A frame failed its checks (bad magic, version, length or checksum)."""


@dataclass(frozen=True)
class FrameInfo:
    chunk_id: bytes
    codec: int
    raw_len: int
    payload_len: int

    @property
    def frame_len(self) -> int:
        return HEADER_SIZE + self.payload_len


def encode(chunk_id: bytes, data: bytes | memoryview, level: int) -> tuple[bytes, int]:
    """The frame for `data` and its codec, as one bytes object."""
    parts, codec = encode_parts(chunk_id, data, level)
    return b"".join(parts), codec


def encode_parts(
    chunk_id: bytes, data: bytes | memoryview, level: int
) -> tuple[list[bytes | memoryview], int]:
    """The frame for `data` as [header + checksum, payload], and its codec (worker thread).

    Kept in two parts so that a raw payload is never copied: the parts go to pwritev as
    they are.
    """
    codec: int = CODEC_RAW
    payload: bytes | memoryview = data
    if level > 0 and len(data) >= 64 and _worth_trying(data, level):
        packed = _compressor(level).compress(data)
        if _saves_enough(len(data), len(packed)):
            codec, payload = CODEC_ZSTD, packed
    header = HEADER.pack(MAGIC, VERSION, codec, 0, len(data), len(payload), chunk_id)
    digest = xxhash.xxh3_64(header)
    digest.update(payload)
    return [header + digest.digest(), payload], codec


PROBE_SIZE = 4096
PROBE_MIN_CHUNK = 64 << 10


def _saves_enough(raw_len: int, packed_len: int) -> bool:
    return packed_len <= raw_len - raw_len // 16


def _worth_trying(data: bytes | memoryview, level: int) -> bool:
    """Whether compressing the whole chunk may pay: a large chunk is probed first.

    Most incompressible data (media, encrypted or already compressed files) is caught by
    compressing three 4 KiB samples (start, middle, end) at a twentieth of the cost of the
    whole chunk; zstd gives up on such data quickly, but not for free. Any sample that
    shrinks enough means the whole chunk is tried.
    """
    if len(data) < PROBE_MIN_CHUNK:
        return True
    view = memoryview(data)
    compressor = _compressor(level)
    for start in (0, (len(data) - PROBE_SIZE) // 2, len(data) - PROBE_SIZE):
        sample = view[start : start + PROBE_SIZE]
        if _saves_enough(PROBE_SIZE, len(compressor.compress(sample))):
            return True
    return False


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per worker thread and level (they are not thread-safe)."""
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zstd", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def parse_header(frame: bytes | memoryview) -> FrameInfo:
    if len(frame) < HEADER_SIZE:
        raise FrameError("truncated frame header")
    magic, version, codec, _, raw_len, payload_len, chunk_id = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError("bad frame magic")
    if version != VERSION:
        raise FrameError(f"unknown frame version {version}")
    if codec not in (CODEC_RAW, CODEC_ZSTD):
        raise FrameError(f"unknown codec {codec}")
    return FrameInfo(bytes(chunk_id), codec, raw_len, payload_len)


def decode(frame: bytes | memoryview, expected_id: bytes | None = None) -> bytes | memoryview:
    """Check a whole frame and return the plaintext (worker thread).

    A raw payload comes back as a view of `frame`, not a copy, when `frame` is `bytes` or
    a view of `bytes` (frames are read into immutable `bytes`, and a copy of every chunk read
    cost more than checking it); a view of anything mutable is copied."""
    info = parse_header(frame)
    if len(frame) != info.frame_len:
        raise FrameError(f"frame length {len(frame)}, header says {info.frame_len}")
    if expected_id is not None and info.chunk_id != expected_id:
        raise FrameError("frame holds another chunk")
    digest = xxhash.xxh3_64(frame[: HEADER.size])
    payload = memoryview(frame)[HEADER_SIZE:]
    digest.update(payload)
    if digest.digest() != bytes(frame[HEADER.size : HEADER_SIZE]):
        raise FrameError("frame checksum mismatch")
    data: bytes | memoryview
    if info.codec == CODEC_RAW:
        data = payload if _immutable(frame) else bytes(payload)
    else:
        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=info.raw_len)
        except zstandard.ZstdError as exc:
            raise FrameError(f"payload does not decompress: {exc}") from None
    if len(data) != info.raw_len:
        raise FrameError("plaintext length mismatch")
    return data


def _immutable(frame: bytes | memoryview) -> bool:
    """Whether a view of `frame` stays valid and unchanged for as long as it is kept."""
    return isinstance(frame, bytes) or (
        isinstance(frame, memoryview) and frame.readonly and isinstance(frame.obj, bytes)
    )
