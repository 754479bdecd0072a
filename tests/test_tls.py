"""amqps:// with a CA, a client certificate and SASL EXTERNAL, on a private TLS node."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.credentials
import pytest

from publisher.broker import connection_parameters
from tests.conftest import make_settings
from tests.rabbitnode import RabbitNode


@pytest.fixture(scope="module")
def tls_node() -> Iterator[RabbitNode]:
    with RabbitNode(tls=True) as node:
        yield node


def run(node: RabbitNode, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "publisher", "run", "--libvirt-uri", "test:///default",
         "--state-dir", str(tmp_path), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_client_certificate_logs_in_by_external_and_publishes(
    tls_node: RabbitNode, tmp_path: Path
) -> None:
    exchange = f"tls-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(tls_node.url()))
    channel = connection.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "#")
    process = run(
        tls_node, tmp_path,
        "--amqp-url", tls_node.tls_url(), "--exchange", exchange,
        "--amqp-ca-file", str(tls_node.ca_file),
        "--amqp-cert-file", str(tls_node.client_cert),
        "--amqp-key-file", str(tls_node.client_key),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        first = None
        while first is None and time.monotonic() < deadline:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                connection.sleep(0.1)
            else:
                first = (method.routing_key, json.loads(body))
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        connection.close()
    assert first is not None, stderr
    assert first[0].endswith(".publisher.capabilities")
    assert process.returncode == 0, stderr
    assert "amqps://localhost" in stderr


def test_a_certificate_that_does_not_verify_is_one_line_and_exit_1(
    tls_node: RabbitNode, tmp_path: Path
) -> None:
    """No --amqp-ca-file: the system's CAs do not know the node's; retrying cannot help."""
    url = tls_node.tls_url().replace("amqps://", "amqps://virtpub:sekret@")
    process = run(tls_node, tmp_path, "--amqp-url", url, "--exchange", f"tls-{uuid.uuid4().hex}")
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "failed TLS verification" in errors[0], stderr
    assert "sekret" not in stderr and "Traceback" not in stderr


def test_the_broker_host_name_is_verified_by_default(tmp_path: Path) -> None:
    settings = make_settings("amqps://mq.example:5671/%2F", "x", tmp_path)
    params = connection_parameters("amqps://mq.example:5671/%2F", "test", settings)
    assert params.ssl_options.server_hostname == "mq.example"
    assert params.ssl_options.context.check_hostname is True
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert isinstance(params.credentials, pika.credentials.PlainCredentials)
