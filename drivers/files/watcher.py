"""The observer-thread role: what watchdog's inotify thread may do, and nothing more.

watchdog calls `PathNotes` on its own thread. It only records which path was touched and
when, in a map bounded by MAX_PENDING, and wakes the worker (`scanner.Scanner`), which
takes the paths once they have been quiet for the debounce. It never blocks on I/O and
never raises into watchdog: a failure is counted and logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from virtpub.drivers.files.config_files import Format, watched

log = logging.getLogger(__name__)

MAX_PENDING = 4096
EVENT_FILTER: list[type[FileSystemEvent]] = [
    # No opened/closed-without-write events: the worker's own reads would wake it again.
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
_WATCHDOG_INOTIFY_LOGGER = "watchdog.observers.inotify_c"
_OVERFLOW_WARNING = "Inotify queue overflowed"


class PathNotes(FileSystemEventHandler):
    """The hand-off between watchdog's thread and the worker: touched paths, the time the
    next full rescan is due, and the event that wakes the worker. Safe on any thread."""

    def __init__(
        self, dirs: Mapping[str, Format], uri: str, debounce_s: float, rescan_interval: float
    ) -> None:
        super().__init__()
        self._dirs = dirs
        self._uri = uri
        self._debounce_s = debounce_s
        self._rescan_interval = rescan_interval
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}
        """Path -> when it was last touched (monotonic)."""
        self._rescan_at = float("inf")
        """When the next full rescan is due (monotonic); none before `begin`."""
        self.overflows = 0
        self.failures = 0
        """watchdog events that could not be noted (each logged)."""

    # -- watchdog's observer thread -------------------------------------------------------------

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            for raw in (event.src_path, event.dest_path):
                if raw:
                    self._note_path(os.fsdecode(raw))
        except Exception:  # never raise into watchdog's observer
            self.failures += 1
            log.exception("filesystem %s: dropped a watchdog event", self._uri)

    def _note_path(self, path: str) -> None:
        directory, name = os.path.split(path)
        fmt = self._dirs.get(directory)
        is_root = path in self._dirs
        if not is_root and (fmt is None or not watched(fmt, name)):
            return
        with self._lock:
            first = not self._pending
            flooded = path not in self._pending and len(self._pending) >= MAX_PENDING
            if flooded:
                self._pending.clear()
                self.overflows += 1
                self._rescan_at = min(self._rescan_at, time.monotonic() + self._debounce_s)
            else:
                self._pending[path] = time.monotonic()
        if flooded:
            log.warning(
                "filesystem %s: over %d changes pending; rescanning", self._uri, MAX_PENDING
            )
        if first or is_root or flooded:
            self.wake.set()  # otherwise the worker is already waiting for an earlier path

    def overflowed(self) -> None:
        """The kernel's inotify queue overflowed: runs on watchdog's inotify thread, inside
        its logging call."""
        try:
            with self._lock:
                self.overflows += 1
            self.request_rescan()
        except Exception:  # an exception here would end watchdog's inotify thread
            self.failures += 1
            log.exception("filesystem %s: could not schedule a rescan", self._uri)

    # -- any thread -----------------------------------------------------------------------------

    def request_rescan(self) -> None:
        """A full rescan once changes have been quiet for the debounce."""
        with self._lock:
            self._rescan_at = min(self._rescan_at, time.monotonic() + self._debounce_s)
        self.wake.set()

    # -- the worker thread ----------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """The periodic rescan counts from the driver's start."""
        with self._lock:
            self._rescan_at = now + self._rescan_interval

    def take_due(self, now: float) -> tuple[set[str], set[str], float]:
        """Removes and returns the watched roots touched and the paths quiet long enough,
        with when the next pending path will be."""
        roots: set[str] = set()
        due: set[str] = set()
        next_due = float("inf")
        with self._lock:
            for path, touched in self._pending.items():
                if path in self._dirs:
                    roots.add(path)
                elif now - touched >= self._debounce_s:
                    due.add(path)
                else:
                    next_due = min(next_due, touched + self._debounce_s)
            for path in roots | due:
                del self._pending[path]
        return roots, due, next_due

    def take_rescan(self, now: float) -> bool:
        """Whether a full rescan is due now; if so, the next one is due an interval later."""
        with self._lock:
            if now < self._rescan_at:
                return False
            self._rescan_at = now + self._rescan_interval
            return True

    def rescan_at(self) -> float:
        with self._lock:
            return self._rescan_at


class OverflowFilter(logging.Filter):
    """Learns of an inotify queue overflow from the one place watchdog reports it: its log.

    `listen` holds watchdog's logger at WARNING or below, so an operator's `--log-level error`
    cannot stop the warning from being made; what the operator's level hides, this filter
    keeps from the handlers."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def listen(self) -> None:
        logger = logging.getLogger(_WATCHDOG_INOTIFY_LOGGER)
        logger.setLevel(min(logging.WARNING, logger.getEffectiveLevel()))
        logger.addFilter(self)

    def deafen(self) -> None:
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_OVERFLOW_WARNING):
            self._on_overflow()
        return record.levelno >= logging.getLogger().getEffectiveLevel()
