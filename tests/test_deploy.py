"""The deployment files: definitions.json imports and gives virtpub exactly what it needs,
virtpub.toml is a valid configuration of every setting, virtpub.service is a notify unit.

The broker test imports the definitions into a private RabbitMQ node and runs
virtpub as the least-privileged `virtpub` user they define: a definition that
differs from what virtpub declares at startup (durability, arguments) would be
used as it is with a line in its log, another exchange type would make it exit 1,
and a permission it lacks would refuse it (403). The alternate exchange is the
definitions' policy, not an argument.
"""

from __future__ import annotations

import base64
import configparser
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import pytest

from tests.rabbitnode import RABBITMQ_USER, RabbitNode
from tests.test_faults import depth, wait_until
from virtpub.config import DEFAULTS, BrokerSettings, read_config_file, resolve
from virtpub.tools.ask import ask

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DEFINITIONS = DEPLOY / "definitions.json"
EXAMPLE_CONFIG = DEPLOY / "virtpub.toml"
UNIT = DEPLOY / "virtpub.service"

EXCHANGE = "virt.events"
ORCHESTRATOR = "virt.orchestrator"
AUDIT = "virt.audit"
UNROUTABLE = "virt.events.unroutable"
HOST_ID = "deploytest"
DOMAINS = 5
EVENTS = 50
# Capabilities, per domain added.defined, defined, started (the startup resync), and
# the snapshot bracket with one entry per domain: the least virtpub sends at startup.
STARTUP = 1 + 3 * DOMAINS + 1 + DOMAINS + 1
ACCESS_REFUSED = 403


def example_credentials() -> tuple[str, str]:
    """The user and password of the example config's broker URL (the documented ones)."""
    url = urlsplit(read_config_file(EXAMPLE_CONFIG)["amqp_url"][0])  # type: ignore[index]
    assert url.username is not None and url.password is not None
    return unquote(url.username), unquote(url.password)


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    """A private node with deploy/definitions.json imported, as an operator would."""
    with RabbitNode() as private:
        # rabbitmqctl runs as the rabbitmq user: the file goes where that user can read it.
        copy = private.dir / DEFINITIONS.name
        shutil.copyfile(DEFINITIONS, copy)
        if os.geteuid() == 0:
            shutil.chown(copy, RABBITMQ_USER, RABBITMQ_USER)
        private.ctl("import_definitions", str(copy))
        yield private


def connect(node: RabbitNode, user: str = "guest", password: str = "guest") -> Any:
    return pika.BlockingConnection(pika.URLParameters(node.url(user, password)))


def from_libvirt(bodies: list[dict[str, Any]]) -> int:
    """How many are the synthetic backend's own events (not startup replays)."""
    return sum(1 for b in bodies if b["data"].get("origin") == "libvirt")


def read_stream(node: RabbitNode, stream: str, count: int) -> list[dict[str, Any]]:
    """A stream is read from an offset, with a prefetch and acks; reading removes nothing."""
    connection = connect(node)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    bodies = []
    for method, _props, body in channel.consume(
        stream, arguments={"x-stream-offset": "first"}, inactivity_timeout=5.0
    ):
        if method is None:
            break
        bodies.append(json.loads(body))
        channel.basic_ack(method.delivery_tag)
        if len(bodies) == count:
            break
    connection.close()
    return bodies


def refusal(node: RabbitNode, action: Callable[[Any], object]) -> int | None:
    """The reply code the broker closes the channel with when `virtpub` tries `action`."""
    user, password = example_credentials()
    connection = connect(node, user, password)
    try:
        action(connection.channel())
    except pika.exceptions.ChannelClosedByBroker as err:
        return int(err.reply_code)
    finally:
        if connection.is_open:
            connection.close()
    return None


def test_virtpub_publishes_through_the_definitions_as_its_own_user(
    node: RabbitNode, tmp_path: Path
) -> None:
    user, password = example_credentials()
    process = subprocess.Popen(
        [sys.executable, "-m", "virtpub", "run",
         "--libvirt-uri", f"synthetic:///?domains={DOMAINS}&count={EVENTS}&rate=500",
         "--amqp-url", node.url(user, password), "--exchange", EXCHANGE,
         "--state-dir", str(tmp_path), "--host-id", HOST_ID],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    consumer = connect(node)
    channel = consumer.channel()
    orchestrator: list[dict[str, Any]] = []

    def take_all() -> None:
        while (got := channel.basic_get(ORCHESTRATOR, auto_ack=True))[0] is not None:
            orchestrator.append(json.loads(got[2]))

    def every_event_arrived() -> bool:
        take_all()
        return from_libvirt(orchestrator) >= EVENTS

    try:
        wait_until(
            lambda: process.poll() is not None or every_event_arrived(),
            60,
            f"{EVENTS} synthetic events in {ORCHESTRATOR}",
        )
        # Its permissions also let it answer capabilities requests, through its own exchange.
        (answer,) = ask(BrokerSettings((node.url(),), EXCHANGE), [HOST_ID], timeout=10)
        assert answer["type"] == "org.virtpub.publisher.capabilities"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "requests are not served" not in stderr
    assert "not declared" not in stderr  # the definitions match what virtpub declares
    assert "using it as it is" not in stderr
    take_all()
    consumer.close()

    # Startup replays are not counted: one the listing already showed comes twice.
    published = len(orchestrator)
    assert published >= STARTUP + EVENTS, stderr
    assert [b["sequence"] for b in orchestrator] == list(range(1, published + 1))
    assert from_libvirt(orchestrator) == EVENTS
    assert {b["source"].split("/")[2] for b in orchestrator} == {HOST_ID}
    audit = read_stream(node, AUDIT, published)
    assert [b["id"] for b in audit] == [b["id"] for b in orchestrator]
    assert depth(node, UNROUTABLE) == 0  # every message had a binding


def test_the_definitions_policy_gives_the_exchange_its_alternate_exchange(
    node: RabbitNode,
) -> None:
    listed = node.ctl("list_exchanges", "name", "type", "policy", "--no-table-headers").stdout
    rows = {tuple(line.split("\t")) for line in listed.splitlines()}
    assert (EXCHANGE, "topic", "virt-events-alternate-exchange") in rows
    (policy,) = json.loads(DEFINITIONS.read_text())["policies"]
    assert policy["definition"] == {"alternate-exchange": UNROUTABLE}
    assert re.fullmatch(policy["pattern"], EXCHANGE) and policy["apply-to"] == "exchanges"
    assert not re.fullmatch(policy["pattern"], f"{EXCHANGE}.requests")


def test_the_virtpub_user_cannot_read_a_queue(node: RabbitNode) -> None:
    assert refusal(node, lambda ch: ch.basic_get(ORCHESTRATOR)) == ACCESS_REFUSED


@pytest.mark.parametrize("exchange", ["amq.topic", ""])
def test_the_virtpub_user_cannot_publish_to_another_exchange(
    node: RabbitNode, exchange: str
) -> None:
    """Neither a topic exchange of the broker's nor the default one, straight into a queue."""

    def publish(channel: Any) -> None:
        channel.confirm_delivery()  # so the refusal arrives before basic_publish returns
        channel.basic_publish(exchange, ORCHESTRATOR, b"{}")

    assert refusal(node, publish) == ACCESS_REFUSED


def test_the_example_password_is_the_one_the_definitions_hash() -> None:
    """RabbitMQ's SHA-256 scheme: base64(salt + sha256(salt + password)), a 4-byte salt."""
    user, password = example_credentials()
    (account,) = [u for u in json.loads(DEFINITIONS.read_text())["users"] if u["name"] == user]
    assert account["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    stored = base64.b64decode(account["password_hash"])
    salt, digest = stored[:4], stored[4:]
    assert hashlib.sha256(salt + password.encode()).digest() == digest
    assert account["tags"] == []


def test_the_example_config_is_valid_and_names_every_setting_at_its_default(
    tmp_path: Path,
) -> None:
    active = read_config_file(EXAMPLE_CONFIG)
    commented = {}
    for line in EXAMPLE_CONFIG.read_text().splitlines():
        if re.match(r"# [a-z_]+ = ", line):
            commented.update(tomllib.loads(line[2:]))  # each parses once uncommented
    assert not set(active) & set(commented)
    assert set(active) | set(commented) == set(DEFAULTS)

    state = {"state_dir": str(tmp_path)}
    example = resolve(state, {}, active)
    defaults = resolve(state, {})
    assert dataclasses.replace(example, amqp_urls=defaults.amqp_urls) == defaults
    assert example.amqp_urls != defaults.amqp_urls


def test_the_unit_is_a_notify_service_running_virtpub() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "30"
    assert re.search(r"/virtpub run --config /etc/virtpub/virtpub\.toml$", service["ExecStart"])
    assert service["StateDirectory"] == "virtpub"
