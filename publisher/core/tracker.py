"""Which domains exist, as the 2008 libvirt RFC defines it, tracked from the event stream.

libvirt reports lifecycle events but not existence: a `stopped` ends a transient
domain and merely shuts off a persistent one. The tracker keeps, per backend and
UUID, the name, persistence and state virtpub last published, and derives:

- `added` before any other event of a UUID: a persistent domain is defined, a
  transient one starts, or virtpub first sees it;
- `removed` as the very last event of a UUID: a transient domain stops, or a
  persistent one is undefined while inactive.

A running transient domain that is defined becomes persistent (no second
`added`); a running persistent domain that is undefined becomes transient (no
`removed` until it stops); a rename keeps the UUID.

The tracker does no I/O. When an event names a UUID it has never seen, it asks a
`Probe` (a lookup by UUID, run on the daemon thread, never in a libvirt callback)
whether the domain exists and how; resync and polling hand it whole listings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

from virtpub.core.event import (
    GONE,
    NOSTATE,
    SHUTOFF,
    DomainEvent,
    DomainFacts,
    DomainRef,
    DomainState,
    Probe,
)

GONE_GRACE_S = 2.0
"""How long a domain found gone may wait for its own ending events before virtpub ends it.

libvirt delivers events after the call that caused them returned, so a lookup or
a listing can show a domain gone while its `stopped` or `undefined` is still on
its way. Ending it at once would make those late events announce it again.
The grace runs from the lookup's answer, not from the event that asked: libvirtd's
QEMU driver holds a domain's lock while it kills the process (1.2-2 s seen here),
so a lookup made for the `resumed` of a guest destroyed at once answers only
after the destroy, with the ending events right behind the answer."""


class Record(NamedTuple):
    """What virtpub last published about a domain. (Named tuples, here and below: one is
    built for every event, and a frozen dataclass's `__init__` costs several times more.)"""

    name: str
    persistent: bool
    state: DomainState
    seq: int
    """The per-domain sequence number of the last message published for this domain."""


class Publication(NamedTuple):
    """An event ready for the envelope, with the domain's situation after it."""

    event: DomainEvent
    persistent: bool
    state: DomainState
    seq: int
    rename: tuple[str, str | None] | None = None


class Tracker:
    """The domains of one backend."""

    def __init__(
        self,
        backend: str,
        records: dict[str, Record] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self._clock = clock
        self.records: dict[str, Record] = dict(records or {})
        self._dirty: set[str] = set()
        self._gone: dict[str, tuple[float, str, frozenset[str] | None]] = {}
        """UUID -> when it was found gone, by what origin, with which event types allowed."""

    def skip_seqs(self, count: int) -> None:
        """After an unclean stop, up to `count` messages may have reached consumers without
        being committed: every domain's `seq` moves on by `count`, so none is used twice.
        The records are written again with the next commit."""
        self.records = {u: r._replace(seq=r.seq + count) for u, r in self.records.items()}
        self._dirty.update(self.records)

    def take_changes(self) -> tuple[dict[str, Record], set[str]]:
        """Records changed since the last call, and UUIDs that no longer exist: what to persist."""
        changed = {u: self.records[u] for u in self._dirty if u in self.records}
        removed = {u for u in self._dirty if u not in self.records}
        self._dirty.clear()
        return changed, removed

    # -- events -------------------------------------------------------------------------------

    def apply(self, event: DomainEvent, probe: Probe) -> list[Publication]:
        out: list[Publication] = []
        uuid = event.domain.uuid
        if uuid not in self.records:
            self._discover(event, probe(uuid), out)
        record = self.records[uuid]
        rename: tuple[str, str | None] | None = None
        name = event.domain.name
        persistent = record.persistent
        if event.event == "defined":
            persistent = True
            if event.detail == "renamed":
                rename = (record.name, name)
        elif event.event == "undefined":
            if event.detail == "renamed":
                # libvirt reports a rename as undefined(old name) then defined(new name); the
                # new name is only known by asking.
                facts = probe(uuid)
                rename = (name, facts.name if isinstance(facts, DomainFacts) else None)
                name = record.name
            else:
                persistent = False
        state = event.state or record.state
        self._publish(out, event, name=name, persistent=persistent, state=state, rename=rename)
        if not persistent and not state.active:
            cause = event.event if event.event in ("undefined", "stopped") else "vanished"
            self._remove(out, event, cause)
        return out

    def _discover(
        self,
        event: DomainEvent,
        facts: DomainFacts | Literal["gone"] | None,
        out: list[Publication],
    ) -> None:
        """Announces a UUID seen for the first time.

        The event's own name and implied state come first: the lookup answers for
        a later moment (the domain may have started or been renamed since). The
        lookup fills in only what the event cannot tell, persistence above all.
        """
        if facts is None:
            # The backend cannot say. Assume it persists, in an unknown state: a wrongly
            # kept domain is corrected at the next resync, a wrong `removed` never could be.
            persistent, fallback = True, NOSTATE
        elif facts == GONE:
            # Gone already, and its last events are probably queued right behind this
            # one: they end it. Removing it now would make them announce it again.
            # `settle` removes it if they never come.
            persistent, fallback = event.event == "defined", NOSTATE
            self._gone[event.domain.uuid] = (self._clock(), "derived", None)
        else:
            persistent, fallback = facts.persistent, facts.state
        if event.event == "defined":
            # A fresh define leaves an inactive domain; a running transient gaining a
            # config would have been known since its start.
            persistent, cause = True, "defined"
            state = fallback if facts is None else SHUTOFF
        else:
            state = event.state or fallback
            # Every listed domain is known, so an unknown one that starts running came into
            # existence by starting (QEMU reports `resumed` before `started`).
            running = event.state or (facts.state if isinstance(facts, DomainFacts) else SHUTOFF)
            starting = event.event in ("started", "resumed")
            cause = "started" if starting or (not persistent and running.active) else "discovered"
        name = event.domain.name
        self.records[event.domain.uuid] = Record(name, persistent, state, 0)
        derived = _derived(event, "added", cause, name)
        self._publish(out, derived, name=name, persistent=persistent, state=state)

    # -- listings -----------------------------------------------------------------------------

    def reconcile(
        self,
        listing: Iterable[DomainFacts],
        origin: Literal["resync", "poll"],
        received_at: float,
        allowed: frozenset[str] | None = None,
    ) -> list[Publication]:
        """The transitions that bring what was published in line with a fresh listing.

        After a blind gap (`resync`) every difference is published; when polling
        for event types a backend cannot emit, only those types (`allowed`) are, and
        the rest is left to the backend's own events.
        """
        out: list[Publication] = []
        seen: set[str] = set()
        for facts in _existing(listing):
            seen.add(facts.uuid)
            record = self.records.get(facts.uuid)
            if record is None:
                if allowed is None or "added" in allowed:
                    self._added_from_listing(facts, origin, received_at, out, allowed)
                continue
            for event, state in _transitions(record, facts):
                if allowed is not None and event not in allowed:
                    continue
                synthetic = _synthetic(self.backend, facts, event, origin, received_at, state)
                pub_persistent = _persistence_after(event, self.records[facts.uuid].persistent)
                self._publish(
                    out,
                    synthetic,
                    name=facts.name,
                    persistent=pub_persistent,
                    state=state or self.records[facts.uuid].state,
                )
            if allowed is None:
                self._refresh(facts)
        if allowed is None or "removed" in allowed:
            for uuid in sorted(set(self.records) - seen):
                self._gone.setdefault(uuid, (received_at, origin, allowed))
        return out

    def _refresh(self, facts: DomainFacts) -> None:
        """Takes the listing's exact state reason, which transitions may not have carried."""
        record = self.records[facts.uuid]
        if record.state != facts.state:
            self.records[facts.uuid] = record._replace(state=facts.state)
            self._dirty.add(facts.uuid)

    def _added_from_listing(
        self,
        facts: DomainFacts,
        origin: str,
        received_at: float,
        out: list[Publication],
        allowed: frozenset[str] | None,
    ) -> None:
        self.records[facts.uuid] = Record(facts.name, facts.persistent, SHUTOFF, 0)
        cause = "defined" if facts.persistent else "started"
        first = _synthetic(self.backend, facts, "added", origin, received_at, None, cause)
        self._publish(
            out,
            first,
            name=facts.name,
            persistent=facts.persistent,
            state=SHUTOFF if facts.persistent else facts.state,
        )
        replay: list[tuple[str, DomainState | None]] = []
        if facts.persistent:
            replay.append(("defined", None))
        if facts.state.active:
            replay.append(("started", facts.state))
        if facts.state.state == "paused":
            replay.append(("suspended", facts.state))
        for event, state in replay:
            if allowed is not None and event not in allowed:
                continue  # the backend reports this one itself
            synthetic = _synthetic(self.backend, facts, event, origin, received_at, state)
            self._publish(
                out,
                synthetic,
                name=facts.name,
                persistent=facts.persistent,
                state=state or self.records[facts.uuid].state,
            )
        self._refresh(facts)

    def _vanish(
        self,
        uuid: str,
        origin: str,
        received_at: float,
        out: list[Publication],
        allowed: frozenset[str] | None,
    ) -> None:
        """A domain the listing no longer has: it stopped and lost its config unseen."""
        record = self.records[uuid]
        facts = DomainFacts(uuid, record.name, None, record.persistent, record.state)
        if record.state.active and (allowed is None or "stopped" in allowed):
            synthetic = _synthetic(self.backend, facts, "stopped", origin, received_at, SHUTOFF)
            self._publish(
                out, synthetic, name=record.name, persistent=record.persistent, state=SHUTOFF
            )
        if record.persistent and (allowed is None or "undefined" in allowed):
            synthetic = _synthetic(self.backend, facts, "undefined", origin, received_at, None)
            self._publish(out, synthetic, name=record.name, persistent=False, state=SHUTOFF)
        base = _synthetic(self.backend, facts, "removed", origin, received_at, None)
        self._remove(out, base, "vanished")

    def snapshot(self, listing: Iterable[DomainFacts], received_at: float) -> list[Publication]:
        """One `snapshot` message per listed domain, carrying its full situation."""
        out: list[Publication] = []
        for facts in _existing(listing):
            if facts.uuid not in self.records:
                continue  # reconcile announced every listed domain; this one left meanwhile
            record = self.records[facts.uuid]
            synthetic = _synthetic(self.backend, facts, "snapshot", "snapshot", received_at, None)
            self._publish(
                out, synthetic, name=record.name, persistent=record.persistent, state=record.state
            )
        return out

    # -- bookkeeping --------------------------------------------------------------------------

    def _publish(
        self,
        out: list[Publication],
        event: DomainEvent,
        *,
        name: str,
        persistent: bool,
        state: DomainState,
        rename: tuple[str, str | None] | None = None,
    ) -> None:
        uuid = event.domain.uuid
        seq = self.records[uuid].seq + 1
        self.records[uuid] = Record(name, persistent, state, seq)
        self._dirty.add(uuid)
        out.append(Publication(event, persistent, state, seq, rename))

    def settle(self, now: float) -> list[Publication]:
        """Ends the domains found gone whose own ending events did not come in time."""
        out: list[Publication] = []
        for uuid, (since, origin, allowed) in sorted(self._gone.items()):
            if now - since < GONE_GRACE_S:
                continue
            del self._gone[uuid]
            if uuid in self.records:
                self._vanish(uuid, origin, now, out, allowed)
        return out

    def _remove(self, out: list[Publication], event: DomainEvent, cause: str) -> None:
        uuid = event.domain.uuid
        self._gone.pop(uuid, None)
        record = self.records[uuid]
        removed = _derived(event, "removed", cause, record.name)
        self._publish(
            out, removed, name=record.name, persistent=record.persistent, state=record.state
        )
        del self.records[uuid]


def _derived(cause_event: DomainEvent, event: str, detail: str, name: str) -> DomainEvent:
    origin = (
        "derived"
        if cause_event.origin in ("libvirt", "filesystem", "derived")
        else cause_event.origin
    )
    return DomainEvent(
        backend=cause_event.backend,
        event=event,
        detail=detail,
        domain=DomainRef(cause_event.domain.uuid, name, cause_event.domain.id),
        codes=None,
        origin=origin,
        received_at=cause_event.received_at,
    )


def _synthetic(  # noqa: PLR0917 - a private constructor, every call site names its parts
    backend: str,
    facts: DomainFacts,
    event: str,
    origin: str,
    received_at: float,
    state: DomainState | None,
    detail: str | None = None,
) -> DomainEvent:
    return DomainEvent(
        backend=backend,
        event=event,
        detail=detail,
        domain=DomainRef(facts.uuid, facts.name, facts.id),
        codes=None,
        origin=origin,
        received_at=received_at,
        state=state,
    )


def _existing(listing: Iterable[DomainFacts]) -> Iterable[DomainFacts]:
    """A listing without transient domains caught shut off while being torn down: they
    no longer exist, and their own stop event is on its way."""
    return (facts for facts in listing if facts.persistent or facts.state.active)


def _persistence_after(event: str, persistent: bool) -> bool:
    return {"defined": True, "undefined": False}.get(event, persistent)


def _transitions(record: Record, facts: DomainFacts) -> list[tuple[str, DomainState | None]]:
    """Events that lead from a published record to listed facts, in a plausible order."""
    steps: list[tuple[str, DomainState | None]] = []
    if facts.persistent and (not record.persistent or facts.name != record.name):
        steps.append(("defined", None))
    before, after = record.state, facts.state
    if before.active and not after.active:
        steps.append(("stopped", after))
    elif not before.active and after.active:
        steps.append(("started", after))
        if after.state == "paused":
            steps.append(("suspended", after))
    elif before.state != after.state and after.active:
        event = {"paused": "suspended", "running": "resumed"}.get(after.state, after.state)
        steps.append((event, after))
    if record.persistent and not facts.persistent:
        steps.append(("undefined", None))
    return steps
