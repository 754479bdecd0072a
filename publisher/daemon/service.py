"""The daemon's lifecycle and loop: drivers hand signals to a queue; one thread turns them
into messages and spools them.

Driver callbacks run on foreign threads and only `offer` to a bounded queue. The
daemon thread is the single owner of the pipeline (sequence, trackers, spool writes),
so message order is the order signals were accepted. It alone talks to a backend
outside callbacks (`Resync`). The broker thread publishes what is spooled. The parts
that do I/O are built by `virtpub.daemon.assembly` and handed in, so doubles can
stand in for them (`virtpub.testing`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from virtpub.amqp.connection import BrokerFatalError
from virtpub.amqp.requests import CapabilityResponder
from virtpub.config import Settings
from virtpub.contract.envelope import Envelope, signal_type
from virtpub.core.driver import Driver, DriverError, Signal
from virtpub.core.event import BackendChange, ConfigRejected
from virtpub.daemon import announcements
from virtpub.daemon.clock import Clock
from virtpub.daemon.inbox import Inbox
from virtpub.daemon.metrics import MetricsServer
from virtpub.daemon.overflow import Overflow
from virtpub.daemon.pipeline import Pipeline
from virtpub.daemon.ports import Publisher, SpoolStore
from virtpub.daemon.resync import Resync
from virtpub.daemon.spool import SpoolError
from virtpub.daemon.status import BrokerHandoff, Status
from virtpub.daemon.systemd import Notifier

log = logging.getLogger(__name__)

INBOX_LIMIT = 100_000
BATCH_LIMIT = 500
FIRST_CONNECT_WAIT_S = 10.0
DRAIN_TIMEOUT_S = 10.0
DISK_FULL_RETRY_S = 0.5

EXIT_OK = 0
EXIT_FAILURE = 1


class Daemon:
    def __init__(
        self,
        settings: Settings,
        drivers: Sequence[Driver],
        *,
        spool: SpoolStore,
        publisher: Publisher,
        responder: CapabilityResponder,
        handoff: BrokerHandoff,
        status: Status,
        metrics: MetricsServer | None = None,
        notifier: Notifier | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.drivers = drivers
        self._drivers = {driver.backend: driver for driver in drivers}
        self._spool = spool
        self.broker = publisher
        """The publisher: the Broker when assembled; the bench and tests read its counts."""
        self._responder = responder
        self.handoff = handoff
        self.status = status
        self._metrics = metrics
        self._notifier = notifier if notifier is not None else Notifier(None)
        self._inbox: Inbox[Signal] = Inbox(INBOX_LIMIT)
        spool.on_durable(self._inbox.wake)  # messages waiting for their commit can go
        self._backends = frozenset(self._drivers)
        self._overflow = Overflow(
            settings.spool_full_policy, settings.spool_max_bytes, status, self._backends
        )
        self._pipeline = Pipeline(Envelope(settings.host_id), spool, publisher, self._overflow)
        self._clock = clock if clock is not None else Clock()
        self._resync = Resync(
            drivers, self._pipeline, lambda: self._take_queued(INBOX_LIMIT), self._clock
        )
        self._running: list[Driver] = []
        self.started = threading.Event()

    def accept(self, signal: Signal) -> None:
        """The `emit` of every driver: runs on foreign threads, never blocks, never raises."""
        if not self._inbox.offer(signal):
            try:
                total = self.status.queue_drops.add(signal)
                if total == 1 or total % 1000 == 0:
                    log.error("event queue full: %d event(s) dropped so far", total)
            except Exception:  # a driver's thread must never see an exception
                log.exception("could not count a dropped event")

    @property
    def dropped(self) -> int:
        """Signals dropped because the queue was full, since the start."""
        return self.status.queue_drops.total

    def run(self, stop: threading.Event) -> int:
        """Runs until `stop` is set; returns the process exit code."""
        try:
            self.begin()
            while not stop.is_set():
                self.turn(stop)
        except (BrokerFatalError, DriverError, SpoolError) as err:
            log.error("%s", err)
            return EXIT_FAILURE
        finally:
            self.finish()
        return EXIT_OK

    def begin(self) -> None:
        """Resumes from the spool, starts the drivers and the broker, publishes the startup
        capabilities and snapshots."""
        self._pipeline.resume(self._drivers)
        self._report_unclean_stop()
        # Backends first, each listed right after it subscribed: events that arrive
        # while the broker is still being reached wait in the queue, behind the
        # capabilities message and the snapshot built from these listings.
        listings = []
        for driver in self.drivers:
            driver.start(self.accept)
            self._running.append(driver)
            listings.append(self._resync.listing(driver))
        self.broker.start()
        self.broker.wait_first_attempt(FIRST_CONNECT_WAIT_S)
        self._add_capabilities()
        for driver, listing in zip(self.drivers, listings, strict=True):
            if listing is not None:
                self._resync.resync(driver, "startup", listing)
        self._pipeline.commit()
        self.started.set()
        self._notifier.ready(f"publishing to exchange {self.settings.exchange!r}")

    def turn(self, stop: threading.Event) -> None:
        """One turn of the loop: take signals (unless the spool is full), spool, feed."""
        broker, pipeline = self.broker, self._pipeline
        if broker.fatal is not None:
            raise BrokerFatalError(broker.fatal)
        if pipeline.holding:
            # A full disk: nothing more is taken (signals wait in the bounded queue,
            # then are counted as dropped) until the held messages are spooled.
            stop.wait(DISK_FULL_RETRY_S)
            self._spool.reclaim()
            pipeline.commit()
            pipeline.feed()
            self._notifier.watchdog()
            return
        if self.handoff.reconnected.is_set():
            self.handoff.reconnected.clear()
            self._add_capabilities()
        if self._overflow.blocks(self._spool.used_bytes):
            # Backpressure: signals wait in the bounded queue (then are counted as
            # dropped) until the broker confirms and the janitor frees room.
            stop.wait(0.05)
        else:
            self._report_drops()
            request_id = self.handoff.snapshot_requests.take_nowait()
            if request_id is not None:
                self._resync.serve_request(request_id)
            self._resync.poll_due(self._clock.monotonic())
            signal = self._inbox.take(timeout=0.01 if pipeline.behind else 0.2)
            if signal is not None:
                self._handle(signal)
            self._take_queued(BATCH_LIMIT)
        pipeline.settle(self._clock.wall())
        pipeline.commit()
        pipeline.feed()
        self._notifier.watchdog()  # only from a loop that still turns

    def finish(self) -> None:
        """Stops the drivers, spools what they queued, drains the broker, closes the spool."""
        self._notifier.stopping()
        for driver in self._running:
            driver.stop()
        if self._flush():
            self._release_reservation()
        broker, spool = self.broker, self._spool
        drained = broker.drain(DRAIN_TIMEOUT_S)
        broker.stop()
        if self._metrics is not None:
            self._metrics.stop()
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

    def _report_drops(self) -> None:
        """A publisher.dropped per loss, then one snapshot of each backend concerned, for
        consumers to rebuild from instead of trusting what they missed."""
        now = self._clock.wall()
        concerned: set[str] = set()
        for report in self._overflow.due_reports(now, self._spool.used_bytes):
            lost, reason = report.lost, report.reason
            log.error("%d event(s) dropped (%s); publishing publisher.dropped", lost.count, reason)
            message = announcements.dropped(
                reason, lost, report.sequences, self._overflow.policy, self._backends
            )
            self._pipeline.add_publisher(message, now)
            concerned |= lost.backends
        for driver in self.drivers:
            if driver.backend in concerned:
                self._resync.after_gap(driver, "dropped")

    def _take_queued(self, limit: int) -> None:
        """Handles what is already queued, up to `limit` messages: one spool commit for all."""
        while self._pipeline.pending < limit:
            signal = self._inbox.take_nowait()
            if signal is None:
                return
            self._handle(signal)

    def _handle(self, signal: Signal) -> None:
        self.status.received[signal.backend, signal_type(signal)] += 1
        if isinstance(signal, BackendChange):
            self._backend_changed(signal)
            return
        if isinstance(signal, ConfigRejected):
            self._pipeline.add_config_invalid(signal)
            return
        driver = self._drivers.get(signal.backend)
        if driver is None:
            log.error("dropped an event from unknown backend %s", signal.backend)
            return
        tracker = self._pipeline.trackers[signal.backend]
        self._pipeline.add_domain(tracker.apply(signal, driver.lookup))

    def _backend_changed(self, change: BackendChange) -> None:
        driver = self._drivers[change.backend]
        self.status.note_backend(change)
        self._pipeline.add_publisher(announcements.backend(change, driver), change.received_at)
        if change.connected:
            self._add_capabilities()
            self._resync.after_gap(driver, "reconnect")

    def _add_capabilities(self) -> None:
        message = announcements.capabilities(self.settings.host_id, self.drivers)
        self._responder.answer = self._pipeline.add_publisher(message, self._clock.wall()).body

    def _report_unclean_stop(self) -> None:
        unclean = self._pipeline.unclean_stop
        if unclean is None:
            return
        message = announcements.unclean_stop(
            unclean.first, unclean.last, self._overflow.policy, self._backends, self._clock.wall()
        )
        self._pipeline.add_publisher(message, self._clock.wall())

    def _flush(self) -> bool:
        """Spools what drivers queued before they stopped, so nothing accepted is lost;
        False if something could not be spooled."""
        try:
            if not self._pipeline.commit_held():  # what a full disk held back, first
                return False
            self._take_queued(INBOX_LIMIT)
            self._pipeline.commit()
        except SpoolError as err:
            log.error("could not spool queued events at shutdown: %s", err)
            return False
        return not self._pipeline.holding

    def _release_reservation(self) -> None:
        """A clean stop: the next start continues right after the last sequence."""
        try:
            self._pipeline.release()
        except SpoolError as err:
            log.error("could not mark the stop as clean (the next start reports a gap): %s", err)
