"""Wiring: drivers hand events to a queue; one thread numbers, envelopes and spools them.

Driver callbacks run on foreign threads and only `put_nowait` onto a bounded
queue. The daemon thread is the single writer of the sequence counter and the
spool, so message order is the order events were accepted. The broker thread
publishes what is spooled.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

from publisher import __version__, schemas
from publisher.broker import Broker, BrokerFatalError, Confirmed
from publisher.config import Settings
from publisher.driver import Driver, DriverError
from publisher.envelope import Envelope, OutgoingMessage
from publisher.event import DomainEvent, JSONValue
from publisher.spool import Spool, SpoolError

log = logging.getLogger(__name__)

INBOX_LIMIT = 100_000
BATCH_LIMIT = 500
FIRST_CONNECT_WAIT_S = 10.0
DRAIN_TIMEOUT_S = 10.0
ROUTING_KEY_FORMAT = "v<major>.<host_id>.<entity>.<event>[.<detail>]"

EXIT_OK = 0
EXIT_FAILURE = 1


class Daemon:
    def __init__(
        self,
        settings: Settings,
        drivers: Sequence[Driver],
        on_confirmed: Confirmed | None = None,
    ) -> None:
        self.settings = settings
        self.drivers = drivers
        self._on_confirmed = on_confirmed
        self._inbox: queue.Queue[DomainEvent] = queue.Queue(maxsize=INBOX_LIMIT)
        self._envelope = Envelope(settings.host_id)
        self._sequence = 0
        self.dropped = 0
        self.started = threading.Event()
        self.broker: Broker | None = None
        self._announce = threading.Event()
        """Set from the broker thread after a reconnect: the capabilities go out again."""

    def accept(self, event: DomainEvent) -> None:
        """The `emit` of every driver: runs on foreign threads, never blocks, never raises."""
        try:
            self._inbox.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("event queue full: %d event(s) dropped so far", self.dropped)

    def run(self, stop: threading.Event) -> int:
        """Runs until `stop` is set; returns the process exit code."""
        try:
            spool = Spool(self.settings.state_dir / "spool.sqlite3")
        except SpoolError as err:
            log.error("%s", err)
            return EXIT_FAILURE
        self._sequence = spool.last_sequence()
        broker = self.broker = Broker(
            self.settings,
            spool,
            on_confirmed=self._on_confirmed,
            on_reconnected=self._announce.set,
            connection_name=f"virtpub {self.settings.host_id} pid {os.getpid()}",
        )
        leftovers = spool.pending()
        if leftovers:
            log.info("resending %d message(s) left in the spool", len(leftovers))
        broker.submit(leftovers)
        started: list[Driver] = []
        try:
            # Backends first: events that arrive while the broker is still being reached
            # wait in the queue, behind the capabilities message appended below.
            for driver in self.drivers:
                driver.start(self.accept)
                started.append(driver)
            broker.start()
            broker.wait_first_attempt(FIRST_CONNECT_WAIT_S)
            self._publish([self._capabilities()], spool, broker)
            self.started.set()
            self._loop(stop, spool, broker)
        except (BrokerFatalError, DriverError, SpoolError) as err:
            log.error("%s", err)
            return EXIT_FAILURE
        finally:
            for driver in started:
                driver.stop()
            self._flush(spool, broker)
            drained = broker.drain(DRAIN_TIMEOUT_S)
            broker.stop()
            left = spool.count()
            spool.close()
            log.info(
                "stopped: %d published, %d confirmed, %d left in the spool%s",
                broker.published,
                broker.confirmed,
                left,
                "" if drained else " (drain timed out)",
            )
        return EXIT_OK

    def _loop(self, stop: threading.Event, spool: Spool, broker: Broker) -> None:
        while not stop.is_set():
            if broker.fatal is not None:
                raise BrokerFatalError(broker.fatal)
            if self._announce.is_set():
                self._announce.clear()
                self._publish([self._capabilities()], spool, broker)
            try:
                first = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._publish(self._envelope_batch(first), spool, broker)

    def _envelope_batch(self, first: DomainEvent) -> list[OutgoingMessage]:
        """The event and whatever else is already queued, up to a batch: one spool commit."""
        events = [first]
        while len(events) < BATCH_LIMIT:
            try:
                events.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        messages = []
        for event in events:
            self._sequence += 1
            messages.append(self._envelope.domain_event(event, self._sequence))
        return messages

    def _flush(self, spool: Spool, broker: Broker) -> None:
        """Spools what drivers queued before they stopped, so nothing accepted is lost."""
        while not self._inbox.empty():
            try:
                self._publish(self._envelope_batch(self._inbox.get_nowait()), spool, broker)
            except (queue.Empty, SpoolError) as err:
                log.error("could not spool queued events at shutdown: %s", err)
                return

    @staticmethod
    def _publish(messages: list[OutgoingMessage], spool: Spool, broker: Broker) -> None:
        spool.append(messages)
        broker.submit(messages)

    def _capabilities(self) -> OutgoingMessage:
        self._sequence += 1
        data: dict[str, JSONValue] = {
            "publisher": {"name": "virtpub", "version": __version__},
            "host_id": self.settings.host_id,
            "routing_key_format": ROUTING_KEY_FORMAT,
            "schemas": {name: schemas.info(name).version for name in schemas.ALL},
            "backends": [driver.capabilities().to_json() for driver in self.drivers],
        }
        return self._envelope.publisher_event("capabilities", data, self._sequence, time.time())
