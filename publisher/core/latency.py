"""The publish latency histogram: recorded where acks arrive, read when metrics are scraped."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


class LatencyHistogram:
    """Hand-off to broker ack, observed on the I/O thread: one bisect and two additions."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as Prometheus wants them, ending with +Inf."""
        counts, running = list(self.counts), 0
        result = []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += count
            result.append((bound, float(running)))
        return result
