"""End to end against a real libvirtd with the QEMU driver and a tiny diskless TCG guest.

`bash .ci/run` installs and starts libvirtd (deploy/setup-host.sh). The guest has
64 MiB, no disk and boots from the network, so it starts in well under a second.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from tests.conftest import HOST_ID, Consumer, Received, RunningPublisher, assert_valid

QEMU_URI = "qemu:///system"
GUEST_XML = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


@pytest.fixture
def qemu() -> Iterator[Any]:
    """A connection for the test's own actions; guests it leaves behind are removed."""
    try:
        conn = libvirt.open(QEMU_URI)
    except libvirt.libvirtError as err:
        pytest.fail(f"no libvirtd at {QEMU_URI} ({err}); run `bash .ci/run`")
    yield conn
    for dom in conn.listAllDomains():
        if dom.name().startswith("virtpub-e2e-"):
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
    conn.close()


def guest_xml() -> tuple[str, str]:
    dom_uuid = str(uuid.uuid4())
    return GUEST_XML.format(name=f"virtpub-e2e-{dom_uuid[:8]}", uuid=dom_uuid), dom_uuid


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
        f"{prefix}.defined.added",
        f"{prefix}.resumed.unpaused",
        f"{prefix}.started.booted",
        f"{prefix}.suspended.paused",
        f"{prefix}.resumed.unpaused",
        f"{prefix}.shutdown.host",
        f"{prefix}.stopped.destroyed",
        f"{prefix}.undefined.removed",
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
        f"{prefix}.resumed.unpaused",
        f"{prefix}.started.booted",
        f"{prefix}.shutdown.host",
        f"{prefix}.stopped.destroyed",
    ]
    received = domains.collect(lambda m: len(events_of(m, dom_uuid)) >= len(expected))
    assert events_of(received, dom_uuid) == expected
