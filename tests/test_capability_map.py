"""Tests for drivers/libvirt/capability_map.py and the map it ships.

Names in the map are checked against the installed libvirt binding through
drivers/libvirt/events.py's Catalog, so a typo or an invented detail fails here
rather than silently never matching an event. Only the test driver is opened.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import libvirt
import pytest

from virtpub.drivers.libvirt import capability_map as cm
from virtpub.drivers.libvirt.events import FIELDS, LIFECYCLE_ID, Catalog, Enum, event_type_of

CATALOG = Catalog(vars(libvirt))

# Every event type the binding names, plus those libvirt_events.py already knows the
# arguments of (IDs newer than the binding, such as NIC_MAC_CHANGE from libvirt 11.2).
KNOWN_EVENT_IDS = {s.event_type for s in CATALOG.ids if s.constant != LIFECYCLE_ID} | {
    event_type_of(constant) for constant in FIELDS
}

# libvirt 9.0's header: event ID codes 0..26, and the number of details of each
# lifecycle type (VIR_DOMAIN_EVENT_<TYPE>_LAST). Codes are stable, so a newer binding
# only adds names above these bounds.
LIBVIRT_9_0_LAST_EVENT_ID = 26
LIBVIRT_9_0_DETAILS = {
    "defined": 4,
    "undefined": 2,
    "started": 5,
    "suspended": 9,
    "resumed": 5,
    "stopped": 7,
    "shutdown": 3,
    "pmsuspended": 2,
    "crashed": 2,
}

# Details libvirt added after 9.0, with their codes in libvirt 12.8.0's libvirt-domain.h: a
# 9.0 binding has no name for them, yet the map must be able to say a driver sends them.
NEWER_DETAILS = {
    "started": {"recreated": 5},  # Since: 11.6.0
    "stopped": {"recreated": 7},  # Since: 11.6.0
    "suspended": {"guest_shutdown": 9},  # Since: 11.10.0
}

# Drivers Debian does not build: no 12.x binaries, and no 12.x source tree could be read.
NOT_PAST_11_3 = {"BHYVE", "CH", "vz", "Parallels"}

ALL_DRIVERS = (
    "QEMU",
    "LXC",
    "Xen",
    "TEST",
    "CH",
    "BHYVE",
    "vz",
    "Parallels",
    "ESX",
    "Hyper-V",
    "VBOX",
    "OpenVZ",
    "VMware",
)


def details_of(kind: str) -> set[str]:
    """The binding's detail names of one lifecycle type, as virtpub publishes them."""
    enum = Enum(f"VIR_DOMAIN_EVENT_{kind.upper()}_")
    named = {
        CATALOG.name(enum, code)
        for code in range(64)
        if not CATALOG.name(enum, code).startswith("unknown_")
    }
    return named | set(NEWER_DETAILS.get(kind, {}))


def raw_map() -> dict[str, Any]:
    text = cm.map_text()
    data: dict[str, Any] = json.loads(text)
    return data


def all_rows() -> list[cm.DriverRow]:
    return [row for rows in cm.load().values() for row in rows]


def test_json_is_deterministic_and_documented() -> None:
    text = cm.map_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert {"format", "naming", "sources", "regenerate"} <= set(data["_about"])
    assert data["_not_covered"], "what lies outside the rows must be said, not left out"


def test_map_loads_with_every_expected_driver() -> None:
    assert set(cm.load()) == set(ALL_DRIVERS)


@pytest.mark.parametrize("row", all_rows(), ids=lambda r: f"{r.driver}-{r.range_text}")
def test_every_name_is_a_libvirt_name(row: cm.DriverRow) -> None:
    assert row.event_ids <= KNOWN_EVENT_IDS, row.event_ids - KNOWN_EVENT_IDS
    assert set(row.lifecycle) <= set(CATALOG.lifecycle_types)
    for kind, details in row.lifecycle.items():
        assert details <= details_of(kind), (kind, details - details_of(kind))
    assert "lifecycle" not in row.event_ids
    assert row.read_from.startswith("v")


def test_qemu_on_9_0_emits_everything_libvirt_9_0_has() -> None:
    row = cm.lookup("QEMU", 9_000_000)
    assert row is not None
    ids_9_0 = {
        s.event_type
        for s in CATALOG.ids
        if s.constant != LIFECYCLE_ID and s.code <= LIBVIRT_9_0_LAST_EVENT_ID
    }
    assert len(ids_9_0) == 24  # 26 IDs, BLOCK_JOB_2 and IO_ERROR_REASON folded
    assert row.event_ids == ids_9_0
    assert set(row.lifecycle) == set(LIBVIRT_9_0_DETAILS)
    for kind, count in LIBVIRT_9_0_DETAILS.items():
        enum = Enum(f"VIR_DOMAIN_EVENT_{kind.upper()}_")
        expected = {CATALOG.name(enum, code) for code in range(count)}
        assert not any(name.startswith("unknown_") for name in expected), kind
        assert row.lifecycle[kind] == expected, kind


def test_qemu_gains_nic_mac_change_at_11_2() -> None:
    before, after = cm.lookup("QEMU", 11_001_000), cm.lookup("QEMU", 11_002_000)
    assert before is not None and after is not None
    assert after.event_ids - before.event_ids == {"nic_mac_change"}


def test_xen_has_no_crash_shutdown_or_reboot() -> None:
    rows = cm.load()["Xen"]
    for row in rows:
        assert not {"crashed", "shutdown"} & set(row.lifecycle)
        assert "reboot" not in row.event_ids
        assert "crashed" in row.lifecycle["stopped"]  # a Xen crash is a stop
        assert row.lifecycle["pmsuspended"] == {"memory"}
    assert "migrated" in rows[0].lifecycle["suspended"]
    assert "migrated" not in rows[-1].lifecycle["suspended"]


def test_summary_facts_hold() -> None:
    def row(driver: str) -> cm.DriverRow:
        found = cm.lookup(driver, 11_003_000)
        assert found is not None, driver
        return found

    assert row("LXC").event_ids == {"reboot", "metadata_change"}
    assert row("TEST").event_ids == {"metadata_change", "device_added", "device_removed"}
    assert set(row("CH").lifecycle) == {"defined", "undefined", "started", "stopped"}
    assert row("BHYVE").lifecycle["stopped"] == {"destroyed"}
    assert "resumed" not in row("vz").lifecycle
    for driver in ("ESX", "Hyper-V", "VBOX", "OpenVZ", "VMware"):
        assert not row(driver).registration
        assert not row(driver).event_types


@pytest.mark.parametrize(
    ("driver", "version", "since"),
    [
        ("TEST", 9_000_000, (9, 0, 0)),
        ("TEST", 9_010_000, (9, 0, 0)),
        ("TEST", 9_999_999, (9, 0, 0)),
        ("TEST", 10_000_000, (10, 0, 0)),
        ("CH", 10_009_999, (9, 0, 0)),
        ("CH", 10_010_000, (10, 10, 0)),
        ("QEMU", 11_001_999, (9, 0, 0)),
        ("QEMU", 11_002_000, (11, 2, 0)),
        ("QEMU", 11_003_005, (11, 2, 0)),
        ("Xen", 11_002_999, (9, 0, 0)),
        ("Xen", 11_003_000, (11, 3, 0)),
    ],
)
def test_lookup_picks_the_row_at_boundaries(
    driver: str, version: int, since: tuple[int, int, int]
) -> None:
    row = cm.lookup(driver, version)
    assert row is not None
    assert row.driver == driver
    assert row.since == since


def test_registration_switches_on_for_ch_at_10_10() -> None:
    old, new = cm.lookup("CH", 10_009_000), cm.lookup("CH", 10_010_000)
    assert old is not None and new is not None
    assert not old.registration and not old.event_types
    assert new.registration and "started" in new.lifecycle


@pytest.mark.parametrize("driver", ["XEN", "qemu", "Test", "bogus", ""])
def test_unknown_driver_type_is_none(driver: str) -> None:
    assert cm.lookup(driver, 9_000_000) is None


@pytest.mark.parametrize(
    ("driver", "version"),
    [("QEMU", 8_010_000), ("QEMU", 8_999_999), ("QEMU", 12_009_000), ("CH", 11_004_000)],
)
def test_version_outside_coverage_is_none(driver: str, version: int) -> None:
    assert cm.lookup(driver, version) is None


def test_the_map_covers_the_newest_release_for_every_driver_debian_builds() -> None:
    newest = raw_map()["_about"]["newest_release"]
    number = cm.libvirt_version_number(newest)
    assert number >= 12_008_000  # libvirt-python 12.8.0 is on PyPI: nothing older is newest
    for driver in set(ALL_DRIVERS) - NOT_PAST_11_3:
        row = cm.lookup(driver, number)
        assert row is not None, f"{driver} has no row for libvirt {newest}"
        # Open-ended rows would claim releases nobody read.
        major, minor, _ = cm.parse_libvirt_version(number)
        assert row.until == (major, minor + 1, 0), row.range_text
    for driver in NOT_PAST_11_3:
        assert cm.lookup(driver, number) is None
        assert driver in raw_map()["_not_covered"][1]["drivers"]


def test_qemu_gains_each_addition_at_its_release() -> None:
    def row(version: int) -> cm.DriverRow:
        found = cm.lookup("QEMU", version)
        assert found is not None, version
        return found

    def details(found: cm.DriverRow) -> set[tuple[str, str]]:
        return {(kind, d) for kind, names in found.lifecycle.items() for d in names}

    assert row(11_005_000) == row(11_003_000)
    assert details(row(11_006_000)) - details(row(11_005_000)) == {
        ("started", "recreated"),
        ("stopped", "recreated"),
    }
    assert details(row(11_010_000)) - details(row(11_009_000)) == {("suspended", "guest_shutdown")}
    assert row(12_004_000).event_ids - row(12_003_000).event_ids == {
        "vcpu_removed",
        "channel_lifecycle",
    }
    assert row(12_008_000).read_from.startswith("v12.8.0")


def test_esx_rows_tell_consumers_about_the_12_4_uuid_change() -> None:
    before, after = cm.lookup("ESX", 12_003_000), cm.lookup("ESX", 12_004_000)
    assert before is not None and after is not None
    assert not before.registration and not after.registration
    assert "legacy_uuid" not in before.notes
    assert "legacy_uuid=1" in after.notes
    assert "removed" in after.notes and "added" in after.notes


def test_version_numbers_round_trip() -> None:
    assert cm.parse_libvirt_version(11_010_002) == (11, 10, 2)
    assert cm.format_libvirt_version(9_000_000) == "9.0.0"
    assert cm.format_libvirt_version((12, 5, 0)) == "12.5.0"
    assert cm.libvirt_version_number("10.10.0") == 10_010_000
    for number in (0, 9_000_000, 11_003_000, 999_999_999):
        assert cm.libvirt_version_number(cm.format_libvirt_version(number)) == number
    for bad in (-1, True):
        with pytest.raises(ValueError, match="not a libvirt version"):
            cm.parse_libvirt_version(bad)


def test_markdown_table_lists_every_driver_and_event_type() -> None:
    table = cm.markdown_table()
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["Driver", "libvirt", "Source read", "Registration"]
    assert set(header[4:]) >= set(CATALOG.lifecycle_types) | {"reboot", "nic_mac_change"}
    body = [line for line in lines[2:] if line.startswith("|")]
    assert len(body) == len(all_rows())
    drivers = {line.strip("|").split("|")[0].strip() for line in body}
    assert drivers == set(ALL_DRIVERS)
    for line in body:
        assert len(line.strip("|").split("|")) == len(header)
    qemu_9 = next(line for line in body if "QEMU" in line and "v9.0.0" in line)
    cells = dict(zip(header, (c.strip() for c in qemu_9.strip("|").split("|")), strict=True))
    never = {name for name in header[4:] if cells[name] == cm.NO}
    # QEMU 9.0 sends every event type 9.0 has
    assert never == {"nic_mac_change", "vcpu_removed", "channel_lifecycle"}
    esx = next(line for line in body if line.startswith("| ESX "))
    assert cm.YES not in esx


def test_module_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cm.main(["--markdown"]) == 0
    assert capsys.readouterr().out == cm.markdown_table()


def test_test_driver_connection_resolves_to_a_row() -> None:
    conn = libvirt.open("test:///default")
    try:
        driver_type, lib_version = conn.getType(), conn.getLibVersion()
    finally:
        conn.close()
    row = cm.lookup(driver_type, lib_version)
    assert row is not None, (driver_type, cm.format_libvirt_version(lib_version))
    assert row.driver == "TEST"
    assert row.registration and "metadata_change" in row.event_ids


def _broken(mutate: Any) -> dict[str, Any]:
    data = copy.deepcopy(raw_map())
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["QEMU"][0].pop("read_from"), r"QEMU\[0\]: wrong keys \(missing: read_from"),
        (lambda d: d["QEMU"][0].update(until="11.2"), r"QEMU\[0\]\.until: expected a version"),
        (lambda d: d["QEMU"][1].update(since="11.1.0"), r"QEMU\[1\]: starts at 11\.1\.0, inside"),
        (lambda d: d["LXC"][0].update(until="9.0.0"), r"LXC\[0\]: until 9\.0\.0 is not after"),
        (lambda d: d["LXC"][0]["event_ids"].append("Reboot"), r"LXC\[0\]\.event_ids: 'Reboot'"),
        (lambda d: d["LXC"][0]["lifecycle"].update(crashed=[]), r"lifecycle\.crashed: a type sent"),
        (lambda d: d["ESX"][0].update(event_ids=["reboot"]), r"ESX\[0\]: a driver that refuses"),
        (lambda d: d["BHYVE"][0].update(registration="yes"), r"BHYVE\[0\]\.registration"),
        (lambda d: d.update(CH=[]), r"CH: expected a non-empty list"),
    ],
)
def test_malformed_map_is_rejected_with_a_clear_error(mutate: Any, message: str) -> None:
    with pytest.raises(cm.CapabilityMapError, match=message):
        cm.parse_map(_broken(mutate))


def test_metadata_keys_are_ignored_and_rows_are_immutable() -> None:
    parsed = cm.parse_map(raw_map())
    assert not any(key.startswith("_") for key in parsed)
    row = parsed["LXC"][0]
    with pytest.raises(TypeError):
        row.lifecycle["crashed"] = frozenset({"panicked"})  # type: ignore[index]
    assert hash(row) == hash(parsed["LXC"][0])
