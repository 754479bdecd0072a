"""The libvirt driver on `test:///default`, in process and without a broker.

These are what the Debian 13 Python leg checks on a newer libvirt than the host's: the
capabilities virtpub computes for the installed libvirt equal that version's row of the
capability map, and an event ID the binding cannot deliver safely is reported, not
subscribed.
"""

from __future__ import annotations

from collections.abc import Iterator

import libvirt
import pytest

from tests.conftest import expected_libvirt_release
from virtpub.core.capabilities import BackendCapabilities
from virtpub.drivers.libvirt import capability_map
from virtpub.drivers.libvirt.domain import LibvirtDomainDriver, binding_version
from virtpub.drivers.libvirt.events import BINDING_DEFECTS, Catalog


def started(catalog: Catalog | None = None) -> Iterator[LibvirtDomainDriver]:
    driver = LibvirtDomainDriver("test:///default", "hv01", catalog=catalog, poll_interval=5.0)
    driver.start(lambda _change: None)
    try:
        yield driver
    finally:
        driver.stop()


@pytest.fixture
def capabilities() -> Iterator[BackendCapabilities]:
    for driver in started():
        yield driver.capabilities()


def test_the_installed_libvirt_has_a_row_and_its_capabilities_are_that_row(
    capabilities: BackendCapabilities,
) -> None:
    """On every libvirt the project runs on (9.0 here, 11.3 in Debian 13) the map decides."""
    conn = libvirt.open("test:///default")
    try:
        version = conn.getLibVersion()
    finally:
        conn.close()
    text = capability_map.format_libvirt_version(version)
    row = capability_map.lookup("TEST", version)
    assert row is not None, f"the map has no TEST row for libvirt {text}"
    assert capabilities.libvirt_version == text
    events = capabilities.events
    native = {name for name, support in events.items() if support.status == "native"}
    assert native == row.event_types
    assert {support.basis for support in events.values()} == {f"map:{text}"}
    for kind, details in row.lifecycle.items():
        assert events[kind].details == tuple(sorted(details)), kind
    never = set(events) - native - {"added", "removed", "snapshot"}
    assert {"reboot", "graphics", "block_job"} <= never
    assert all(events[name].status in ("polled", "unsupported") for name in never)


def test_a_withheld_event_id_is_unsupported_with_the_binding_defect_as_reason() -> None:
    """The channel lifecycle ID of a 12.8 binding is never registered, and says why."""
    constants = {
        **vars(libvirt),
        "VIR_DOMAIN_EVENT_ID_VCPU_REMOVED": 28,
        "VIR_DOMAIN_EVENT_ID_CHANNEL_LIFECYCLE": 29,
    }
    for driver in started(Catalog(constants, (12, 8, 0))):
        support = driver.capabilities().events["channel_lifecycle"]
        assert support.status == "unsupported"
        assert support.reason == BINDING_DEFECTS["CHANNEL_LIFECYCLE"].why
        # An ID the binding delivers is still tried; this libvirt refuses what it lacks.
        vcpu = driver.capabilities().events["vcpu_removed"]
        assert vcpu.status == "unsupported"
        assert vcpu.reason != support.reason


def test_the_leg_runs_on_the_libvirt_it_was_made_for() -> None:
    """A Debian 13 leg sets the release it expects, so a host libvirt can't pass for it;
    elsewhere it is Debian 12's."""
    expected = expected_libvirt_release()
    running = capability_map.format_libvirt_version(libvirt.getVersion())
    assert running.startswith(f"{expected}."), running
    row = capability_map.lookup("TEST", libvirt.getVersion())
    assert row is not None
    assert f"v{expected}." in row.read_from, "this release's row was read for this release"


def test_the_binding_version_comes_from_its_package_metadata() -> None:
    version = binding_version()
    assert version is not None, "libvirt-python is installed, so its metadata names it"
    assert version >= (9, 0, 0)
