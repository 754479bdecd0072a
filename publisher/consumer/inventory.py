"""The consumer's rules, pure (no I/O): the fleet's domains (host, domain, state, persistent)
rebuilt from messages alone, message by message.

Every domain message carries the domain's name, state and persistence after the event, so
the view is a table keyed by (host, domain UUID) that each message overwrites and `removed`
deletes. The publisher's snapshot bracket marks and sweeps the rows of domains that vanished
while nobody was listening. A gap in a host's `sequence` means the table may be wrong about
that host; `take_gapped_hosts` names the hosts to ask for a snapshot.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtpub.contract import schemas
from virtpub.contract.routing import RoutingKey

BINDINGS = ("v1.*.domain.#", "v1.*.publisher.#", "v1.*.config.#")
"""Every message a publisher sends, so that a gap in `sequence` always means a lost one."""
_DOMAIN_EVENT_MAJOR = schemas.info(schemas.DOMAIN_EVENT).major

# Resends after a lost confirm are at most the publisher's in-flight window (1,000) apart
# from the original; remembering far more ids than that keeps memory bounded in --watch.
DEDUP_WINDOW = 100_000

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Row:
    """One domain as its latest message describes it; `last_event` is `event[.detail]`."""

    host: str
    uuid: str
    name: str
    state: str
    persistent: bool
    last_event: str
    seq: int


class _MalformedError(Exception):
    """A body that breaks the message contract; the message is counted and skipped."""


@dataclass(frozen=True, slots=True)
class _Envelope:
    host: str
    entity: str
    event: str
    detail: str | None
    id: str
    sequence: int


@dataclass(frozen=True, slots=True)
class _DomainMessage:
    source: str
    uuid: str
    name: str
    event: str
    detail: str | None
    state: str
    persistent: bool
    seq: int


@dataclass(slots=True)
class _Snapshot:
    """An open begin..end window of one backend of one host."""

    snapshot_id: str
    seen: set[str] = dataclasses.field(default_factory=set)
    snapshotted: set[str] = dataclasses.field(default_factory=set)


class Inventory:
    """The fleet view, rebuilt from messages in the order the queue delivers them.

    Counters: `messages` every message given to `apply`; of those, `duplicates` were resends
    of an id already applied, `rejected` broke the contract, `ignored` were well-formed but say
    nothing about the table (capabilities, backend connections, unknown entities). `gaps`
    counts discontinuities, each of which means at least one missed message: a publisher's
    `sequence` not one more than its previous one, or a domain's `data.seq` not one more than
    its previous one (or not 1 on `added`). `changes` grows whenever `rows()` changes.
    """

    def __init__(self) -> None:
        self.messages = 0
        self.duplicates = 0
        self.rejected = 0
        self.ignored = 0
        self.gaps = 0
        self.changes = 0
        self._rows: dict[Key, Row] = {}
        self._backends: dict[Key, str] = {}
        self._sequences: dict[str, int] = {}
        self._snapshots: dict[Key, _Snapshot] = {}
        self._seen_ids: set[str] = set()
        self._seen_order: collections.deque[str] = collections.deque()
        self._gapped: dict[str, None] = {}
        """Hosts, in the order their gaps came: one entry per host, however many gaps."""

    def take_gapped_hosts(self) -> list[str]:
        """The hosts whose `sequence` had a gap since the last call, each once."""
        hosts, self._gapped = list(self._gapped), {}
        return hosts

    def rows(self) -> list[Row]:
        return sorted(self._rows.values(), key=lambda row: (row.host, row.name, row.uuid))

    def apply_raw(self, routing_key: str, raw: bytes) -> None:
        """`apply` for an undecoded body; a body that is not a JSON object is rejected."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, Mapping):
            self.messages += 1
            self.rejected += 1
            return
        self.apply(routing_key, body)

    def apply(self, routing_key: str, body: Mapping[str, Any]) -> None:
        self.messages += 1
        try:
            envelope = _parse_envelope(routing_key, body)
        except _MalformedError:
            self.rejected += 1
            return
        if envelope.id in self._seen_ids:
            self.duplicates += 1
            return
        self._remember(envelope.id)
        self._check_sequence(envelope.host, envelope.sequence)
        try:
            if envelope.entity == "domain":
                self._apply_domain(envelope.host, _parse_domain(body))
            elif envelope.entity == "publisher" and envelope.event == "snapshot":
                self._apply_snapshot(envelope, _mapping(body, "data"))
            else:
                self.ignored += 1
        except _MalformedError:
            self.rejected += 1

    def _remember(self, message_id: str) -> None:
        self._seen_ids.add(message_id)
        self._seen_order.append(message_id)
        if len(self._seen_order) > DEDUP_WINDOW:
            self._seen_ids.discard(self._seen_order.popleft())

    def _check_sequence(self, host: str, sequence: int) -> None:
        previous = self._sequences.get(host)
        if previous is not None and sequence != previous + 1:
            self.gaps += 1
            self._gapped[host] = None
        self._sequences[host] = sequence

    def _apply_domain(self, host: str, message: _DomainMessage) -> None:
        key = (host, message.uuid)
        previous = self._rows.get(key)
        if message.event == "added":
            expected: int | None = 1
        else:
            expected = previous.seq + 1 if previous is not None else None
        if expected is not None and message.seq != expected:
            self.gaps += 1
        snapshot = self._snapshots.get((host, message.source))
        if snapshot is not None:
            snapshot.seen.add(message.uuid)
            if message.event == "snapshot":
                snapshot.snapshotted.add(message.uuid)
        if message.event == "removed":
            self._delete(key)
            return
        row = Row(
            host=host,
            uuid=message.uuid,
            name=message.name,
            state=message.state,
            persistent=message.persistent,
            last_event=f"{message.event}.{message.detail}" if message.detail else message.event,
            seq=message.seq,
        )
        self._backends[key] = message.source
        if row != previous:
            self._rows[key] = row
            self.changes += 1

    def _apply_snapshot(self, envelope: _Envelope, data: Mapping[str, Any]) -> None:
        if envelope.detail not in ("begin", "end"):
            self.ignored += 1
            return
        backend = _str(data, "backend")
        snapshot_id = _str(data, "snapshot_id")
        key = (envelope.host, backend)
        if envelope.detail == "begin":
            self._snapshots[key] = _Snapshot(snapshot_id)
        else:
            domains = _int(data, "domains")
            snapshot = self._snapshots.get(key)
            if snapshot is None or snapshot.snapshot_id != snapshot_id:
                return  # its begin came before this queue existed: nothing to sweep by
            del self._snapshots[key]
            if len(snapshot.snapshotted) != domains:
                return  # a snapshot message was lost: sweeping would drop a live domain
            for row_key, row_backend in list(self._backends.items()):
                if (
                    row_key[0] == envelope.host
                    and row_backend == backend
                    and row_key[1] not in snapshot.seen
                ):
                    self._delete(row_key)

    def _delete(self, key: Key) -> None:
        self._backends.pop(key, None)
        if self._rows.pop(key, None) is not None:
            self.changes += 1


def _parse_envelope(routing_key: str, body: Mapping[str, Any]) -> _Envelope:
    key = RoutingKey.parse(routing_key)
    if key is None or key.major != _DOMAIN_EVENT_MAJOR:
        raise _MalformedError("routing key")
    return _Envelope(
        host=key.host_id,
        entity=key.entity,
        event=key.event,
        detail=key.detail,
        id=_str(body, "id"),
        sequence=_int(body, "sequence"),
    )


def _parse_domain(body: Mapping[str, Any]) -> _DomainMessage:
    data = _mapping(body, "data")
    domain = _mapping(data, "domain")
    detail = data.get("detail")
    if detail is not None and not isinstance(detail, str):
        raise _MalformedError("detail")
    persistent = data.get("persistent")
    if not isinstance(persistent, bool):
        raise _MalformedError("persistent")
    return _DomainMessage(
        source=_str(body, "source"),
        uuid=_str(domain, "uuid"),
        name=_str(domain, "name"),
        event=_str(data, "event"),
        detail=detail,
        state=_str(_mapping(data, "state"), "state"),
        persistent=persistent,
        seq=_int(data, "seq"),
    )


def _mapping(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if not isinstance(value, Mapping):
        raise _MalformedError(key)
    return value


def _str(parent: Mapping[str, Any], key: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or not value:
        raise _MalformedError(key)
    return value


def _int(parent: Mapping[str, Any], key: str) -> int:
    value = parent.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _MalformedError(key)
    return value
