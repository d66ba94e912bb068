"""Reading one chunk back from the regional store, trusting nothing it returns.

A chunk whose local copy was evicted (or is damaged) is read with one ranged GET of its
frame in the pack the index names (`UpstreamRecord`), never the whole pack. What comes back
is checked three times before it is served: the pack entry's frame checks (`pack.read_frame`:
length, chunk id, raw length, checksum), the frame's own checksum while decoding, and the
keyed content id of the plaintext, which only the domain's id key can forge. So a damaged or
substituted object is an error naming the chunk, never wrong bytes.

Calls block (network): run them in worker threads, never on the trio thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tierfs.data import frame
from tierfs.errors import ExitCode, TierfsError
from tierfs.upstream import pack as packfmt
from tierfs.upstream.objectstore import ObjectStore
from tierfs.upstream.state import UpstreamRecord

ContentId = Callable[[bytes | memoryview], bytes]


class ChunkDamaged(TierfsError):
    """The region's copy of a chunk fails its checks: no copy of it can be trusted there."""

    def __init__(self, chunk_id: bytes, detail: str) -> None:
        super().__init__(f"chunk {chunk_id.hex()[:16]}: {detail}", ExitCode.VERIFY_FAILED)


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A chunk as the region holds it: the frame (to keep locally) and its plaintext."""

    frame: bytes
    plaintext: bytes | memoryview


class RegionReader:
    """Fetches chunks by their upstream record; safe to share between threads."""

    def __init__(self, store: ObjectStore, content_id: ContentId) -> None:
        self.store = store
        self.content_id = content_id

    def fetch(self, chunk_id: bytes, where: UpstreamRecord) -> Fetched:
        """The checked frame and plaintext of `chunk_id` (worker thread).

        Raises `ChunkDamaged` when the object is there but wrong, and the store's errors
        (`StoreUnavailable`, `ObjectMissing`, ...) when it cannot be read."""
        entry = packfmt.PackEntry(chunk_id, where.offset, where.length, where.raw_len)
        try:
            raw = packfmt.read_frame(self.store, where.pack, entry)
            plaintext = frame.decode(raw, chunk_id)
        except (packfmt.PackError, frame.FrameError) as exc:
            raise ChunkDamaged(chunk_id, f"damaged in {where.pack}: {exc}") from None
        if self.content_id(plaintext) != chunk_id:
            raise ChunkDamaged(chunk_id, f"content in {where.pack} does not match its id")
        return Fetched(raw, plaintext)
