"""The hand-off from drivers' threads to the daemon thread: bounded, lock-free per signal.

`queue.Queue` takes a lock and signals a condition for every put and get: at
ten thousand events a second that was a tenth of the daemon thread's time.
A deque's append and popleft are atomic in CPython, so producers only append
and set an event, and only when the reader may be waiting.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    def __init__(self, limit: int) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._limit = limit
        self._ready = threading.Event()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T) -> bool:
        """Adds `item` unless the inbox is full; never blocks. Any thread."""
        if len(self._items) >= self._limit:
            return False
        self._items.append(item)
        if not self._ready.is_set():
            self._ready.set()
        return True

    def wake(self) -> None:
        """Ends the reader's wait without an item: something else is due. Any thread."""
        self._ready.set()

    def take(self, timeout: float) -> T | None:
        """The oldest item, waiting up to `timeout` for one. The reader's thread only."""
        item = self.take_nowait()
        if item is not None:
            return item
        self._ready.clear()
        item = self.take_nowait()  # appended before the clear: its set() may have been skipped
        if item is not None:
            return item
        self._ready.wait(timeout)
        return self.take_nowait()

    def take_nowait(self) -> T | None:
        try:
            return self._items.popleft()
        except IndexError:
            return None
