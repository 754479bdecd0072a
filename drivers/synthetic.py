"""A backend that makes up domain events, for benchmarks and fault-injection tests.

`synthetic:///?domains=N&rate=R&count=C` runs N persistent domains and flips them
between running and paused, R events a second (0: as fast as it can), C events
in all (0: until stopped), from a thread of its own, as libvirt's loop would.
Each event is one message (no existence change), and the listing always agrees
with what was emitted, so a resync finds nothing to add.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from virtpub.core.capabilities import BackendCapabilities, EventSupport
from virtpub.core.driver import DriverError, Emit
from virtpub.core.event import Codes, DomainEvent, DomainFacts, DomainRef, DomainState

SCHEME = "synthetic"
RUNNING = DomainState("running", "unpaused", 1, 5)
PAUSED = DomainState("paused", "user", 3, 1)
_NAMESPACE = uuid.UUID("9f1d7c52-6a0e-4c44-8d7e-2b6a4c1f0b00")


@dataclass(frozen=True, slots=True)
class SyntheticOptions:
    domains: int = 100
    rate: float = 0.0
    count: int = 0

    @classmethod
    def from_uri(cls, uri: str) -> SyntheticOptions:
        parts = urlsplit(uri)
        if parts.scheme != SCHEME:
            raise DriverError(f"synthetic: {uri!r} is not a synthetic:/// URI")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"domains", "rate", "count"}
        if unknown:
            raise DriverError(f"synthetic: unknown option(s) {', '.join(sorted(unknown))}")
        try:
            options = cls(
                domains=int(query.get("domains", "100")),
                rate=float(query.get("rate", "0")),
                count=int(query.get("count", "0")),
            )
        except ValueError as err:
            raise DriverError(f"synthetic: {uri!r}: {err}") from None
        if options.domains < 1 or options.rate < 0 or options.count < 0:
            raise DriverError(f"synthetic: {uri!r}: domains >= 1, rate >= 0, count >= 0")
        return options


class SyntheticDriver:
    def __init__(self, uri: str, host_id: str, options: SyntheticOptions | None = None) -> None:
        self.uri = uri
        self.options = options or SyntheticOptions.from_uri(uri)
        self._backend = f"virtpub://{host_id}/synthetic/{self.options.domains}"
        self._refs = [
            DomainRef(str(uuid.uuid5(_NAMESPACE, f"{host_id}/{n}")), f"synthetic-{n:05d}", n + 1)
            for n in range(self.options.domains)
        ]
        self._paused = [False] * self.options.domains
        self._lock = threading.Lock()
        self._emit: Emit | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.emitted = 0
        self.finished = threading.Event()

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def polled(self) -> frozenset[str]:
        return frozenset()

    @property
    def poll_interval(self) -> float:
        return 10.0

    def start(self, emit: Emit) -> None:
        self._emit = emit
        if self.options.rate or self.options.count:
            self._thread = threading.Thread(target=self._run, name="synthetic", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        total, rate = self.options.count, self.options.rate
        begun = time.perf_counter()
        while not self._stop.is_set() and (total == 0 or self.emitted < total):
            if rate:
                due = begun + self.emitted / rate
                delay = due - time.perf_counter()
                if delay > 0 and self._stop.wait(delay):
                    break
            self.emit_one()
        self.finished.set()

    def emit_one(self, on_handoff: Callable[[DomainEvent], None] | None = None) -> DomainEvent:
        """Flips the next domain and hands the event off, on the caller's thread."""
        with self._lock:
            index = self.emitted % len(self._refs)
            self._paused[index] = not self._paused[index]
            paused = self._paused[index]
            self.emitted += 1
        event = DomainEvent(
            backend=self._backend,
            event="suspended" if paused else "resumed",
            detail="paused" if paused else "unpaused",
            domain=self._refs[index],
            codes=Codes(event_id=0, event=3 if paused else 4, detail=0),
            origin="libvirt",
            received_at=time.time(),
            state=PAUSED if paused else RUNNING,
        )
        if on_handoff is not None:
            on_handoff(event)
        if self._emit is not None:
            self._emit(event)
        return event

    def capabilities(self) -> BackendCapabilities:
        events = {
            name: EventSupport("native", basis="synthetic") for name in ("suspended", "resumed")
        }
        events.update(
            {
                name: EventSupport("derived", basis="synthetic")
                for name in ("added", "removed", "snapshot")
            }
        )
        return BackendCapabilities(
            driver="synthetic",
            source=self._backend,
            uri=self.uri,
            hypervisor_type="synthetic",
            hypervisor_version=None,
            libvirt_version=None,
            events=events,
        )

    def list_domains(self) -> list[DomainFacts]:
        with self._lock:
            paused = list(self._paused)
        return [
            DomainFacts(ref.uuid, ref.name, ref.id, True, PAUSED if p else RUNNING)
            for ref, p in zip(self._refs, paused, strict=True)
        ]

    def lookup(self, uuid_: str) -> DomainFacts | Literal["gone"] | None:
        for facts in self.list_domains():
            if facts.uuid == uuid_:
                return facts
        return "gone"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
