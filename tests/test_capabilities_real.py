"""Capabilities of real libvirt drivers: what the map says each one emits, as announced.

`qemu:///system` and `lxc:///` are served by the libvirtd that `.ci/run` starts (Debian
12's on the host leg, Debian 13's in the debian13-libvirtd leg); `test:///default` is
in-process. Each must announce exactly its map row, for the release the leg is on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt
import pytest

from tests.conftest import (
    QEMU_URI,
    Consumer,
    RunningPublisher,
    assert_valid,
    expected_libvirt_release,
)
from virtpub.drivers.libvirt import capability_map
from virtpub.drivers.libvirt.capabilities import DERIVED, POLLABLE
from virtpub.drivers.libvirt.events import Catalog


@pytest.mark.parametrize("uri", [QEMU_URI, "lxc:///", "test:///default"])
def test_a_real_driver_announces_its_row_of_the_map(
    uri: str,
    qemu: Any,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("v1.*.publisher.capabilities")
    publisher = publisher_factory(uri)
    (message,) = consumer.collect(lambda m: len(m) >= 1)
    assert_valid(message)
    (backend,) = message.body["data"]["backends"]
    if uri == "test:///default":
        driver_type, version = publisher.conn.getType(), publisher.conn.getLibVersion()
    else:
        conn = libvirt.open(uri)
        try:
            driver_type, version = conn.getType(), conn.getLibVersion()
        finally:
            conn.close()
    release = capability_map.format_libvirt_version(version)
    assert release.startswith(f"{expected_libvirt_release()}."), f"{uri} is on libvirt {release}"
    row = capability_map.lookup(driver_type, version)
    assert row is not None, f"{driver_type} {version} must be covered by the map"
    assert backend["hypervisor"]["type"] == driver_type
    events = backend["events"]
    native = {name for name, entry in events.items() if entry["status"] == "native"}
    polled = {name for name, entry in events.items() if entry["status"] == "polled"}
    assert native == row.event_types
    lifecycle = set(Catalog(vars(libvirt)).lifecycle_types)
    assert polled == (lifecycle - set(row.lifecycle)) & POLLABLE
    assert {n for n, e in events.items() if e["status"] == "derived"} == set(DERIVED)
    basis = f"map:{capability_map.format_libvirt_version(version)}"
    assert {entry["basis"] for entry in events.values()} == {basis}
    if driver_type == "QEMU":
        assert not polled, "QEMU emits every lifecycle type"
    if driver_type == "LXC":
        assert {"reboot", "metadata_change"} <= native
        assert "block_job" not in native and "crashed" in polled
