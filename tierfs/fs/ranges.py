"""A sorted set of disjoint half-open byte ranges."""

from __future__ import annotations

import bisect


class RangeSet:
    """Disjoint, non-adjacent [start, end) ranges kept sorted; adjacent ranges merge."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges or ():
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        # Fast path: appending at or after the last range (sequential writes).
        if not starts or start > ends[-1]:
            starts.append(start)
            ends.append(end)
            return
        if start >= starts[-1]:
            ends[-1] = max(ends[-1], end)
            return
        lo = bisect.bisect_left(ends, start)
        hi = bisect.bisect_right(starts, end)
        if lo < hi:
            start = min(start, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def truncate(self, size: int) -> None:
        """Forget everything at or beyond `size`."""
        idx = bisect.bisect_left(self._starts, size)
        del self._starts[idx:], self._ends[idx:]
        if self._ends and self._ends[-1] > size:
            self._ends[-1] = size

    def as_list(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        return len(self._starts)
