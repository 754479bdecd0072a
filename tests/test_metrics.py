"""`/metrics` and `/healthz` of a running publisher, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Consumer, RunningPublisher, make_settings, wait_for
from tests.rabbitnode import pick_port
from tests.test_publish_test_driver import count_for, domain_xml
from virtpub.amqp.session import request_snapshot
from virtpub.tools.ask import ask_capabilities


@pytest.fixture
def served(
    amqp_url: str, exchange: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[RunningPublisher, str]]]:
    running: list[RunningPublisher] = []

    def start(url: str = amqp_url) -> tuple[RunningPublisher, str]:
        port = pick_port()
        settings = dataclasses.replace(
            make_settings(url, exchange, tmp_path / "state"), metrics_listen=("127.0.0.1", port)
        )
        running.append(RunningPublisher(settings))
        return running[-1], f"http://127.0.0.1:{port}"

    yield start
    for publisher in running:
        publisher.stop()


def scrape(base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: [(s.labels, s.value) for s in family.samples if s.name == sample.name]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests_counted(base: str) -> dict[str, float]:
    return {labels["outcome"]: value for labels, value in scrape(base)["virtpub_requests_total"]}


def health(base: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_metrics_count_what_happened(
    served: Callable[..., tuple[RunningPublisher, str]],
    consumer_factory: Callable[..., Consumer],
) -> None:
    consumer = consumer_factory("#")
    publisher, base = served()
    xml, dom_uuid = domain_xml("vm-metrics")
    dom = publisher.conn.defineXML(xml)
    dom.create()
    consumer.collect(count_for(dom_uuid, 3))
    metrics = scrape(base)
    received = {labels["type"]: value for labels, value in metrics["virtpub_events_received_total"]}
    assert received["org.virtpub.domain.defined"] == 1
    assert received["org.virtpub.domain.started"] == 1
    [(_, confirmed)] = metrics["virtpub_messages_confirmed_total"]
    assert confirmed >= len(consumer.messages)
    [(_, observed)] = metrics["virtpub_publish_latency_seconds_count"]
    assert observed == confirmed  # every message confirmed in this run was timed
    assert metrics["virtpub_events_dropped_total"] == [
        ({"reason": "queue_full"}, 0.0),
        ({"reason": "spool_full"}, 0.0),
    ]
    assert requests_counted(base) == {
        "capabilities_answered": 0,
        "snapshot_accepted": 0,
        "rejected": 0,
    }
    responder = publisher.daemon._responder
    wait_for(lambda: responder.serving, 10, "requests served")
    connection = pika.BlockingConnection(pika.URLParameters(publisher.settings.amqp_urls[0]))
    channel = connection.channel()
    exchange = publisher.settings.exchange
    ask_capabilities(connection, exchange, [publisher.settings.host_id], timeout=10)
    request_snapshot(channel, exchange, publisher.settings.host_id, str(uuid.uuid4()))
    request_snapshot(channel, exchange, publisher.settings.host_id, "not-a-uuid")
    connection.close()
    wait_for(lambda: requests_counted(base)["rejected"] == 1, 10, "the refusal counted")
    assert requests_counted(base) == {
        "capabilities_answered": 1,
        "snapshot_accepted": 1,
        "rejected": 1,
    }
    status, body = health(base)
    assert status == 200 and body["status"] == "ok"
    assert body["checks"]["broker"]["ok"] is True
    assert any(name.startswith("backend virtpub://") for name in body["checks"])


def test_healthz_says_what_is_wrong_when_the_broker_is_away(
    served: Callable[..., tuple[RunningPublisher, str]],
) -> None:
    _, base = served(f"amqp://guest:guest@127.0.0.1:{pick_port()}/%2F")  # nothing listens
    status, body = health(base)
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["checks"]["broker"]["ok"] is False
    assert body["checks"]["spool"]["ok"] is True
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{base}/nothing", timeout=5)
    assert caught.value.code == 404
