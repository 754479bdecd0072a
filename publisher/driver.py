"""The seam between signal sources and the publisher core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from publisher.capabilities import BackendCapabilities
from publisher.event import DomainEvent

Emit = Callable[[DomainEvent], None]
"""Hands an event to the publisher. Never blocks and never raises: safe on any thread."""


class Driver(Protocol):
    """A signal source: opens its backend, reports what it can emit, and emits events."""

    @property
    def backend(self) -> str:
        """A stable identifier of the backend (its source URI), used in every event."""
        ...

    def start(self, emit: Emit) -> None:
        """Connect and subscribe; from then on events go to `emit`.

        Raises `DriverError` with a one-line reason when the backend cannot be used.
        """
        ...

    def capabilities(self) -> BackendCapabilities:
        """What this backend emits, as found when it started."""
        ...

    def stop(self) -> None:
        """Unsubscribe and close. Safe to call more than once."""
        ...


class DriverError(Exception):
    """A backend cannot be used; the message is one line meant for the operator."""
