"""Where each event type of a libvirt backend comes from: the capability map, then the probe.

libvirt accepts a registration for every event ID on every driver that has
events at all, so the probe alone says `native` for events a driver never
sends. The map (drivers/libvirt/capability_map.json, read from libvirt's driver
sources) says what each driver really emits; lifecycle types it lacks are
filled by polling where a listing can show them. A pure function, so every
driver row can be checked without that hypervisor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from virtpub.core.capabilities import EventSupport
from virtpub.drivers.libvirt.capability_map import DriverRow, format_libvirt_version

DERIVED = ("added", "removed", "snapshot")
POLLABLE = frozenset(
    {"defined", "undefined", "started", "stopped", "suspended", "resumed", "pmsuspended", "crashed"}
)
"""Lifecycle types a listing can reveal: each is a change of state or of persistence."""
GUEST_DETAILS = {"stopped": "shutdown"}
"""A detail only the guest causes: a driver that never sends it (bhyve, CH) misses a guest's
poweroff, so the type is polled as well, while the driver's own events still count."""


@dataclass(frozen=True, slots=True)
class Probe:
    """What registering for every event ID showed on this connection."""

    driver_type: str
    libvirt_version: int
    lifecycle_types: tuple[str, ...]
    event_ids: tuple[str, ...]
    """The other event types this libvirt build knows, in virtpub's names."""
    accepted: frozenset[str]
    """Event types whose registration succeeded, `lifecycle` included if it did."""
    refused: Mapping[str, str]
    """Event type (or `lifecycle`) to libvirt's reason for refusing it."""


@dataclass(frozen=True, slots=True)
class Plan:
    events: Mapping[str, EventSupport]
    polled: frozenset[str]
    """Lifecycle types the daemon finds by listing the backend."""
    superseded: frozenset[str]
    """Polled types the backend never emits at all: any event of one it sends anyway is
    dropped, as polling publishes that change already."""
    basis: str


def plan(probe: Probe, row: DriverRow | None, poll_interval: float) -> Plan:
    basis = f"map:{format_libvirt_version(probe.libvirt_version)}" if row else "probe"
    lacking = f"libvirt's {probe.driver_type} driver does not emit it"
    events: dict[str, EventSupport] = {
        name: EventSupport("derived", basis=basis) for name in DERIVED
    }
    lifecycle_ok = "lifecycle" in probe.accepted and (row is None or row.registration)
    polled: set[str] = set()
    for name in probe.lifecycle_types:
        if lifecycle_ok and (row is None or name in row.lifecycle):
            details = tuple(sorted(row.lifecycle[name])) if row else None
            guest_detail = GUEST_DETAILS.get(name)
            if details is None or guest_detail is None or guest_detail in details:
                events[name] = EventSupport("native", basis=basis, details=details)
            else:
                polled.add(name)
                partial = (
                    f"libvirt's {probe.driver_type} driver sends {name} only as"
                    f" {', '.join(details)}: a {guest_detail} by the guest is found by polling"
                )
                events[name] = EventSupport(
                    "polled", partial, poll_interval, basis=basis, details=details
                )
            continue
        reason = probe.refused.get("lifecycle") or lacking
        if name in POLLABLE:
            polled.add(name)
            events[name] = EventSupport("polled", reason, poll_interval, basis=basis)
        else:
            events[name] = EventSupport(
                "unsupported", f"{reason}, and a listing cannot show it", basis=basis
            )
    for name in probe.event_ids:
        if name in probe.accepted and (row is None or name in row.event_ids):
            events[name] = EventSupport("native", basis=basis)
        else:
            events[name] = EventSupport(
                "unsupported", probe.refused.get(name) or lacking, basis=basis
            )
    native_too = {name for name in polled if events[name].details}
    return Plan(events, frozenset(polled), frozenset(polled - native_too), basis)
