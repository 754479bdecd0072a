"""Exchanges someone else declared first: virtpub declares topic, durable, no arguments, and
uses an exchange that exists with other settings as it is. (The wrong type is in test_cli,
where `virtpub run`'s exit code is.)"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pika
import pytest

from tests.conftest import HOST_ID, Consumer, Received, RunningPublisher
from tests.test_publish_test_driver import domain_xml, keys_for, run_lifecycle
from virtpub.amqp.requests import requests_exchange
from virtpub.config import BrokerSettings
from virtpub.tools.ask import ask

USED_AS_IT_IS = "using it as it is"


def snapshot_ended(messages: list[Received]) -> bool:
    return any(m.routing_key.endswith("publisher.snapshot.end") for m in messages)


def test_a_consumer_that_declared_the_exchange_first_receives_every_event(
    amqp_url: str,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The orchestrator's plain declaration comes first; virtpub's matches it, and so does
    another consumer's after virtpub started."""
    caplog.set_level(logging.INFO, logger="virtpub.amqp.topology")
    consumer = consumer_factory("#")  # declares the exchange: topic, durable, no arguments
    publisher = publisher_factory()
    consumer.collect(snapshot_ended)
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().exchange_declare(exchange, "topic", durable=True)  # no 406
    xml, dom_uuid = domain_xml("vm-declared-first")
    run_lifecycle(publisher.conn, xml)
    messages = consumer.collect(lambda m: len(keys_for(m, dom_uuid)) >= 8)
    broker = publisher.daemon.broker
    assert broker is not None
    assert publisher.stop() == 0
    messages = consumer.quiet(0.3)
    assert [m.body["sequence"] for m in messages] == list(range(1, broker.published + 1))
    assert broker.confirmed == broker.published and broker.returned == 0
    assert len(keys_for(messages, dom_uuid)) == 8
    assert not [r for r in caplog.records if USED_AS_IT_IS in r.getMessage()]


def test_exchanges_with_an_earlier_virtpubs_alternate_exchange_argument_are_used_as_they_are(
    amqp_url: str,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The events and requests exchanges as virtpub declared them before, with the argument:
    the plain declaration is refused (406), so virtpub finds them passively, says so once
    each, publishes and answers capabilities requests."""
    caplog.set_level(logging.INFO, logger="virtpub.amqp.topology")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        for name in (exchange, requests_exchange(exchange)):
            channel.exchange_declare(
                name, "topic", durable=True, arguments={"alternate-exchange": f"{name}.unroutable"}
            )
    consumer = consumer_factory("#", declare=False)
    publisher = publisher_factory()
    consumer.collect(snapshot_ended)
    (answer,) = ask(BrokerSettings((amqp_url,), exchange), [HOST_ID], timeout=10)
    assert answer["type"] == "org.virtpub.publisher.capabilities"
    broker = publisher.daemon.broker
    assert broker is not None
    assert publisher.stop() == 0
    messages = consumer.quiet(0.3)
    assert [m.body["sequence"] for m in messages] == list(range(1, broker.published + 1))
    used = [r.getMessage() for r in caplog.records if USED_AS_IT_IS in r.getMessage()]
    assert len(used) == 2, used
    for name, line in zip((exchange, requests_exchange(exchange)), sorted(used), strict=True):
        assert f"exchange {name!r}" in line and "'alternate-exchange'" in line


def test_a_requests_exchange_of_another_type_leaves_publishing_going(
    amqp_url: str,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests cannot be served through a fanout exchange, but the events still go out:
    one warning, and the run goes on (the events exchange's type is what stops virtpub)."""
    caplog.set_level(logging.WARNING, logger="virtpub.amqp.requests")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().exchange_declare(requests_exchange(exchange), "fanout", durable=True)
    consumer = consumer_factory("#")
    publisher = publisher_factory()
    messages = consumer.collect(snapshot_ended)

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]

    deadline = time.monotonic() + 10  # the requests channel is set up after publishing's
    while not refusals() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert publisher.stop() == 0
    assert messages[0].routing_key == f"v1.{HOST_ID}.publisher.capabilities"
    (line,) = refusals()
    assert f"exchange {requests_exchange(exchange)!r} exists as a fanout exchange" in line
