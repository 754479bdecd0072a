"""Pure normalization of libvirt domain event callbacks into `DomainEvent` values.

Every name comes from the constants of the libvirt binding in use (passed in as a
mapping, so this module is tested without a hypervisor). A code the binding
cannot name is rendered `unknown_<code>`: a newer libvirtd than the binding must
never make an event disappear.

libvirt has two event IDs for two things: BLOCK_JOB/BLOCK_JOB_2 and
IO_ERROR/IO_ERROR_REASON. Each pair becomes one event type; the richer ID is
preferred and the older one only subscribed where the richer one is refused.

A binding can also get an ID wrong: where its callback wrapper does not match libvirt's
callback (BINDING_DEFECTS), the ID is withheld, because the first event would crash the
process rather than publish something wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from virtpub.core.event import Codes, DomainEvent, DomainRef, DomainState, JSONValue

ID_PREFIX = "VIR_DOMAIN_EVENT_ID_"
LIFECYCLE_ID = "LIFECYCLE"

_LIFECYCLE_TYPE = re.compile(r"VIR_DOMAIN_EVENT_([A-Z]+)")


@dataclass(frozen=True, slots=True)
class Enum:
    """Names for a field's integer codes, from the binding's constants with this prefix.

    `single_segment` skips constants whose remainder has an underscore, for
    prefixes that several unrelated enums share (VIR_DOMAIN_BLOCK_JOB_*).
    """

    prefix: str
    single_segment: bool = False
    only: frozenset[str] | None = None
    """Names to accept, for prefixes shared with unrelated constants (VIR_DOMAIN_SHUTDOWN_*)."""


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    enum: Enum | None = None
    kind: str = "plain"
    """`plain`, `address` (graphics endpoint dict) or `subject` (graphics identity pairs)."""


_PHASE = Enum("VIR_DOMAIN_EVENT_GRAPHICS_", single_segment=True)
_ADDRESS_FAMILY = Enum("VIR_DOMAIN_EVENT_GRAPHICS_ADDRESS_")
_IO_ACTION = Enum("VIR_DOMAIN_EVENT_IO_ERROR_", single_segment=True)
_BLOCK_JOB_FIELDS = (
    Field("disk"),
    Field("type", Enum("VIR_DOMAIN_BLOCK_JOB_TYPE_")),
    Field("status", Enum("VIR_DOMAIN_BLOCK_JOB_", single_segment=True)),
)

# Positional callback arguments (between the domain and the opaque value) of each
# event ID, by the suffix of its VIR_DOMAIN_EVENT_ID_ constant.
FIELDS: Mapping[str, tuple[Field, ...]] = {
    "REBOOT": (),
    "RTC_CHANGE": (Field("utcoffset"),),
    "WATCHDOG": (Field("action", Enum("VIR_DOMAIN_EVENT_WATCHDOG_")),),
    "IO_ERROR": (Field("src_path"), Field("dev_alias"), Field("action", _IO_ACTION)),
    "IO_ERROR_REASON": (
        Field("src_path"),
        Field("dev_alias"),
        Field("action", _IO_ACTION),
        Field("reason"),
    ),
    "GRAPHICS": (
        Field("phase", _PHASE),
        Field("local", kind="address"),
        Field("remote", kind="address"),
        Field("auth_scheme"),
        Field("subject", kind="subject"),
    ),
    "CONTROL_ERROR": (),
    "BLOCK_JOB": _BLOCK_JOB_FIELDS,
    "BLOCK_JOB_2": _BLOCK_JOB_FIELDS,
    "DISK_CHANGE": (
        Field("old_src_path"),
        Field("new_src_path"),
        Field("dev_alias"),
        Field("reason", Enum("VIR_DOMAIN_EVENT_DISK_CHANGE_")),
    ),
    "TRAY_CHANGE": (
        Field("dev_alias"),
        Field("reason", Enum("VIR_DOMAIN_EVENT_TRAY_CHANGE_")),
    ),
    "PMWAKEUP": (Field("reason"),),
    "PMSUSPEND": (Field("reason"),),
    "BALLOON_CHANGE": (Field("actual_kib"),),
    "PMSUSPEND_DISK": (Field("reason"),),
    "DEVICE_REMOVED": (Field("dev_alias"),),
    "TUNABLE": (Field("params"),),
    "AGENT_LIFECYCLE": (
        Field("state", Enum("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_")),
        Field("reason", Enum("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_")),
    ),
    "DEVICE_ADDED": (Field("dev_alias"),),
    "MIGRATION_ITERATION": (Field("iteration"),),
    "JOB_COMPLETED": (Field("params"),),
    "DEVICE_REMOVAL_FAILED": (Field("dev_alias"),),
    "METADATA_CHANGE": (
        Field("type", Enum("VIR_DOMAIN_METADATA_", single_segment=True)),
        Field("namespace"),
    ),
    "BLOCK_THRESHOLD": (
        Field("dev"),
        Field("path"),
        Field("threshold"),
        Field("excess"),
    ),
    "MEMORY_FAILURE": (
        Field("recipient", Enum("VIR_DOMAIN_EVENT_MEMORY_FAILURE_RECIPIENT_")),
        Field("action", Enum("VIR_DOMAIN_EVENT_MEMORY_FAILURE_ACTION_")),
        Field("flags"),
    ),
    "MEMORY_DEVICE_SIZE_CHANGE": (Field("alias"), Field("size_kib")),
    "NIC_MAC_CHANGE": (Field("alias"), Field("old_mac"), Field("new_mac")),
    "VCPU_REMOVED": (Field("vcpu_id"),),
    "CHANNEL_LIFECYCLE": (
        Field("channel_name"),
        Field("state", Enum("VIR_CONNECT_DOMAIN_EVENT_CHANNEL_LIFECYCLE_STATE_")),
        Field("reason", Enum("VIR_CONNECT_DOMAIN_EVENT_CHANNEL_LIFECYCLE_REASON_")),
    ),
}
"""CHANNEL_LIFECYCLE follows libvirt's C callback (dom, channelName, state, reason): no
released binding delivers it yet (BINDING_DEFECTS), so these are the arguments a fixed one
must pass."""

BindingVersion = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class BindingDefect:
    """libvirt-python releases whose wrapper for one event ID cannot deliver it safely."""

    first: BindingVersion
    last: BindingVersion
    """The newest release known to have the defect; later ones are taken to be fixed."""
    why: str


BINDING_DEFECTS: Mapping[str, BindingDefect] = {
    "CHANNEL_LIFECYCLE": BindingDefect(
        first=(12, 4, 0),
        last=(12, 8, 0),
        why=(
            "libvirt-python 12.4.0 to 12.8.0 declare the channel lifecycle callback as"
            " (dom, state, reason) while libvirt calls it with (dom, channelName, state,"
            " reason): the opaque pointer it reads is the reason code, so the first event"
            " would crash the process; not subscribed"
        ),
    ),
}

_DOMAIN_STATES = (
    "NOSTATE",
    "RUNNING",
    "BLOCKED",
    "PAUSED",
    "SHUTDOWN",
    "SHUTOFF",
    "CRASHED",
    "PMSUSPENDED",
)
_STATE = Enum("VIR_DOMAIN_", single_segment=True, only=frozenset(_DOMAIN_STATES))
_SHUTDOWN_REASONS = frozenset({"UNKNOWN", "USER"})  # the rest of VIR_DOMAIN_SHUTDOWN_* are flags


def _reason_enum(state: str) -> Enum:
    return Enum(
        f"VIR_DOMAIN_{state.upper()}_", only=_SHUTDOWN_REASONS if state == "shutdown" else None
    )


# Lifecycle event -> the domain state it leaves behind. The detail names the reason,
# except where libvirt named the two enums differently.
_STATE_AFTER: Mapping[str, str] = {
    "started": "running",
    "resumed": "running",
    "suspended": "paused",
    "stopped": "shutoff",
    "pmsuspended": "pmsuspended",
    "crashed": "crashed",
}
_REASON_ALIASES: Mapping[tuple[str, str], str] = {
    ("suspended", "paused"): "user",
    ("suspended", "migrated"): "migration",
}

# Older ID -> the richer ID that supersedes it; both publish the richer one's event type.
SUPERSEDED_BY: Mapping[str, str] = {
    "BLOCK_JOB": "BLOCK_JOB_2",
    "IO_ERROR": "IO_ERROR_REASON",
}


@dataclass(frozen=True, slots=True)
class EventIdSpec:
    """One libvirt event ID as this binding knows it."""

    constant: str
    """Suffix of the VIR_DOMAIN_EVENT_ID_ constant, e.g. `BLOCK_JOB_2`."""
    code: int
    event_type: str
    """The published event type, e.g. `block_job` for both block job IDs."""
    fields: tuple[Field, ...] | None
    """None when this module does not know the ID's arguments: published positionally."""


def event_type_of(constant: str) -> str:
    return SUPERSEDED_BY.get(constant, constant).removesuffix("_2").removesuffix("_REASON").lower()


def withheld_ids(
    constants: Iterable[str], binding_version: BindingVersion | None
) -> dict[str, str]:
    """Event IDs this binding has but cannot deliver safely, each with the reason.

    An unknown binding version is treated as defective: a crash is worse than a missing type.
    """
    withheld: dict[str, str] = {}
    for constant in constants:
        defect = BINDING_DEFECTS.get(constant)
        if defect is None:
            continue
        if binding_version is None:
            withheld[constant] = f"the libvirt-python version is unknown, and {defect.why}"
        elif defect.first <= binding_version <= defect.last:
            withheld[constant] = defect.why
    return withheld


class Catalog:
    """Names for every domain event ID, lifecycle type, detail and enum of one binding."""

    def __init__(
        self, constants: Mapping[str, object], binding_version: BindingVersion | None = None
    ) -> None:
        """`binding_version` is libvirt-python's own release (not libvirt's), None if unknown."""
        ints = {k: v for k, v in constants.items() if isinstance(v, int)}
        self._constants = ints
        self.ids: tuple[EventIdSpec, ...] = tuple(
            sorted(
                (
                    EventIdSpec(
                        constant=name.removeprefix(ID_PREFIX),
                        code=code,
                        event_type=event_type_of(name.removeprefix(ID_PREFIX)),
                        fields=FIELDS.get(name.removeprefix(ID_PREFIX)),
                    )
                    for name, code in ints.items()
                    if name.startswith(ID_PREFIX) and not name.endswith("_LAST")
                ),
                key=lambda spec: spec.code,
            )
        )
        self.withheld: Mapping[str, str] = MappingProxyType(
            withheld_ids((spec.constant for spec in self.ids), binding_version)
        )
        """IDs never subscribed (BINDING_DEFECTS), to the reason virtpub reports for each."""
        self._lifecycle_types: dict[int, str] = {}
        for name, code in ints.items():
            match = _LIFECYCLE_TYPE.fullmatch(name)
            if match and match.group(1) != "LAST":
                self._lifecycle_types[code] = match.group(1)
        self._enums: dict[Enum, dict[int, str]] = {}

    @property
    def lifecycle_types(self) -> tuple[str, ...]:
        """Lowercase names of every lifecycle event type, in code order."""
        return tuple(self._lifecycle_types[c].lower() for c in sorted(self._lifecycle_types))

    def subscriptions(self) -> list[EventIdSpec]:
        """IDs to try, richest first: a superseded ID is tried only if its successor fails.

        Withheld IDs are left out: once registered, their first event would crash the process.
        """
        usable = (spec for spec in self.ids if spec.constant not in self.withheld)
        return sorted(usable, key=lambda spec: (spec.constant in SUPERSEDED_BY, spec.code))

    def event_types(self) -> tuple[str, ...]:
        """Every event type this binding can publish: lifecycle types, then the other IDs."""
        others = sorted({s.event_type for s in self.ids if s.constant != LIFECYCLE_ID})
        return (*self.lifecycle_types, *others)

    def name(self, enum: Enum, code: int) -> str:
        names = self._enums.get(enum)
        if names is None:
            names = {}
            # Longest first, so the shortest name of a code is written last and wins: an alias
            # such as PMSUSPENDED_DISK_UNKNOWN never hides PMSUSPENDED_UNKNOWN.
            for const in sorted(self._constants, key=lambda c: (len(c), c), reverse=True):
                rest = const.removeprefix(enum.prefix)
                if rest in (const, "LAST") or (enum.single_segment and "_" in rest):
                    continue
                if enum.only is None or rest in enum.only:
                    names[self._constants[const]] = rest.lower()
            self._enums[enum] = names
        return names.get(code, f"unknown_{code}")

    def code(self, enum: Enum, name: str) -> int | None:
        value = self._constants.get(f"{enum.prefix}{name.upper()}")
        if value is None or (enum.only is not None and name.upper() not in enum.only):
            return None
        return value

    def domain_state(self, state_code: int, reason_code: int) -> DomainState:
        """A `virDomainGetState` answer, named."""
        state = self.name(_STATE, state_code)
        reason = (
            self.name(_reason_enum(state), reason_code)
            if not state.startswith("unknown_")
            else f"unknown_{reason_code}"
        )
        return DomainState(state, reason, state_code, reason_code)

    def implied_state(self, event: str, detail: str) -> DomainState | None:
        """The state a lifecycle event leaves the domain in; None for events that change none."""
        state = _STATE_AFTER.get(event)
        if state is None:
            return None
        state_code = self.code(_STATE, state)
        if state_code is None:
            return None
        reason = _REASON_ALIASES.get((event, detail), detail)
        reason_code = self.code(_reason_enum(state), reason)
        if reason_code is None:
            reason, reason_code = "unknown", 0
        return DomainState(state, reason, state_code, reason_code)

    def lifecycle(self, event: int, detail: int) -> tuple[str, str]:
        kind = self._lifecycle_types.get(event)
        if kind is None:
            return f"unknown_{event}", f"unknown_{detail}"
        return kind.lower(), self.name(Enum(f"VIR_DOMAIN_EVENT_{kind}_"), detail)


def _plain(value: object) -> JSONValue:
    """Copies a callback argument into JSON-safe primitives (libvirt gives dicts, tuples)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def normalize_info(
    catalog: Catalog, fields: Sequence[Field] | None, args: Sequence[object]
) -> dict[str, JSONValue]:
    """The event-specific fields of a non-lifecycle callback."""
    if fields is None:
        return {"args": [_plain(a) for a in args]}
    info: dict[str, JSONValue] = {}
    for spec, value in zip(fields, args, strict=False):
        if spec.kind == "address" and isinstance(value, Mapping):
            family = value.get("family")
            info[spec.name] = {
                "family": catalog.name(_ADDRESS_FAMILY, family)
                if isinstance(family, int)
                else None,
                "node": _plain(value.get("node")),
                "service": _plain(value.get("service")),
            }
        elif spec.kind == "subject" and isinstance(value, list | tuple):
            info[spec.name] = [
                {"type": _plain(pair[0]), "name": _plain(pair[1])}
                for pair in value
                if isinstance(pair, list | tuple) and len(pair) == 2
            ]
        elif spec.enum is not None and isinstance(value, int):
            info[spec.name] = catalog.name(spec.enum, value)
            info[f"{spec.name}_code"] = value
        else:
            info[spec.name] = _plain(value)
    return info


def normalize(
    catalog: Catalog,
    spec: EventIdSpec,
    *,
    backend: str,
    domain: DomainRef,
    args: Sequence[object],
    received_at: float,
) -> DomainEvent:
    """One callback's arguments (those between the domain and the opaque value) to an event."""
    if spec.constant == LIFECYCLE_ID:
        event_code, detail_code = int(args[0]), int(args[1])  # type: ignore[call-overload]
        event, detail = catalog.lifecycle(event_code, detail_code)
        return DomainEvent(
            backend=backend,
            event=event,
            detail=detail,
            domain=domain,
            codes=Codes(event_id=spec.code, event=event_code, detail=detail_code),
            origin="libvirt",
            received_at=received_at,
            state=catalog.implied_state(event, detail),
        )
    return DomainEvent(
        backend=backend,
        event=spec.event_type,
        detail=None,
        domain=domain,
        codes=Codes(event_id=spec.code),
        origin="libvirt",
        received_at=received_at,
        info=normalize_info(catalog, spec.fields, args),
    )
