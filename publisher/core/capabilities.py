"""What each backend of this host can emit, announced before any domain event.

libvirt has no capability query (the 2008 RFC asked for one); a consumer reads
this message to decide whether it can rely on events or must poll.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from virtpub.core.event import JSONValue

Support = Literal["native", "derived", "polled", "filesystem", "unsupported"]


@dataclass(frozen=True, slots=True)
class EventSupport:
    status: Support
    reason: str | None = None
    """Why an event is not native, e.g. the error libvirt gave when registration failed."""
    interval_s: float | None = None
    """For polled events: seconds between two listings."""
    basis: str = "probe"
    """What the status rests on: `map:<libvirt version>`, `probe`, `inotify`, `synthetic`."""
    details: tuple[str, ...] | None = None
    """For native lifecycle types known from the capability map: the details sent with it."""


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    driver: str
    source: str
    uri: str
    hypervisor_type: str | None
    hypervisor_version: str | None
    libvirt_version: str | None
    events: Mapping[str, EventSupport]

    def to_json(self) -> dict[str, JSONValue]:
        events: dict[str, JSONValue] = {}
        for name in sorted(self.events):
            support = self.events[name]
            entry: dict[str, JSONValue] = {"status": support.status, "basis": support.basis}
            if support.details is not None:
                entry["details"] = list(support.details)
            if support.reason is not None:
                entry["reason"] = support.reason
            if support.interval_s is not None:
                entry["interval_s"] = support.interval_s
            events[name] = entry
        return {
            "driver": self.driver,
            "source": self.source,
            "uri": self.uri,
            "hypervisor": {"type": self.hypervisor_type, "version": self.hypervisor_version},
            "libvirt_version": self.libvirt_version,
            "events": events,
        }
