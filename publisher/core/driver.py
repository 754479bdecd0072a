"""The seam between signal sources and the publisher core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from virtpub.core.capabilities import BackendCapabilities
from virtpub.core.event import BackendChange, ConfigRejected, DomainEvent, DomainFacts

Signal = DomainEvent | BackendChange | ConfigRejected
Emit = Callable[[Signal], None]
"""Hands a signal to the publisher. Never blocks and never raises: safe on any thread."""


class Driver(Protocol):
    """A signal source: opens its backend, reports what it can emit, and emits events."""

    @property
    def backend(self) -> str:
        """A stable identifier of the backend (its source URI), used in every event."""
        ...

    @property
    def uri(self) -> str:
        """Where the backend was opened, as configured (it may hold credentials: redact it
        before publishing); told in publisher.backend."""
        ...

    def start(self, emit: Emit) -> None:
        """Connect and subscribe; from then on events go to `emit`.

        Raises `DriverError` with a one-line reason when the backend cannot be used.
        """
        ...

    def capabilities(self) -> BackendCapabilities:
        """What this backend emits, as found when it started."""
        ...

    @property
    def polled(self) -> frozenset[str]:
        """Event types the backend cannot emit, which the daemon finds by polling instead."""
        ...

    @property
    def poll_interval(self) -> float: ...

    def list_domains(self) -> list[DomainFacts]:
        """Every domain now. Called on the daemon thread; raises DriverError while disconnected."""
        ...

    def lookup(self, uuid: str) -> DomainFacts | Literal["gone"] | None:
        """One domain now: its facts, "gone" if it does not exist, None if the backend can't say."""
        ...

    def stop(self) -> None:
        """Unsubscribe and close. Safe to call more than once."""
        ...


class DriverError(Exception):
    """A backend cannot be used; the message is one line meant for the operator."""
