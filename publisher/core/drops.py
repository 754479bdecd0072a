"""Counting what could not be kept, so that it can be told instead of lost silently.

Drivers' callbacks run on foreign threads that must never block; when the
daemon's queue is full they drop the signal and count it here. The daemon takes
the tally when it can publish again and announces it as `publisher.dropped`.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from virtpub.contract.envelope import TYPE_PREFIX
from virtpub.core.driver import Signal
from virtpub.core.event import BackendChange, ConfigRejected


def signal_type(signal: Signal) -> str:
    """The CloudEvents type the signal would have been published as."""
    if isinstance(signal, BackendChange):
        return f"{TYPE_PREFIX}publisher.backend"
    if isinstance(signal, ConfigRejected):
        return f"{TYPE_PREFIX}config.invalid"
    return f"{TYPE_PREFIX}domain.{signal.event}"


@dataclass(frozen=True, slots=True)
class Tally:
    count: int
    types: dict[str, int]
    backends: frozenset[str]
    since: float
    """Wall-clock time of the first drop counted."""


class DropCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._types: collections.Counter[str] = collections.Counter()
        self._backends: set[str] = set()
        self._since: float | None = None
        self.total = 0
        """Every drop since the start, for logs and metrics."""

    def add(self, signal: Signal) -> int:
        """Counts one dropped signal; returns the total so far. Safe on any thread."""
        kind = signal_type(signal)
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
