"""The daemon's own publisher.* messages (capabilities, dropped, backend, snapshot), as
contract values built from what the daemon knows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from virtpub import __version__
from virtpub.contract import routing, schemas
from virtpub.contract.envelope import rfc3339
from virtpub.contract.messages import Backend, Capabilities, Dropped, Snapshot
from virtpub.core.driver import Driver
from virtpub.core.drops import Tally
from virtpub.core.event import BackendChange
from virtpub.core.redact import redact_url
from virtpub.daemon.spool import DroppedRange

DropReason = Literal["queue_full", "spool_full", "unclean_stop"]
SnapshotReason = Literal["startup", "reconnect", "dropped", "requested"]


def capabilities(host_id: str, drivers: Sequence[Driver]) -> Capabilities:
    return Capabilities(
        publisher_name="virtpub",
        publisher_version=__version__,
        host_id=host_id,
        routing_key_format=routing.FORMAT,
        schemas={name: schemas.info(name).version for name in schemas.ALL},
        backends=tuple(driver.capabilities().to_json() for driver in drivers),
    )


def dropped(
    reason: DropReason,
    tally: Tally,
    sequences: DroppedRange | None,
    policy: str,
    known: frozenset[str],
) -> Dropped:
    return Dropped(
        reason=reason,
        policy=policy,
        count=tally.count,
        events=dict(sorted(tally.types.items())),
        backends=tuple(sorted(tally.backends & set(known))),
        since=rfc3339(tally.since),
        first_sequence=None if sequences is None else sequences.first,
        last_sequence=None if sequences is None else sequences.last,
    )


def unclean_stop(first: int, last: int, policy: str, known: frozenset[str], now: float) -> Dropped:
    """The sequences the last run may have published without spooling them: consumers hold
    some of them or none; the startup snapshot follows."""
    return Dropped(
        reason="unclean_stop",
        policy=policy,
        count=last - first + 1,
        events={},
        backends=tuple(sorted(known)),
        since=rfc3339(now),
        first_sequence=first,
        last_sequence=last,
    )


def backend(change: BackendChange, driver: Driver) -> Backend:
    return Backend(
        backend=change.backend,
        uri=redact_url(driver.uri),
        connected=change.connected,
        reason=change.reason,
    )


def snapshot_begin(
    backend: str, snapshot_id: str, reason: SnapshotReason, request_id: str | None
) -> Snapshot:
    return Snapshot(
        backend=backend,
        snapshot_id=snapshot_id,
        reason=reason,
        phase="begin",
        request_id=request_id,
    )
