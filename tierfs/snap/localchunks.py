"""Reading chunks and tree blobs by id from an unmounted data directory.

`fsck` reads tree blobs to count the references they hold, and tools read snapshots without
a daemon. A chunk is read from its hot copy, else from its cold record (the zone device is
opened on first need, read-only use only). Single-threaded; not for the mounted daemon, which
reads through `FileReader.load_chunk`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType
from typing import Any

from tierfs import config
from tierfs.data import frame
from tierfs.errors import ExitCode, TierfsError
from tierfs.meta.records import ChunkRecord
from tierfs.meta.store import MetaStore
from tierfs.tiers.cold import devspec
from tierfs.tiers.cold.reader import read_chunk
from tierfs.tiers.cold.record import Location, record_len
from tierfs.tiers.hot import HotStore
from tierfs.tiers.zns.device import ZonedDevice


class LocalChunks:
    """`fetch(id)` -> plaintext, over one read transaction of an unmounted index."""

    def __init__(self, data_dir: Path, store: MetaStore, tx: Any) -> None:
        self.data_dir = data_dir
        self.store = store
        self.tx = tx
        self.hot = HotStore(data_dir / "hot")
        self._device: ZonedDevice | None = None

    def __enter__(self) -> LocalChunks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._device is not None:
            with contextlib.suppress(Exception):
                self._device.close_device()
            self._device = None

    def record(self, chunk_id: bytes) -> ChunkRecord:
        raw = self.tx.get(chunk_id, db=self.store.chunks)
        if raw is None:
            raise TierfsError(f"chunk {chunk_id.hex()[:16]} is not in the index", ExitCode.IO)
        return ChunkRecord.decode(bytes(raw))

    def fetch(self, chunk_id: bytes) -> bytes:
        """A chunk's plaintext, checked against its frame checksum and id."""
        record = self.record(chunk_id)
        try:
            hot = record.hot_location()
            if hot is not None:
                raw = self.hot.read(hot[0], hot[1], record.frame_len)
                return bytes(frame.decode(raw, chunk_id))
            cold = record.cold_location()
            if cold is not None:
                device = self._cold_device()
                length = record_len(record.frame_len, device.geometry.lba_size)
                return bytes(read_chunk(device, Location(cold[0], cold[1], length), chunk_id))
        except (OSError, frame.FrameError) as exc:
            raise TierfsError(
                f"chunk {chunk_id.hex()[:16]} is unreadable: {exc}", ExitCode.IO
            ) from None
        raise TierfsError(f"chunk {chunk_id.hex()[:16]} has no stored copy", ExitCode.IO)

    def _cold_device(self) -> ZonedDevice:
        if self._device is None:
            spec = devspec.parse(config.load(self.data_dir).get("cold", "device"))
            if not spec.enabled:
                raise TierfsError("a chunk is in the cold tier, but none is configured")
            self._device = devspec.open_device(spec, self.data_dir / "cold")
        return self._device
