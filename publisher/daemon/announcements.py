"""The data of the daemon's own publisher.* messages: capabilities, dropped, backend, snapshot.

Kept apart from the daemon so the payloads can become typed contract values in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from virtpub import __version__
from virtpub.contract import routing, schemas
from virtpub.contract.envelope import rfc3339
from virtpub.core.driver import Driver
from virtpub.core.drops import Tally
from virtpub.core.event import BackendChange, JSONValue
from virtpub.core.redact import redact_url
from virtpub.daemon.spool import DroppedRange

DropReason = Literal["queue_full", "spool_full"]
SnapshotReason = Literal["startup", "reconnect", "dropped", "requested"]


def capabilities_data(host_id: str, drivers: Sequence[Driver]) -> dict[str, JSONValue]:
    data: dict[str, JSONValue] = {
        "publisher": {"name": "virtpub", "version": __version__},
        "host_id": host_id,
        "routing_key_format": routing.FORMAT,
        "schemas": {name: schemas.info(name).version for name in schemas.ALL},
        "backends": [driver.capabilities().to_json() for driver in drivers],
    }
    return data


def dropped_data(
    reason: DropReason,
    tally: Tally,
    dropped: DroppedRange | None,
    policy: str,
    known: frozenset[str],
) -> dict[str, JSONValue]:
    events: dict[str, JSONValue] = dict(sorted(tally.types.items()))
    backends: list[JSONValue] = [*sorted(tally.backends & set(known))]
    data: dict[str, JSONValue] = {
        "reason": reason,
        "policy": policy,
        "count": tally.count,
        "events": events,
        "backends": backends,
        "since": rfc3339(tally.since),
    }
    if dropped is not None:
        data["first_sequence"] = dropped.first
        data["last_sequence"] = dropped.last
    return data


def backend_data(change: BackendChange, driver: Driver) -> dict[str, JSONValue]:
    data: dict[str, JSONValue] = {
        "backend": change.backend,
        "uri": redact_url(driver.uri),
        "connected": change.connected,
        "reason": change.reason,
    }
    return data


def snapshot_bracket(
    backend: str, snapshot_id: str, reason: SnapshotReason, request_id: str | None
) -> dict[str, JSONValue]:
    bracket: dict[str, JSONValue] = {
        "backend": backend,
        "snapshot_id": snapshot_id,
        "reason": reason,
    }
    if request_id is not None:
        bracket["request_id"] = request_id
    return bracket
