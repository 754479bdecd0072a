"""Snapshot on request, and the requests channel under a closing channel and a held queue.

Against the shared broker, with in-process publishers on `test:///default` (the real daemon,
so a test can change domains through the connection the driver watches).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.conftest import HOST_ID, Consumer, RunningPublisher, assert_valid, wait_for
from tests.test_publish_test_driver import domain_xml
from virtpub import consumer
from virtpub.amqp.requests import CapabilityResponder, requests_exchange
from virtpub.daemon.inbox import Inbox

VIRTPUB = [sys.executable, "-m", "virtpub"]


def virtpub(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VIRTPUB, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def brackets(messages: list[Any], request_id: str | None = None) -> list[dict[str, Any]]:
    """The snapshot begin/end bodies received, of one request if `request_id` is given."""
    return [
        m.body
        for m in messages
        if m.body["type"] == "org.virtpub.publisher.snapshot"
        and (request_id is None or m.body["data"].get("request_id") == request_id)
    ]


def test_snapshot_command_gets_a_fresh_bracket_with_its_request_id(
    amqp_url: str,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("v1.*.publisher.snapshot.#", "v1.*.domain.#")
    publisher = publisher_factory()
    consumer.collect(lambda m: any(b["data"]["phase"] == "end" for b in brackets(m)))
    dom = publisher.conn.defineXML(domain_xml("vm-requested")[0])
    consumer.collect(lambda m: any(x.body["data"].get("event") == "added" for x in m))
    started = time.monotonic()
    result = virtpub("snapshot", "--amqp-url", amqp_url, "--exchange", exchange, "--host", HOST_ID)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    backend = publisher.drivers[0].backend
    assert result.stdout.splitlines() == [f"{HOST_ID}  {backend}  2 domain(s)"]
    assert result.stderr == ""
    assert took < 20, f"the command took {took:.1f} s"

    begin, end = [b for b in brackets(consumer.quiet(0.5)) if b["data"]["reason"] == "requested"]
    request_id = begin["data"]["request_id"]
    assert uuid.UUID(request_id)
    assert (begin["data"]["phase"], end["data"]["phase"]) == ("begin", "end")
    assert end["data"]["request_id"] == request_id
    assert end["data"]["snapshot_id"] == begin["data"]["snapshot_id"]
    inside = [
        m.body["data"]["domain"]["name"]
        for m in consumer.messages
        if begin["sequence"] < m.body["sequence"] < end["sequence"]
    ]
    assert sorted(inside) == sorted(["test", dom.name()])
    for message in consumer.messages:
        assert_valid(message)

    # Without --host, the hosts to wait for are those that answer capabilities.
    result = virtpub("snapshot", "--amqp-url", amqp_url, "--exchange", exchange)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{HOST_ID}  {backend}  2 domain(s)"]
    ids = {b["data"].get("request_id") for b in brackets(consumer.quiet(0.5))}
    assert len(ids - {None, request_id}) == 1, "a second request, with an id of its own"
    assert publisher.daemon._responder.snapshots_requested == 2


def test_a_snapshot_request_without_a_uuid_is_refused_logged_and_counted(
    amqp_url: str,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = consumer_factory("v1.*.publisher.snapshot.#")
    publisher = publisher_factory()
    responder = publisher.daemon._responder
    wait_for(lambda: responder.serving, 10, "requests served")
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for correlation_id in (None, "not-a-uuid"):
        properties = pika.BasicProperties(correlation_id=correlation_id)
        channel.basic_publish(requests_exchange(exchange), f"snapshot.{HOST_ID}", b"", properties)
    connection.close()
    wait_for(lambda: responder.rejected == 2, 10, "both requests refused")
    assert not [b for b in brackets(consumer.quiet(1.0)) if b["data"]["reason"] == "requested"]
    refusals = [r.getMessage() for r in caplog.records if r.name == "virtpub.amqp.requests"]
    assert len(refusals) == 2 and all("without a UUID correlation_id" in m for m in refusals)
    assert responder.serving and responder.snapshots_requested == 0


def test_snapshot_command_fails_in_one_line_for_a_host_that_does_not_answer(
    amqp_url: str, exchange: str, publisher_factory: Callable[..., RunningPublisher]
) -> None:
    asked = ["snapshot", "--amqp-url", amqp_url, "--exchange", exchange]
    result = virtpub(*asked)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"virtpub snapshot: no publisher has ever served requests on exchange {exchange!r}"
        f" ({exchange}.requests does not exist)"
    ]
    declared = pika.BlockingConnection(pika.URLParameters(amqp_url))
    declared.channel().exchange_declare(requests_exchange(exchange), "topic", durable=True)
    declared.close()
    result = virtpub(*asked, "--discovery-timeout", "0.5")
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["virtpub snapshot: no publisher answered within 0.5 s"]

    publisher_factory()
    result = virtpub(*asked, "--host", HOST_ID, "--host", "nosuchhost", "--discovery-timeout", "1")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "virtpub snapshot: no answer from host 'nosuchhost' within 1 s"
    ]
    assert len(result.stdout.splitlines()) == 1, "the host that answered still snapshots"


# -- the responder on an I/O loop of the test's own --------------------------------------------


class IOThread:
    """A SelectConnection run on a thread of its own, as the broker's I/O thread runs one;
    whatever a callback raises ends the loop and is kept in `error`."""

    def __init__(self, url: str) -> None:
        self.error: BaseException | None = None
        self._opened = threading.Event()
        self.connection = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=lambda _c: self._opened.set(),
            on_open_error_callback=lambda _c, err: self._fail(err),
            on_close_callback=lambda c, _reason: c.ioloop.stop(),
        )
        self._thread = threading.Thread(target=self._run, name="test-io", daemon=True)
        self._thread.start()
        assert self._opened.wait(10), f"no connection: {self.error}"

    def _fail(self, err: BaseException) -> None:
        self.error = err
        self._opened.set()
        self.connection.ioloop.stop()

    def _run(self) -> None:
        try:
            self.connection.ioloop.start()
        except BaseException as err:  # kept for the test to assert on
            self.error = err

    def call(self, callback: Callable[[], None]) -> None:
        self.connection.ioloop.add_callback_threadsafe(callback)

    def close(self) -> None:
        if self._thread.is_alive():
            self.call(self.connection.close)
            self._thread.join(10)


@pytest.fixture
def io_thread(amqp_url: str) -> Iterator[IOThread]:
    thread = IOThread(amqp_url)
    yield thread
    thread.close()


def closing_after(step: str) -> tuple[type[CapabilityResponder], threading.Event]:
    """A responder whose channel starts closing right after `step` sent its next request,
    so that request's reply arrives on a closing channel (as when the connection closes).
    The event is set once it closed the channel."""
    original = getattr(CapabilityResponder, step)
    closed = threading.Event()

    def step_then_close(self: Any, arg: Any) -> None:
        original(self, arg)
        channel = self._channel
        if channel is not None and channel.is_open:
            channel.close()
            closed.set()

    return type(f"ClosingAfter_{step}", (CapabilityResponder,), {step: step_then_close}), closed


@pytest.mark.parametrize("step", ["on_exchange_ready", "on_queue_declareok", "on_bindok"])
def test_every_step_tolerates_its_channel_closing_meanwhile(
    exchange: str, io_thread: IOThread, step: str, caplog: pytest.LogCaptureFixture
) -> None:
    responder_class, closed = closing_after(step)
    responder = responder_class(exchange, f"closing-{uuid.uuid4().hex[:8]}")
    io_thread.call(lambda: responder.attach(io_thread.connection))
    assert closed.wait(10), f"{step} did not run"
    wait_for(lambda: responder._channel is None, 10, "the request channel closed")
    time.sleep(0.2)  # any reply still in flight arrives on the closed channel
    assert io_thread.error is None, f"a step raised into pika: {io_thread.error!r}"
    assert io_thread.connection.is_open and not responder.serving
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("virtpub")
    ]

    # The connection survived: a responder on it serves.
    fresh = CapabilityResponder(exchange, f"fresh-{uuid.uuid4().hex[:8]}")
    io_thread.call(lambda: fresh.attach(io_thread.connection))
    wait_for(lambda: fresh.serving, 10, "a fresh responder serves")
    assert io_thread.error is None


def test_a_stuck_publisher_makes_the_command_time_out_in_one_line(
    amqp_url: str, topic: str, io_thread: IOThread
) -> None:
    """A publisher that takes the request and never publishes the bracket: the responder is
    the real one, only the daemon thread behind it is missing (a stuck daemon cannot be
    made on purpose here)."""
    host, taken = f"stuck-{uuid.uuid4().hex[:8]}", Inbox[str](1)
    backend = f"virtpub://{host}/libvirt/test%3A%2F%2F%2Fdefault"
    responder = CapabilityResponder(topic, host, taken.offer)
    responder.answer = json.dumps(
        {"data": {"host_id": host, "backends": [{"source": backend}]}}
    ).encode()
    io_thread.call(lambda: responder.attach(io_thread.connection))
    wait_for(lambda: responder.serving, 10, "the responder serves")
    asked = ["snapshot", "--amqp-url", amqp_url, "--exchange", topic, "--host", host]
    result = virtpub(*asked, "--timeout", "1")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"virtpub snapshot: no snapshot end from host {host!r}, backend {backend} within 1 s"
    ]
    request_id = taken.take_nowait()
    assert request_id is not None and uuid.UUID(request_id) and len(taken) == 0


def test_requests_are_served_again_once_a_dead_connection_lets_go_of_the_queue(
    amqp_url: str,
    exchange: str,
    publisher_factory: Callable[..., RunningPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a failover the broker keeps the old connection's exclusive queue until it
    notices that connection is dead. Here another connection holds the queue instead, then
    lets go: the publisher must retry and serve again, without a restart."""
    holder = pika.BlockingConnection(pika.URLParameters(amqp_url))
    queue = f"{requests_exchange(exchange)}.{HOST_ID}"
    holder.channel().queue_declare(queue, exclusive=True, auto_delete=True)
    caplog.set_level(logging.INFO, logger="virtpub.amqp.requests")
    publisher = publisher_factory()
    responder = publisher.daemon._responder
    wait_for(
        lambda: any("RESOURCE_LOCKED" in r.getMessage() for r in caplog.records),
        10,
        "the held queue refused",
    )
    asked = ["capabilities", "--amqp-url", amqp_url, "--exchange", exchange, "--host", HOST_ID]
    refused = virtpub(*asked, "--timeout", "1")
    assert refused.returncode == 1, "the queue is held: nobody can be serving"
    time.sleep(2)  # a few retries fail meanwhile
    holder.close()
    took = wait_for(lambda: responder.serving, 20, "requests served after the queue was freed")
    served = virtpub(*asked, "--timeout", "5")
    assert served.returncode == 0, served.stderr
    # At most one retry interval (10 s) after the queue was freed, plus the declaration.
    assert took < 15, f"served again {took:.1f} s after the queue was freed"
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "virtpub.amqp.requests"
    ]
    assert len(warnings) == 1, "one warning, not one per retry (pika's own are silenced)"
    print(f"served again {took:.2f} s after the held queue was freed")


# -- the inventory closes the loop: gap, request, consistent again ------------------------------


class Watch:
    """`virtpub inventory --watch --json` as a process; its lines collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*VIRTPUB, "inventory", "--watch", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.tables: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: Any, tables: bool) -> None:
        for line in stream:
            if tables:
                self.tables.append(json.loads(line))
            else:
                self.errors.append(line.rstrip("\n"))

    def names(self) -> dict[str, str]:
        """Domain name to state, in the latest table."""
        return {r["name"]: r["state"] for r in self.tables[-1]["rows"]} if self.tables else {}

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(10)
        for thread in self._threads:
            thread.join(5)
        return code


def listing(conn: Any) -> dict[str, str]:
    """libvirt's own view of the host, in the inventory's terms: name to state."""
    states = {1: "running", 3: "paused", 5: "shutoff"}
    return {dom.name(): states.get(dom.state()[0], "?") for dom in conn.listAllDomains()}


def test_inventory_requests_a_snapshot_on_a_gap_and_ends_consistent(
    amqp_url: str,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    """The inventory's queue misses every domain message for a while (its binding is taken
    away and given back): the next message shows a gap in the host's sequence, the
    inventory asks for a snapshot, and the bracket's mark and sweep put the table right."""
    brackets_seen = consumer_factory("v1.*.publisher.snapshot.#")  # declares the exchange
    queue = f"virtpub-test-inventory-{uuid.uuid4().hex[:10]}"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    watching: Watch | None = None
    try:
        for binding in consumer.BINDINGS:
            channel.queue_bind(queue, exchange, binding)
        publisher = publisher_factory()
        gone = publisher.conn.defineXML(domain_xml("vm-gone")[0])
        watch = watching = Watch("--amqp-url", amqp_url, "--exchange", exchange, "--queue", queue)
        wait_for(lambda: set(watch.names()) == {"test", "vm-gone"}, 15, "the first table")

        channel.queue_unbind(queue, exchange, "v1.*.domain.#")
        gone.undefine()  # removed: missed
        publisher.conn.defineXML(domain_xml("vm-new")[0])  # added: missed
        publisher.conn.lookupByName("test").suspend()  # paused: missed
        broker = publisher.daemon.broker
        assert broker is not None
        wait_for(lambda: broker.unconfirmed() == 0, 10, "all confirmed")
        time.sleep(0.5)  # the broker has routed them past the unbound queue
        assert set(watch.names()) == {"test", "vm-gone"}, "the inventory missed the changes"
        channel.queue_bind(queue, exchange, "v1.*.domain.#")
        publisher.conn.defineXML(domain_xml("vm-after")[0])  # the gap shows here

        expected = listing(publisher.conn)
        took = wait_for(lambda: watch.names() == expected, 20, f"the table equals {expected}")
        print(f"consistent again {took:.2f} s after the message that showed the gap")
        (line,) = watch.errors
        assert line.startswith(f"virtpub inventory: gap in the sequence of host {HOST_ID!r};")
        request_id = line.rsplit("(request ", 1)[1].rstrip(")")
        requested = brackets(brackets_seen.collect(lambda m: len(brackets(m, request_id)) == 2))
        assert [b["data"]["reason"] for b in requested if b["data"].get("request_id")] == [
            "requested",
            "requested",
        ]
        final = watch.tables[-1]
        assert final["gaps"] >= 1 and final["rejected"] == 0
        assert publisher.daemon._responder.snapshots_requested == 1
        watching = None
        assert watch.stop() == 0
    finally:
        if watching is not None:
            watching.stop()
        channel.queue_delete(queue)
        connection.close()
