"""Nothing is lost: faults injected during bursts, on a private RabbitMQ node.

Each test runs virtpub as a real process with the synthetic backend
(`synthetic:///`, 50 domains, a burst of events from a thread of its own, as
libvirt's loop would), breaks something mid-burst, and then reads every message
from a durable queue bound to `#`: the publisher's `sequence` has no gap, every
domain's `seq` has no gap, and every synthetic event arrived at least once.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.rabbitnode import RabbitNode

DOMAINS = 50
BURST = 10_000
STARTUP = 1 + 3 * DOMAINS + DOMAINS + 2  # capabilities, resync replays, snapshot bracket


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with RabbitNode() as private:
        yield private


@pytest.fixture
def queue(node: RabbitNode) -> Iterator[str]:
    """A durable queue bound to `#` on a fresh exchange, declared before virtpub starts."""
    name = f"faults-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(node.url()))
    channel = connection.channel()
    channel.exchange_declare(
        name, "topic", durable=True, arguments={"alternate-exchange": f"{name}.unroutable"}
    )
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, name, "#")
    connection.close()
    yield name


def start_virtpub(
    node: RabbitNode, exchange: str, state_dir: Path, count: int = BURST, rate: int = 2500
) -> subprocess.Popen[str]:
    uri = f"synthetic:///?domains={DOMAINS}&rate={rate}&count={count}"
    return subprocess.Popen(
        [sys.executable, "-m", "publisher", "run", "--libvirt-uri", uri,
         "--amqp-url", node.url(), "--exchange", exchange, "--state-dir", str(state_dir),
         "--host-id", "faulty"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def depth(node: RabbitNode, queue: str) -> int:
    """Messages in the queue, 0 while the broker cannot be asked."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(node.url()))
    except pika.exceptions.AMQPError:
        return 0
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    return stderr


def read_all(node: RabbitNode, queue: str) -> list[dict[str, Any]]:
    connection = pika.BlockingConnection(pika.URLParameters(node.url()))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=2000)
    bodies = []
    for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=1.0):
        if method is None:
            break
        bodies.append(json.loads(body))
    connection.close()
    return bodies


def assert_complete(bodies: list[dict[str, Any]], synthetic_events: int) -> None:
    """Every message virtpub accepted arrived at least once, in per-domain order."""
    sequences = sorted({b["sequence"] for b in bodies})
    assert sequences == list(range(1, sequences[-1] + 1)), "a publisher sequence is missing"
    first_seen: dict[int, dict[str, Any]] = {}
    for body in bodies:
        first_seen.setdefault(body["sequence"], body)
    per_domain: dict[str, list[int]] = defaultdict(list)
    for sequence in sequences:
        body = first_seen[sequence]
        if body["type"].startswith("org.virtpub.domain."):
            per_domain[body["subject"]].append(body["data"]["seq"])
    assert len(per_domain) == DOMAINS
    for subject, seqs in per_domain.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"domain {subject}: {seqs[:20]}..."
    events = {b["id"] for b in bodies if b["data"].get("origin") == "libvirt"}
    assert len(events) == synthetic_events


def test_broker_restart_during_a_burst(node: RabbitNode, queue: str, tmp_path: Path) -> None:
    virtpub = start_virtpub(node, queue, tmp_path)
    wait_until(lambda: depth(node, queue) > STARTUP + 2000, 60, "the burst to start")
    node.restart()
    wait_until(lambda: depth(node, queue) >= STARTUP + BURST, 120, "every event")
    stderr = stop(virtpub)
    assert "lost the broker" in stderr
    assert_complete(read_all(node, queue), BURST)


def test_virtpub_killed_during_a_burst_resends_after_restart(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    virtpub = start_virtpub(node, queue, tmp_path)
    wait_until(lambda: depth(node, queue) > STARTUP + 3000, 60, "the burst to start")
    virtpub.send_signal(signal.SIGKILL)
    virtpub.wait(10)
    accepted = _spooled_sequence(tmp_path)
    restarted = start_virtpub(node, queue, tmp_path, count=0, rate=0)  # no new events
    wait_until(lambda: depth(node, queue) >= accepted, 120, "the spooled events")
    wait_until(_settled(node, queue), 60, "the queue to settle")
    stderr = stop(restarted)
    assert "resending" in stderr
    bodies = read_all(node, queue)
    assert max(b["sequence"] for b in bodies) > accepted  # and the restart's own messages
    emitted = {b["id"] for b in bodies if b["data"].get("origin") == "libvirt"}
    assert len(emitted) > 3000
    assert_complete(bodies, len(emitted))


def test_memory_alarm_during_a_burst_pauses_without_loss(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    virtpub = start_virtpub(node, queue, tmp_path)
    wait_until(lambda: depth(node, queue) > STARTUP + 2000, 60, "the burst to start")
    node.set_memory_alarm(True)
    try:
        time.sleep(3)
        held = depth(node, queue)
        time.sleep(2)
        assert depth(node, queue) == held, "a blocked publisher must hold its messages"
        assert virtpub.poll() is None, "virtpub must wait out the alarm, not exit"
    finally:
        node.set_memory_alarm(False)
    wait_until(lambda: depth(node, queue) >= STARTUP + BURST, 120, "every event")
    stderr = stop(virtpub)
    assert "blocked publishing" in stderr
    assert_complete(read_all(node, queue), BURST)


def test_broker_down_when_virtpub_starts(node: RabbitNode, queue: str, tmp_path: Path) -> None:
    node.stop()
    try:
        virtpub = start_virtpub(node, queue, tmp_path, count=2000)
        time.sleep(4)
        assert virtpub.poll() is None, "an unreachable broker is retried"
    finally:
        node.start()
    wait_until(lambda: depth(node, queue) >= STARTUP + 2000, 120, "every event")
    stderr = stop(virtpub)
    assert "broker unreachable" in stderr
    assert_complete(read_all(node, queue), 2000)


def _spooled_sequence(state_dir: Path) -> int:
    """The last sequence virtpub accepted before it was killed, from its spool."""
    with sqlite3.connect(state_dir / "spool.sqlite3") as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'sequence'").fetchone()
    return int(row[0])


def _settled(node: RabbitNode, queue: str) -> Callable[[], bool]:
    """True once the queue depth stayed the same for a second."""
    last = [-1]

    def check() -> bool:
        now = depth(node, queue)
        settled, last[0] = now == last[0], now
        if not settled:
            time.sleep(0.8)
        return settled

    return check
