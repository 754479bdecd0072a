"""Watched config directories beside libvirt: one `defined` per define, not two.

On a host where libvirtd writes the watched directory itself (QEMU's
/etc/libvirt/qemu), a define reaches virtpub twice: libvirt's own event and the
new file. With `watch_defines = "fallback"` the files speak only when no libvirt
backend of the host emits defined/undefined natively; otherwise their domain
events are counted as suppressed duplicates, and only rejected files are told.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from virtpub.core.capabilities import BackendCapabilities, EventSupport
from virtpub.core.driver import Driver, Emit, Signal
from virtpub.core.event import DomainEvent, DomainFacts

log = logging.getLogger(__name__)

CONFIG_EVENTS = ("defined", "undefined")


class FallbackWatch:
    """A filesystem driver that stands back where a libvirt backend has the events."""

    def __init__(self, watcher: Driver, others: Sequence[Driver], policy: str) -> None:
        self._watcher = watcher
        self._others = others
        self._policy = policy
        self._natives: list[str] = []
        self._emit: Emit | None = None
        self._lock = threading.Lock()
        self.suppressed = 0
        """Domain events from files dropped because a libvirt backend already sent them."""

    @property
    def backend(self) -> str:
        return self._watcher.backend

    @property
    def uri(self) -> str:
        """The backend's identifier, as the daemon has always told for watched files."""
        return self._watcher.backend

    @property
    def polled(self) -> frozenset[str]:
        return self._watcher.polled

    @property
    def poll_interval(self) -> float:
        return self._watcher.poll_interval

    @property
    def suppressing(self) -> bool:
        return bool(self._natives)

    def start(self, emit: Emit) -> None:
        """Decides once the other backends have started (they come first) and said what
        they emit."""
        if self._policy == "fallback":
            self._natives = [d.backend for d in self._others if _emits_config_events(d)]
        if self._natives:
            log.info(
                "watched config files: defined/undefined come from %s; file events are"
                " counted as duplicates (watch_defines = always publishes them too)",
                ", ".join(self._natives),
            )
        self._emit = emit
        self._watcher.start(self._forward)

    def _forward(self, signal: Signal) -> None:
        """On watchdog's threads: never blocks, never raises."""
        if self._natives and isinstance(signal, DomainEvent):
            with self._lock:
                self.suppressed += 1
            return
        if self._emit is not None:
            self._emit(signal)

    def capabilities(self) -> BackendCapabilities:
        capabilities = self._watcher.capabilities()
        if not self._natives:
            return capabilities
        reason = f"suppressed: {', '.join(self._natives)} emits it natively"
        events = {
            name: EventSupport("unsupported", reason, basis=support.basis)
            for name, support in capabilities.events.items()
        }
        return replace(capabilities, events=events)

    def list_domains(self) -> list[DomainFacts]:
        return [] if self._natives else self._watcher.list_domains()

    def lookup(self, uuid: str) -> DomainFacts | Literal["gone"] | None:
        return None if self._natives else self._watcher.lookup(uuid)

    def stop(self) -> None:
        self._watcher.stop()
        if self.suppressed:
            log.info("watched config files: %d duplicate event(s) suppressed", self.suppressed)


def _emits_config_events(driver: Driver) -> bool:
    try:
        events = driver.capabilities().events
    except RuntimeError:  # not started: it says nothing yet
        return False
    return all(name in events and events[name].status == "native" for name in CONFIG_EVENTS)
