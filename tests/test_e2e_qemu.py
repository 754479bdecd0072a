"""End to end against a real libvirtd with the QEMU driver and a tiny diskless TCG guest.

`bash .ci/run` installs and starts libvirtd (deploy/setup-host.sh). The guest has
64 MiB, no disk and boots from the network, so it starts in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import (
    HOST_ID,
    QEMU_URI,
    Consumer,
    Received,
    RunningPublisher,
    assert_valid,
    guest_xml,
)


def events_of(messages: list[Received], dom_uuid: str) -> list[str]:
    return [m.routing_key for m in messages if m.body.get("subject") == dom_uuid]


def test_guest_lifecycle_from_a_real_libvirtd(
    qemu: Any,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    everything = consumer_factory("#")
    domains = consumer_factory("v1.*.domain.#")
    publisher_factory(QEMU_URI)
    xml, dom_uuid = guest_xml()
    dom = qemu.defineXML(xml)
    dom.create()
    dom.suspend()
    dom.resume()
    dom.destroy()
    dom.undefine()

    prefix = f"v1.{HOST_ID}.domain"
    # libvirtd with QEMU resumes the vCPUs before it reports the boot, and reports a
    # destroy as a host-initiated shutdown followed by the stop.
    expected = [
        f"{prefix}.added.defined",
        f"{prefix}.defined.added",
        f"{prefix}.resumed.unpaused",
        f"{prefix}.started.booted",
        f"{prefix}.suspended.paused",
        f"{prefix}.resumed.unpaused",
        f"{prefix}.shutdown.host",
        f"{prefix}.stopped.destroyed",
        f"{prefix}.undefined.removed",
        f"{prefix}.removed.undefined",
    ]
    received = domains.collect(lambda m: len(events_of(m, dom_uuid)) >= len(expected))
    assert events_of(received, dom_uuid) == expected
    for message in received:
        assert_valid(message)
    running = [m for m in received if m.routing_key.endswith("started.booted")]
    assert running[0].body["data"]["domain"]["id"] > 0

    first = everything.collect(lambda m: len(m) >= 1)[0]
    assert first.routing_key == f"v1.{HOST_ID}.publisher.capabilities"
    assert_valid(first)
    (backend,) = first.body["data"]["backends"]
    assert backend["hypervisor"]["type"] == "QEMU"
    assert backend["uri"] == QEMU_URI
    assert backend["events"]["stopped"]["status"] == "native"


def test_transient_guest_from_a_real_libvirtd(
    qemu: Any,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    domains = consumer_factory("v1.*.domain.#")
    publisher_factory(QEMU_URI)
    xml, dom_uuid = guest_xml()
    qemu.createXML(xml, 0).destroy()

    prefix = f"v1.{HOST_ID}.domain"
    expected = [
        f"{prefix}.added.started",
        f"{prefix}.resumed.unpaused",
        f"{prefix}.started.booted",
        f"{prefix}.shutdown.host",
        f"{prefix}.stopped.destroyed",
        f"{prefix}.removed.stopped",
    ]
    received = domains.collect(lambda m: len(events_of(m, dom_uuid)) >= len(expected))
    assert events_of(received, dom_uuid) == expected
