"""Nothing is lost when the cluster node virtpub publishes to goes away mid-burst.

virtpub gets the URLs of a private three-node cluster and connects to the first.
That node is stopped during a synthetic burst: virtpub has to move on to another
node by itself, resend what the stopped node never confirmed, and every message has
to end up in a quorum queue, whose replicas on the two other nodes outlive the one
that stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from tests.rabbitcluster import RabbitCluster
from tests.test_faults import BURST, DOMAINS, STARTUP, assert_complete, depth, read_all, wait_until
from virtpub.core.redact import redact_url

HOST_ID = "clustered"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster() as formed:
        yield formed


def declare_topology(cluster: RabbitCluster, exchange: str) -> None:
    """The exchange as virtpub declares it, and a quorum queue bound to `#` on it with a
    replica on every node and its leader on node 0, the node the test stops: the two
    replicas left have to elect a leader while virtpub publishes.

    virtpub declares its alternate exchange's queue itself, as a quorum queue: a
    classic one would live on node 0 alone, and with that node down no other node
    would let virtpub declare it again (404, home node down).
    """
    with pika.BlockingConnection(pika.URLParameters(cluster.nodes[-1].url())) as connection:
        connection.channel().exchange_declare(exchange, "topic", durable=True)
    quorum = {
        "x-queue-type": "quorum",
        "x-quorum-initial-group-size": len(cluster.nodes),
        "x-queue-leader-locator": "client-local",
    }
    with pika.BlockingConnection(pika.URLParameters(cluster.nodes[0].url())) as connection:
        channel = connection.channel()
        channel.queue_declare(exchange, durable=True, arguments=quorum)
        channel.queue_bind(exchange, exchange, "#")


def start_virtpub(
    cluster: RabbitCluster, exchange: str, state_dir: Path, log: Path
) -> subprocess.Popen[bytes]:
    """virtpub on a burst, logging to a file: the test reads the log while it runs,
    and a pipe nobody reads while it runs could fill and block it."""
    uri = f"synthetic:///?domains={DOMAINS}&rate=2500&count={BURST}"
    urls = [arg for url in cluster.urls() for arg in ("--amqp-url", url)]
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "virtpub", "run", "--libvirt-uri", uri, *urls,
             "--exchange", exchange, "--state-dir", str(state_dir), "--host-id", HOST_ID],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip


def stop_virtpub(virtpub: subprocess.Popen[bytes], log: Path) -> str:
    virtpub.send_signal(signal.SIGTERM)
    virtpub.wait(60)
    text = log.read_text()
    assert virtpub.returncode == 0, text
    return text


def connected_to(cluster: RabbitCluster, log: Path) -> list[int]:
    """The nodes virtpub's log says it connected to, in order.

    The log, not `node_of_connection`, tells the test which node to stop: each
    rabbitmqctl call boots an Erlang VM of its own, which on a loaded machine takes
    seconds, and the burst is over in four.
    """
    lines = {f"connected to broker {redact_url(url)},": i for i, url in enumerate(cluster.urls())}
    text = log.read_text()
    return [i for line in text.splitlines() for key, i in lines.items() if key in line]


def test_node_stopped_during_a_burst_loses_nothing(cluster: RabbitCluster, tmp_path: Path) -> None:
    exchange = f"cluster-{uuid.uuid4().hex[:8]}"
    declare_topology(cluster, exchange)
    log = tmp_path / "virtpub.log"
    virtpub = start_virtpub(cluster, exchange, tmp_path / "state", log)
    wait_until(lambda: bool(connected_to(cluster, log)), 60, "virtpub to connect")
    assert connected_to(cluster, log) == [0], "virtpub connects to the URL given first"
    first = cluster.nodes[0]
    wait_until(lambda: depth(first, exchange) > STARTUP, 60, "the burst to start")
    assert depth(first, exchange) < STARTUP + BURST, "the node must go during the burst"

    cluster.stop_node(0)
    wait_until(lambda: len(connected_to(cluster, log)) > 1, 90, "virtpub to reconnect")
    assert virtpub.poll() is None, log.read_text()

    reader = cluster.nodes[1]  # any running node serves the queue
    wait_until(lambda: depth(reader, exchange) >= STARTUP + BURST, 120, "every event")
    connection_name = f"virtpub {HOST_ID} pid {virtpub.pid}"
    # Until the new leader is elected the queue refuses messages, and virtpub may move
    # on again: the node it stays on is the one its log names last.
    wait_until(
        lambda: cluster.node_of_connection(connection_name, 60) == connected_to(cluster, log)[-1],
        90,
        "the broker and virtpub's log to agree on its node",
    )
    assert connected_to(cluster, log)[-1] != 0
    text = stop_virtpub(virtpub, log)
    assert f"lost the broker at {redact_url(first.url())}" in text
    assert_complete(read_all(reader, exchange), BURST)
