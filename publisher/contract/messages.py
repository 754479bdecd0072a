"""Each wire message as a typed value: its schema, its version and the history of that version.

A message class states the `data` of one schema. `VERSION` must equal the version locked in
schemas/versions.json, and `CHANGES` tells, one line per minor version, what each version added:
a field changed here without a new version (and a new line) fails tests/test_messages.py.
`data()` returns exactly what the wire carries, keys in wire order; `from_data` reads it back.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from virtpub.contract import schemas
from virtpub.core.event import Codes, DomainState, JSONValue

Phase = Literal["begin", "end"]


@dataclass(frozen=True, slots=True)
class Message:
    """What every message class states; the envelope reads these to route and type it."""

    SCHEMA: ClassVar[str]
    VERSION: ClassVar[str]
    CHANGES: ClassVar[tuple[str, ...]]
    ENTITY: ClassVar[str]
    EVENT: ClassVar[str]

    @property
    def event_name(self) -> str:
        """The routing key's event segment and the end of the CloudEvents type."""
        return self.EVENT

    @property
    def detail(self) -> str | None:
        """The routing key's last segment, when the message has one."""
        return None

    def data(self) -> dict[str, JSONValue]:
        raise NotImplementedError

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        raise NotImplementedError


@functools.lru_cache(maxsize=1024)
def _state_data(state: DomainState) -> dict[str, JSONValue]:
    """Shared between messages (orjson only reads it): states repeat, dicts cost."""
    return {
        "state": state.state,
        "reason": state.reason,
        "state_code": state.state_code,
        "reason_code": state.reason_code,
    }


@functools.lru_cache(maxsize=1024)
def _codes_data(codes: Codes) -> dict[str, JSONValue]:
    result: dict[str, JSONValue] = {"event_id": codes.event_id}
    if codes.event is not None:
        result["event"] = codes.event
    if codes.detail is not None:
        result["detail"] = codes.detail
    return result


@dataclass(frozen=True, slots=True)
class DomainPart:
    """The `domain` of a domain event; `id` only while the domain runs."""

    uuid: str
    name: str
    id: int | None = None

    def data(self) -> dict[str, JSONValue]:
        result: dict[str, JSONValue] = {"uuid": self.uuid, "name": self.name}
        if self.id is not None:
            result["id"] = self.id
        return result


@dataclass(frozen=True, slots=True)
class Rename:
    """The names before and after a rename; `new_name` None when it could not be learnt."""

    old_name: str
    new_name: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainEventMessage(Message):
    SCHEMA: ClassVar[str] = schemas.DOMAIN_EVENT
    VERSION: ClassVar[str] = "1.2"
    CHANGES: ClassVar[tuple[str, ...]] = (
        "1.0: one libvirt domain event: domain, event, detail, codes, info",
        "1.1: existence events (added, removed), origin, persistent, state, per-domain seq,"
        " rename; codes only on events from libvirt",
        "1.2: channel_lifecycle (libvirt 12.4) with channel_name, state, reason; the details"
        " started/recreated, stopped/recreated (11.6) and suspended/guest_shutdown (11.10)",
    )
    ENTITY: ClassVar[str] = "domain"

    domain: DomainPart
    event: str
    event_detail: str | None
    origin: str
    persistent: bool
    state: DomainState
    seq: int
    info: Mapping[str, JSONValue] = field(default_factory=dict)
    codes: Codes | None = None
    rename: Rename | None = None

    @property
    def event_name(self) -> str:
        return self.event

    @property
    def detail(self) -> str | None:
        return self.event_detail

    def data(self) -> dict[str, JSONValue]:
        data: dict[str, JSONValue] = {
            "domain": self.domain.data(),
            "event": self.event,
            "detail": self.event_detail,
            "origin": self.origin,
            "persistent": self.persistent,
            "state": _state_data(self.state),
            "seq": self.seq,
            "info": dict(self.info),
        }
        if self.codes is not None:
            data["codes"] = _codes_data(self.codes)
        if self.rename is not None:
            data["rename"] = {"old_name": self.rename.old_name, "new_name": self.rename.new_name}
        return data

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        codes, rename = data.get("codes"), data.get("rename")
        return cls(
            domain=DomainPart(**data["domain"]),
            event=data["event"],
            event_detail=data["detail"],
            origin=data["origin"],
            persistent=data["persistent"],
            state=DomainState(**data["state"]),
            seq=data["seq"],
            info=data["info"],
            codes=None if codes is None else Codes(**codes),
            rename=None if rename is None else Rename(**rename),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities(Message):
    """`backends` are the drivers' own capability documents (`DriverCapabilities.to_json()`)."""

    SCHEMA: ClassVar[str] = schemas.PUBLISHER_CAPABILITIES
    VERSION: ClassVar[str] = "1.2"
    CHANGES: ClassVar[tuple[str, ...]] = (
        "1.0: publisher, host_id, routing_key_format, schemas, backends with their events",
        "1.1: polled events say their poll interval",
        "1.2: every event type has a status and a basis; native lifecycle types list details",
    )
    ENTITY: ClassVar[str] = "publisher"
    EVENT: ClassVar[str] = "capabilities"

    publisher_name: str
    publisher_version: str
    host_id: str
    routing_key_format: str
    schemas: Mapping[str, str]
    backends: tuple[Mapping[str, JSONValue], ...]

    def data(self) -> dict[str, JSONValue]:
        return {
            "publisher": {"name": self.publisher_name, "version": self.publisher_version},
            "host_id": self.host_id,
            "routing_key_format": self.routing_key_format,
            "schemas": dict(self.schemas),
            "backends": [dict(backend) for backend in self.backends],
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            publisher_name=data["publisher"]["name"],
            publisher_version=data["publisher"]["version"],
            host_id=data["host_id"],
            routing_key_format=data["routing_key_format"],
            schemas=data["schemas"],
            backends=tuple(data["backends"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot(Message):
    """One side of a snapshot bracket; `domains` is set on the end only."""

    SCHEMA: ClassVar[str] = schemas.PUBLISHER_SNAPSHOT
    VERSION: ClassVar[str] = "1.2"
    CHANGES: ClassVar[tuple[str, ...]] = (
        "1.0: begin and end of one backend's snapshot: backend, snapshot_id, reason, phase,"
        " domains on end",
        "1.1: reason dropped, after a publisher.dropped",
        "1.2: reason requested, with the request's request_id",
    )
    ENTITY: ClassVar[str] = "publisher"
    EVENT: ClassVar[str] = "snapshot"

    backend: str
    snapshot_id: str
    reason: str
    phase: Phase
    request_id: str | None = None
    domains: int | None = None

    @property
    def detail(self) -> str | None:
        return self.phase

    def data(self) -> dict[str, JSONValue]:
        data: dict[str, JSONValue] = {
            "backend": self.backend,
            "snapshot_id": self.snapshot_id,
            "reason": self.reason,
        }
        if self.request_id is not None:
            data["request_id"] = self.request_id
        data["phase"] = self.phase
        if self.domains is not None:
            data["domains"] = self.domains
        return data

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            backend=data["backend"],
            snapshot_id=data["snapshot_id"],
            reason=data["reason"],
            phase=data["phase"],
            request_id=data.get("request_id"),
            domains=data.get("domains"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend(Message):
    SCHEMA: ClassVar[str] = schemas.PUBLISHER_BACKEND
    VERSION: ClassVar[str] = "1.0"
    CHANGES: ClassVar[tuple[str, ...]] = (
        "1.0: a backend connected or disconnected: backend, uri, connected, reason",
    )
    ENTITY: ClassVar[str] = "publisher"
    EVENT: ClassVar[str] = "backend"

    backend: str
    uri: str
    connected: bool
    reason: str | None

    @property
    def detail(self) -> str | None:
        return "connected" if self.connected else "disconnected"

    def data(self) -> dict[str, JSONValue]:
        return {
            "backend": self.backend,
            "uri": self.uri,
            "connected": self.connected,
            "reason": self.reason,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        return cls(**data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped(Message):
    """`since` is already RFC 3339; the sequences for spool_full and unclean_stop."""

    SCHEMA: ClassVar[str] = schemas.PUBLISHER_DROPPED
    VERSION: ClassVar[str] = "1.1"
    CHANGES: ClassVar[tuple[str, ...]] = (
        "1.0: events lost from a full queue or spool: reason, policy, count, events, backends,"
        " since, first and last sequence",
        "1.1: reason unclean_stop: the sequences the last run may have published without"
        " spooling them (events is empty: what they were is not known)",
    )
    ENTITY: ClassVar[str] = "publisher"
    EVENT: ClassVar[str] = "dropped"

    reason: str
    policy: str
    count: int
    events: Mapping[str, int]
    backends: tuple[str, ...]
    since: str
    first_sequence: int | None = None
    last_sequence: int | None = None

    @property
    def detail(self) -> str | None:
        return self.reason

    def data(self) -> dict[str, JSONValue]:
        data: dict[str, JSONValue] = {
            "reason": self.reason,
            "policy": self.policy,
            "count": self.count,
            "events": dict(self.events),
            "backends": list(self.backends),
            "since": self.since,
        }
        if self.first_sequence is not None and self.last_sequence is not None:
            data["first_sequence"] = self.first_sequence
            data["last_sequence"] = self.last_sequence
        return data

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        return cls(**{**data, "backends": tuple(data["backends"])})


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigInvalid(Message):
    SCHEMA: ClassVar[str] = schemas.CONFIG_INVALID
    VERSION: ClassVar[str] = "1.0"
    CHANGES: ClassVar[tuple[str, ...]] = (
        "1.0: a watched config file virtpub refuses: backend, path, reason, message",
    )
    ENTITY: ClassVar[str] = "config"
    EVENT: ClassVar[str] = "invalid"

    backend: str
    path: str
    reason: str
    message: str

    def data(self) -> dict[str, JSONValue]:
        return {
            "backend": self.backend,
            "path": self.path,
            "reason": self.reason,
            "message": self.message,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        return cls(**data)


MESSAGES: tuple[type[Message], ...] = (
    DomainEventMessage,
    Capabilities,
    Snapshot,
    Backend,
    Dropped,
    ConfigInvalid,
)
"""One class per schema, in the order of `schemas.ALL`."""


def for_schema(name: str) -> type[Message]:
    """The class of a schema name (as a sample's or a consumer's `dataschema` names it)."""
    return next(cls for cls in MESSAGES if name == cls.SCHEMA)
