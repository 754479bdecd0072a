"""Unit tests for publisher/core/tracker.py: which domains exist, as the 2008 RFC defines it.

The Tracker does no I/O; every test drives it with libvirt events built by the real
catalog (so implied states are what the driver produces) and a fake probe that
answers DomainFacts, GONE or None. Expected publications are written out as
(event, detail, origin, persistent, state, seq) tuples.

The property tests at the end drive the Tracker with a small simulator of libvirt's
semantics (persistent and transient domains, QEMU's event order) and check the
RFC's guarantees after every operation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import libvirt
import pytest

from virtpub.core import tracker as model
from virtpub.core.event import GONE, DomainEvent, DomainFacts, DomainRef
from virtpub.core.tracker import Publication, Record, Tracker
from virtpub.drivers.libvirt.events import Catalog, normalize

BACKEND = "virtpub://hv01/libvirt/qemu%3A%2F%2F%2Fsystem"
T0 = 1_700_000_000.5
WEB = "6f1c6a52-3d0e-4b8a-9a43-1f0e2f7f6a11"
DB = "0b6cf9b2-5d0e-4a8e-9a51-1f0e6c3a7d21"
CACHE = "d2b4e6f8-1a3c-4e5f-8a7b-9c0d1e2f3a4b"
LOG = "a3e1c5d7-2b4f-4a6c-8e0d-1f3b5d7f9a2c"
CATALOG = Catalog(vars(libvirt))
SPECS = {spec.constant: spec for spec in CATALOG.ids}

RUNNING = CATALOG.domain_state(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
PAUSED = CATALOG.domain_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
SHUTOFF = CATALOG.domain_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
STATES = {"running": RUNNING, "paused": PAUSED, "shutoff": SHUTOFF}

Probed = DomainFacts | Literal["gone"] | None
Row = tuple[str, str | None, str, bool, str, int]


def lifecycle(
    uuid: str, name: str, event: str, detail: str, dom_id: int | None = None
) -> DomainEvent:
    """A lifecycle callback as the driver normalizes it, e.g. ("stopped", "destroyed")."""
    kind = getattr(libvirt, f"VIR_DOMAIN_EVENT_{event.upper()}")
    code = getattr(libvirt, f"VIR_DOMAIN_EVENT_{event.upper()}_{detail.upper()}")
    return normalize(
        CATALOG,
        SPECS["LIFECYCLE"],
        backend=BACKEND,
        domain=DomainRef(uuid, name, dom_id),
        args=(kind, code),
        received_at=T0,
    )


def rtc_change(uuid: str, name: str, dom_id: int | None = 7) -> DomainEvent:
    return normalize(
        CATALOG,
        SPECS["RTC_CHANGE"],
        backend=BACKEND,
        domain=DomainRef(uuid, name, dom_id),
        args=(3600,),
        received_at=T0,
    )


def facts(uuid: str, name: str, persistent: bool, state: str = "shutoff") -> DomainFacts:
    return DomainFacts(uuid, name, 7 if state != "shutoff" else None, persistent, STATES[state])


class Probe:
    """Answers lookups from a fixed table and records which UUIDs were asked about."""

    def __init__(self, answers: dict[str, Probed] | None = None) -> None:
        self.answers: dict[str, Probed] = dict(answers or {})
        self.calls: list[str] = []

    def __call__(self, uuid: str) -> Probed:
        self.calls.append(uuid)
        return self.answers.get(uuid, GONE)


def rows(publications: Iterable[Publication]) -> list[Row]:
    return [
        (p.event.event, p.event.detail, p.event.origin, p.persistent, p.state.state, p.seq)
        for p in publications
    ]


def settled(
    tracker: Tracker,
    listing: list[DomainFacts],
    origin: Literal["resync", "poll"],
    received_at: float,
    allowed: frozenset[str] | None = None,
) -> list[Publication]:
    """A reconcile, then the grace for late ending events running out with none coming."""
    out = tracker.reconcile(listing, origin, received_at, allowed)
    return out + tracker.settle(received_at + model.GONE_GRACE_S)


def feed(tracker: Tracker, probe: Probe, *events: DomainEvent) -> list[Publication]:
    out: list[Publication] = []
    for event in events:
        out.extend(tracker.apply(event, probe))
    return out


def record(name: str, persistent: bool, state: str, seq: int = 5) -> Record:
    return Record(name, persistent, STATES[state], seq)


# --- persistent and transient lifecycles ---------------------------------------------------


def test_persistent_domain_defined_started_paused_resumed_destroyed_undefined() -> None:
    tracker = Tracker(BACKEND)
    probe = Probe({WEB: facts(WEB, "web-01", persistent=True)})
    out = feed(
        tracker,
        probe,
        lifecycle(WEB, "web-01", "defined", "added"),
        lifecycle(WEB, "web-01", "started", "booted", 7),
        lifecycle(WEB, "web-01", "suspended", "paused", 7),
        lifecycle(WEB, "web-01", "resumed", "unpaused", 7),
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
        lifecycle(WEB, "web-01", "undefined", "removed"),
    )
    assert rows(out) == [
        ("added", "defined", "derived", True, "shutoff", 1),
        ("defined", "added", "libvirt", True, "shutoff", 2),
        ("started", "booted", "libvirt", True, "running", 3),
        ("suspended", "paused", "libvirt", True, "paused", 4),
        ("resumed", "unpaused", "libvirt", True, "running", 5),
        ("stopped", "destroyed", "libvirt", True, "shutoff", 6),
        ("undefined", "removed", "libvirt", False, "shutoff", 7),
        ("removed", "undefined", "derived", False, "shutoff", 8),
    ]
    assert probe.calls == [WEB]  # asked once, for the UUID it had never seen
    assert tracker.records == {}


def test_derived_events_carry_no_codes_and_name_the_domain() -> None:
    tracker = Tracker(BACKEND)
    out = feed(
        tracker,
        Probe({WEB: facts(WEB, "web-01", persistent=False, state="running")}),
        lifecycle(WEB, "web-01", "started", "booted", 7),
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
    )
    added, started, stopped, removed = out
    assert (added.event.codes, removed.event.codes) == (None, None)
    assert started.event.codes is not None and stopped.event.codes is not None
    assert added.event.domain == DomainRef(WEB, "web-01", 7)
    assert removed.event.domain.uuid == WEB
    assert removed.event.domain.name == "web-01"
    assert {p.event.backend for p in out} == {BACKEND}
    assert {p.event.received_at for p in out} == {T0}
    assert all(p.rename is None for p in out)


def test_transient_domain_exists_from_start_to_stop() -> None:
    tracker = Tracker(BACKEND)
    out = feed(
        tracker,
        Probe({WEB: facts(WEB, "web-01", persistent=False, state="running")}),
        lifecycle(WEB, "web-01", "started", "booted", 7),
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
    )
    assert rows(out) == [
        ("added", "started", "derived", False, "running", 1),
        ("started", "booted", "libvirt", False, "running", 2),
        ("stopped", "destroyed", "libvirt", False, "shutoff", 3),
        ("removed", "stopped", "derived", False, "shutoff", 4),
    ]
    assert tracker.records == {}


def test_transient_domain_that_is_defined_becomes_persistent() -> None:
    tracker = Tracker(BACKEND)
    probe = Probe({WEB: facts(WEB, "web-01", persistent=False, state="running")})
    out = feed(
        tracker,
        probe,
        lifecycle(WEB, "web-01", "started", "booted", 7),
        lifecycle(WEB, "web-01", "defined", "added", 7),
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
    )
    assert rows(out) == [
        ("added", "started", "derived", False, "running", 1),
        ("started", "booted", "libvirt", False, "running", 2),
        ("defined", "added", "libvirt", True, "running", 3),
        ("stopped", "destroyed", "libvirt", True, "shutoff", 4),
    ]
    assert tracker.records[WEB].persistent is True
    assert tracker.records[WEB].state.state == "shutoff"
    assert probe.calls == [WEB]


def test_running_persistent_domain_that_is_undefined_becomes_transient() -> None:
    tracker = Tracker(BACKEND)
    out = feed(
        tracker,
        Probe({WEB: facts(WEB, "web-01", persistent=True)}),
        lifecycle(WEB, "web-01", "defined", "added"),
        lifecycle(WEB, "web-01", "started", "booted", 7),
        lifecycle(WEB, "web-01", "undefined", "removed", 7),
    )
    assert rows(out)[-1] == ("undefined", "removed", "libvirt", False, "running", 4)
    assert tracker.records[WEB] == Record("web-01", False, RUNNING, 4)
    out = feed(tracker, Probe(), lifecycle(WEB, "web-01", "stopped", "destroyed"))
    assert rows(out) == [
        ("stopped", "destroyed", "libvirt", False, "shutoff", 5),
        ("removed", "stopped", "derived", False, "shutoff", 6),
    ]


def test_rename_keeps_the_uuid_and_says_old_and_new_name() -> None:
    """libvirt reports a rename as undefined/renamed (old name), then defined/renamed (new)."""
    tracker = Tracker(BACKEND, {WEB: record("web-01", True, "shutoff", seq=2)})
    probe = Probe({WEB: facts(WEB, "web-02", persistent=True)})
    out = feed(
        tracker,
        probe,
        lifecycle(WEB, "web-01", "undefined", "renamed"),
        lifecycle(WEB, "web-02", "defined", "renamed"),
    )
    assert rows(out) == [
        ("undefined", "renamed", "libvirt", True, "shutoff", 3),
        ("defined", "renamed", "libvirt", True, "shutoff", 4),
    ]
    assert [p.rename for p in out] == [("web-01", "web-02"), ("web-01", "web-02")]
    assert [p.event.domain.name for p in out] == ["web-01", "web-02"]
    assert probe.calls == [WEB]  # the undefined/renamed event does not carry the new name
    assert tracker.records[WEB].name == "web-02"
    assert tracker.records[WEB].persistent is True


@pytest.mark.parametrize("answer", [None, GONE], ids=["unknown", "gone"])
def test_rename_whose_new_name_cannot_be_learnt_says_null(answer: Probed) -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", True, "shutoff", seq=2)})
    (pub,) = feed(tracker, Probe({WEB: answer}), lifecycle(WEB, "web-01", "undefined", "renamed"))
    assert pub.rename == ("web-01", None)
    assert (pub.persistent, tracker.records[WEB].name) == (True, "web-01")


@pytest.mark.parametrize("detail", ["destroyed", "shutdown", "migrated", "saved", "failed"])
def test_persistent_domain_that_stops_still_exists(detail: str) -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", True, "running")})
    out = feed(tracker, Probe(), lifecycle(WEB, "web-01", "stopped", detail))
    assert rows(out) == [("stopped", detail, "libvirt", True, "shutoff", 6)]
    assert tracker.records[WEB].state.state == "shutoff"


@pytest.mark.parametrize("detail", ["destroyed", "shutdown", "migrated", "saved", "failed"])
def test_transient_domain_that_shuts_down_migrates_or_is_saved_is_removed(detail: str) -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", False, "running")})
    out = feed(tracker, Probe(), lifecycle(WEB, "web-01", "stopped", detail))
    assert rows(out) == [
        ("stopped", detail, "libvirt", False, "shutoff", 6),
        ("removed", "stopped", "derived", False, "shutoff", 7),
    ]


def test_qemu_order_resumed_before_started_still_adds_first() -> None:
    tracker = Tracker(BACKEND)
    out = feed(
        tracker,
        Probe({WEB: facts(WEB, "web-01", persistent=False, state="running")}),
        lifecycle(WEB, "web-01", "resumed", "unpaused", 7),
        lifecycle(WEB, "web-01", "started", "booted", 7),
    )
    assert rows(out) == [
        ("added", "started", "derived", False, "running", 1),
        ("resumed", "unpaused", "libvirt", False, "running", 2),
        ("started", "booted", "libvirt", False, "running", 3),
    ]


# --- UUIDs never seen before ---------------------------------------------------------------


def test_unknown_uuid_is_discovered_with_the_probed_facts() -> None:
    tracker = Tracker(BACKEND)
    probe = Probe({WEB: facts(WEB, "web-01", persistent=True)})
    out = feed(tracker, probe, lifecycle(WEB, "web-01", "stopped", "destroyed"))
    assert rows(out) == [
        ("added", "discovered", "derived", True, "shutoff", 1),
        ("stopped", "destroyed", "libvirt", True, "shutoff", 2),
    ]
    assert probe.calls == [WEB]


def test_unknown_uuid_the_backend_says_is_gone_is_added_then_removed() -> None:
    tracker = Tracker(BACKEND)
    out = feed(tracker, Probe({WEB: GONE}), lifecycle(WEB, "web-01", "stopped", "destroyed"))
    assert rows(out) == [
        ("added", "discovered", "derived", False, "shutoff", 1),
        ("stopped", "destroyed", "libvirt", False, "shutoff", 2),
        ("removed", "stopped", "derived", False, "shutoff", 3),
    ]
    assert tracker.records == {}


def test_unknown_uuid_started_then_gone_waits_for_its_stop() -> None:
    tracker = Tracker(BACKEND)
    out = feed(tracker, Probe({WEB: GONE}), lifecycle(WEB, "web-01", "started", "booted", 7))
    assert rows(out) == [
        ("added", "started", "derived", False, "running", 1),
        ("started", "booted", "libvirt", False, "running", 2),
    ]
    out = feed(tracker, Probe(), lifecycle(WEB, "web-01", "stopped", "destroyed"))
    assert [r[:2] for r in rows(out)] == [("stopped", "destroyed"), ("removed", "stopped")]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            ("stopped", "destroyed"),
            [
                ("added", "discovered", "derived", True, "shutoff", 1),
                ("stopped", "destroyed", "libvirt", True, "shutoff", 2),
            ],
        ),
        (
            ("started", "booted"),
            [
                ("added", "started", "derived", True, "running", 1),
                ("started", "booted", "libvirt", True, "running", 2),
            ],
        ),
        (
            ("defined", "added"),
            [
                # Defined while maybe running (a transient gaining a config): state unknown.
                ("added", "defined", "derived", True, "nostate", 1),
                ("defined", "added", "libvirt", True, "nostate", 2),
            ],
        ),
        (
            ("suspended", "paused"),
            [
                ("added", "discovered", "derived", True, "paused", 1),
                ("suspended", "paused", "libvirt", True, "paused", 2),
            ],
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_unknown_uuid_the_backend_cannot_answer_for_is_assumed_persistent(
    event: tuple[str, str], expected: list[Row]
) -> None:
    """None (disconnected): a wrongly kept domain is fixed by resync, a wrong removed never."""
    tracker = Tracker(BACKEND)
    out = feed(tracker, Probe({WEB: None}), lifecycle(WEB, "web-01", *event))
    assert rows(out) == expected
    assert WEB in tracker.records


def test_unknown_transient_the_backend_cannot_answer_for_is_not_removed_when_it_stops() -> None:
    tracker = Tracker(BACKEND)
    probe = Probe({WEB: None})
    out = feed(
        tracker,
        probe,
        lifecycle(WEB, "web-01", "started", "booted", 7),
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
    )
    assert "removed" not in [p.event.event for p in out]
    assert WEB in tracker.records


@pytest.mark.parametrize(
    "first",
    [(), (rtc_change(WEB, "web-01"),), (lifecycle(WEB, "web-01", "defined", "updated", 7),)],
    ids=["undefined-first", "after-rtc_change", "after-redefine"],
)
def test_unknown_uuid_undefined_while_the_backend_cannot_answer_is_not_removed(
    first: tuple[DomainEvent, ...],
) -> None:
    """The domain may be running (it then merely became transient): no `removed`.

    The tracker assumes shutoff for a domain it discovered while the probe could not
    answer, so the undefined that follows looks like the end of an inactive domain.
    """
    tracker = Tracker(BACKEND)
    out = feed(
        tracker,
        Probe({WEB: None}),
        *first,
        lifecycle(WEB, "web-01", "undefined", "removed", 7),
    )
    assert "removed" not in [p.event.event for p in out]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            facts(WEB, "web-01", persistent=True, state="running"),
            [
                ("added", "discovered", "derived", True, "running", 1),
                ("rtc_change", None, "libvirt", True, "running", 2),
            ],
        ),
        (
            facts(WEB, "web-01", persistent=False, state="running"),
            [
                ("added", "started", "derived", False, "running", 1),
                ("rtc_change", None, "libvirt", False, "running", 2),
            ],
        ),
        (
            None,
            [  # the state is unknown until the next resync
                ("added", "discovered", "derived", True, "nostate", 1),
                ("rtc_change", None, "libvirt", True, "nostate", 2),
            ],
        ),
        (
            GONE,
            [  # its ending events are probably queued behind: it is not removed yet
                ("added", "discovered", "derived", False, "nostate", 1),
                ("rtc_change", None, "libvirt", False, "nostate", 2),
            ],
        ),
    ],
    ids=["persistent", "transient", "cannot-tell", "gone"],
)
def test_non_lifecycle_event_of_an_unknown_domain(answer: Probed, expected: list[Row]) -> None:
    tracker = Tracker(BACKEND)
    probe = Probe({WEB: answer})
    out = feed(tracker, probe, rtc_change(WEB, "web-01"))
    assert rows(out) == expected
    assert probe.calls == [WEB]


def test_a_gone_domain_whose_ending_never_comes_is_removed_after_the_grace() -> None:
    event = rtc_change(WEB, "web-01")
    tracker = Tracker(BACKEND, clock=lambda: event.received_at)
    feed(tracker, Probe({WEB: GONE}), event)
    assert tracker.settle(event.received_at + model.GONE_GRACE_S / 2) == []
    ended = tracker.settle(event.received_at + model.GONE_GRACE_S)
    assert [(p.event.event, p.event.detail, p.event.origin, p.seq) for p in ended] == [
        ("stopped", None, "derived", 3),  # its state was unknown: it may have been running
        ("removed", "vanished", "derived", 4),
    ]
    assert WEB not in tracker.records
    assert tracker.settle(event.received_at + 10 * model.GONE_GRACE_S) == []


def test_the_grace_runs_from_the_lookup_answer_not_from_the_event() -> None:
    """libvirtd holds the domain's lock while it destroys a QEMU guest, so a lookup made for
    its `resumed` answers GONE only when the destroy is over, and the ending events come
    right behind that answer, more than the grace after the `resumed` itself."""
    answered = T0 + 1.9
    tracker = Tracker(BACKEND, clock=lambda: answered)
    feed(tracker, Probe({WEB: GONE}), lifecycle(WEB, "web-01", "resumed", "unpaused", 7))
    assert tracker.settle(T0 + model.GONE_GRACE_S + 0.5) == []
    out = feed(tracker, Probe(), lifecycle(WEB, "web-01", "stopped", "destroyed"))
    assert [r[:2] for r in rows(out)] == [("stopped", "destroyed"), ("removed", "stopped")]
    assert tracker.settle(answered + 10 * model.GONE_GRACE_S) == []


def test_a_domain_missing_from_a_listing_ended_by_its_late_stop_lives_once() -> None:
    """libvirt delivers a stop after the call returned: the listing may already lack the
    domain when its own `stopped` is still on its way. That event ends it, once."""
    tracker = Tracker(BACKEND, {WEB: record("web-01", False, "running", seq=3)})
    assert tracker.reconcile([], "resync", T0) == []
    out = feed(tracker, Probe(), lifecycle(WEB, "web-01", "stopped", "destroyed"))
    assert [r[:2] for r in rows(out)] == [("stopped", "destroyed"), ("removed", "stopped")]
    assert [p.seq for p in out] == [4, 5]
    assert tracker.settle(T0 + 10 * model.GONE_GRACE_S) == []


def test_a_gone_domain_ended_by_its_own_stop_is_not_removed_twice() -> None:
    tracker = Tracker(BACKEND)
    started = lifecycle(WEB, "web-01", "resumed", "unpaused", 7)
    out = feed(
        tracker, Probe({WEB: GONE}), started, lifecycle(WEB, "web-01", "stopped", "destroyed")
    )
    assert [r[:2] for r in rows(out)] == [
        ("added", "started"),
        ("resumed", "unpaused"),
        ("stopped", "destroyed"),
        ("removed", "stopped"),
    ]
    assert tracker.settle(started.received_at + 10 * model.GONE_GRACE_S) == []


def test_known_domain_is_never_probed() -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", True, "running")})
    probe = Probe()
    feed(
        tracker,
        probe,
        rtc_change(WEB, "web-01"),
        lifecycle(WEB, "web-01", "suspended", "paused", 7),
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
    )
    assert probe.calls == []


# --- seq and what to persist ---------------------------------------------------------------


def test_seq_is_per_domain_and_restarts_after_removed_and_added() -> None:
    tracker = Tracker(BACKEND)
    probe = Probe(
        {
            WEB: facts(WEB, "web-01", persistent=False, state="running"),
            DB: facts(DB, "db-01", persistent=True),
        }
    )
    out = feed(
        tracker,
        probe,
        lifecycle(WEB, "web-01", "started", "booted", 7),
        lifecycle(DB, "db-01", "defined", "added"),
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
        lifecycle(WEB, "web-01", "started", "booted", 8),
        lifecycle(DB, "db-01", "started", "booted", 9),
    )
    assert [(p.event.domain.uuid, p.event.event, p.seq) for p in out] == [
        (WEB, "added", 1),
        (WEB, "started", 2),
        (DB, "added", 1),
        (DB, "defined", 2),
        (WEB, "stopped", 3),
        (WEB, "removed", 4),
        (WEB, "added", 1),
        (WEB, "started", 2),
        (DB, "started", 3),
    ]
    assert probe.calls == [WEB, DB, WEB]


def test_seq_continues_from_persisted_records() -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", True, "shutoff", seq=41)})
    out = feed(tracker, Probe(), lifecycle(WEB, "web-01", "started", "booted", 7))
    assert [p.seq for p in out] == [42]


def test_take_changes_returns_changed_records_and_removed_uuids() -> None:
    tracker = Tracker(
        BACKEND, {DB: record("db-01", True, "running"), CACHE: record("c", True, "running")}
    )
    assert tracker.take_changes() == ({}, set())
    probe = Probe({WEB: facts(WEB, "web-01", persistent=True)})
    feed(
        tracker,
        probe,
        lifecycle(WEB, "web-01", "defined", "added"),
        lifecycle(DB, "db-01", "stopped", "destroyed"),
    )
    changed, removed = tracker.take_changes()
    assert changed == {
        WEB: Record("web-01", True, model.SHUTOFF, 2),  # a fresh define: shut off, reason unknown
        DB: Record("db-01", True, CATALOG.implied_state("stopped", "destroyed"), 6),
    }
    assert removed == set()
    assert tracker.take_changes() == ({}, set())
    feed(tracker, probe, lifecycle(WEB, "web-01", "undefined", "removed"))
    assert tracker.take_changes() == ({}, {WEB})


def test_take_changes_of_a_domain_removed_and_added_again_is_a_change() -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", False, "running")})
    probe = Probe({WEB: facts(WEB, "web-01", persistent=False, state="running")})
    feed(
        tracker,
        probe,
        lifecycle(WEB, "web-01", "stopped", "destroyed"),
        lifecycle(WEB, "web-01", "started", "booted", 8),
    )
    changed, removed = tracker.take_changes()
    assert (set(changed), removed) == ({WEB}, set())
    assert changed[WEB].seq == 2


# --- reconcile: resync ---------------------------------------------------------------------


def test_resync_announces_new_domains_and_replays_how_they_got_there() -> None:
    tracker = Tracker(BACKEND)
    listing = [
        facts(WEB, "web-01", persistent=True),
        facts(DB, "db-01", persistent=False, state="running"),
        facts(CACHE, "cache-01", persistent=False, state="paused"),
        facts(LOG, "log-01", persistent=True, state="paused"),
    ]
    out = settled(tracker, listing, "resync", T0)
    assert [(p.event.domain.uuid, *row) for p, row in zip(out, rows(out), strict=True)] == [
        (WEB, "added", "defined", "resync", True, "shutoff", 1),
        (WEB, "defined", None, "resync", True, "shutoff", 2),
        (DB, "added", "started", "resync", False, "running", 1),
        (DB, "started", None, "resync", False, "running", 2),
        (CACHE, "added", "started", "resync", False, "paused", 1),
        (CACHE, "started", None, "resync", False, "paused", 2),
        (CACHE, "suspended", None, "resync", False, "paused", 3),
        (LOG, "added", "defined", "resync", True, "shutoff", 1),
        (LOG, "defined", None, "resync", True, "shutoff", 2),
        (LOG, "started", None, "resync", True, "paused", 3),
        (LOG, "suspended", None, "resync", True, "paused", 4),
    ]
    assert all(p.event.codes is None for p in out)
    assert {u: r.state for u, r in tracker.records.items()} == {
        f.uuid: f.state for f in listing
    }  # the listing's exact reason is kept


def test_resync_removes_domains_the_listing_no_longer_has() -> None:
    tracker = Tracker(
        BACKEND,
        {
            WEB: record("web-01", False, "running", seq=3),
            DB: record("db-01", True, "shutoff", seq=4),
            CACHE: record("cache-01", True, "running", seq=5),
        },
    )
    out = settled(tracker, [], "resync", T0)
    assert [(p.event.domain.uuid, *row) for p, row in zip(out, rows(out), strict=True)] == [
        (DB, "undefined", None, "resync", False, "shutoff", 5),
        (DB, "removed", "vanished", "resync", False, "shutoff", 6),
        (WEB, "stopped", None, "resync", False, "shutoff", 4),
        (WEB, "removed", "vanished", "resync", False, "shutoff", 5),
        (CACHE, "stopped", None, "resync", True, "shutoff", 6),
        (CACHE, "undefined", None, "resync", False, "shutoff", 7),
        (CACHE, "removed", "vanished", "resync", False, "shutoff", 8),
    ]  # in UUID order
    assert tracker.records == {}
    assert tracker.take_changes() == ({}, {WEB, DB, CACHE})


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (("shutoff", True), ("running", True), [("started", True, "running")]),
        (("running", True), ("shutoff", True), [("stopped", True, "shutoff")]),
        (("running", True), ("paused", True), [("suspended", True, "paused")]),
        (("paused", True), ("running", True), [("resumed", True, "running")]),
        (("paused", True), ("shutoff", True), [("stopped", True, "shutoff")]),
        (
            ("shutoff", True),
            ("paused", True),
            [("started", True, "paused"), ("suspended", True, "paused")],
        ),
        (("running", False), ("running", True), [("defined", True, "running")]),
        (("running", True), ("running", False), [("undefined", False, "running")]),
        (("paused", False), ("running", False), [("resumed", False, "running")]),
        (
            ("running", False),
            ("shutoff", True),
            [("defined", True, "running"), ("stopped", True, "shutoff")],
        ),
        (
            ("shutoff", True),
            ("running", False),
            [("started", True, "running"), ("undefined", False, "running")],
        ),
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else None,
)
def test_resync_publishes_state_and_persistence_transitions(
    before: tuple[str, bool], after: tuple[str, bool], expected: list[tuple[str, bool, str]]
) -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", before[1], before[0], seq=5)})
    out = settled(tracker, [facts(WEB, "web-01", after[1], after[0])], "resync", T0)
    assert rows(out) == [
        (event, None, "resync", persistent, state, 6 + n)
        for n, (event, persistent, state) in enumerate(expected)
    ]
    assert tracker.records[WEB] == Record("web-01", after[1], STATES[after[0]], 5 + len(out))


def test_resync_of_an_unchanged_listing_publishes_nothing() -> None:
    tracker = Tracker(
        BACKEND,
        {WEB: record("web-01", True, "running"), DB: record("db-01", False, "paused")},
    )
    tracker.take_changes()
    listing = [facts(WEB, "web-01", True, "running"), facts(DB, "db-01", False, "paused")]
    assert settled(tracker, listing, "resync", T0) == []
    assert tracker.take_changes() == ({}, set())


def test_resync_takes_the_listed_reason_without_publishing() -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", True, "running")})
    unpaused = CATALOG.domain_state(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)
    listing = [DomainFacts(WEB, "web-01", 7, True, unpaused)]
    assert settled(tracker, listing, "resync", T0) == []
    assert tracker.records[WEB] == Record("web-01", True, unpaused, 5)
    assert set(tracker.take_changes()[0]) == {WEB}


def test_resync_of_a_domain_renamed_unseen_redefines_it_under_the_new_name() -> None:
    tracker = Tracker(BACKEND, {WEB: record("web-01", True, "shutoff")})
    out = settled(tracker, [facts(WEB, "web-02", True)], "resync", T0)
    assert rows(out) == [("defined", None, "resync", True, "shutoff", 6)]
    assert out[0].event.domain.name == "web-02"
    assert tracker.records[WEB].name == "web-02"


# --- reconcile: poll -----------------------------------------------------------------------


def test_poll_publishes_only_the_allowed_types_and_leaves_the_rest() -> None:
    tracker = Tracker(
        BACKEND,
        {
            WEB: record("web-01", True, "running"),
            DB: record("db-01", False, "running"),
            CACHE: record("cache-01", True, "running"),
        },
    )
    tracker.take_changes()
    listing = [
        facts(WEB, "web-01", True, "paused"),  # suspended: allowed
        facts(DB, "db-01", True, "running"),  # defined: left to the backend's events
        facts(LOG, "log-01", False, "running"),  # new: added not allowed
    ]  # CACHE vanished: removed not allowed
    out = settled(tracker, listing, "poll", T0, frozenset({"suspended", "resumed"}))
    assert [(p.event.domain.uuid, *row) for p, row in zip(out, rows(out), strict=True)] == [
        (WEB, "suspended", None, "poll", True, "paused", 6),
    ]
    assert tracker.records == {
        WEB: Record("web-01", True, PAUSED, 6),
        DB: record("db-01", False, "running"),
        CACHE: record("cache-01", True, "running"),
    }
    assert set(tracker.take_changes()[0]) == {WEB}


def test_poll_for_existence_adds_and_removes() -> None:
    allowed = frozenset({"defined", "undefined", "added", "removed"})
    tracker = Tracker(BACKEND, {CACHE: record("cache-01", True, "shutoff", seq=2)})
    out = settled(tracker, [facts(WEB, "web-01", True)], "poll", T0, allowed)
    assert [(p.event.domain.uuid, *row) for p, row in zip(out, rows(out), strict=True)] == [
        (WEB, "added", "defined", "poll", True, "shutoff", 1),
        (WEB, "defined", None, "poll", True, "shutoff", 2),
        (CACHE, "undefined", None, "poll", False, "shutoff", 3),
        (CACHE, "removed", "vanished", "poll", False, "shutoff", 4),
    ]


def test_poll_does_not_replay_types_it_does_not_own_for_a_new_domain() -> None:
    """started is native here: its own event (queued behind the poll) reports it."""
    allowed = frozenset({"defined", "undefined", "added", "removed"})
    tracker = Tracker(BACKEND)
    out = settled(tracker, [facts(WEB, "web-01", True, "running")], "poll", T0, allowed)
    assert {p.event.event for p in out} <= allowed


# --- snapshot ------------------------------------------------------------------------------


def test_snapshot_gives_one_entry_per_known_listed_domain() -> None:
    tracker = Tracker(
        BACKEND,
        {
            WEB: record("web-01", True, "running", seq=3),
            DB: record("db-01", False, "paused", seq=9),
            CACHE: record("cache-01", True, "shutoff", seq=1),  # known, not listed
        },
    )
    listing = [
        facts(WEB, "web-01", True, "running"),
        facts(DB, "db-01", False, "paused"),
        facts(LOG, "log-01", True),  # listed, never announced
    ]
    out = tracker.snapshot(listing, T0)
    assert [(p.event.domain.uuid, *row) for p, row in zip(out, rows(out), strict=True)] == [
        (WEB, "snapshot", None, "snapshot", True, "running", 4),
        (DB, "snapshot", None, "snapshot", False, "paused", 10),
    ]
    assert [p.event.domain.name for p in out] == ["web-01", "db-01"]
    assert all(p.event.codes is None and p.rename is None for p in out)
    assert set(tracker.records) == {WEB, DB, CACHE}


def test_resync_then_snapshot_covers_every_listed_domain() -> None:
    tracker = Tracker(BACKEND, {CACHE: record("cache-01", True, "shutoff")})
    listing = [facts(WEB, "web-01", True, "running"), facts(DB, "db-01", False, "running")]
    settled(tracker, listing, "resync", T0)
    out = tracker.snapshot(listing, T0)
    assert [(p.event.domain.uuid, p.state) for p in out] == [(WEB, RUNNING), (DB, RUNNING)]
    assert set(tracker.records) == {WEB, DB}


# --- property: a simulated libvirt ---------------------------------------------------------


@dataclass
class SimDomain:
    uuid: str
    name: str
    persistent: bool
    state: str  # running, paused or shutoff
    id: int | None = None


class Simulator:
    """libvirt's semantics for one connection, emitting the lifecycle events QEMU would."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.domains: dict[str, SimDomain] = {}
        self.retired: list[str] = []
        """UUIDs that existed and may be used again (createXML or define with the same UUID)."""
        self.incarnations: defaultdict[str, int] = defaultdict(int)
        self._counter = 0

    # -- what a backend answers --

    def facts(self, dom: SimDomain) -> DomainFacts:
        return DomainFacts(dom.uuid, dom.name, dom.id, dom.persistent, STATES[dom.state])

    def probe(self, uuid: str) -> Probed:
        dom = self.domains.get(uuid)
        return GONE if dom is None else self.facts(dom)

    def listing(self) -> list[DomainFacts]:
        return [self.facts(dom) for dom in self.domains.values()]

    def view(self) -> dict[str, tuple[str, bool, str]]:
        return {u: (d.name, d.persistent, d.state) for u, d in self.domains.items()}

    # -- operations --

    def _fresh(self) -> tuple[str, str]:
        self._counter += 1
        if self.retired and self.rng.random() < 0.3:
            uuid = self.retired.pop(self.rng.randrange(len(self.retired)))
        else:
            uuid = f"00000000-0000-4000-8000-{self._counter:012x}"
        return uuid, f"vm-{self._counter}"

    def _event(
        self, dom: SimDomain, event: str, detail: str, name: str | None = None
    ) -> DomainEvent:
        return lifecycle(dom.uuid, name or dom.name, event, detail, dom.id)

    def _boot(self, dom: SimDomain, paused: bool) -> list[DomainEvent]:
        self._counter += 1
        dom.id, dom.state = self._counter, "running"
        events = []
        if self.rng.random() < 0.5:  # QEMU emits resumed before started
            events.append(self._event(dom, "resumed", "unpaused"))
        events.append(self._event(dom, "started", "booted"))
        if paused:
            dom.state = "paused"
            events.append(self._event(dom, "suspended", "paused"))
        return events

    def _gone(self, dom: SimDomain) -> None:
        del self.domains[dom.uuid]
        self.retired.append(dom.uuid)

    def step(self) -> tuple[str, list[DomainEvent]]:
        """One random operation that libvirt would accept now, and the events it emits."""
        doms = list(self.domains.values())
        ops: list[tuple[str, Callable[[], list[DomainEvent]]]] = [
            ("define", self.define_new),
            ("create", self.create_transient),
        ]
        for dom in doms:
            active = dom.state != "shutoff"
            if dom.persistent:
                ops.append(("undefine", lambda d=dom: self.undefine(d)))
                ops.append(("redefine", lambda d=dom: self.redefine(d)))
                if not active:
                    ops.append(("start", lambda d=dom: self.start(d)))
                    ops.append(("rename", lambda d=dom: self.rename(d)))
            elif active:
                ops.append(("make-persistent", lambda d=dom: self.redefine(d)))
            if active:
                ops.append(("stop", lambda d=dom: self.stop(d)))
                ops.append(("reboot", lambda d=dom: [rtc_change(d.uuid, d.name, d.id)]))
            if dom.state == "running":
                ops.append(("suspend", lambda d=dom: self.suspend(d)))
            if dom.state == "paused":
                ops.append(("resume", lambda d=dom: self.resume(d)))
        name, op = self.rng.choice(ops)
        return name, op()

    def define_new(self) -> list[DomainEvent]:
        uuid, name = self._fresh()
        dom = self.domains[uuid] = SimDomain(uuid, name, True, "shutoff")
        self.incarnations[uuid] += 1
        return [self._event(dom, "defined", "added")]

    def create_transient(self) -> list[DomainEvent]:
        uuid, name = self._fresh()
        dom = self.domains[uuid] = SimDomain(uuid, name, False, "shutoff")
        self.incarnations[uuid] += 1
        return self._boot(dom, paused=self.rng.random() < 0.2)

    def redefine(self, dom: SimDomain) -> list[DomainEvent]:
        detail = "updated" if dom.persistent else "added"
        dom.persistent = True
        return [self._event(dom, "defined", detail)]

    def start(self, dom: SimDomain) -> list[DomainEvent]:
        return self._boot(dom, paused=self.rng.random() < 0.2)

    def stop(self, dom: SimDomain) -> list[DomainEvent]:
        detail = self.rng.choice(["destroyed", "shutdown", "migrated", "saved", "failed"])
        events = []
        if detail == "shutdown":
            events.append(self._event(dom, "shutdown", "finished"))
        dom.id, dom.state = None, "shutoff"
        events.append(self._event(dom, "stopped", detail))
        if not dom.persistent:
            self._gone(dom)
        return events

    def suspend(self, dom: SimDomain) -> list[DomainEvent]:
        dom.state = "paused"
        return [self._event(dom, "suspended", "paused")]

    def resume(self, dom: SimDomain) -> list[DomainEvent]:
        dom.state = "running"
        return [self._event(dom, "resumed", "unpaused")]

    def undefine(self, dom: SimDomain) -> list[DomainEvent]:
        dom.persistent = False
        event = self._event(dom, "undefined", "removed")
        if dom.state == "shutoff":
            self._gone(dom)
        return [event]

    def rename(self, dom: SimDomain) -> list[DomainEvent]:
        self._counter += 1
        old, dom.name = dom.name, f"vm-{self._counter}"
        return [
            self._event(dom, "undefined", "renamed", old),
            self._event(dom, "defined", "renamed"),
        ]


def tracked(tracker: Tracker) -> dict[str, tuple[str, bool, str]]:
    return {u: (r.name, r.persistent, r.state.state) for u, r in tracker.records.items()}


def check_stream(published: list[Publication], sim: Simulator) -> None:
    """added first, contiguous seq, only a fresh added after removed, no spurious re-add."""
    lives: defaultdict[str, list[list[Publication]]] = defaultdict(list)
    for pub in published:
        uuid = pub.event.domain.uuid
        if not lives[uuid] or lives[uuid][-1][-1].event.event == "removed":
            assert pub.event.event == "added", f"{uuid}: {pub.event.event} before added"
            lives[uuid].append([])
        lives[uuid][-1].append(pub)
    for uuid, runs in lives.items():
        assert len(runs) <= sim.incarnations[uuid], f"{uuid} added more often than it was created"
        for run in runs:
            assert [p.seq for p in run] == list(range(1, len(run) + 1)), uuid
            assert all(p.event.event not in ("added", "removed") for p in run[1:-1]), uuid


SEEDS = [1, 2, 3, 7, 42, 1234]
OPS = 500


@pytest.mark.parametrize("seed", SEEDS)
def test_property_events_handled_as_they_come(seed: int) -> None:
    """Every event is handled right after its operation; the probe tells the truth."""
    rng = random.Random(seed)
    sim, tracker = Simulator(rng), Tracker(BACKEND)
    published: list[Publication] = []
    for _ in range(OPS):
        op, events = sim.step()
        out = feed(tracker, sim.probe, *events)
        published.extend(out)
        for pub in out:
            if pub.event.event == "removed":
                assert pub.event.domain.uuid not in sim.domains, f"{op}: removed an existing domain"
        assert tracked(tracker) == sim.view(), op
        check_stream(published, sim)
    ops_seen = {p.event.event for p in published}
    assert {"added", "removed", "defined", "undefined", "started", "stopped"} <= ops_seen
    assert any(p.rename for p in published)


@pytest.mark.parametrize("seed", SEEDS)
def test_property_events_handled_late(seed: int) -> None:
    """Events wait in the queue while more operations happen; the probe answers the present."""
    rng = random.Random(seed)
    sim, tracker = Simulator(rng), Tracker(BACKEND)
    published: list[Publication] = []
    queued: list[DomainEvent] = []
    for n in range(OPS):
        queued.extend(sim.step()[1])
        if rng.random() < 0.3 or n == OPS - 1:
            published.extend(feed(tracker, sim.probe, *queued))
            queued.clear()
            assert tracked(tracker) == sim.view()
            check_stream(published, sim)


@pytest.mark.parametrize("seed", SEEDS)
def test_property_blind_gaps_are_closed_by_resync(seed: int) -> None:
    """Events are lost while the backend is away, the last ones before it are handled with a
    probe that cannot answer; a resync then brings the records back in line."""
    rng = random.Random(seed)
    sim, tracker = Simulator(rng), Tracker(BACKEND)
    published: list[Publication] = []
    n = 0
    while n < OPS:
        for _ in range(rng.randrange(1, 20)):  # connected
            _, events = sim.step()
            n += 1
            out = feed(tracker, sim.probe, *events)
            published.extend(out)
            assert tracked(tracker) == sim.view()
        for _ in range(rng.randrange(0, 3)):  # queued, handled after the loss was noticed
            _, events = sim.step()
            n += 1
            out = feed(tracker, lambda _uuid: None, *events)
            published.extend(out)
            for pub in out:
                if pub.event.event == "removed":
                    assert pub.event.domain.uuid not in sim.domains
        for _ in range(rng.randrange(0, 10)):  # lost
            sim.step()
            n += 1
        published.extend(settled(tracker, sim.listing(), "resync", T0))
        assert tracked(tracker) == sim.view()
        check_stream(published, sim)
        snap = tracker.snapshot(sim.listing(), T0)
        assert sorted(p.event.domain.uuid for p in snap) == sorted(sim.domains)
        published.extend(snap)
    check_stream(published, sim)


def test_property_first_start_while_lookups_fail_never_removes_an_existing_domain() -> None:
    """virtpub starts with no records while libvirt already has domains; events arrive while
    lookups fail (None). No `removed` may name a domain that exists; resync then converges."""
    for seed in SEEDS:
        rng = random.Random(seed)
        sim = Simulator(rng)
        for _ in range(50):
            sim.step()
        tracker = Tracker(BACKEND)
        published: list[Publication] = []
        for _ in range(30):
            op, events = sim.step()
            out = feed(tracker, lambda _uuid: None, *events)
            published.extend(out)
            for pub in out:
                if pub.event.event == "removed":
                    uuid = pub.event.domain.uuid
                    assert uuid not in sim.domains, f"seed {seed}: {op} removed existing {uuid}"
        published.extend(settled(tracker, sim.listing(), "resync", T0))
        assert tracked(tracker) == sim.view()
        check_stream(published, sim)
