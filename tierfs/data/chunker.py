"""Cutting data into chunks and naming them: FastCDC (or fixed blocks) and keyed BLAKE3.

Both run in worker threads: pyfastcdc's cutting loop and blake3 release the GIL.
"""

from __future__ import annotations

from collections.abc import Iterator

import blake3
from pyfastcdc import FastCDC

from tierfs.data.domain import Domain

ID_SIZE = 32


class Chunker:
    """A domain's chunker: content-defined cuts, or fixed-size blocks for in-place rewriters."""

    def __init__(self, domain: Domain) -> None:
        p = domain.chunker
        self._cdc = FastCDC(
            p.avg_size,
            min_size=p.min_size,
            max_size=p.max_size,
            normalized_chunking=p.normalization,  # type: ignore[arg-type]
            seed=domain.gear_seed,
        )
        self.fixed_size = p.fixed_size
        self.max_size = max(p.max_size, p.fixed_size)
        self._id_key = domain.id_key

    def cut(
        self, data: bytes | bytearray | memoryview, fixed: bool = False, base: int = 0
    ) -> Iterator[tuple[int, int]]:
        """(offset, length) of each chunk of `data`, which starts at file offset `base`.

        Fixed-size blocks are aligned to file offsets, so that a block rewritten in place is
        cut exactly as before.
        """
        if fixed:
            off = 0
            while off < len(data):
                length = min(self.fixed_size - (base + off) % self.fixed_size, len(data) - off)
                yield off, length
                off += length
            return
        for chunk in self._cdc.cut_buf(data):
            yield chunk.offset, chunk.length

    def content_id(self, data: bytes | memoryview) -> bytes:
        """The keyed BLAKE3-256 of the plaintext: the chunk's name within the domain."""
        return blake3.blake3(data, key=self._id_key).digest()
