"""Nothing is lost: faults injected during bursts, on a private RabbitMQ node.

Each test runs virtpub as a real process with the synthetic backend
(`synthetic:///`, 50 domains, a burst of events from a thread of its own, as
libvirt's loop would), breaks something mid-burst, and then reads every message
from a durable queue bound to `#`: the publisher's `sequence` has no gap, every
domain's `seq` has no gap, and every synthetic event arrived at least once.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.blackhole import BlackHoleProxy
from tests.rabbitnode import RabbitNode, pick_port
from virtpub.config import BrokerSettings
from virtpub.daemon.spool import ROW_OVERHEAD
from virtpub.tools.ask import ask

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
    channel.exchange_declare(name, "topic", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, name, "#")
    connection.close()
    yield name


def start_virtpub(
    node: RabbitNode,
    exchange: str,
    state_dir: Path,
    *,
    count: int = BURST,
    rate: int = 2500,
    extra: list[str] | None = None,
    urls: list[str] | None = None,
) -> subprocess.Popen[str]:
    uri = f"synthetic:///?domains={DOMAINS}&rate={rate}&count={count}"
    url_options = [arg for url in urls or [node.url()] for arg in ("--amqp-url", url)]
    return subprocess.Popen(
        [sys.executable, "-m", "virtpub", "run", "--libvirt-uri", uri,
         *url_options, "--exchange", exchange, "--state-dir", str(state_dir),
         "--host-id", "faulty", *(extra or [])],
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


def unclean_stops(bodies: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """The sequence ranges each restart after a kill named as possibly missing."""
    return sorted({
        (b["data"]["first_sequence"], b["data"]["last_sequence"])
        for b in bodies
        if b["type"] == "org.virtpub.publisher.dropped" and b["data"]["reason"] == "unclean_stop"
    })  # fmt: skip


def assert_complete(bodies: list[dict[str, Any]], synthetic_events: int) -> None:
    """Every message virtpub accepted arrived at least once, in per-domain order; the only
    gaps in `sequence` are ones a `publisher.dropped.unclean_stop` names, and no sequence
    or domain `seq` was given to two messages."""
    first_seen: dict[int, dict[str, Any]] = {}
    for body in bodies:
        seen = first_seen.setdefault(body["sequence"], body)
        assert seen["id"] == body["id"], f"sequence {body['sequence']} was given twice"
    sequences = sorted(first_seen)
    explained = {n for first, last in unclean_stops(bodies) for n in range(first, last + 1)}
    missing = set(range(1, sequences[-1] + 1)) - set(sequences)
    assert missing <= explained, f"unexplained gaps: {sorted(missing - explained)[:20]}"
    per_domain: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for sequence in sequences:
        body = first_seen[sequence]
        if body["type"].startswith("org.virtpub.domain."):
            per_domain[body["subject"]].append((sequence, body["data"]["seq"]))
    assert len(per_domain) == DOMAINS
    for subject, seqs in per_domain.items():
        for (before, a), (after, b) in itertools.pairwise(seqs):
            if any(before < n < after for n in explained):
                assert b > a, f"domain {subject}: seq {b} after {a} across an unclean stop"
            else:
                assert b == a + 1, f"domain {subject}: seq {b} after {a}"
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
    accepted = spooled_sequence(tmp_path)
    restarted = start_virtpub(node, queue, tmp_path, count=0, rate=0)  # no new events
    wait_until(lambda: depth(node, queue) >= accepted, 120, "the spooled events")
    wait_until(_settled(node, queue), 60, "the queue to settle")
    stderr = stop(restarted)
    assert "resending" in stderr
    assert "did not stop cleanly" in stderr
    bodies = read_all(node, queue)
    assert max(b["sequence"] for b in bodies) > accepted  # and the restart's own messages
    [(first, last)] = unclean_stops(bodies)
    assert first == accepted + 1
    assert last - first < 1000, "at most one reservation ahead"
    emitted = {b["id"] for b in bodies if b["data"].get("origin") == "libvirt"}
    assert len(emitted) > 3000
    assert_complete(bodies, len(emitted))


KILLS = 12


def test_killed_again_and_again_loses_nothing_committed_or_confirmed(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    """SIGKILL at random moments of a burst, KILLS times: each time, what the spool had
    committed (read from its file after the kill) and what the broker had confirmed (in
    the queue) reaches the consumer after the restarts, no sequence number is used twice,
    and every gap is one a `publisher.dropped.unclean_stop` names.

    Most kills land between a batch's publish and its commit: the commit is the sync
    thread's fsync, 5 ms and more after the write. What a kill leaves in the file is what
    was written (the kernel keeps it), so the test counts only the narrower window, kills
    between the publish and the write (messages above the written sequence in the queue);
    it is a figure, not a condition. test_spool kills a writer whose fsync never came.
    """
    rng = random.Random(int.from_bytes(uuid.uuid4().bytes[:4]))
    committed: dict[int, str] = {}
    reservations: list[tuple[int, int]] = []
    """(last committed, last reserved) at each kill."""
    for _ in range(KILLS):
        before = spooled_sequence(tmp_path) if spool_created(tmp_path) else 0
        virtpub = start_virtpub(node, queue, tmp_path, count=0, rate=4000)
        # Each kill after the run's first commit (its startup messages), so each run has
        # reserved numbers of its own to report after the kill.
        first_commit = functools.partial(committed_after, tmp_path, before)
        wait_until(first_commit, 30, "the run's first commit")
        time.sleep(rng.uniform(0.5, 2.5))
        virtpub.send_signal(signal.SIGKILL)
        virtpub.wait(10)
        with sqlite3.connect(f"file:{tmp_path / 'spool.sqlite3'}?mode=ro", uri=True) as db:
            committed.update(db.execute("SELECT sequence, id FROM messages").fetchall())
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        reservations.append((meta["sequence"], meta["reserved"]))
    final = start_virtpub(node, queue, tmp_path, count=0, rate=0)
    wait_until(lambda: depth(node, queue) >= len(committed), 120, "the spooled events")
    wait_until(_settled(node, queue), 60, "the queue to settle")
    stop(final)
    bodies = read_all(node, queue)
    arrived = {b["id"] for b in bodies}
    lost = [s for s, mid in committed.items() if mid not in arrived]
    assert not lost, f"committed before a kill, never delivered: {lost[:20]}"
    assert len(unclean_stops(bodies)) == KILLS
    emitted = {b["id"] for b in bodies if b["data"].get("origin") == "libvirt"}
    sequences = {b["sequence"] for b in bodies}
    in_window = sum(any(last < n <= reserved for n in sequences) for last, reserved in reservations)
    print(f"\n{KILLS} kills, {in_window} between a publish and its write;"
          f" {len(committed)} written rows checked, {len(emitted)} events delivered")  # fmt: skip
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


def spooled_sequence(state_dir: Path) -> int:
    """The last sequence virtpub accepted before it was killed, from its spool."""
    with sqlite3.connect(state_dir / "spool.sqlite3") as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'sequence'").fetchone()
    return 0 if row is None else int(row[0])  # None: nothing committed yet


def _settled(node: RabbitNode, queue: str) -> Callable[[], bool]:
    """True once the queue depth stayed the same for a second."""
    return _steady(lambda: depth(node, queue))


def _steady(read: Callable[[], int]) -> Callable[[], bool]:
    """True once `read` gave the same figure for a second."""
    last = [-1]

    def check() -> bool:
        now = read()
        settled, last[0] = now == last[0], now
        if not settled:
            time.sleep(0.8)
        return settled

    return check


SPOOL_LIMIT = 1 << 20
SPOOL_SLACK = 500 * 1024
"""A full spool still takes the batch in hand (at most 500 messages of about 700 bytes)."""


def start_spooling(
    node: RabbitNode, exchange: str, state_dir: Path, count: int, policy: str
) -> subprocess.Popen[str]:
    return start_virtpub(
        node, exchange, state_dir, count=count, rate=0,
        extra=["--spool-max-bytes", "1MiB", "--spool-full-policy", policy],
    )  # fmt: skip


def spool_bytes(state_dir: Path) -> int:
    """What the spool's messages take, counted as virtpub counts them against its bound."""
    size = (
        "length(id) + length(routing_key) + length(type) + length(properties) + length(body)"
        f" + {ROW_OVERHEAD}"
    )
    with sqlite3.connect(f"file:{state_dir / 'spool.sqlite3'}?mode=ro", uri=True) as db:
        return int(db.execute(f"SELECT TOTAL({size}) FROM messages").fetchone()[0])


def committed_after(state_dir: Path, sequence: int) -> bool:
    """Whether the spool holds a sequence beyond `sequence`."""
    return spool_created(state_dir) and spooled_sequence(state_dir) > sequence


def spool_created(state_dir: Path) -> bool:
    """Whether virtpub has made its spool: the file appears before its tables do."""
    path = state_dir / "spool.sqlite3"
    if not path.exists():
        return False
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
        return db.execute(query).fetchone() is not None


def wait_for_steady_spool(state_dir: Path) -> int:
    """Waits until the spool stopped growing: the burst is over or held back."""
    wait_until(lambda: spool_created(state_dir), 30, "the spool")
    last, steady_since = -1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() - steady_since < 3:
        if time.monotonic() > deadline:
            pytest.fail("the spool never stopped growing")
        now = spool_bytes(state_dir)
        if now != last:
            last, steady_since = now, time.monotonic()
        time.sleep(0.2)
    return last


def test_a_full_spool_blocks_and_publishes_what_it_dropped(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    """Policy block: the spool stays within its bound while the broker is away, the queue
    in front of it overflows, and every event is either delivered or counted as dropped."""
    burst = 130_000  # more than the spool and the daemon's queue (100,000) hold together
    node.stop()
    try:
        virtpub = start_spooling(node, queue, tmp_path, burst, "block")
        held = wait_for_steady_spool(tmp_path)
        assert SPOOL_LIMIT <= held <= SPOOL_LIMIT + SPOOL_SLACK
        assert virtpub.poll() is None
    finally:
        node.start()
    wait_until(_settled(node, queue), 180, "the queue to settle")
    wait_until(lambda: any(_dropped(read_peek(node, queue))), 60, "publisher.dropped")
    wait_until(_settled(node, queue), 60, "the queue to settle")
    stderr = stop(virtpub)
    bodies = read_all(node, queue)
    reports = _dropped(bodies)
    assert {r["data"]["reason"] for r in reports} == {"queue_full"}
    lost = sum(r["data"]["count"] for r in reports)
    assert 0 < lost <= burst - 100_000  # the queue held 100,000 at least
    assert sum(n for r in reports for n in r["data"]["events"].values()) == lost
    assert f" {lost} dropped from a full queue" in stderr
    assert_complete(bodies, burst - lost)  # no sequence gap: dropped events never got one
    _assert_snapshot_follows(bodies, reports)


def test_drop_oldest_keeps_the_spool_bounded_and_names_the_sequences_it_dropped(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    burst = 20_000
    node.stop()
    try:
        virtpub = start_spooling(node, queue, tmp_path, burst, "drop-oldest")
        held = wait_for_steady_spool(tmp_path)
        assert held <= SPOOL_LIMIT + SPOOL_SLACK
        assert virtpub.poll() is None
    finally:
        node.start()
    wait_until(lambda: any(_dropped(read_peek(node, queue))), 120, "publisher.dropped")
    wait_until(_settled(node, queue), 120, "the queue to settle")
    stop(virtpub)
    bodies = read_all(node, queue)
    reports = _dropped(bodies)
    assert reports and {r["data"]["reason"] for r in reports} == {"spool_full"}
    dropped: set[int] = set()
    for report in reports:
        span = range(report["data"]["first_sequence"], report["data"]["last_sequence"] + 1)
        assert report["data"]["count"] == len(span)
        assert sum(report["data"]["events"].values()) == len(span)
        assert not dropped & set(span), "each sequence is reported dropped once"
        dropped |= set(span)
    received = {b["sequence"] for b in bodies}
    assert not received & dropped, "a message reported dropped must not arrive"
    assert received | dropped == set(range(1, max(received) + 1)), "an unexplained gap"
    emitted = [b["sequence"] for b in bodies if b["data"].get("origin") == "libvirt"]
    assert len(emitted) < burst
    assert max(dropped) < max(emitted), "the oldest are dropped, the newest kept"
    _assert_snapshot_follows(bodies, reports)


def read_peek(node: RabbitNode, queue: str) -> list[dict[str, Any]]:
    """The newest few hundred messages' bodies, read without consuming."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url()))
    channel = connection.channel()
    bodies = []
    try:
        total = int(channel.queue_declare(queue, passive=True).method.message_count)
        for _ in range(min(total, 5000)):
            method, _props, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            bodies.append(json.loads(body))
    finally:
        connection.close()  # unacked messages go back to the queue
    return bodies


def _dropped(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in bodies if b["type"] == "org.virtpub.publisher.dropped"]


def _assert_snapshot_follows(bodies: list[dict[str, Any]], reports: list[dict[str, Any]]) -> None:
    """After a loss, a snapshot (reason dropped) lets a consumer rebuild what it missed."""
    last = max(r["sequence"] for r in reports)
    snapshots = [
        b for b in bodies
        if b["type"] == "org.virtpub.publisher.snapshot" and b["sequence"] > last
    ]  # fmt: skip
    assert [s["data"]["reason"] for s in snapshots][:2] == ["dropped", "dropped"]
    assert snapshots[1]["data"]["domains"] == DOMAINS


def metric(port: int, name: str) -> float:
    """One sample of virtpub's own /metrics, 0 while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(f"{name} ") or line.startswith(f"{name}_total "):
            return float(line.split()[1])
    return 0.0


def test_a_queue_that_refuses_publishes_gets_every_message_in_order(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    """A second bound queue at `x-max-length` with `reject-publish`: the broker nacks.

    The bounded queue is full before virtpub starts and is only drained, slower than
    virtpub publishes, once the first nack is counted: from then on a refused message
    must reach it before anything published after it, and every message arrives.
    (Messages in flight when the first nack of an episode comes are the broker's to
    take or refuse: those published by the time the first nack is seen are kept out of
    the order check.)
    """
    bounded = f"{queue}.bounded"
    limit, burst = 100, 300
    connection = pika.BlockingConnection(pika.URLParameters(node.url()))
    channel = connection.channel()
    channel.queue_declare(
        bounded, durable=True, arguments={"x-max-length": limit, "x-overflow": "reject-publish"}
    )
    channel.queue_bind(bounded, queue, "#")
    for n in range(limit):
        channel.basic_publish("", bounded, json.dumps({"filler": n}).encode())
    port = pick_port()
    started = time.monotonic()
    virtpub = start_virtpub(
        node,
        queue,
        tmp_path,
        count=burst,
        rate=300,
        extra=["--metrics-listen", f"127.0.0.1:{port}"],
    )
    wait_until(lambda: metric(port, "virtpub_messages_nacked") > 0, 30, "the first nack")
    first_nack = time.monotonic() - started
    before_nack = metric(port, "virtpub_messages_published")  # no resend yet: sequences 1..this
    order: list[int] = []
    events: set[str] = set()
    deadline = time.monotonic() + 120
    while len(events) < burst or set(order) != set(range(1, spooled_sequence(tmp_path) + 1)):
        assert time.monotonic() < deadline, f"{len(set(order))} in the bounded queue"
        method, _props, body = channel.basic_get(bounded, auto_ack=True)
        message = json.loads(body) if method is not None else {}
        if "sequence" in message:
            order.append(message["sequence"])
            if message["data"].get("origin") == "libvirt":
                events.add(message["id"])
        connection.sleep(0.004)  # slower than virtpub publishes: the queue reaches its limit
    wait_until(lambda: metric(port, "virtpub_spool_messages") == 0, 30, "an empty spool")
    counts = {
        name: metric(port, f"virtpub_messages_{name}")
        for name in ("published", "confirmed", "nacked", "reconnects")
    }
    stderr = stop(virtpub)
    accepted = spooled_sequence(tmp_path)
    channel.queue_delete(bounded)
    connection.close()
    everything = read_all(node, queue)
    delivered = {b["sequence"] for b in everything}
    print(
        f"\nnacks: accepted {accepted}, delivered {len(delivered)}, "
        f"missing {accepted - len(delivered)}, first nack after {first_nack:.1f} s, {counts}"
    )
    assert_complete(everything, burst)
    first_seen = list(dict.fromkeys(order))
    for index, sequence in enumerate(first_seen):
        if sequence > before_nack:
            overtaken = [s for s in first_seen[index + 1 :] if s < sequence]
            assert not overtaken, f"{sequence} overtook refused {overtaken[:10]}"
    assert len(first_seen) > before_nack + 50, "the order check covered enough messages"
    assert counts["nacked"] > 0 and counts["reconnects"] == 0
    # Each publish gets one confirm; only acks count as confirmed, once per message.
    assert counts["confirmed"] == accepted
    assert counts["published"] == counts["confirmed"] + counts["nacked"]
    assert "resending in order" in stderr


def through(proxy: BlackHoleProxy, node: RabbitNode, heartbeat: int | None = None) -> list[str]:
    """The proxy first, the broker itself second, as `--amqp-url`s."""
    query = f"?heartbeat={heartbeat}" if heartbeat else ""
    first = node.url().replace(f":{node.port}/", f":{proxy.port}/") + query
    return [first, node.url() + query]


def test_a_silent_partition_in_a_burst_fails_over_on_stalled_confirms(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    """The proxy stops forwarding mid-burst, closing nothing. With messages in flight the
    confirms that stop coming tell first: virtpub fails over to the second URL within
    10 s (pika's heartbeat check alone took 37.7 s), and nothing accepted is missing."""
    burst, port = 3000, pick_port()
    with BlackHoleProxy(("127.0.0.1", node.port)) as proxy:
        virtpub = start_virtpub(
            node, queue, tmp_path, count=burst, rate=300, urls=through(proxy, node),
            extra=["--metrics-listen", f"127.0.0.1:{port}"],
        )  # fmt: skip
        wait_until(lambda: depth(node, queue) > STARTUP + 500, 60, "the burst to start")
        proxy.partition()
        cut = time.monotonic()
        held = depth(node, queue)
        wait_until(lambda: metric(port, "virtpub_messages_reconnects") >= 1, 30, "a failover")
        detected = time.monotonic() - cut
        wait_until(lambda: depth(node, queue) > held + 250, 30, "publishing again")
        resumed = time.monotonic() - cut
        # Still partitioned: the dead connection holds the exclusive requests queue until
        # the broker gives up on it, and virtpub must take the queue over then.
        asked = BrokerSettings(amqp_urls=(node.url(),), exchange=queue)
        wait_until(lambda: bool(ask(asked, ["faulty"], timeout=2)), 60, "requests served")
        served = time.monotonic() - cut
        proxy.heal()
        wait_until(lambda: depth(node, queue) >= STARTUP + burst, 120, "every event")
        wait_until(_settled(node, queue), 60, "the queue to settle")
        stderr = stop(virtpub)
    accepted = spooled_sequence(tmp_path)
    bodies = read_all(node, queue)
    delivered = len({b["sequence"] for b in bodies})
    print(
        f"\npartition in a burst: accepted {accepted}, delivered {delivered},"
        f" missing {accepted - delivered}, detected after {detected:.1f} s,"
        f" publishing again after {resumed:.1f} s,"
        f" requests served again {served - detected:.1f} s after the failover"
    )
    assert "no confirm for" in stderr
    assert resumed < 10.0
    assert served - detected < 60.0
    assert_complete(bodies, burst)


def test_a_silent_partition_of_an_idle_connection_is_noticed_within_two_heartbeats(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    """Nothing in flight: silence is the only sign. The broker sends a heartbeat every
    half heartbeat, so one heartbeat without a byte means the connection is gone."""
    heartbeat, port = 4, pick_port()
    with BlackHoleProxy(("127.0.0.1", node.port)) as proxy:
        virtpub = start_virtpub(
            node, queue, tmp_path, count=0, rate=0, urls=through(proxy, node, heartbeat),
            extra=["--metrics-listen", f"127.0.0.1:{port}"],
        )  # fmt: skip
        wait_until(lambda: metric(port, "virtpub_spool_messages") == 0 and depth(node, queue) > 0,
                   60, "the startup messages")  # fmt: skip
        proxy.partition()
        cut = time.monotonic()
        wait_until(lambda: metric(port, "virtpub_messages_reconnects") >= 1, 30, "a failover")
        detected = time.monotonic() - cut
        proxy.heal()
        stderr = stop(virtpub)
    accepted = spooled_sequence(tmp_path)
    bodies = read_all(node, queue)
    delivered = len({b["sequence"] for b in bodies})
    print(
        f"\nidle partition: accepted {accepted}, delivered {delivered},"
        f" missing {accepted - delivered}, detected after {detected:.1f} s"
        f" (heartbeat {heartbeat} s)"
    )
    assert "nothing heard for" in stderr
    assert detected < 2 * heartbeat
    assert_complete(bodies, 0)


def fill(directory: Path) -> Path:
    """Writes a file until its filesystem is full; returns it (delete it to make room)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
    return filler


def test_a_full_state_filesystem_holds_events_and_recovers_when_space_returns(
    node: RabbitNode, queue: str, tmp_path: Path
) -> None:
    """The state directory is a 64 MiB tmpfs of the test's own, filled up mid-burst while a
    memory alarm holds the broker's confirms, so the spool has to grow: virtpub keeps
    running, says so in one line, takes no new events (the block policy's backpressure)
    and, once the space is freed and the alarm cleared, spools and delivers every event.
    (While the broker confirms, a full disk changes nothing: the spool's files are
    written again from their beginning, in the space they already have.)"""
    state, burst = tmp_path / "state", 1500
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(state)], check=True)
    try:
        virtpub = start_virtpub(node, queue, state, count=burst, rate=100)
        wait_until(lambda: depth(node, queue) > STARTUP + 200, 60, "the burst to start")
        node.set_memory_alarm(True)
        try:
            filler = fill(state)
            filled = time.monotonic()
            wait_until(_steady(lambda: spooled_sequence(state)), 30, "spooling to stop")
            held = spooled_sequence(state)
            time.sleep(3)
            assert spooled_sequence(state) == held, "a full spool must take no new events"
            assert held < STARTUP + burst, "the burst ended before the disk filled"
            assert virtpub.poll() is None, "a full disk must not stop virtpub"
            stalled_for = time.monotonic() - filled
            filler.unlink()
        finally:
            node.set_memory_alarm(False)
        try:
            wait_until(lambda: depth(node, queue) >= STARTUP + burst, 120, "every event")
        except BaseException:
            virtpub.kill()
            print(virtpub.communicate()[1][-3000:])
            raise
        wait_until(_settled(node, queue), 60, "the queue to settle")
        stderr = stop(virtpub)
        accepted = spooled_sequence(state)
    finally:
        subprocess.run(["umount", "--lazy", str(state)], check=False)
    bodies = read_all(node, queue)
    delivered = len({b["sequence"] for b in bodies})
    print(
        f"\nfull disk: accepted {accepted}, delivered {delivered},"
        f" missing {accepted - delivered}, {held} spooled when the disk filled,"
        f" held for {stalled_for:.1f} s"
    )
    # One line each time the disk fills, however many retries, and one when it has room
    # again (the retry's checkpoint can free the WAL's space, and the burst fill it again).
    full, room = stderr.count("taking no new events"), stderr.count("room again")
    assert full >= 1 and stderr.count("ERROR") == full == room, stderr[-2000:]
    assert "Traceback" not in stderr
    assert_complete(bodies, burst)
