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

    def fetch_span(
        self, chunk_id: bytes, where: UpstreamRecord, span: int
    ) -> tuple[Fetched, list[tuple[bytes, Fetched]]]:
        """`chunk_id`, and the frames that follow it in its pack within `span` bytes, in one
        ranged GET (worker thread). The replicator packs a file's chunks back to back, so a
        sequential reader gets the next chunks from the same request.

        The first frame is checked as `fetch` checks it (an error raises); the ones after it
        are parsed by their own headers and each checked by its checksum and content id: the
        first that fails, or that the span cuts, ends the list (the pack's trailing index is
        no frame), and its chunk is simply fetched on its own when needed."""
        if span <= where.length:
            return self.fetch(chunk_id, where), []
        data = self.store.get(where.pack, where.offset, where.offset + span)
        first = self._check(chunk_id, where, data[: where.length])
        extras: list[tuple[bytes, Fetched]] = []
        pos = where.length
        while pos < len(data):
            try:
                info = frame.parse_header(memoryview(data)[pos:])
                end = pos + info.frame_len
                if end > len(data):
                    break
                raw = data[pos:end]
                plaintext = frame.decode(raw, info.chunk_id)
            except frame.FrameError:
                break
            if self.content_id(plaintext) != info.chunk_id:
                break
            extras.append((info.chunk_id, Fetched(raw, plaintext)))
            pos = end
        return first, extras

    def _check(self, chunk_id: bytes, where: UpstreamRecord, raw: bytes) -> Fetched:
        entry = packfmt.PackEntry(chunk_id, where.offset, where.length, where.raw_len)
        try:
            packfmt.check_frame(raw, entry, where.pack)
            plaintext = frame.decode(raw, chunk_id)
        except (packfmt.PackError, frame.FrameError) as exc:
            raise ChunkDamaged(chunk_id, f"damaged in {where.pack}: {exc}") from None
        if self.content_id(plaintext) != chunk_id:
            raise ChunkDamaged(chunk_id, f"content in {where.pack} does not match its id")
        return Fetched(raw, plaintext)

    def fetch(self, chunk_id: bytes, where: UpstreamRecord) -> Fetched:
        """The checked frame and plaintext of `chunk_id` (worker thread).

        Raises `ChunkDamaged` when the object is there but wrong, and the store's errors
        (`StoreUnavailable`, `ObjectMissing`, ...) when it cannot be read."""
        raw = self.store.get(where.pack, where.offset, where.offset + where.length)
        return self._check(chunk_id, where, raw)
