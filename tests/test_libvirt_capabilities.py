"""Where each event type comes from, for every driver of the map, without that hypervisor."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from virtpub.drivers.libvirt import capability_map
from virtpub.drivers.libvirt.capabilities import DERIVED, POLLABLE, Probe, plan
from virtpub.drivers.libvirt.events import LIFECYCLE_ID, Catalog

CATALOG = Catalog(vars(libvirt))
LIFECYCLE = CATALOG.lifecycle_types
EVENT_IDS = tuple(dict.fromkeys(s.event_type for s in CATALOG.ids if s.constant != LIFECYCLE_ID))
V9 = 9_000_000


def probe(driver_type: str, *, refused: dict[str, str] | None = None) -> Probe:
    """What libvirt's registration shows: everything accepted unless refused."""
    refused = refused or {}
    everything = {"lifecycle", *EVENT_IDS}
    return Probe(driver_type, V9, LIFECYCLE, EVENT_IDS, frozenset(everything - set(refused)),
                 refused)  # fmt: skip


def statuses(driver_type: str, row: capability_map.DriverRow | None) -> dict[str, set[str]]:
    decided = plan(probe(driver_type), row, 5.0)
    result: dict[str, set[str]] = {}
    for name, support in decided.events.items():
        result.setdefault(support.status, set()).add(name)
    return result


def test_an_unknown_driver_falls_back_to_the_probe_and_says_so() -> None:
    decided = plan(probe("FANCY", refused={"graphics": "not supported"}), None, 5.0)
    assert decided.basis == "probe"
    assert {s.basis for s in decided.events.values()} == {"probe"}
    assert decided.polled == frozenset()
    assert decided.events["graphics"].status == "unsupported"
    assert decided.events["graphics"].reason == "not supported"
    assert all(decided.events[name].status == "native" for name in LIFECYCLE)


def test_a_refused_lifecycle_registration_polls_every_lifecycle_state() -> None:
    decided = plan(probe("FANCY", refused={"lifecycle": "no events here"}), None, 5.0)
    assert decided.polled == POLLABLE & set(LIFECYCLE)
    assert decided.superseded == decided.polled
    assert decided.events["stopped"].reason == "no events here"
    assert decided.events["stopped"].interval_s == 5.0
    assert decided.events["shutdown"].status == "unsupported"


def test_bhyve_polls_the_guest_poweroff_it_never_reports() -> None:
    row = capability_map.lookup("BHYVE", V9)
    assert row is not None
    decided = plan(probe("BHYVE"), row, 5.0)
    stopped = decided.events["stopped"]
    assert (stopped.status, stopped.details) == ("polled", ("destroyed",))
    assert "stopped" in decided.polled
    assert "stopped" not in decided.superseded, "its own stopped/destroyed still counts"
    assert {"suspended", "resumed"} <= decided.superseded
    assert decided.events["started"].status == "native"
    assert decided.events["reboot"].status == "unsupported"
    assert decided.basis == "map:9.0.0"


def test_xen_has_no_crashed_shutdown_or_reboot_events() -> None:
    row = capability_map.lookup("Xen", V9)
    found = statuses("Xen", row)
    assert "crashed" in found["polled"]
    assert {"shutdown", "reboot"} <= found["unsupported"]
    assert {"pmsuspended", "metadata_change"} <= found["native"]


def test_drivers_without_event_registration_run_wholly_on_polling() -> None:
    row = capability_map.lookup("ESX", V9)
    assert row is not None and not row.registration
    decided = plan(probe("ESX", refused={"lifecycle": "no support"}), row, 5.0)
    assert decided.polled == POLLABLE & set(LIFECYCLE)
    assert {s.status for n, s in decided.events.items() if n in EVENT_IDS} == {"unsupported"}


@pytest.mark.parametrize("driver_type", sorted(capability_map.load()))
def test_every_event_type_of_every_driver_has_exactly_one_source(driver_type: str) -> None:
    for row in capability_map.load()[driver_type]:
        decided = plan(probe(driver_type), row, 5.0)
        assert set(decided.events) == {*DERIVED, *LIFECYCLE, *EVENT_IDS}
        native = {n for n, s in decided.events.items() if s.status == "native"}
        assert native <= row.event_types
        for name in set(LIFECYCLE) - set(row.lifecycle):
            expected = "polled" if name in POLLABLE else "unsupported"
            assert decided.events[name].status == expected, (driver_type, name)


def test_the_readme_table_is_the_map() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- capability-map:begin -->\n", "\n<!-- capability-map:end -->"
    table = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert table == capability_map.markdown_table().rstrip("\n"), (
        "regenerate the README table: python -m virtpub.drivers.libvirt.capability_map --markdown"
    )
