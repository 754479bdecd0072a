"""Immutable event values handed from signal sources to the publisher.

A driver's callback runs on a foreign thread (libvirt's event loop, watchdog's
observer); it builds one of these from primitive values it copied and hands it
off. Everything after that point works on these values only, so nothing
downstream ever reaches back into libvirt for data that may already be gone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeAlias

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
_NO_INFO: Mapping[str, JSONValue] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DomainRef:
    """Who an event is about. `id` is the hypervisor's runtime id, None when not running."""

    uuid: str
    name: str
    id: int | None = None


@dataclass(frozen=True, slots=True)
class DomainState:
    """libvirt's state and reason of a domain, as names and codes (`running`/`booted`, 1/1)."""

    state: str
    reason: str
    state_code: int
    reason_code: int

    @property
    def active(self) -> bool:
        """Whether the domain may be running; a transient domain exists exactly while active.

        Only `shutoff` is inactive: `nostate` (what virtpub records when it could not
        learn a state) counts as active, so an unknown state never leads to a `removed`.
        """
        return self.state != "shutoff"


@dataclass(frozen=True, slots=True)
class DomainFacts:
    """What a backend's listing says about one domain, read on the daemon thread."""

    uuid: str
    name: str
    id: int | None
    persistent: bool
    state: DomainState


@dataclass(frozen=True, slots=True)
class BackendChange:
    """A backend's connection was lost or (re)established."""

    backend: str
    connected: bool
    reason: str | None
    received_at: float


@dataclass(frozen=True, slots=True)
class Codes:
    """libvirt's raw numeric codes, kept so consumers can act on values this build cannot name."""

    event_id: int
    event: int | None = None
    detail: int | None = None


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """One domain signal, normalized.

    `event` and `detail` are lowercase names taken from libvirt's own constants
    (`stopped`/`destroyed`, `rtc_change`/None); a code this build cannot name is
    rendered as `unknown_<code>` so it is still published and routable.
    `info` carries the fields specific to the event ID. `state` is the state the
    event implies (a `started` means running), None where it implies none.
    `codes` are None for events virtpub derives, polls or resyncs itself.
    """

    backend: str
    event: str
    detail: str | None
    domain: DomainRef
    codes: Codes | None
    origin: str
    received_at: float
    info: Mapping[str, JSONValue] = field(default_factory=dict)
    state: DomainState | None = None

    def __post_init__(self) -> None:
        info = MappingProxyType(dict(self.info)) if self.info else _NO_INFO
        object.__setattr__(self, "info", info)


@dataclass(frozen=True, slots=True)
class ConfigRejected:
    """A config file virtpub refuses, published as `config.invalid`: the domain it may
    describe is invisible (or frozen at the file's last valid content) until it is fixed."""

    backend: str
    path: str
    reason: str
    """A short code: `malformed`, `forbidden_xml`, `too_large`, `binary`, `symlink`, ..."""
    message: str
    received_at: float


GONE: Literal["gone"] = "gone"
Probe = Callable[[str], "DomainFacts | Literal['gone'] | None"]
"""Looks a domain up by UUID: its facts, GONE if the backend says it does not exist,
None if the backend cannot tell right now (disconnected)."""

SHUTOFF = DomainState("shutoff", "unknown", 5, 0)
NOSTATE = DomainState("nostate", "unknown", 0, 0)
