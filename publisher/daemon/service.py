"""Wiring: drivers hand signals to a queue; one thread turns them into messages and spools them.

Driver callbacks run on foreign threads and only `offer` to a bounded
queue. The daemon thread is the single owner of the sequence counter, the
domain trackers and the spool writes, so message order is the order signals
were accepted. It alone talks to a backend outside callbacks: listings for the
snapshot, resync and polling, and lookups of UUIDs it has never seen. The
broker thread publishes what is spooled.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Literal

from virtpub import __version__
from virtpub.amqp.broker import Broker, Confirmed
from virtpub.amqp.connection import BrokerFatalError
from virtpub.amqp.requests import CapabilityResponder
from virtpub.config import Settings
from virtpub.contract import routing, schemas
from virtpub.contract.envelope import Envelope, OutgoingMessage, rfc3339, signal_type
from virtpub.core.driver import Driver, DriverError, Signal
from virtpub.core.drops import DropCounter, Tally
from virtpub.core.event import BackendChange, ConfigRejected, DomainFacts, JSONValue
from virtpub.core.redact import redact_url
from virtpub.core.tracker import Publication, Tracker
from virtpub.daemon.inbox import Inbox
from virtpub.daemon.metrics import Counters, MetricsServer
from virtpub.daemon.spool import (
    DomainChanges,
    DroppedRange,
    Spool,
    SpoolDiskFullError,
    SpoolError,
    stored_size,
)
from virtpub.daemon.systemd import Notifier

log = logging.getLogger(__name__)

INBOX_LIMIT = 100_000
BATCH_LIMIT = 500
BROKER_BACKLOG = 2_000
"""Messages held in memory for the broker (queued and in flight); the rest stay in the spool."""
READY_LIMIT = 2_000
"""Messages just spooled and kept in memory for the broker, beyond BROKER_BACKLOG."""
SNAPSHOT_REQUESTS_WAITING = 16
"""Snapshot requests taken from the broker and not yet served; more are refused (and counted)."""
DROP_REPORT_INTERVAL_S = 1.0
"""At most one publisher.dropped (and the snapshot after it) per interval under sustained loss."""
FIRST_CONNECT_WAIT_S = 10.0
DRAIN_TIMEOUT_S = 10.0
DISK_FULL_RETRY_S = 0.5
_EXISTENCE_BY_POLL = frozenset({"defined", "undefined", "started", "stopped"})

EXIT_OK = 0
EXIT_FAILURE = 1

DropReason = Literal["queue_full", "spool_full"]
SnapshotReason = Literal["startup", "reconnect", "dropped", "requested"]


class Daemon:
    def __init__(
        self,
        settings: Settings,
        drivers: Sequence[Driver],
        on_confirmed: Confirmed | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.drivers = drivers
        self._drivers = {driver.backend: driver for driver in drivers}
        self._on_confirmed = on_confirmed
        self._notifier = notifier if notifier is not None else Notifier(None)
        self._inbox: Inbox[Signal] = Inbox(INBOX_LIMIT)
        self._snapshot_requests: Inbox[str] = Inbox(SNAPSHOT_REQUESTS_WAITING)
        """Ids of snapshot requests, handed over from the broker's I/O thread."""
        self._ready: collections.deque[OutgoingMessage] = collections.deque()
        """Spooled messages not yet handed to the broker, kept so they need not be read back."""
        self._envelope = Envelope(settings.host_id)
        self._sequence = 0
        self._handed = 0
        """The sequence of the last message handed to the broker."""
        self._pending: list[OutgoingMessage] = []
        self._unspooled: tuple[list[OutgoingMessage], DomainChanges] | None = None
        """Messages (and the domain records they lead to) a full disk kept out of the spool."""
        self._trackers: dict[str, Tracker] = {}
        self._next_poll: dict[str, float] = {}
        self._queue_drops = DropCounter(signal_type)
        self._next_drop_report = 0.0
        self._spool_drops: list[DroppedRange] = []
        self._spool_dropped = 0
        self.received: collections.Counter[tuple[str, str]] = collections.Counter()
        """(backend, event type) to signals taken from the drivers; the daemon thread's."""
        self._backend_up = {driver.backend: True for driver in drivers}
        self._backend_reconnects = 0
        self.started = threading.Event()
        self.broker: Broker | None = None
        self._announce = threading.Event()
        """Set from the broker thread after a reconnect: the capabilities go out again."""

    def accept(self, signal: Signal) -> None:
        """The `emit` of every driver: runs on foreign threads, never blocks, never raises."""
        if not self._inbox.offer(signal):
            try:
                total = self._queue_drops.add(signal)
                if total == 1 or total % 1000 == 0:
                    log.error("event queue full: %d event(s) dropped so far", total)
            except Exception:  # a driver's thread must never see an exception
                log.exception("could not count a dropped event")

    @property
    def dropped(self) -> int:
        """Signals dropped because the queue was full, since the start."""
        return self._queue_drops.total

    def run(self, stop: threading.Event) -> int:
        """Runs until `stop` is set; returns the process exit code."""
        try:
            spool = Spool(self.settings.state_dir / "spool.sqlite3")
        except SpoolError as err:
            log.error("%s", err)
            return EXIT_FAILURE
        self._sequence = spool.last_sequence()
        known = spool.domains()
        self._trackers = {b: Tracker(b, known.get(b)) for b in self._drivers}
        self._responder = CapabilityResponder(
            self.settings.exchange, self.settings.host_id, self._snapshot_requests.offer
        )
        broker = self.broker = Broker(
            self.settings,
            spool,
            responder=self._responder,
            on_confirmed=self._on_confirmed,
            on_reconnected=self._announce.set,
            connection_name=f"virtpub {self.settings.host_id} pid {os.getpid()}",
        )
        try:
            metrics = self._serve_metrics(spool, broker)
        except OSError as err:
            log.error(
                "metrics: cannot listen on %s:%d: %s", *self.settings.metrics_listen or (), err
            )
            spool.close()
            return EXIT_FAILURE
        leftovers = spool.count()
        if leftovers:
            log.info("resending %d message(s) left in the spool", leftovers)
        self._handed = spool.first_sequence() - 1 if leftovers else self._sequence
        started: list[Driver] = []
        try:
            # Backends first, each listed right after it subscribed: events that arrive
            # while the broker is still being reached wait in the queue, behind the
            # capabilities message and the snapshot built from these listings.
            listings = []
            for driver in self.drivers:
                driver.start(self.accept)
                started.append(driver)
                listings.append(self._list(driver))
            broker.start()
            broker.wait_first_attempt(FIRST_CONNECT_WAIT_S)
            self._add_capabilities()
            for driver, listing in zip(self.drivers, listings, strict=True):
                if listing is not None:
                    self._resync(driver, "startup", listing)
            self._commit(spool, broker)
            self.started.set()
            self._notifier.ready(f"publishing to exchange {self.settings.exchange!r}")
            self._loop(stop, spool, broker)
        except (BrokerFatalError, DriverError, SpoolError) as err:
            log.error("%s", err)
            return EXIT_FAILURE
        finally:
            self._notifier.stopping()
            for driver in started:
                driver.stop()
            self._flush(spool, broker)
            drained = broker.drain(DRAIN_TIMEOUT_S)
            broker.stop()
            if metrics is not None:
                metrics.stop()
            left = spool.count()
            returned = spool.returned_count()
            spool.close()
            log.info(
                "stopped: %d published, %d confirmed, %d left in the spool%s;"
                " %d returned as unroutable (kept in the spool), %d dropped from a full queue",
                broker.published,
                broker.confirmed,
                left,
                "" if drained else " (drain timed out)",
                returned,
                self.dropped,
            )
        return EXIT_OK

    def _loop(self, stop: threading.Event, spool: Spool, broker: Broker) -> None:
        while not stop.is_set():
            if broker.fatal is not None:
                raise BrokerFatalError(broker.fatal)
            if self._unspooled is not None:
                # A full disk: nothing more is taken (signals wait in the bounded queue,
                # then are counted as dropped) until the held messages are spooled.
                stop.wait(DISK_FULL_RETRY_S)
                spool.reclaim()
                self._commit(spool, broker)
                self._feed(spool, broker)
                self._notifier.watchdog()
                continue
            if self._announce.is_set():
                self._announce.clear()
                self._add_capabilities()
            if self._spool_full(spool):
                # Backpressure: signals wait in the bounded queue (then are counted as
                # dropped) until the broker confirms and the janitor frees room.
                stop.wait(0.05)
            else:
                self._report_drops(spool)
                self._serve_snapshot_request()
                self._poll_due(time.monotonic())
                behind = self._handed < self._sequence
                signal = self._inbox.take(timeout=0.01 if behind else 0.2)
                if signal is not None:
                    self._handle(signal)
                self._take_queued(BATCH_LIMIT)
            for tracker in self._trackers.values():
                self._add_domain(tracker.settle(time.time()))
            self._commit(spool, broker)
            self._feed(spool, broker)
            self._notifier.watchdog()  # only from a loop that still turns

    def _serve_metrics(self, spool: Spool, broker: Broker) -> MetricsServer | None:
        address = self.settings.metrics_listen
        if address is None:
            return None
        counters = Counters(
            received=lambda: dict(self.received),
            broker=broker.counts,
            dropped=lambda: {"queue_full": self.dropped, "spool_full": self._spool_dropped},
            spool=lambda: (spool.count(), spool.used_bytes),
            backend_reconnects=lambda: self._backend_reconnects,
            requests=self._responder.counts,
            latency=broker.latency,
        )
        server = MetricsServer(address, counters, lambda: self._health(spool, broker))
        server.start()
        return server

    def _health(self, spool: Spool, broker: Broker) -> dict[str, tuple[bool, str]]:
        checks = {
            f"backend {backend}": (up, "connected" if up else "disconnected")
            for backend, up in dict(self._backend_up).items()
        }
        checks["broker"] = (
            broker.ready,
            "publishing" if broker.ready else "not connected, or blocked by a resource alarm",
        )
        room = self.settings.spool_max_bytes - spool.used_bytes
        checks["spool"] = (room > 0, f"{spool.used_bytes} of {self.settings.spool_max_bytes} bytes")
        return checks

    def _spool_full(self, spool: Spool) -> bool:
        """Under `block`, whether to stop taking signals; `drop-oldest` makes room instead."""
        settings = self.settings
        return (
            settings.spool_full_policy == "block" and spool.used_bytes >= settings.spool_max_bytes
        )

    def _report_drops(self, spool: Spool) -> None:
        """At most once an interval: a publisher.dropped per loss, then one snapshot of each
        backend concerned, for consumers to rebuild from instead of trusting what they missed.

        Drops from a full spool are told once it has drained to half: told earlier, the
        report and its snapshot would only push out more messages, and be told again.
        """
        now = time.time()
        if now < self._next_drop_report:
            return
        reports: list[tuple[DropReason, Tally, DroppedRange | None]] = []
        queued = self._queue_drops.take()
        if queued is not None:
            reports.append(("queue_full", queued, None))
        if spool.used_bytes < self.settings.spool_max_bytes // 2:
            everyone = frozenset(self._drivers)
            for span in self._spool_drops:
                tally = Tally(span.count, dict(span.types), everyone, span.at)
                reports.append(("spool_full", tally, span))
            self._spool_drops = []
        if not reports:
            return
        self._next_drop_report = now + DROP_REPORT_INTERVAL_S
        concerned: set[str] = set()
        for reason, lost, sequences in reports:
            log.error("%d event(s) dropped (%s); publishing publisher.dropped", lost.count, reason)
            self._add_publisher("dropped", self._dropped_data(reason, lost, sequences), now, reason)
            concerned |= lost.backends
        for driver in self.drivers:
            if driver.backend in concerned:
                listing = self._list(driver)
                if listing is not None:
                    self._resync(driver, "dropped", listing)

    def _make_room(self, spool: Spool, broker: Broker, incoming: list[OutgoingMessage]) -> None:
        """Under `drop-oldest`: drops the oldest messages not yet sent to the broker.

        Messages in flight stay: the broker may have them already.
        """
        settings = self.settings
        if settings.spool_full_policy != "drop-oldest":
            return
        excess = spool.used_bytes + sum(map(stored_size, incoming)) - settings.spool_max_bytes
        if excess <= 0:
            return
        unsent = broker.withdraw()
        if unsent is not None:
            self._handed = unsent - 1
        self._ready.clear()  # some of it may be dropped now
        dropped = spool.drop_oldest(self._handed, excess)
        for span in dropped:
            log.error(
                "spool full: dropped %d unsent message(s), sequences %d-%d",
                span.count,
                span.first,
                span.last,
            )
        self._spool_drops = DroppedRange.merge([*self._spool_drops, *dropped])
        self._spool_dropped += sum(span.count for span in dropped)

    def _dropped_data(
        self, reason: DropReason, tally: Tally, dropped: DroppedRange | None
    ) -> dict[str, JSONValue]:
        events: dict[str, JSONValue] = dict(sorted(tally.types.items()))
        backends: list[JSONValue] = [*sorted(tally.backends & set(self._drivers))]
        data: dict[str, JSONValue] = {
            "reason": reason,
            "policy": self.settings.spool_full_policy,
            "count": tally.count,
            "events": events,
            "backends": backends,
            "since": rfc3339(tally.since),
        }
        if dropped is not None:
            data["first_sequence"] = dropped.first
            data["last_sequence"] = dropped.last
        return data

    def _take_queued(self, limit: int) -> None:
        """Handles what is already queued, up to `limit` messages: one spool commit for all."""
        while len(self._pending) < limit:
            signal = self._inbox.take_nowait()
            if signal is None:
                return
            self._handle(signal)

    def _handle(self, signal: Signal) -> None:
        self.received[signal.backend, signal_type(signal)] += 1
        if isinstance(signal, BackendChange):
            self._backend_changed(signal)
            return
        if isinstance(signal, ConfigRejected):
            self._sequence += 1
            self._pending.append(self._envelope.config_invalid(signal, self._sequence))
            return
        driver = self._drivers.get(signal.backend)
        if driver is None:
            log.error("dropped an event from unknown backend %s", signal.backend)
            return
        self._add_domain(self._trackers[signal.backend].apply(signal, driver.lookup))

    def _backend_changed(self, change: BackendChange) -> None:
        driver = self._drivers[change.backend]
        self._backend_up[change.backend] = change.connected
        self._backend_reconnects += change.connected
        data: dict[str, JSONValue] = {
            "backend": change.backend,
            "uri": redact_url(getattr(driver, "uri", change.backend)),
            "connected": change.connected,
            "reason": change.reason,
        }
        detail = "connected" if change.connected else "disconnected"
        self._add_publisher("backend", data, change.received_at, detail)
        if change.connected:
            self._add_capabilities()
            listing = self._list(driver)
            if listing is not None:
                self._resync(driver, "reconnect", listing)

    @staticmethod
    def _list(driver: Driver) -> list[DomainFacts] | None:
        try:
            return driver.list_domains()
        except DriverError as err:
            log.warning("%s; resync waits for the backend to come back", err)
            return None

    def _resync(
        self,
        driver: Driver,
        reason: SnapshotReason,
        listing: list[DomainFacts],
        request_id: str | None = None,
    ) -> None:
        """After a blind gap: publishes the transitions missed, then a snapshot of every domain.
        On request, the same: the bracket then carries the request's id.

        The listing is taken right after the backend subscribed, and applied before
        any event queued since: records kept from before the gap are stale, and an
        event applied to a stale record could remove a domain that still exists.
        An event the listing already reflects is then published once more, with
        existence still right.
        """
        now = time.time()
        tracker = self._trackers[driver.backend]
        self._add_domain(tracker.reconcile(listing, "resync", now))
        snapshot_id = str(uuid.uuid4())
        bracket: dict[str, JSONValue] = {
            "backend": driver.backend,
            "snapshot_id": snapshot_id,
            "reason": reason,
        }
        if request_id is not None:
            bracket["request_id"] = request_id
        self._add_publisher("snapshot", {**bracket, "phase": "begin"}, now, "begin")
        entries = tracker.snapshot(listing, now)
        self._add_domain(entries)
        end: dict[str, JSONValue] = {**bracket, "phase": "end", "domains": len(entries)}
        self._add_publisher("snapshot", end, now, "end")
        self._next_poll[driver.backend] = time.monotonic() + driver.poll_interval

    def _serve_snapshot_request(self) -> None:
        """A bracket of every backend, from fresh listings, for one consumer's request.

        Records are current here (not stale as after a gap): queued events first, so the
        listing is compared with what they already told.
        """
        request_id = self._snapshot_requests.take_nowait()
        if request_id is None:
            return
        self._take_queued(INBOX_LIMIT)
        log.info("snapshot requested (request %s)", request_id)
        for driver in self.drivers:
            listing = self._list(driver)
            if listing is not None:
                self._resync(driver, "requested", listing, request_id)

    def _poll_due(self, now: float) -> None:
        for driver in self.drivers:
            if not driver.polled or now < self._next_poll.get(driver.backend, 0.0):
                continue
            self._next_poll[driver.backend] = now + driver.poll_interval
            # Records are current here (not stale as after a gap): queued events first, so
            # the listing is compared with what they already told.
            self._take_queued(INBOX_LIMIT)
            try:
                listing = driver.list_domains()
            except DriverError as err:
                log.debug("poll skipped: %s", err)
                continue
            allowed = driver.polled
            if allowed & _EXISTENCE_BY_POLL:
                allowed |= {"added", "removed"}
            tracker = self._trackers[driver.backend]
            self._add_domain(tracker.reconcile(listing, "poll", time.time(), allowed))

    def _add_domain(self, publications: list[Publication]) -> None:
        for publication in publications:
            self._sequence += 1
            self._pending.append(self._envelope.domain_event(publication, self._sequence))

    def _add_publisher(
        self, event: str, data: dict[str, JSONValue], received_at: float, detail: str | None = None
    ) -> None:
        self._sequence += 1
        self._pending.append(
            self._envelope.publisher_event(event, data, self._sequence, received_at, detail)
        )

    def _add_capabilities(self) -> None:
        data: dict[str, JSONValue] = {
            "publisher": {"name": "virtpub", "version": __version__},
            "host_id": self.settings.host_id,
            "routing_key_format": routing.FORMAT,
            "schemas": {name: schemas.info(name).version for name in schemas.ALL},
            "backends": [driver.capabilities().to_json() for driver in self.drivers],
        }
        self._add_publisher("capabilities", data, time.time())
        self._responder.answer = self._pending[-1].body

    def _commit(self, spool: Spool, broker: Broker) -> None:
        """Spools the pending messages with the domain records they lead to, in one transaction."""
        if self._unspooled is not None:
            messages, changes = self._unspooled
        elif self._pending:
            messages, self._pending = self._pending, []
            changes = {backend: t.take_changes() for backend, t in self._trackers.items()}
        else:
            return
        try:
            self._make_room(spool, broker, messages)
            spool.append(messages, changes)
        except SpoolDiskFullError as err:
            if self._unspooled is None:
                log.error(
                    "%s; holding %d message(s) and taking no new events until there is room",
                    err,
                    len(messages),
                )
            self._unspooled = messages, changes
            return
        if self._unspooled is not None:
            self._unspooled = None
            log.info("spool: room again; %d held message(s) spooled", len(messages))
        self._feed(spool, broker, messages)

    def _feed(
        self, spool: Spool, broker: Broker, fresh: list[OutgoingMessage] | None = None
    ) -> None:
        """Hands the broker what the spool holds and it has not seen, while it has room.

        The spool is the buffer: in a burst or an outage memory holds at most
        BROKER_BACKLOG messages for the broker and READY_LIMIT just spooled (so the
        common case reads nothing back); the rest waits on disk and is read back in order.
        """
        ready = self._ready
        if fresh:
            last = ready[-1].sequence if ready else self._handed
            if fresh[0].sequence == last + 1 and len(ready) + len(fresh) <= READY_LIMIT:
                ready.extend(fresh)
            else:
                ready.clear()  # read back from the spool instead
        room = BROKER_BACKLOG - broker.unconfirmed()
        if room <= 0 or self._handed >= self._sequence:
            return
        if ready and ready[0].sequence == self._handed + 1:
            batch = [ready.popleft() for _ in range(min(room, len(ready)))]
        else:
            ready.clear()
            batch = spool.after(self._handed, room)
        if batch:
            broker.submit(batch)
            self._handed = batch[-1].sequence

    def _flush(self, spool: Spool, broker: Broker) -> None:
        """Spools what drivers queued before they stopped, so nothing accepted is lost."""
        try:
            self._commit(spool, broker)  # what a full disk held back, first
            if self._unspooled is not None:
                log.error(
                    "could not spool %d held message(s) at shutdown: the disk is still full",
                    len(self._unspooled[0]),
                )
                return
            self._take_queued(INBOX_LIMIT)
            self._commit(spool, broker)
        except SpoolError as err:
            log.error("could not spool queued events at shutdown: %s", err)
