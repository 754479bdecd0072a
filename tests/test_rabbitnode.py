"""The private-node infrastructure itself, against real private nodes.

Each node start costs seconds, so the plain tests share one node and the TLS tests
another; only the cleanup test boots a node of its own. None of them touches the
shared broker at 127.0.0.1:5672.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.credentials
import pika.exceptions
import pytest

from tests.rabbitnode import (
    DEPRECATED_FEATURES_4_0,
    TLS_USER,
    RabbitNode,
    beam_pids,
)

SHARED_PORT = 5672


def assert_no_process(node: RabbitNode) -> None:
    """No VM of the node remains, by the module's own scan and by pgrep's."""
    assert beam_pids(node.name) == []
    pgrep = subprocess.run(["pgrep", "-af", node.name], capture_output=True, text=True, check=False)
    assert pgrep.returncode == 1, pgrep.stdout


def assert_gone(node: RabbitNode) -> None:
    assert_no_process(node)
    assert not node.dir.exists()


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with RabbitNode() as node:
        yield node
    assert_gone(node)


@pytest.fixture(scope="module")
def tls_node() -> Iterator[RabbitNode]:
    with RabbitNode(tls=True) as node:
        yield node
    assert_gone(node)


def connect(url: str) -> Any:
    return pika.BlockingConnection(pika.URLParameters(url))


def wait_for(connection: Any, condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Services the connection (so callbacks run) until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        connection.process_data_events(time_limit=0.1)


def publish_persistent(node: RabbitNode, queue: str, body: bytes) -> None:
    """Publishes with confirms, so the message is on disk before the broker goes."""
    connection = connect(node.url())
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    connection.close()


def get_one(node: RabbitNode, queue: str) -> tuple[Any, bytes]:
    connection = connect(node.url())
    method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
    connection.close()
    assert method is not None, f"{queue} is empty"
    return properties, body


def tls_parameters(
    node: RabbitNode,
    server_hostname: str = "localhost",
    *,
    client_cert: bool = True,
    credentials: Any = None,
) -> Any:
    context = ssl.create_default_context(cafile=str(node.ca_file))
    if client_cert:
        context.load_cert_chain(str(node.client_cert), str(node.client_key))
    parameters = pika.URLParameters(node.tls_url())
    parameters.ssl_options = pika.SSLOptions(context, server_hostname)
    parameters.credentials = credentials or pika.credentials.ExternalCredentials()
    return parameters


# -- a plain node --------------------------------------------------------------------


def test_node_is_private(node: RabbitNode) -> None:
    assert node.port != SHARED_PORT
    assert node.is_running()
    assert node.name in node.ctl("eval", "node().").stdout
    connection = connect(node.url())
    assert connection.is_open
    connection.close()


def test_persistent_message_survives_restart(node: RabbitNode) -> None:
    queue = f"survivor-{uuid.uuid4().hex[:8]}"
    publish_persistent(node, queue, b"still here")
    before = beam_pids(node.name)

    node.restart()

    assert beam_pids(node.name) not in ([], before)  # a new VM, not the old one
    properties, body = get_one(node, queue)
    assert body == b"still here"
    assert properties.delivery_mode == 2


def test_memory_alarm_blocks_publishers_until_cleared(node: RabbitNode) -> None:
    queue = f"alarm-{uuid.uuid4().hex[:8]}"
    events: list[str] = []
    connection = connect(node.url())
    connection.add_on_connection_blocked_callback(lambda *_: events.append("blocked"))
    connection.add_on_connection_unblocked_callback(lambda *_: events.append("unblocked"))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    try:
        node.set_memory_alarm(True)
        # The broker blocks (and tells) a connection when it next publishes.
        channel.basic_publish("", queue, b"held back")
        wait_for(connection, lambda: events == ["blocked"])

        node.set_memory_alarm(False)
        wait_for(connection, lambda: events == ["blocked", "unblocked"])
    finally:
        node.set_memory_alarm(False)
    method, _, body = channel.basic_get(queue, auto_ack=True)
    assert method is not None
    assert body == b"held back"
    connection.close()


def test_added_user_gets_exactly_its_permissions(node: RabbitNode) -> None:
    node.add_user("reader", "secret", "", "", ".*")
    connection = connect(node.url("reader", "secret"))
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        channel.queue_declare(f"forbidden-{uuid.uuid4().hex[:8]}")
    assert closed.value.reply_code == 403
    connection.close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect(node.url("reader", "wrong"))


def test_kill_leaves_no_process_and_start_recovers(node: RabbitNode) -> None:
    """A node killed mid-flight starts again and serves. (What survives a SIGKILL is the
    broker's business and varies: a queue declared milliseconds before may not.)"""
    node.kill()

    assert_no_process(node)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(node.url())
    node.start()
    queue = f"after-crash-{uuid.uuid4().hex[:8]}"
    publish_persistent(node, queue, b"published after the crash")
    assert get_one(node, queue)[1] == b"published after the crash"


def test_cleanup_leaves_nothing_even_with_a_client_and_an_alarm() -> None:
    with RabbitNode() as fresh:
        connection = connect(fresh.url())
        fresh.set_memory_alarm(True)
    assert_gone(fresh)
    fresh.cleanup()  # idempotent
    with pytest.raises(pika.exceptions.AMQPError):
        connection.channel()


# -- a TLS node ----------------------------------------------------------------------


def test_tls_external_login_is_the_certificate_cn(tls_node: RabbitNode) -> None:
    connection = pika.BlockingConnection(tls_parameters(tls_node))
    queue = connection.channel().queue_declare("", exclusive=True).method.queue
    assert queue
    listing = tls_node.ctl(
        "-q", "--no-table-headers", "list_connections", "user", "auth_mechanism", "ssl"
    ).stdout
    connection.close()
    assert listing.split() == [TLS_USER, "EXTERNAL", "true"]


def test_tls_rejects_a_wrong_server_hostname(tls_node: RabbitNode) -> None:
    with pytest.raises(ssl.SSLError, match="not-localhost"):
        pika.BlockingConnection(tls_parameters(tls_node, "not-localhost"))


def test_tls_without_client_certificate(tls_node: RabbitNode) -> None:
    """fail_if_no_peer_cert = false: the handshake succeeds, password logins work,
    and EXTERNAL is refused (it has no certificate to name the user)."""
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(tls_parameters(tls_node, client_cert=False))
    guest = pika.PlainCredentials("guest", "guest")
    connection = pika.BlockingConnection(
        tls_parameters(tls_node, client_cert=False, credentials=guest)
    )
    assert connection.is_open
    connection.close()


def test_tls_node_still_speaks_plain_amqp(tls_node: RabbitNode) -> None:
    connection = connect(tls_node.url())
    connection.channel().queue_declare("", exclusive=True)
    connection.close()


# -- Debian 13's RabbitMQ 4.0, from its rootfs ---------------------------------------------


def test_a_debian13_node_is_rabbitmq_4_0_denying_every_deprecated_feature() -> None:
    """Whatever VIRTPUB_TEST_BROKER says: the node the debian13-broker leg runs against."""
    with RabbitNode(broker="debian13", refuse_deprecated_uses=False) as debian13:
        assert debian13.epmd_port not in (None, 4369), "the host's epmd is not shared"
        assert "RabbitMQ version: 4.0." in debian13.ctl("status").stdout
        listing = debian13.ctl("-q", "--no-table-headers", "list_deprecated_features").stdout
        known = {line.split()[0] for line in listing.splitlines() if line.strip()}
        assert known and known <= set(DEPRECATED_FEATURES_4_0), known
        # A denied feature's use closes the whole connection: 541 INTERNAL_ERROR.
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as transient:
            connect(debian13.url()).channel().queue_declare(f"virtpub-test-{uuid.uuid4().hex}")
        assert transient.value.reply_code == 541
        assert "transient_nonexcl_queues" in transient.value.reply_text
        # A global QoS is only logged (and applied): the log is what catches it.
        connect(debian13.url()).channel().basic_qos(prefetch_count=1, global_qos=True)
        expected = ["transient_nonexcl_queues", "global_qos"]
        deadline = time.monotonic() + 10  # the node's logger writes a moment later
        while debian13.deprecated_features_used() != expected:
            assert time.monotonic() < deadline, debian13.deprecated_features_used()
            time.sleep(0.1)
    assert_gone(debian13)
    # Its own epmd went with it (its PID namespace): nothing listens on its port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", debian13.epmd_port or 0), timeout=5).close()
