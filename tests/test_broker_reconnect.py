"""A connection the broker closes under the publisher: it reconnects, resends, re-announces.

The broker is the one the tests use; only the publisher's own connection is closed
(`rabbitmqctl close_connection`), so nothing else on it is disturbed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pika

from tests.conftest import (
    HOST_ID,
    Consumer,
    RunningPublisher,
    assert_valid,
    rabbitmqctl,
    wait_for,
)
from tests.test_publish_test_driver import domain_xml


def close_connections_named(name: str) -> int:
    """Closes the broker connections whose client-provided name is `name`.

    rabbitmqctl's JSON output renders pids in a form close_connection rejects, so
    the tab-separated listing is read instead (pid, then client properties).
    """
    listing = rabbitmqctl(
        "-q", "--no-table-headers", "list_connections", "pid", "client_properties"
    )
    closed = 0
    for line in listing.splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{name}"}}' in properties:
            rabbitmqctl("-q", "close_connection", pid, "closed by a test")
            closed += 1
    return closed


def test_reconnect_republishes_capabilities_and_loses_nothing(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("#")
    publisher = publisher_factory()
    consumer.collect(lambda m: len(m) >= 1)
    broker = publisher.daemon.broker
    assert broker is not None

    assert close_connections_named(f"virtpub {HOST_ID} pid {os.getpid()}") == 1
    dom = publisher.conn.defineXML(domain_xml("vm-reconnect")[0])
    dom.create()
    dom.destroy()
    deadline = time.monotonic() + 20
    while broker.reconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.reconnects == 1

    messages = consumer.collect(
        lambda m: (
            sum(x.body["subject"] == dom.UUIDString() for x in m) >= 4
            and sum(x.routing_key.endswith("capabilities") for x in m) >= 2
        )
    )
    keys = [m.routing_key for m in messages]
    capabilities = f"v1.{HOST_ID}.publisher.capabilities"
    assert keys[0] == capabilities
    assert keys.count(capabilities) == 2, "announced again after the reconnect"
    dom_uuid = dom.UUIDString()
    domain_keys = [m.routing_key for m in messages if m.body["subject"] == dom_uuid]
    assert domain_keys == [
        f"v1.{HOST_ID}.domain.added.defined",
        f"v1.{HOST_ID}.domain.defined.added",
        f"v1.{HOST_ID}.domain.started.booted",
        f"v1.{HOST_ID}.domain.stopped.destroyed",
    ]
    # At least once: a resend after the reconnect may repeat an id, never skip a sequence.
    sequences = sorted({m.body["sequence"] for m in messages})
    assert sequences == list(range(1, len(sequences) + 1))
    for message in messages:
        assert_valid(message)
    assert consumer.quiet(0.3)[len(messages) :] == []


def test_reconnect_during_a_burst_confirms_everything(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    """Events keep coming while the connection is replaced: none may be published on the
    new channel before confirm mode is on (it would never be acked), none may be lost."""
    consumer = consumer_factory("v1.*.domain.#")
    publisher = publisher_factory()
    broker = publisher.daemon.broker
    assert broker is not None
    uuids = []
    for i in range(150):
        xml, dom_uuid = domain_xml(f"vm-burst-{i}")
        publisher.conn.defineXML(xml).undefine()
        uuids.append(dom_uuid)
        if i in (40, 100):
            assert close_connections_named(f"virtpub {HOST_ID} pid {os.getpid()}") == 1
    ours = set(uuids)
    messages = consumer.collect(
        lambda m: len({x.body["id"] for x in m if x.body["subject"] in ours}) >= 600, timeout=30
    )
    deadline = time.monotonic() + 20
    while broker.unconfirmed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.unconfirmed() == 0
    assert broker.reconnects == 2
    defined = [m.body["subject"] for m in messages if m.routing_key.endswith("defined.added")]
    assert sorted(set(defined)) == sorted(uuids)


def test_refused_messages_are_resent_in_order(
    amqp_url: str,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    """A queue that refuses publishes while it holds 3 messages (reject-publish): the broker
    nacks, virtpub resends from the refused message on, and nothing arrives out of order.

    The queue is drained only once the first nack has come. Messages already in flight at
    the first nack are the broker's to take or refuse (README, "Delivery guarantees"): a
    drain that made room during the startup burst would let one of them in ahead of a
    refused one, which is that documented exception, not the order this test holds."""
    consumer_factory("v1.nothing.matches")  # declares the exchange the same way virtpub does
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    small = channel.queue_declare(
        "", exclusive=True, arguments={"x-max-length": 3, "x-overflow": "reject-publish"}
    ).method.queue
    channel.queue_bind(small, exchange, "#")
    publisher = publisher_factory()
    xml, dom_uuid = domain_xml("vm-nacked")
    dom = publisher.conn.defineXML(xml)
    dom.create()
    broker = publisher.daemon.broker
    assert broker is not None
    wait_for(lambda: broker.nacked > 0, 30, "the full queue refusing a publish")
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not any(
        b.get("subject") == dom_uuid and b["data"]["event"] == "started" for b in received
    ):
        assert time.monotonic() < deadline, f"got {[b['sequence'] for b in received]}"
        method, _props, body = channel.basic_get(small, auto_ack=True)
        if method is None:
            connection.sleep(0.05)
        else:
            received.append(json.loads(body))
    connection.close()
    assert broker.nacked > 0
    first_seen = list(dict.fromkeys(b["sequence"] for b in received))
    assert first_seen == list(range(1, len(first_seen) + 1)), "refused messages came out of order"
