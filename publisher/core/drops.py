"""Counting what could not be kept, so that it can be told instead of lost silently.

Drivers' callbacks run on foreign threads that must never block; when the
daemon's queue is full they drop the signal and count it here. The daemon takes
the tally when it can publish again and announces it as `publisher.dropped`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from virtpub.core.driver import Signal


@dataclass(frozen=True, slots=True)
class Tally:
    count: int
    types: dict[str, int]
    backends: frozenset[str]
    since: float
    """Wall-clock time of the first drop counted."""


class DropCounter:
    def __init__(self, type_of: Callable[[Signal], str]) -> None:
        """`type_of` names a signal as the tally reports it: the type it would have had."""
        self._type_of = type_of
        self._lock = threading.Lock()
        self._types: collections.Counter[str] = collections.Counter()
        self._backends: set[str] = set()
        self._since: float | None = None
        self.total = 0
        """Every drop since the start, for logs and metrics."""

    def add(self, signal: Signal) -> int:
        """Counts one dropped signal; returns the total so far. Safe on any thread."""
        kind = self._type_of(signal)
        with self._lock:
            self._types[kind] += 1
            self._backends.add(signal.backend)
            if self._since is None:
                self._since = time.time()
            self.total += 1
            return self.total

    def take(self) -> Tally | None:
        """What was dropped since the last take, or None."""
        with self._lock:
            if self._since is None:
                return None
            tally = Tally(
                sum(self._types.values()), dict(self._types), frozenset(self._backends), self._since
            )
            self._types.clear()
            self._backends.clear()
            self._since = None
            return tally
