"""The consumer rules (`virtpub.consumer.Inventory`) message by message, without I/O."""

from __future__ import annotations

from tests.test_inventory import FakePublisher
from virtpub.consumer import Inventory

WEB = "6695eb01-f6a4-8304-79aa-97f2502e193f"
DB = "0b6cf9b2-5d0e-4a8e-9a51-1f0e6c3a7d21"


def test_a_resent_id_is_counted_once_as_duplicate() -> None:
    host = FakePublisher("h1")
    added = host.domain(WEB, "web", "added")
    inventory = Inventory()
    inventory.apply(*added)
    inventory.apply(*added)
    assert (inventory.duplicates, inventory.gaps, len(inventory.rows())) == (1, 0, 1)


def test_a_skipped_host_sequence_is_a_gap_and_names_the_host_once() -> None:
    host = FakePublisher("h1")
    inventory = Inventory()
    inventory.apply(*host.domain(WEB, "web", "added"))
    host.sequence += 1
    inventory.apply(*host.domain(DB, "db", "added"))
    host.sequence += 1
    inventory.apply(*host.domain(WEB, "web", "stopped"))
    assert inventory.gaps == 2
    assert inventory.take_gapped_hosts() == ["h1"]
    assert inventory.take_gapped_hosts() == []


def test_a_skipped_domain_seq_is_a_gap() -> None:
    host = FakePublisher("h1")
    inventory = Inventory()
    inventory.apply(*host.domain(WEB, "web", "added"))
    host.seqs[WEB] += 1
    inventory.apply(*host.domain(WEB, "web", "stopped", state="shutoff"))
    assert inventory.gaps == 1
    assert [row.state for row in inventory.rows()] == ["shutoff"]


def test_a_complete_snapshot_sweeps_the_domains_it_did_not_mention() -> None:
    host = FakePublisher("h1")
    inventory = Inventory()
    for message in (
        host.domain(WEB, "web", "added"),
        host.domain(DB, "db", "added"),
        host.snapshot_begin("s1"),
        host.domain(WEB, "web", "snapshot"),
        host.snapshot_end("s1", domains=1),
    ):
        inventory.apply(*message)
    assert [row.name for row in inventory.rows()] == ["web"]


def test_malformed_and_unknown_messages_are_counted_not_raised() -> None:
    inventory = Inventory()
    inventory.apply_raw("v1.h1.domain.added", b"not json")
    inventory.apply("not-a-key", {"id": "x", "sequence": 1})
    inventory.apply("v1.h1.domain.added", {"id": "y", "sequence": 1, "data": {}})
    inventory.apply(*FakePublisher("h2").publisher("capabilities"))
    assert (inventory.messages, inventory.rejected, inventory.ignored) == (4, 3, 1)
