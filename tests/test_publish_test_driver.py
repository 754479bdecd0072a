"""End to end against the real RabbitMQ with libvirt's in-process `test:///default` driver."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import pytest
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_rabbitmq
from cloudevents.core.formats.json import JSONFormat

from tests.conftest import (
    HOST_ID,
    Consumer,
    Received,
    RunningPublisher,
    alternate_exchange_policy,
    assert_valid,
)
from virtpub.amqp.broker import Broker
from virtpub.contract.envelope import CONTENT_TYPE, OutgoingMessage
from virtpub.daemon.spool import Spool
from virtpub.drivers.libvirt import capability_map
from virtpub.drivers.libvirt.capability_map import DriverRow

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


def domain_xml(name: str) -> tuple[str, str]:
    dom_uuid = str(uuid.uuid4())
    return DOMAIN_XML.format(name=name, uuid=dom_uuid), dom_uuid


def run_lifecycle(conn: Any, xml: str) -> None:
    """Define, start, pause, resume, destroy and undefine one domain: eight messages."""
    dom = conn.defineXML(xml)
    dom.create()
    dom.suspend()
    dom.resume()
    dom.destroy()
    dom.undefine()


def keys_for(messages: list[Received], dom_uuid: str) -> list[str]:
    return [m.routing_key for m in messages if m.body.get("subject") == dom_uuid]


def count_for(dom_uuid: str, n: int) -> Callable[[list[Received]], bool]:
    return lambda messages: len(keys_for(messages, dom_uuid)) >= n


def test_persistent_lifecycle_is_published_in_order_after_capabilities(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("#")
    publisher = publisher_factory()
    xml, dom_uuid = domain_xml("vm-persistent")
    run_lifecycle(publisher.conn, xml)

    messages = consumer.collect(count_for(dom_uuid, 8))
    assert messages[0].routing_key == f"v1.{HOST_ID}.publisher.capabilities"
    assert keys_for(messages, dom_uuid) == [
        f"v1.{HOST_ID}.domain.added.defined",
        f"v1.{HOST_ID}.domain.defined.added",
        f"v1.{HOST_ID}.domain.started.booted",
        f"v1.{HOST_ID}.domain.suspended.paused",
        f"v1.{HOST_ID}.domain.resumed.unpaused",
        f"v1.{HOST_ID}.domain.stopped.destroyed",
        f"v1.{HOST_ID}.domain.undefined.removed",
        f"v1.{HOST_ID}.domain.removed.undefined",
    ]
    ours = [m for m in messages if m.body.get("subject") == dom_uuid]
    assert [m.body["data"]["seq"] for m in ours] == list(range(1, 9))
    assert [m.body["data"]["persistent"] for m in ours] == [True] * 6 + [False, False]
    assert [m.body["data"]["state"]["state"] for m in ours] == [
        "shutoff", "shutoff", "running", "paused", "running", "shutoff", "shutoff", "shutoff",
    ]  # fmt: skip
    assert [m.body["data"]["origin"] for m in ours] == ["derived"] + ["libvirt"] * 6 + ["derived"]
    sequences = [m.body["sequence"] for m in messages]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    for message in messages:
        assert_valid(message)
    started = next(m for m in messages if m.routing_key.endswith("started.booted"))
    assert started.body["data"]["domain"] == {
        "uuid": dom_uuid,
        "name": "vm-persistent",
        "id": started.body["data"]["domain"]["id"],
    }
    assert started.body["data"]["codes"] == {"event_id": 0, "event": 2, "detail": 0}
    stopped = next(m for m in messages if m.routing_key.endswith("stopped.destroyed"))
    assert "id" not in stopped.body["data"]["domain"], "a stopped domain has no runtime id"


def test_transient_create_and_destroy(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("v1.*.domain.#")
    publisher = publisher_factory()
    xml, dom_uuid = domain_xml("vm-transient")
    publisher.conn.createXML(xml, 0).destroy()

    messages = consumer.collect(count_for(dom_uuid, 4))
    assert keys_for(messages, dom_uuid) == [
        f"v1.{HOST_ID}.domain.added.started",
        f"v1.{HOST_ID}.domain.started.booted",
        f"v1.{HOST_ID}.domain.stopped.destroyed",
        f"v1.{HOST_ID}.domain.removed.stopped",
    ]
    ours = [m for m in messages if m.body.get("subject") == dom_uuid]
    assert not any(m.body["data"]["persistent"] for m in ours)


def test_amqp_properties_and_cloudevents_binding(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("#")
    publisher = publisher_factory()
    xml, dom_uuid = domain_xml("vm-props")
    publisher.conn.defineXML(xml)

    messages = consumer.collect(count_for(dom_uuid, 2))
    for message in messages:
        props = message.properties
        assert props.content_type == CONTENT_TYPE
        assert props.delivery_mode == 2
        assert props.app_id == "virtpub"
        assert props.message_id == message.body["id"]
        assert props.type == message.body["type"]
        assert abs(props.timestamp - _epoch(message.body["time"])) <= 1
        assert props.headers["host_id"] == HOST_ID
        assert props.headers["schema_version"] == message.body["dataschema"].rsplit(":", 1)[1]
        event = from_rabbitmq(
            RabbitMQMessage(headers={}, content_type=props.content_type, body=message.raw),
            JSONFormat(),
        )
        assert event.get_id() == message.body["id"]
        assert event.get_type() == message.body["type"]
    defined = messages[-1]
    assert defined.properties.headers["event"] == "defined"
    assert defined.body["type"] == "org.virtpub.domain.defined"
    assert defined.body["source"] == publisher.drivers[0].backend


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_bindings_select_exactly_what_they_name(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    everything = consumer_factory("#")
    stops = consumer_factory("v1.*.domain.stopped.#")
    this_host = consumer_factory(f"v1.{HOST_ID}.#")
    other_host = consumer_factory("v1.otherhost.#")
    publisher = publisher_factory()
    xml, dom_uuid = domain_xml("vm-bindings")
    dom = publisher.conn.defineXML(xml)
    dom.create()
    dom.destroy()

    everything.collect(count_for(dom_uuid, 4))
    assert keys_for(stops.collect(count_for(dom_uuid, 1)), dom_uuid) == [
        f"v1.{HOST_ID}.domain.stopped.destroyed"
    ]
    assert [m.routing_key for m in this_host.collect(count_for(dom_uuid, 4))] == [
        m.routing_key for m in everything.messages
    ]
    assert other_host.quiet(0.5) == []


def test_test_driver_capabilities_are_its_row_of_the_map(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    """test:///default accepts every registration; the map says what it really sends."""
    consumer = consumer_factory("v1.*.publisher.capabilities")
    publisher = publisher_factory()
    (message,) = consumer.collect(lambda m: len(m) >= 1)
    assert_valid(message)
    data = message.body["data"]
    assert data["host_id"] == HOST_ID
    assert data["schemas"]["domain-event"].startswith("1.")
    (backend,) = data["backends"]
    assert backend["uri"] == "test:///default"
    assert backend["hypervisor"]["type"] == "TEST"
    conn = publisher.conn
    row = capability_map.lookup(conn.getType(), conn.getLibVersion())
    assert row is not None
    events = backend["events"]
    by_status = {
        status: {name for name, entry in events.items() if entry["status"] == status}
        for status in ("native", "derived", "polled", "unsupported")
    }
    assert by_status["native"] == row.event_types
    assert by_status["derived"] == {"added", "removed", "snapshot"}
    assert by_status["polled"] == {"pmsuspended", "crashed"}  # states a listing shows
    assert "shutdown" in by_status["unsupported"]  # a transition no listing shows
    assert {"reboot", "block_job", "io_error", "graphics"} <= by_status["unsupported"]
    assert {entry["basis"] for entry in events.values()} == {
        f"map:{capability_map.format_libvirt_version(conn.getLibVersion())}"
    }
    assert events["stopped"]["details"] == sorted(row.lifecycle["stopped"])
    # The superseded IDs are not separate event types.
    assert "block_job_2" not in events and "io_error_reason" not in events


def test_sequence_continues_across_restarts(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("#")
    first = publisher_factory()
    xml, dom_uuid = domain_xml("vm-restart")
    first.conn.defineXML(xml)
    consumer.collect(count_for(dom_uuid, 2))
    assert first.stop() == 0
    second_start = len(consumer.quiet(0.3))
    publisher_factory()
    messages = consumer.collect(
        lambda m: any(x.routing_key.endswith("snapshot.end") for x in m[second_start:])
    )
    sequences = [m.body["sequence"] for m in messages]
    assert sequences == list(range(1, len(messages) + 1))
    assert messages[second_start].routing_key.endswith("publisher.capabilities")


def test_a_policys_alternate_exchange_keeps_unroutable_messages(
    amqp_url: str, exchange: str, publisher_factory: Callable[..., RunningPublisher]
) -> None:
    """virtpub declares the exchange without arguments; the README's policy names its
    `<exchange>.unroutable`, which virtpub declares with its queue."""
    with alternate_exchange_policy(exchange):
        publisher = publisher_factory()  # nothing is bound to the exchange
        xml, _ = domain_xml("vm-unroutable")
        publisher.conn.defineXML(xml)
        broker = publisher.daemon.broker
        assert broker is not None
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        kept: list[str] = []
        try:
            deadline = time.monotonic() + 15
            while f"v1.{HOST_ID}.domain.defined.added" not in kept and time.monotonic() < deadline:
                method, _props, _body = channel.basic_get(f"{exchange}.unroutable", auto_ack=True)
                if method is None:
                    connection.sleep(0.05)
                else:
                    kept.append(method.routing_key)
        finally:
            connection.close()
    assert kept[0] == f"v1.{HOST_ID}.publisher.capabilities"
    assert kept[-2:] == [f"v1.{HOST_ID}.domain.added.defined", f"v1.{HOST_ID}.domain.defined.added"]
    assert f"v1.{HOST_ID}.publisher.snapshot.end" in kept
    assert broker.returned == 0


STARTUP_MESSAGES = 7
"""Capabilities, the resync of the one domain `test` (added, defined, started) and its
snapshot bracket (begin, entry, end)."""


def stop_after_returns(
    publisher: RunningPublisher, count: int, tmp_path: Path
) -> tuple[Broker, list[tuple[OutgoingMessage, int, str]]]:
    """Waits (15 s at most) for `count` returns, stops the publisher and reads what its
    spool kept as returned; a returned message is acked, so nothing is left to resend."""
    broker = publisher.daemon.broker
    assert broker is not None
    deadline = time.monotonic() + 15
    while broker.returned < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert publisher.stop() == 0
    spool = Spool(tmp_path / "state" / "spool.sqlite3")
    try:
        kept = spool.returned()
        assert spool.count() == 0, "a returned message is acked: nothing left to resend"
    finally:
        spool.close()
    return broker, kept


def test_a_message_not_even_the_alternate_exchange_takes_is_returned_and_kept(
    amqp_url: str,
    exchange: str,
    tmp_path: Path,
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    """With the policy's alternate exchange's queue gone, the broker returns the message and
    then acks it: virtpub must keep its copy instead of deleting it with the ack."""
    with alternate_exchange_policy(exchange):
        publisher = publisher_factory()  # nothing is bound to the exchange
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        # Deleted only once the startup messages are in it: a quorum queue deleted while a
        # publish routes to it crashes the publishing channel on the broker (541), and
        # virtpub's reconnect would declare the queue again.
        deadline = time.monotonic() + 15
        while (
            channel.queue_declare(f"{exchange}.unroutable", passive=True).method.message_count
            < STARTUP_MESSAGES
            and time.monotonic() < deadline
        ):
            connection.sleep(0.05)
        channel.queue_delete(f"{exchange}.unroutable")
        connection.close()
        xml, dom_uuid = domain_xml("vm-returned")
        publisher.conn.defineXML(xml)
        broker, kept = stop_after_returns(publisher, 2, tmp_path)
    assert broker.returned == len(kept) == 2
    assert [m.routing_key for m, _code, _text in kept] == [
        f"v1.{HOST_ID}.domain.added.defined",
        f"v1.{HOST_ID}.domain.defined.added",
    ]
    assert {(code, text) for _m, code, text in kept} == {(312, "NO_ROUTE")}
    for message, _code, _text in kept:
        assert json.loads(message.body)["subject"] == dom_uuid
        assert message.basic_properties().message_id == json.loads(message.body)["id"]


def test_without_an_alternate_exchange_unroutable_messages_are_returned_kept_and_counted(
    tmp_path: Path,
    publisher_factory: Callable[..., RunningPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No policy and no binding: every message comes back (mandatory), is kept in the
    spool's returned table and counted, and only the first one is explained in the log."""
    caplog.set_level(logging.WARNING, logger="virtpub.amqp.broker")
    publisher = publisher_factory()
    xml, dom_uuid = domain_xml("vm-no-alternate")
    run_lifecycle(publisher.conn, xml)
    broker, kept = stop_after_returns(publisher, STARTUP_MESSAGES + 8, tmp_path)  # lifecycle: 8
    assert broker.counts()["returned"] == broker.returned == broker.published == len(kept)
    assert [m.sequence for m, _code, _text in kept] == list(range(1, len(kept) + 1))
    assert kept[0][0].routing_key == f"v1.{HOST_ID}.publisher.capabilities"
    assert sum(json.loads(m.body).get("subject") == dom_uuid for m, _c, _t in kept) == 8
    explained = [r.getMessage() for r in caplog.records if "returned message" in r.getMessage()]
    assert len(explained) == 1, explained
    assert "no alternate exchange" in explained[0] and kept[0][0].id in explained[0]


def test_lifecycle_types_a_backend_lacks_are_polled(
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    """A driver whose map row lacks suspended/resumed: pausing still yields them, found by
    listing (`origin: poll`), and libvirt's own would-be duplicates are held back."""
    consumer = consumer_factory("#")

    def lacking(driver_type: str, libvirt_version: int) -> DriverRow | None:
        row = capability_map.lookup(driver_type, libvirt_version)
        assert row is not None, "the test driver has a row in the map"
        kept = {k: v for k, v in row.lifecycle.items() if k not in {"suspended", "resumed"}}
        return dataclasses.replace(row, lifecycle=kept)

    publisher = publisher_factory(capability_lookup=lacking, poll_interval=0.3)
    xml, dom_uuid = domain_xml("vm-polled")
    dom = publisher.conn.defineXML(xml)
    dom.create()
    consumer.collect(count_for(dom_uuid, 3))
    dom.suspend()
    consumer.collect(count_for(dom_uuid, 4))
    dom.resume()
    messages = consumer.collect(count_for(dom_uuid, 5))
    assert keys_for(messages, dom_uuid) == [
        f"v1.{HOST_ID}.domain.added.defined",
        f"v1.{HOST_ID}.domain.defined.added",
        f"v1.{HOST_ID}.domain.started.booted",
        f"v1.{HOST_ID}.domain.suspended",
        f"v1.{HOST_ID}.domain.resumed",
    ]
    ours = [m for m in messages if m.body.get("subject") == dom_uuid]
    assert [m.body["data"]["origin"] for m in ours[3:]] == ["poll", "poll"]
    assert [m.body["data"]["state"]["state"] for m in ours[3:]] == ["paused", "running"]
    assert consumer.quiet(0.8) == messages, "libvirt's own suspended/resumed are not repeated"
    events = messages[0].body["data"]["backends"][0]["events"]
    assert events["suspended"] == {
        "status": "polled", "reason": "libvirt's TEST driver does not emit it",
        "interval_s": 0.3, "basis": "map:9.0.0",
    }  # fmt: skip
    assert events["started"]["status"] == "native"
    for message in messages:
        assert_valid(message)
