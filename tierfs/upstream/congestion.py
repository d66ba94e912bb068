"""Backing off when the link or the store is slow: fewer uploads in flight, not more timeouts.

Additive increase, multiplicative decrease of the replicator's uploads in flight, from how fast
puts go. The best rate seen (seconds per MiB per upload in flight, for puts of at least
`MIN_SAMPLE` bytes) stands for the uncongested link; a put `SLOW_FACTOR` times slower than that
halves the uploads allowed (down to one), a put within it allows one more (up to
`regional.uploads`). A congested site link or an overloaded store thus sees fewer requests at
once, and replication leaves room for the site's own traffic.
"""

from __future__ import annotations

import logging

import trio

log = logging.getLogger(__name__)

MIN_SAMPLE = 256 << 10
SLOW_FACTOR = 4.0
_MIB = float(1 << 20)


class Congestion:
    def __init__(self, limiter: trio.CapacityLimiter, most: int) -> None:
        self.limiter = limiter
        self.most = most
        self.best: float | None = None
        self.backoffs = 0

    def observe(self, size: int, seconds: float) -> None:
        """A put of `size` bytes took `seconds` (trio thread, right after it returned)."""
        if size < MIN_SAMPLE or seconds <= 0:
            return
        in_flight = max(1, self.limiter.borrowed_tokens)
        per_mib = seconds / (size / _MIB) / in_flight
        if self.best is None or per_mib < self.best:
            self.best = per_mib
        allowed = int(self.limiter.total_tokens)
        if per_mib > SLOW_FACTOR * self.best:
            if allowed > 1:
                self.limiter.total_tokens = max(1, allowed // 2)
                self.backoffs += 1
                log.info(
                    "uploads slowed to %.2f s/MiB (best %.2f): %d at once",
                    per_mib,
                    self.best,
                    self.limiter.total_tokens,
                )
        elif allowed < self.most:
            self.limiter.total_tokens = allowed + 1
