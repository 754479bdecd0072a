"""What each libvirt driver really emits, per libvirt version, read from libvirt's own sources.

virConnectDomainEventRegisterAny accepts every event ID on any driver that has events at all, so
the registration probe says an LXC host "supports" graphics or watchdog events it can never send.
`capability_map.json`, next to this module, records what each driver's source actually
constructs. A driver or a version the map does not cover gives None: the caller keeps the probe's
answer rather than trusting a guess. The JSON's `_about` says how the map was built and checked.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType

DATA_FILE = "capability_map.json"

Version = tuple[int, int, int]

# Display order of lifecycle types in the table (libvirt's code order); any other is appended.
LIFECYCLE_ORDER = (
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
)

# Table marks, as escapes: the en dash reads as "never", not as a hyphen typed by mistake.
YES = "\u2713"
NO = "\u2013"

_VERSION_TEXT = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_ROW_KEYS = frozenset(
    {"since", "until", "read_from", "registration", "event_ids", "lifecycle", "notes"}
)


class CapabilityMapError(ValueError):
    """The map does not have the documented shape; the message names the offending entry."""


def parse_libvirt_version(number: int) -> Version:
    """Splits libvirt's packed version integer: major * 1,000,000 + minor * 1,000 + release."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"not a libvirt version number: {number!r}")
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def format_libvirt_version(version: int | Version) -> str:
    """`9000000` or `(9, 0, 0)` -> `"9.0.0"`, the form the JSON and the table use."""
    major, minor, release = parse_libvirt_version(version) if isinstance(version, int) else version
    return f"{major}.{minor}.{release}"


def libvirt_version_number(text: str) -> int:
    """`"9.0.0"` -> `9000000`, so a version read from the map compares with getLibVersion()."""
    major, minor, release = _parse_version_text(text, "version")
    return major * 1_000_000 + minor * 1000 + release


@dataclass(frozen=True, slots=True)
class DriverRow:
    """What one driver emits over one range of libvirt versions (`since` <= v < `until`)."""

    driver: str
    """The driver type exactly as virConnectGetType() returns it, e.g. `QEMU`, `Xen`, `TEST`."""
    since: Version
    until: Version | None
    """Exclusive; None when the row is open-ended."""
    read_from: str
    """The libvirt release(s) whose source was read; the rest of the range is inferred."""
    registration: bool
    """False when the driver refuses event registration altogether (VIR_ERR_NO_SUPPORT)."""
    event_ids: frozenset[str]
    """Non-lifecycle event types, in virtpub's names (`reboot`, `block_job`, ...)."""
    lifecycle: Mapping[str, frozenset[str]] = field(hash=False)
    """Lifecycle type -> the details the driver sends with it; an absent type is never sent."""
    notes: str = ""

    def covers(self, version: Version) -> bool:
        return self.since <= version and (self.until is None or version < self.until)

    @property
    def event_types(self) -> frozenset[str]:
        """Every event type the driver can publish: lifecycle types and event IDs together."""
        return self.event_ids | frozenset(self.lifecycle)

    @property
    def range_text(self) -> str:
        since = format_libvirt_version(self.since)
        if self.until is None:
            return f"≥{since}"
        return f"≥{since} <{format_libvirt_version(self.until)}"


def _parse_version_text(value: object, where: str) -> Version:
    if not isinstance(value, str):
        raise CapabilityMapError(f"{where}: expected a version string like '9.0.0', got {value!r}")
    match = _VERSION_TEXT.fullmatch(value)
    if match is None:
        raise CapabilityMapError(f"{where}: expected a version string like '9.0.0', got {value!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _names(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise CapabilityMapError(f"{where}: expected a list of names, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str) or not _NAME.fullmatch(item):
            raise CapabilityMapError(f"{where}: {item!r} is not a lowercase event name")
    if len(set(value)) != len(value):
        raise CapabilityMapError(f"{where}: names repeat")
    return frozenset(value)


def _row(driver: str, index: int, raw: object) -> DriverRow:
    where = f"{driver}[{index}]"
    if not isinstance(raw, dict):
        raise CapabilityMapError(f"{where}: expected an object, got {type(raw).__name__}")
    keys = set(raw)
    if keys != _ROW_KEYS:
        missing = ", ".join(sorted(_ROW_KEYS - keys)) or "none"
        extra = ", ".join(sorted(keys - _ROW_KEYS)) or "none"
        raise CapabilityMapError(f"{where}: wrong keys (missing: {missing}; unexpected: {extra})")
    since = _parse_version_text(raw["since"], f"{where}.since")
    until = None if raw["until"] is None else _parse_version_text(raw["until"], f"{where}.until")
    if until is not None and until <= since:
        raise CapabilityMapError(f"{where}: until {raw['until']} is not after since {raw['since']}")
    read_from, registration, notes = raw["read_from"], raw["registration"], raw["notes"]
    if not isinstance(read_from, str) or not read_from.strip():
        raise CapabilityMapError(f"{where}.read_from: must name the release(s) actually read")
    if not isinstance(registration, bool):
        raise CapabilityMapError(f"{where}.registration: expected true or false")
    if not isinstance(notes, str):
        raise CapabilityMapError(f"{where}.notes: expected a string")
    event_ids = _names(raw["event_ids"], f"{where}.event_ids")
    lifecycle_raw = raw["lifecycle"]
    if not isinstance(lifecycle_raw, dict):
        raise CapabilityMapError(f"{where}.lifecycle: expected an object of type -> details")
    lifecycle: dict[str, frozenset[str]] = {}
    for kind, details in lifecycle_raw.items():
        if not _NAME.fullmatch(kind):
            raise CapabilityMapError(f"{where}.lifecycle: {kind!r} is not a lifecycle type name")
        names = _names(details, f"{where}.lifecycle.{kind}")
        if not names:
            raise CapabilityMapError(f"{where}.lifecycle.{kind}: a type sent must have details")
        lifecycle[kind] = names
    if not registration and (event_ids or lifecycle):
        raise CapabilityMapError(f"{where}: a driver that refuses registration emits nothing")
    return DriverRow(
        driver=driver,
        since=since,
        until=until,
        read_from=read_from,
        registration=registration,
        event_ids=event_ids,
        lifecycle=MappingProxyType(lifecycle),
        notes=notes,
    )


def parse_map(raw: object) -> Mapping[str, tuple[DriverRow, ...]]:
    """Validates decoded JSON into rows per driver; keys starting with `_` are documentation."""
    if not isinstance(raw, dict):
        raise CapabilityMapError(f"top level: expected an object, got {type(raw).__name__}")
    drivers: dict[str, tuple[DriverRow, ...]] = {}
    for driver, rows_raw in raw.items():
        if driver.startswith("_"):
            continue
        if not isinstance(rows_raw, list) or not rows_raw:
            raise CapabilityMapError(f"{driver}: expected a non-empty list of rows")
        rows = tuple(_row(driver, i, row) for i, row in enumerate(rows_raw))
        for i, (before, after) in enumerate(itertools.pairwise(rows), start=1):
            if before.until is None or before.until > after.since:
                raise CapabilityMapError(
                    f"{driver}[{i}]: starts at {format_libvirt_version(after.since)}, inside "
                    f"the previous row (rows must be sorted by since and must not overlap)"
                )
        drivers[driver] = rows
    return MappingProxyType(drivers)


def map_text() -> str:
    """The packaged map file, as text."""
    return resources.files(__package__ or "").joinpath(DATA_FILE).read_text(encoding="utf-8")


@functools.cache
def load() -> Mapping[str, tuple[DriverRow, ...]]:
    """The packaged map, validated once per process."""
    text = map_text()
    try:
        raw: object = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CapabilityMapError(f"{DATA_FILE}: not valid JSON: {exc}") from exc
    return parse_map(raw)


def lookup(driver_type: str, libvirt_version: int) -> DriverRow | None:
    """The row for conn.getType() and conn.getLibVersion(); None means: keep the probe's answer.

    Pass the daemon's version (getLibVersion on the connection), not the client library's:
    the driver runs in the daemon.
    """
    version = parse_libvirt_version(libvirt_version)
    for row in load().get(driver_type, ()):
        if row.covers(version):
            return row
    return None


def _columns(rows: Sequence[DriverRow]) -> tuple[str, ...]:
    extra = {kind for row in rows for kind in row.lifecycle} - set(LIFECYCLE_ORDER)
    event_ids = {name for row in rows for name in row.event_ids}
    return (*LIFECYCLE_ORDER, *sorted(extra), *sorted(event_ids))


def markdown_table() -> str:
    """A README table, one line per row: which event types each driver can really send."""
    rows = [row for driver in sorted(load(), key=str.casefold) for row in load()[driver]]
    columns = _columns(rows)
    header = ["Driver", "libvirt", "Source read", "Registration", *columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 4 + [":-:"] * len(columns)) + "|",
    ]
    for row in rows:
        marks = [YES if name in row.event_types else NO for name in columns]
        cells = [
            row.driver,
            row.range_text,
            row.read_from,
            YES if row.registration else NO,
            *marks,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{YES} emitted, {NO} never emitted. Lifecycle details per type and the evidence for "
        f"each row are in drivers/libvirt/{DATA_FILE}; other versions fall back to the probe."
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m virtpub.drivers.libvirt.capability_map",
        description="Show the libvirt driver event capability map.",
    )
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
