"""What the daemon thread counts, and what the broker's thread hands it: shared with the
metrics server and the broker, so each is built before the daemon that fills it."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

from virtpub.contract.envelope import signal_type
from virtpub.core.drops import DropCounter
from virtpub.core.event import BackendChange
from virtpub.daemon.inbox import Inbox

SNAPSHOT_REQUESTS_WAITING = 16
"""Snapshot requests taken from the broker and not yet served; more are refused (and counted)."""


class Status:
    """Counters written on the daemon thread (drops also on drivers' threads), read at scrape."""

    def __init__(self, backends: Iterable[str]) -> None:
        self.received: collections.Counter[tuple[str, str]] = collections.Counter()
        """(backend, event type) to signals taken from the drivers."""
        self.backend_up = dict.fromkeys(backends, True)
        self.backend_reconnects = 0
        self.queue_drops = DropCounter(signal_type)
        self.spool_dropped = 0
        """Spooled messages dropped to make room, since the start."""

    def note_backend(self, change: BackendChange) -> None:
        self.backend_up[change.backend] = change.connected
        self.backend_reconnects += change.connected

    def dropped(self) -> dict[str, int]:
        return {"queue_full": self.queue_drops.total, "spool_full": self.spool_dropped}


class BrokerHandoff:
    """What the broker's I/O thread hands the daemon thread: it only offers and sets."""

    def __init__(self) -> None:
        self.snapshot_requests: Inbox[str] = Inbox(SNAPSHOT_REQUESTS_WAITING)
        """Ids of snapshot requests."""
        self.reconnected = threading.Event()
        """Set after a reconnect: the capabilities go out again."""
