"""Test doubles for the daemon's parts: run a `Daemon` without a broker, a disk or libvirt.

For users writing drivers and for virtpub's own tests. The doubles keep the contracts
of the real parts (`virtpub.daemon.ports`, `virtpub.core.driver.Driver`) and nothing
more, and run on the caller's thread, so a test drives the daemon turn by turn:

    spool = MemorySpool()
    publisher = RecordingPublisher(spool, confirm_at_once=True)
    driver = ScriptedDriver("scripted://a", {uuid: facts})
    daemon = make_daemon([driver], spool=spool, publisher=publisher)
    daemon.begin()                 # startup capabilities and snapshot
    driver.emit(event)             # as the backend would, from any thread
    daemon.turn(threading.Event())
    daemon.finish()
    publisher.types()              # what was handed over, in order
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from virtpub.amqp.connection import BrokerFatalError
from virtpub.amqp.requests import CapabilityResponder
from virtpub.config import Settings
from virtpub.contract.envelope import OutgoingMessage
from virtpub.core.capabilities import BackendCapabilities, EventSupport
from virtpub.core.driver import Driver, DriverError, Emit, Signal
from virtpub.core.event import BackendChange, DomainFacts
from virtpub.core.tracker import Record
from virtpub.daemon.clock import Clock
from virtpub.daemon.service import Daemon
from virtpub.daemon.spool import (
    KEEP_TYPE,
    DomainChanges,
    DroppedRange,
    SpoolDiskFullError,
    stored_size,
)
from virtpub.daemon.status import BrokerHandoff, Status

__all__ = [
    "ManualClock",
    "MemorySpool",
    "RecordingPublisher",
    "ScriptedDriver",
    "double_settings",
    "make_daemon",
]


class MemorySpool:
    """The spool's semantics in a dict: ordered sequences, the size bound by `stored_size`,
    drop-oldest after the handed-over mark (sparing drop reports), domain records. An
    append is committed at once (the real spool commits at its sync thread's next fsync).

    `disk_full = True` makes `append` fail as a full disk does.
    """

    def __init__(self) -> None:
        self.messages: dict[int, OutgoingMessage] = {}
        """Unconfirmed messages by sequence, in order."""
        self.records: dict[str, dict[str, Record]] = {}
        self._last_sequence = 0
        self._reserved = 0
        self._confirmed_early: set[int] = set()
        """Confirmed before their append: the append skips them, as the real spool does."""
        self._bytes = 0
        self.disk_full = False
        self.closed = False

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def last_sequence(self) -> int:
        return self._last_sequence

    def reserved_sequence(self) -> int:
        return self._reserved

    def release_reservation(self) -> None:
        self._reserved = self._last_sequence

    def on_durable(self, callback: Callable[[], None]) -> None:
        """Never called: an append here is committed when it returns."""

    def first_sequence(self) -> int:
        return min(self.messages, default=0)

    def domains(self) -> dict[str, dict[str, Record]]:
        return {backend: dict(records) for backend, records in self.records.items()}

    def append(
        self,
        messages: Sequence[OutgoingMessage],
        domains: DomainChanges | None = None,
        *,
        reserve: int = 0,
    ) -> None:
        if not messages:
            return
        if self.disk_full:
            raise SpoolDiskFullError("spool: the disk is full (MemorySpool.disk_full)")
        for backend, (changed, removed) in (domains or {}).items():
            records = self.records.setdefault(backend, {})
            records.update(changed)
            for uuid in removed:
                records.pop(uuid, None)
        for message in messages:
            if message.sequence in self._confirmed_early:
                self._confirmed_early.discard(message.sequence)
                continue
            self.messages[message.sequence] = message
            self._bytes += stored_size(message)
        self._last_sequence = messages[-1].sequence
        self._reserved = max(self._reserved, self._last_sequence + reserve)

    def after(self, sequence: int, limit: int) -> list[OutgoingMessage]:
        later = sorted(s for s in self.messages if s > sequence)[:limit]
        return [self.messages[s] for s in later]

    def drop_oldest(self, after: int, need: int) -> list[DroppedRange]:
        spans: list[tuple[int, int, dict[str, int]]] = []
        freed = 0
        for sequence in sorted(s for s in self.messages if s > after):
            if freed >= need:
                break
            message = self.messages[sequence]
            if message.type == KEEP_TYPE:
                continue
            if not spans or spans[-1][1] + 1 != sequence:
                spans.append((sequence, sequence, {}))
            first, _, types = spans[-1]
            types[message.type] = types.get(message.type, 0) + 1
            spans[-1] = (first, sequence, types)
            freed += stored_size(message)
        for first, last, _ in spans:
            for sequence in range(first, last + 1):
                self._bytes -= stored_size(self.messages.pop(sequence))
        at = time.time()
        return [DroppedRange(first, last, types, at) for first, last, types in spans]

    def remove(self, messages: Iterable[OutgoingMessage]) -> None:
        """Confirmed messages leave at once (the real spool's janitor does it soon after)."""
        for message in messages:
            if self.messages.pop(message.sequence, None) is not None:
                self._bytes -= stored_size(message)
            elif message.sequence > self._last_sequence:
                self._confirmed_early.add(message.sequence)

    def reclaim(self) -> None:
        """Nothing to checkpoint in memory."""

    def count(self) -> int:
        return len(self.messages)

    def returned_count(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class RecordingPublisher:
    """Records what the daemon hands over; confirms it on `confirm()`, or at once.

    Confirmed messages are removed from `spool`, as the broker does. Set `ready` False to
    stand for a lost connection (nothing is confirmed at once), `fatal` to a reason to
    stand for a broker that refuses (the daemon stops with it).
    """

    def __init__(self, spool: MemorySpool, *, confirm_at_once: bool = False) -> None:
        self._spool = spool
        self.confirm_at_once = confirm_at_once
        self.submitted: list[OutgoingMessage] = []
        """Everything handed over, in order, withdrawn messages included."""
        self.withdrawn: list[OutgoingMessage] = []
        self._outbound: list[OutgoingMessage] = []
        self.ready = True
        self.fatal: str | None = None
        self.published = 0
        self.confirmed = 0
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def wait_first_attempt(self, timeout: float) -> None:
        if self.fatal is not None:
            raise BrokerFatalError(self.fatal)

    def submit(self, messages: Iterable[OutgoingMessage]) -> None:
        batch = list(messages)
        self.submitted.extend(batch)
        self._outbound.extend(batch)
        if self.confirm_at_once and self.ready:
            self.confirm()

    def confirm(self, count: int | None = None) -> list[OutgoingMessage]:
        """Confirms the oldest `count` unconfirmed messages (all by default); returns them."""
        taken = self._outbound[: len(self._outbound) if count is None else count]
        del self._outbound[: len(taken)]
        self.published += len(taken)
        self.confirmed += len(taken)
        self._spool.remove(taken)
        return taken

    def withdraw(self) -> int | None:
        if not self._outbound:
            return None
        first = self._outbound[0].sequence
        self.withdrawn.extend(self._outbound)
        self._outbound.clear()
        return first

    def unconfirmed(self) -> int:
        return len(self._outbound)

    def drain(self, timeout: float) -> bool:
        return not self._outbound

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True

    def types(self) -> list[str]:
        """The CloudEvents type of each message handed over, in order."""
        return [message.type for message in self.submitted]


class ScriptedDriver:
    """A Driver whose backend is a dict the test controls.

    `script` is emitted when the daemon starts the driver; `emit` sends more, as the
    backend's thread would; `disconnect`/`reconnect` report backend changes (while
    disconnected, listings fail as a lost backend's do). `lookup` answers from `domains`.
    """

    def __init__(
        self,
        backend: str,
        domains: Mapping[str, DomainFacts] | None = None,
        *,
        script: Sequence[Signal] = (),
        polled: frozenset[str] = frozenset(),
        poll_interval: float = 10.0,
        uri: str | None = None,
    ) -> None:
        self._backend = backend
        self._uri = uri if uri is not None else backend
        self.domains: dict[str, DomainFacts] = dict(domains or {})
        self.script = list(script)
        self._polled = polled
        self._poll_interval = poll_interval
        self._emit: Emit | None = None
        self.connected = True
        self.listings = 0
        """How many times the daemon listed the domains."""
        self.stopped = False

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def polled(self) -> frozenset[str]:
        return self._polled

    @property
    def poll_interval(self) -> float:
        return self._poll_interval

    def start(self, emit: Emit) -> None:
        self._emit = emit
        self.emit(*self.script)

    def emit(self, *signals: Signal) -> None:
        if self._emit is None:
            raise RuntimeError("ScriptedDriver: emit before the daemon started it")
        for signal in signals:
            self._emit(signal)

    def disconnect(self, reason: str = "scripted disconnect", at: float = 0.0) -> None:
        self.connected = False
        self.emit(BackendChange(self._backend, False, reason, at))

    def reconnect(self, at: float = 0.0) -> None:
        self.connected = True
        self.emit(BackendChange(self._backend, True, None, at))

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            driver="scripted",
            source=self._backend,
            uri=self._backend,
            hypervisor_type=None,
            hypervisor_version=None,
            libvirt_version=None,
            events={
                name: EventSupport("polled", interval_s=self._poll_interval)
                for name in sorted(self._polled)
            },
        )

    def list_domains(self) -> list[DomainFacts]:
        if not self.connected:
            raise DriverError(f"scripted: {self._backend} is disconnected")
        self.listings += 1
        return list(self.domains.values())

    def lookup(self, uuid: str) -> DomainFacts | Literal["gone"] | None:
        if not self.connected:
            return None
        return self.domains.get(uuid, "gone")

    def stop(self) -> None:
        self.stopped = True


class ManualClock:
    """Time that moves only when told: `advance` moves the wall and the monotonic clock."""

    def __init__(self, wall: float = 1_000_000.0, monotonic: float = 1_000.0) -> None:
        self.wall = wall
        self.monotonic = monotonic

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds

    @property
    def clock(self) -> Clock:
        return Clock(wall=lambda: self.wall, monotonic=lambda: self.monotonic)


def double_settings(**overrides: Any) -> Settings:
    """Settings for a daemon made of doubles (nothing they name is reached), with `overrides`."""
    base = Settings(
        libvirt_uris=(),
        amqp_urls=("amqp://doubles.invalid/",),
        exchange="virtpub.test",
        host_id="testhost",
        state_dir=Path("/nonexistent/virtpub-doubles"),
        log_level="info",
        log_format="text",
    )
    return dataclasses.replace(base, **overrides)


def make_daemon(
    drivers: Sequence[Driver],
    *,
    spool: MemorySpool | None = None,
    publisher: RecordingPublisher | None = None,
    settings: Settings | None = None,
    clock: ManualClock | None = None,
) -> Daemon:
    """A Daemon of doubles: a MemorySpool, a RecordingPublisher that confirms at once, and
    the real clocks unless a ManualClock is given."""
    spool = spool if spool is not None else MemorySpool()
    handoff = BrokerHandoff()
    settings = settings if settings is not None else double_settings()
    return Daemon(
        settings,
        drivers,
        spool=spool,
        publisher=publisher or RecordingPublisher(spool, confirm_at_once=True),
        responder=CapabilityResponder(
            settings.exchange, settings.host_id, handoff.snapshot_requests.offer
        ),
        handoff=handoff,
        status=Status(driver.backend for driver in drivers),
        clock=clock.clock if clock is not None else None,
    )
