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

    def remove(self, start: int, end: int) -> None:
        """Take [start, end) out of the set, splitting a range that spans it."""
        if end <= start or not self._starts:
            return
        starts, ends = self._starts, self._ends
        lo = bisect.bisect_right(ends, start)
        hi = bisect.bisect_left(starts, end)
        if lo >= hi:
            return
        new_starts: list[int] = []
        new_ends: list[int] = []
        if starts[lo] < start:
            new_starts.append(starts[lo])
            new_ends.append(start)
        if ends[hi - 1] > end:
            new_starts.append(end)
            new_ends.append(ends[hi - 1])
        starts[lo:hi] = new_starts
        ends[lo:hi] = new_ends

    def intersect(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) that are in the set."""
        out = []
        idx = bisect.bisect_right(self._ends, start)
        while idx < len(self._starts) and self._starts[idx] < end:
            out.append((max(start, self._starts[idx]), min(end, self._ends[idx])))
            idx += 1
        return out

    def as_list(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        return len(self._starts)
