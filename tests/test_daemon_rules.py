"""The daemon's rules, on the shipped doubles (`virtpub.testing`): no broker, no disk, no
libvirt, no thread. Each test drives the daemon turn by turn and checks the facts the
integration tests check over a real broker: order, resync, polling, the spool-full
policies, and that what is confirmed leaves the spool."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from virtpub.contract.envelope import OutgoingMessage
from virtpub.core.event import ConfigRejected, DomainEvent, DomainFacts, DomainRef, DomainState
from virtpub.core.tracker import GONE_GRACE_S
from virtpub.daemon import pipeline
from virtpub.daemon.health import health_checks
from virtpub.daemon.overflow import Overflow
from virtpub.daemon.service import EXIT_FAILURE, Daemon
from virtpub.daemon.spool import stored_size
from virtpub.daemon.status import Status
from virtpub.testing import (
    ManualClock,
    MemorySpool,
    RecordingPublisher,
    ScriptedDriver,
    double_settings,
    make_daemon,
)

RUNNING = DomainState("running", "booted", 1, 1)
PAUSED = DomainState("paused", "user", 3, 1)
ONE = "virtpub://testhost/scripted/one"
TWO = "virtpub://testhost/scripted/two"
UUID_A = "aaaaaaaa-0000-0000-0000-000000000001"
UUID_B = "bbbbbbbb-0000-0000-0000-000000000002"
UUID_C = "cccccccc-0000-0000-0000-000000000003"
STOPPED = threading.Event()
STOPPED.set()
"""Handed to `turn`: a set event makes its waits (backpressure, a full disk) return at once."""


def facts(uuid: str, name: str, state: DomainState = RUNNING) -> DomainFacts:
    return DomainFacts(uuid, name, 1, True, state)


def paused(backend: str, uuid: str, name: str) -> DomainEvent:
    return DomainEvent(backend, "suspended", "paused", DomainRef(uuid, name, 1), None, "event",
                       0.0, state=PAUSED)  # fmt: skip


def resumed(backend: str, uuid: str, name: str) -> DomainEvent:
    return DomainEvent(backend, "resumed", "unpaused", DomainRef(uuid, name, 1), None, "event",
                       0.0, state=RUNNING)  # fmt: skip


def tick(driver: ScriptedDriver) -> None:
    """Queues a signal that touches no domain (a rejected config file), so a turn that has
    nothing else to take does not wait for one."""
    driver.emit(ConfigRejected(driver.backend, "/etc/tick.xml", "malformed", "tick", 0.0))


def body(message: OutgoingMessage) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(message.body)
    return decoded


def short(message: OutgoingMessage) -> str:
    """`domain.suspended`, `publisher.snapshot`: the type without its prefix."""
    return message.type.removeprefix("org.virtpub.")


def started(
    *drivers: ScriptedDriver,
    confirm_at_once: bool = True,
    clock: ManualClock | None = None,
    **settings: Any,
) -> tuple[Daemon, MemorySpool, RecordingPublisher]:
    spool = MemorySpool()
    publisher = RecordingPublisher(spool, confirm_at_once=confirm_at_once)
    daemon = make_daemon(
        list(drivers),
        spool=spool,
        publisher=publisher,
        settings=double_settings(**settings),
        clock=clock,
    )
    daemon.begin()
    return daemon, spool, publisher


def test_startup_is_capabilities_then_a_snapshot_bracket_per_backend() -> None:
    daemon, _, publisher = started(
        ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")}), ScriptedDriver(TWO)
    )
    assert publisher.types()[0] == "org.virtpub.publisher.capabilities"
    brackets = [body(m)["data"] for m in publisher.submitted if short(m) == "publisher.snapshot"]
    assert [(b["backend"], b["phase"], b["reason"]) for b in brackets] == [
        (ONE, "begin", "startup"), (ONE, "end", "startup"),
        (TWO, "begin", "startup"), (TWO, "end", "startup"),
    ]  # fmt: skip
    assert [b.get("domains") for b in brackets] == [None, 1, None, 0]
    assert daemon.started.is_set()


def test_sequences_are_consecutive_in_accept_order_across_backends() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    two = ScriptedDriver(TWO, {UUID_B: facts(UUID_B, "b")})
    daemon, _, publisher = started(one, two)
    startup = len(publisher.submitted)
    one.emit(paused(ONE, UUID_A, "a"))
    two.emit(paused(TWO, UUID_B, "b"))
    one.emit(resumed(ONE, UUID_A, "a"))
    two.emit(resumed(TWO, UUID_B, "b"))
    daemon.turn(STOPPED)
    assert [m.sequence for m in publisher.submitted] == list(range(1, startup + 5))
    accepted = [(body(m)["subject"], short(m)) for m in publisher.submitted[startup:]]
    assert accepted == [
        (UUID_A, "domain.suspended"), (UUID_B, "domain.suspended"),
        (UUID_A, "domain.resumed"), (UUID_B, "domain.resumed"),
    ]  # fmt: skip


def test_each_domain_counts_its_own_seq_without_gaps() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a"), UUID_B: facts(UUID_B, "b")})
    daemon, _, publisher = started(one)
    one.emit(paused(ONE, UUID_A, "a"), paused(ONE, UUID_B, "b"), resumed(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    for uuid in (UUID_A, UUID_B):
        seqs = [body(m)["data"]["seq"] for m in publisher.submitted if body(m)["subject"] == uuid]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), uuid


def test_a_restart_resends_what_is_unconfirmed_then_continues_the_sequence() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    first, spool, publisher = started(one, confirm_at_once=False)
    publisher.confirm(2)
    first.finish()
    left = [m.sequence for m in spool.after(0, 100)]
    assert left == list(range(3, len(publisher.submitted) + 1))

    again = RecordingPublisher(spool)
    second = make_daemon([ScriptedDriver(ONE, dict(one.domains))], spool=spool, publisher=again)
    second.begin()
    sequences = [m.sequence for m in again.submitted]
    assert sequences == list(range(3, len(again.submitted) + 3))
    fresh = again.submitted[len(left) :]
    assert short(fresh[0]) == "publisher.capabilities"
    assert [short(m) for m in fresh[1:]] == [
        "publisher.snapshot", "domain.snapshot", "publisher.snapshot",
    ], "the domain's record came back from the spool: nothing to tell but the snapshot"  # fmt: skip


def test_a_reconnect_publishes_the_listing_diff_then_a_snapshot() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a"), UUID_B: facts(UUID_B, "b")})
    clock = ManualClock()
    daemon, _, publisher = started(one, clock=clock)
    one.disconnect("connection reset")
    daemon.turn(STOPPED)
    lost = publisher.submitted[-1]
    assert short(lost) == "publisher.backend"
    assert body(lost)["data"]["connected"] is False
    assert body(lost)["data"]["reason"] == "connection reset"
    gap = len(publisher.submitted)
    del one.domains[UUID_A]
    one.domains[UUID_C] = facts(UUID_C, "c")
    one.reconnect()
    daemon.turn(STOPPED)
    after = publisher.submitted[gap:]
    assert [short(m) for m in after[:2]] == ["publisher.backend", "publisher.capabilities"]
    assert body(after[0])["data"]["connected"] is True
    diff = [(body(m)["subject"], body(m)["data"]["event"]) for m in after if "domain." in m.type]
    assert (UUID_C, "added") in diff
    assert UUID_B not in {uuid for uuid, event in diff if event != "snapshot"}
    assert UUID_A not in {uuid for uuid, _ in diff}, "a domain gone is told after a grace"
    brackets = [body(m)["data"] for m in after if short(m) == "publisher.snapshot"]
    assert [(b["phase"], b["reason"]) for b in brackets] == [
        ("begin", "reconnect"), ("end", "reconnect"),
    ]  # fmt: skip
    assert brackets[1]["domains"] == 2
    snapshot = [body(m)["subject"] for m in after if short(m) == "domain.snapshot"]
    assert sorted(snapshot) == [UUID_B, UUID_C]
    assert daemon.status.backend_reconnects == 1
    assert daemon.status.backend_up == {ONE: True}
    settled = len(publisher.submitted)
    clock.advance(GONE_GRACE_S)
    one.emit(paused(ONE, UUID_B, "b"))  # a signal to take, so the turn does not wait
    daemon.turn(STOPPED)
    told = [(body(m)["subject"], short(m)) for m in publisher.submitted[settled:]]
    assert told == [
        (UUID_B, "domain.suspended"),
        (UUID_A, "domain.stopped"), (UUID_A, "domain.undefined"), (UUID_A, "domain.removed"),
    ]  # fmt: skip


def test_a_backend_change_tells_the_drivers_uri_redacted() -> None:
    one = ScriptedDriver(ONE, uri="qemu+tls://admin:hunter2@host/system")
    daemon, _, publisher = started(one)
    one.disconnect()
    daemon.turn(STOPPED)
    data = body(publisher.submitted[-1])["data"]
    assert data["uri"] == "qemu+tls://admin:***@host/system"
    assert data["backend"] == ONE


def test_polled_types_are_found_by_listing_at_the_drivers_interval() -> None:
    clock = ManualClock()
    one = ScriptedDriver(
        ONE, {UUID_A: facts(UUID_A, "a")}, polled=frozenset({"suspended"}), poll_interval=5.0
    )
    spool = MemorySpool()
    publisher = RecordingPublisher(spool, confirm_at_once=True)
    daemon = make_daemon([one], spool=spool, publisher=publisher, clock=clock)
    daemon.begin()
    assert one.listings == 1
    startup = len(publisher.submitted)
    one.domains[UUID_A] = facts(UUID_A, "a", PAUSED)
    clock.advance(4.9)
    tick(one)
    daemon.turn(STOPPED)
    assert one.listings == 1, "not yet: the interval runs from the startup listing"
    clock.advance(0.1)
    tick(one)
    daemon.turn(STOPPED)
    assert one.listings == 2
    found = [m for m in publisher.submitted[startup:] if short(m).startswith("domain.")]
    assert [short(m) for m in found] == ["domain.suspended"]
    assert body(found[0])["data"]["origin"] == "poll"
    clock.advance(4.9)
    tick(one)
    daemon.turn(STOPPED)
    assert one.listings == 2, "the next poll is an interval after the last"


def test_a_snapshot_request_takes_queued_events_first_and_carries_its_id() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon, _, publisher = started(one)
    startup = len(publisher.submitted)
    one.emit(paused(ONE, UUID_A, "a"))
    one.domains[UUID_A] = facts(UUID_A, "a", PAUSED)
    assert daemon.handoff.snapshot_requests.offer("request-7")
    daemon.turn(STOPPED)
    served = publisher.submitted[startup:]
    assert [short(m) for m in served] == [
        "domain.suspended", "publisher.snapshot", "domain.snapshot", "publisher.snapshot",
    ]  # fmt: skip
    bracket = body(served[1])["data"]
    assert (bracket["reason"], bracket["request_id"]) == ("requested", "request-7")


def test_under_block_a_full_spool_holds_signals_back_and_loses_none() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    _, probe, _ = started(ScriptedDriver(ONE, dict(one.domains)), confirm_at_once=False)
    full = probe.used_bytes  # the startup messages
    daemon, spool, publisher = started(
        one, confirm_at_once=False, spool_max_bytes=full, spool_full_policy="block"
    )
    startup = len(publisher.submitted)
    one.emit(paused(ONE, UUID_A, "a"), resumed(ONE, UUID_A, "a"), paused(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    daemon.turn(STOPPED)
    assert len(publisher.submitted) == startup, "nothing is taken while the spool is full"
    assert spool.count() == startup
    publisher.confirm()
    daemon.turn(STOPPED)
    assert [short(m) for m in publisher.submitted[startup:]] == [
        "domain.suspended", "domain.resumed", "domain.suspended",
    ]  # fmt: skip
    assert daemon.dropped == 0
    assert daemon.status.spool_dropped == 0
    assert publisher.withdrawn == []
    assert not [m for m in publisher.submitted if short(m) == "publisher.dropped"]


def test_drop_oldest_drops_the_oldest_unsent_and_names_the_exact_ranges() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    bound = 4 * stored_size(started(ScriptedDriver(ONE, dict(one.domains)))[2].submitted[-1])
    daemon, spool, publisher = started(
        one, confirm_at_once=False, spool_max_bytes=bound, spool_full_policy="drop-oldest"
    )
    for _ in range(3):
        one.emit(paused(ONE, UUID_A, "a"), resumed(ONE, UUID_A, "a"))
        daemon.turn(STOPPED)
    assert spool.used_bytes <= bound
    assert publisher.withdrawn, "what the broker had not published was taken back"
    last = max(m.sequence for m in publisher.submitted)
    confirmed = {m.sequence for m in publisher.confirm()}
    lost = sorted(set(range(1, last + 1)) - confirmed)
    assert lost, "the bound forced drops"
    assert lost[0] == 1, "the oldest went first"
    assert daemon.status.spool_dropped == len(lost)
    daemon.turn(STOPPED)  # the spool is empty now: the drops are told
    reports = [body(m)["data"] for m in publisher.submitted if short(m) == "publisher.dropped"]
    assert [(r["first_sequence"], r["last_sequence"]) for r in reports] == runs(lost)
    assert {r["reason"] for r in reports} == {"spool_full"}
    assert {r["policy"] for r in reports} == {"drop-oldest"}
    assert sum(r["count"] for r in reports) == len(lost)
    after = publisher.submitted[-3:]
    assert [short(m) for m in after] == ["publisher.snapshot", "domain.snapshot",
                                         "publisher.snapshot"]  # fmt: skip
    assert body(after[0])["data"]["reason"] == "dropped"


def runs(sequences: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for sequence in sequences:
        if spans and spans[-1][1] + 1 == sequence:
            spans[-1] = (spans[-1][0], sequence)
        else:
            spans.append((sequence, sequence))
    return spans


def test_what_is_confirmed_leaves_the_spool_and_only_that() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon, spool, publisher = started(one, confirm_at_once=False)
    handed = len(publisher.submitted)
    assert spool.count() == handed
    confirmed = publisher.confirm(3)
    assert [m.sequence for m in confirmed] == [1, 2, 3]
    assert [m.sequence for m in spool.after(0, 100)] == list(range(4, handed + 1))
    assert spool.used_bytes == sum(map(stored_size, publisher.submitted[3:]))
    publisher.confirm()
    assert spool.count() == 0
    assert spool.used_bytes == 0
    daemon.finish()
    assert spool.closed


def test_the_domain_records_are_spooled_with_the_messages_that_lead_to_them() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon, spool, _ = started(one)
    assert spool.records[ONE][UUID_A].state == RUNNING
    one.emit(paused(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    assert spool.records[ONE][UUID_A].state == PAUSED


def test_a_full_disk_holds_messages_and_spools_them_once_there_is_room() -> None:
    """The batch whose commit fails was handed over alongside its commit; it is held and
    committed once there is room, and nothing new is taken meanwhile."""
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon, spool, publisher = started(one, confirm_at_once=False)
    startup = len(publisher.submitted)
    spool.disk_full = True
    one.emit(paused(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    one.emit(resumed(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    assert [short(m) for m in publisher.submitted[startup:]] == ["domain.suspended"]
    held = publisher.submitted[-1].sequence
    assert held not in spool.messages
    spool.disk_full = False
    daemon.turn(STOPPED)
    assert held in spool.messages, "spooled once there is room"
    assert [short(m) for m in publisher.submitted[startup:]] == ["domain.suspended"]
    daemon.turn(STOPPED)
    assert [short(m) for m in publisher.submitted[startup:]] == [
        "domain.suspended", "domain.resumed",
    ], "the signal that waited in the queue follows"  # fmt: skip


def test_shutdown_spools_and_hands_over_what_the_drivers_queued() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon, spool, publisher = started(one, confirm_at_once=False)
    one.emit(paused(ONE, UUID_A, "a"))
    daemon.finish()
    assert one.stopped
    assert short(publisher.submitted[-1]) == "domain.suspended"
    assert spool.count() == len(publisher.submitted)
    assert publisher.stopped


def test_a_broker_that_refuses_stops_the_daemon_with_a_failure() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    spool = MemorySpool()
    publisher = RecordingPublisher(spool)
    publisher.fatal = "ACCESS_REFUSED"
    daemon = make_daemon([one], spool=spool, publisher=publisher)
    assert daemon.run(threading.Event()) == EXIT_FAILURE
    assert one.stopped
    assert spool.closed
    assert not daemon.started.is_set()


def test_the_policies_decide_from_the_spools_size_alone() -> None:
    status = Status([ONE])
    block = Overflow("block", 100, status, frozenset({ONE}))
    assert not block.blocks(99)
    assert block.blocks(100)
    one = started(ScriptedDriver(ONE))[2].submitted[0]
    assert block.excess(100, [one]) == 0, "block never drops"
    drop = Overflow("drop-oldest", 100, status, frozenset({ONE}))
    assert not drop.blocks(10_000)
    assert drop.excess(100, [one]) == stored_size(one)
    assert drop.excess(0, []) == 0


def test_health_names_each_backend_the_broker_and_the_spool() -> None:
    checks = health_checks({ONE: True, TWO: False}, False, 10, 10)
    assert checks == {
        f"backend {ONE}": (True, "connected"),
        f"backend {TWO}": (False, "disconnected"),
        "broker": (False, "not connected, or blocked by a resource alarm"),
        "spool": (False, "10 of 10 bytes"),
    }
    assert health_checks({}, True, 9, 10)["spool"] == (True, "9 of 10 bytes")


class OrderedSpool(MemorySpool):
    """Notes each commit in `log`, beside the publisher's submits: tells what went out
    before its own commit."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        super().__init__()
        self.log = log

    def append(self, messages: Any, domains: Any = None, *, reserve: int = 0) -> None:
        super().append(messages, domains, reserve=reserve)
        if messages:
            self.log.append(("commit", messages[-1].sequence))


class OrderedPublisher(RecordingPublisher):
    def __init__(self, spool: OrderedSpool) -> None:
        super().__init__(spool)
        self.log = spool.log

    def submit(self, messages: Any) -> None:
        batch = list(messages)
        self.log.append(("submit", batch[-1].sequence))
        super().submit(batch)


class CountingSpool(MemorySpool):
    """Notes the sequences each `after` reads back."""

    def __init__(self) -> None:
        super().__init__()
        self.read_back: list[int] = []

    def after(self, sequence: int, limit: int) -> list[OutgoingMessage]:
        found = super().after(sequence, limit)
        self.read_back += [m.sequence for m in found]
        return found


def test_a_burst_beyond_what_memory_keeps_reads_back_only_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "READY_LIMIT", 3)
    uuids = [f"{n:08d}-0000-0000-0000-000000000000" for n in range(4)]
    listing = {uuid: facts(uuid, uuid[:8]) for uuid in uuids}
    spool = CountingSpool()
    publisher = RecordingPublisher(spool, confirm_at_once=True)
    daemon = make_daemon([ScriptedDriver(ONE, listing)], spool=spool, publisher=publisher)
    daemon.begin()
    while daemon._pipeline.behind:
        daemon.turn(STOPPED)
    handed = [m.sequence for m in publisher.submitted]
    assert handed == list(range(1, spool.last_sequence() + 1)), "all, once, in order"
    assert spool.read_back == handed[3:], "the first three went out from memory"


def test_a_batch_goes_out_before_its_commit_only_within_the_reservation() -> None:
    log: list[tuple[str, int]] = []
    spool = OrderedSpool(log)
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon = make_daemon([one], spool=spool, publisher=OrderedPublisher(spool))
    daemon.begin()
    startup = spool.last_sequence()
    assert log == [("commit", startup), ("submit", startup)], "nothing reserved yet"
    assert spool.reserved_sequence() == startup + 1000
    log.clear()
    one.emit(paused(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    assert log == [("submit", startup + 1), ("commit", startup + 1)]


def test_after_an_unclean_stop_no_sequence_or_seq_is_used_twice() -> None:
    """A run killed after a commit leaves its reservation open: the next run continues
    after it, says which numbers may be missing, and moves every domain's seq on."""
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon, spool, publisher = started(one)
    one.emit(paused(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    last, reserved = spool.last_sequence(), spool.reserved_sequence()
    seq = spool.records[ONE][UUID_A].seq
    assert reserved > last
    # Killed here: no finish(). The next run, on the same spool:
    again = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a", PAUSED)})
    publisher = RecordingPublisher(spool, confirm_at_once=True)
    make_daemon([again], spool=spool, publisher=publisher).begin()
    first, *rest = publisher.submitted
    assert short(first) == "publisher.dropped"
    assert first.routing_key.endswith(".publisher.dropped.unclean_stop")
    data = body(first)["data"]
    assert (data["first_sequence"], data["last_sequence"]) == (last + 1, reserved)
    assert data["count"] == reserved - last
    assert first.sequence == reserved + 1
    assert [m.sequence for m in rest] == list(range(reserved + 2, reserved + 2 + len(rest)))
    domain_seqs = [body(m)["data"]["seq"] for m in rest if short(m).startswith("domain.")]
    assert domain_seqs and min(domain_seqs) > seq + data["count"] - 1
    assert spool.records[ONE][UUID_A].seq >= seq + data["count"], "written with the commit"


def test_a_clean_stop_gives_the_reservation_back() -> None:
    one = ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a")})
    daemon, spool, _ = started(one)
    one.emit(paused(ONE, UUID_A, "a"))
    daemon.turn(STOPPED)
    daemon.finish()
    before = spool.last_sequence()
    assert spool.reserved_sequence() == before
    publisher = RecordingPublisher(spool, confirm_at_once=True)
    make_daemon([ScriptedDriver(ONE, {UUID_A: facts(UUID_A, "a", PAUSED)})], spool=spool,
                publisher=publisher).begin()  # fmt: skip
    assert short(publisher.submitted[0]) == "publisher.capabilities"
    assert publisher.submitted[0].sequence == before + 1
