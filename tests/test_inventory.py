"""The inventory rebuilt from messages: the table rules message by message, then the consumer
and the command against the real RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from click.testing import CliRunner

from tests.conftest import on_test_broker
from virtpub.config import BrokerSettings
from virtpub.consumer import Inventory, Row, follow
from virtpub.tools.inventory import (
    inventory_command,
    render_table,
    to_json,
)

WEB = "6695eb01-f6a4-8304-79aa-97f2502e193f"
DB = "0b6cf9b2-5d0e-4a8e-9a51-1f0e6c3a7d21"
CACHE = "d2b4e6f8-1a3c-4e5f-8a7b-9c0d1e2f3a4b"

Message = tuple[str, dict[str, Any]]


class FakePublisher:
    """Hand-built messages of one host, with its `sequence` and each domain's `seq` kept
    consecutive unless a test says otherwise."""

    def __init__(self, host: str, backend: str = "test:///default") -> None:
        self.host = host
        self.backend = f"virtpub://{host}/libvirt/{backend.replace(':', '%3A')}"
        self.sequence = 0
        self.seqs: dict[str, int] = {}

    def _body(self, source: str, subject: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        self.sequence += 1
        return {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": source,
            "type": f"org.virtpub.{event}",
            "subject": subject,
            "time": "2026-11-27T07:53:44.102463Z",
            "sequence": self.sequence,
            "data": data,
        }

    def domain(
        self,
        uuid_: str,
        name: str,
        event: str,
        detail: str | None = None,
        *,
        state: str = "running",
        persistent: bool = True,
        backend: str | None = None,
        **extra: Any,
    ) -> Message:
        seq = 1 if event == "added" else self.seqs.get(uuid_, 0) + 1
        self.seqs[uuid_] = seq
        data = {
            "domain": {"uuid": uuid_, "name": name},
            "event": event,
            "detail": detail,
            "origin": "snapshot" if event == "snapshot" else "libvirt",
            "persistent": persistent,
            "state": {"state": state, "reason": "unknown", "state_code": 1, "reason_code": 0},
            "seq": seq,
            **extra,
        }
        key = f"v1.{self.host}.domain.{event}" + (f".{detail}" if detail else "")
        return key, self._body(backend or self.backend, uuid_, f"domain.{event}", data)

    def publisher(self, event: str, detail: str | None = None, **data: Any) -> Message:
        key = f"v1.{self.host}.publisher.{event}" + (f".{detail}" if detail else "")
        source = f"virtpub://{self.host}/publisher"
        return key, self._body(source, self.host, f"publisher.{event}", data)

    def snapshot_begin(self, snapshot_id: str, backend: str | None = None) -> Message:
        return self.publisher(
            "snapshot",
            "begin",
            backend=backend or self.backend,
            snapshot_id=snapshot_id,
            reason="startup",
        )

    def snapshot_end(self, snapshot_id: str, domains: int, backend: str | None = None) -> Message:
        return self.publisher(
            "snapshot",
            "end",
            backend=backend or self.backend,
            snapshot_id=snapshot_id,
            domains=domains,
        )


def applied(*messages: Message) -> Inventory:
    inventory = Inventory()
    for routing_key, body in messages:
        inventory.apply(routing_key, body)
    return inventory


def summary(inventory: Inventory) -> list[tuple[str, str, str, bool, str]]:
    return [(r.host, r.name, r.state, r.persistent, r.last_event) for r in inventory.rows()]


def counters(inventory: Inventory) -> dict[str, int]:
    return {key: value for key, value in to_json(inventory).items() if key != "rows"}


# -- the table, message by message ------------------------------------------------------------


def test_added_state_changes_and_removed() -> None:
    h = FakePublisher("node07")
    inventory = applied(
        h.domain(WEB, "web1", "added", state="shutoff"),
        h.domain(WEB, "web1", "started", "booted"),
        h.domain(WEB, "web1", "suspended", "paused", state="paused"),
    )
    assert inventory.rows() == [
        Row("node07", WEB, "web1", "paused", True, "suspended.paused", seq=3)
    ]
    inventory.apply(*h.domain(WEB, "web1", "removed", state="shutoff"))
    assert inventory.rows() == []
    inventory.apply(*h.domain(WEB, "web1", "added", state="shutoff"))  # seq restarts at 1
    assert summary(inventory) == [("node07", "web1", "shutoff", True, "added")]
    assert counters(inventory) == {
        "messages": 5,
        "gaps": 0,
        "duplicates": 0,
        "rejected": 0,
        "ignored": 0,
    }


def test_rename_keeps_the_row_under_its_new_name() -> None:
    h = FakePublisher("node07")
    inventory = applied(
        h.domain(WEB, "web1", "added", state="shutoff"),
        h.domain(DB, "db", "added", state="shutoff"),
        h.domain(
            WEB,
            "zz-web",
            "defined",
            "renamed",
            state="shutoff",
            rename={"old_name": "web1", "new_name": "zz-web"},
        ),
    )
    assert [(r.uuid, r.name) for r in inventory.rows()] == [(DB, "db"), (WEB, "zz-web")]
    assert inventory.gaps == 0


def test_a_transient_domain_goes_when_it_stops() -> None:
    h = FakePublisher("node07")
    inventory = applied(
        h.domain(CACHE, "cache", "added", persistent=False),
        h.domain(CACHE, "cache", "started", "booted", persistent=False),
    )
    assert summary(inventory) == [("node07", "cache", "running", False, "started.booted")]
    inventory.apply(*h.domain(CACHE, "cache", "stopped", "destroyed", persistent=False))
    inventory.apply(*h.domain(CACHE, "cache", "removed", state="shutoff", persistent=False))
    assert inventory.rows() == [] and inventory.gaps == 0


def test_a_message_for_an_unseen_domain_fills_its_row_in() -> None:
    """A queue created mid-stream learns a domain from any of its messages, not only `added`."""
    h = FakePublisher("node07")
    h.seqs[WEB] = 41
    inventory = applied(h.domain(WEB, "web1", "rtc_change"))
    assert summary(inventory) == [("node07", "web1", "running", True, "rtc_change")]
    assert inventory.gaps == 0


def test_snapshot_sweeps_only_unseen_rows_of_its_host_and_backend() -> None:
    h1, h2 = FakePublisher("node07"), FakePublisher("node08")
    other_backend = "virtpub://node07/libvirt/qemu%3A%2F%2F%2Fsystem"
    inventory = applied(
        h1.domain(WEB, "web1", "added"),
        h1.domain(DB, "db", "added"),  # vanishes unseen
        h1.domain(CACHE, "cache", "added", backend=other_backend),
        h2.domain(DB, "db", "added"),  # same UUID on another host
        h1.snapshot_begin("s1"),
        h1.domain(WEB, "web1", "snapshot"),
    )
    assert len(inventory.rows()) == 4  # nothing is swept before the end
    inventory.apply(*h1.snapshot_end("s1", domains=1))
    assert {(r.host, r.name) for r in inventory.rows()} == {
        ("node07", "web1"),
        ("node07", "cache"),
        ("node08", "db"),
    }
    assert inventory.gaps == 0 and inventory.ignored == 0


def test_snapshot_keeps_rows_that_had_any_message_in_the_window() -> None:
    h = FakePublisher("node07")
    inventory = applied(
        h.snapshot_begin("s1"),
        h.domain(WEB, "web1", "snapshot"),
        h.domain(DB, "db", "added", state="shutoff"),  # defined after the listing
        h.snapshot_end("s1", domains=1),
    )
    assert [r.name for r in inventory.rows()] == ["db", "web1"]


def test_no_sweep_without_a_complete_begin_and_end() -> None:
    h = FakePublisher("node07")
    rows = [h.domain(WEB, "web1", "added"), h.domain(DB, "db", "added")]
    # The begin came before the queue existed.
    no_begin = applied(*rows, h.domain(WEB, "web1", "snapshot"), h.snapshot_end("s1", 1))
    assert len(no_begin.rows()) == 2
    # The end belongs to another snapshot (the publisher restarted one).
    h = FakePublisher("node07")
    rows = [h.domain(WEB, "web1", "added"), h.domain(DB, "db", "added")]
    other_end = applied(*rows, h.snapshot_begin("s1"), h.snapshot_end("s0", 0))
    assert len(other_end.rows()) == 2
    # A snapshot message was lost in between (the end announces 2).
    h = FakePublisher("node07")
    rows = [h.domain(WEB, "web1", "added"), h.domain(DB, "db", "added")]
    begin, web = h.snapshot_begin("s1"), h.domain(WEB, "web1", "snapshot")
    h.domain(DB, "db", "snapshot")  # published, never received
    incomplete = applied(*rows, begin, web, h.snapshot_end("s1", 2))
    assert len(incomplete.rows()) == 2 and incomplete.gaps == 1


def test_duplicate_ids_are_ignored() -> None:
    h = FakePublisher("node07")
    added = h.domain(WEB, "web1", "added", state="shutoff")
    started = h.domain(WEB, "web1", "started", "booted")
    inventory = applied(added, started, added, started)
    assert summary(inventory) == [("node07", "web1", "running", True, "started.booted")]
    assert (inventory.messages, inventory.duplicates, inventory.gaps) == (4, 2, 0)


def test_a_domain_seq_gap_is_counted_and_the_message_still_applied() -> None:
    h = FakePublisher("node07")
    inventory = applied(h.domain(WEB, "web1", "added", state="shutoff"))
    h.seqs[WEB] += 2  # two messages of web1 never reached the publisher's stream
    inventory.apply(*h.domain(WEB, "web1", "started", "booted"))
    assert summary(inventory) == [("node07", "web1", "running", True, "started.booted")]
    assert inventory.rows()[0].seq == 4
    assert inventory.gaps == 1


def test_a_publisher_sequence_gap_is_counted_per_host() -> None:
    h1, h2 = FakePublisher("node07"), FakePublisher("node08")
    inventory = applied(
        h1.publisher("capabilities"),
        h2.publisher("capabilities"),
        h1.domain(WEB, "web1", "added"),
    )
    h1.sequence += 3  # three messages of node07 lost
    inventory.apply(*h1.domain(DB, "db", "added"))
    inventory.apply(*h2.domain(DB, "db", "added"))
    assert inventory.gaps == 1 and len(inventory.rows()) == 3


def test_hosts_with_a_sequence_gap_are_taken_once_each() -> None:
    """What --watch asks a snapshot of: the hosts whose sequence jumped, not those whose
    domain seq did (that alone says nothing new of the host), and each host once."""
    h1, h2 = FakePublisher("node07"), FakePublisher("node08")
    inventory = applied(h1.publisher("capabilities"), h2.domain(DB, "db", "added"))
    assert inventory.take_gapped_hosts() == []
    h1.sequence += 1
    inventory.apply(*h1.domain(WEB, "web1", "added"))
    h1.sequence += 2
    inventory.apply(*h1.domain(WEB, "web1", "suspended", state="paused"))
    h2.seqs[DB] = 5  # a domain seq gap, with the host's sequence unbroken
    inventory.apply(*h2.domain(DB, "db", "resumed"))
    assert inventory.gaps == 3
    assert inventory.take_gapped_hosts() == ["node07"]
    assert inventory.take_gapped_hosts() == []
    h2.sequence += 1
    inventory.apply(*h2.domain(DB, "db", "suspended", state="paused"))
    assert inventory.take_gapped_hosts() == ["node08"]


def test_a_requested_snapshot_marks_and_sweeps_like_any_other() -> None:
    host = FakePublisher("node07")
    inventory = applied(
        host.publisher("capabilities"),
        host.domain(WEB, "web1", "added"),
        host.domain(DB, "db", "added"),
    )
    begin_key, begin = host.snapshot_begin("s2")
    begin["data"].update(reason="requested", request_id=str(uuid.uuid4()))
    inventory.apply(begin_key, begin)
    inventory.apply(*host.domain(WEB, "web1", "snapshot"))
    end_key, end = host.snapshot_end("s2", domains=1)
    end["data"].update(reason="requested", request_id=begin["data"]["request_id"])
    inventory.apply(end_key, end)
    assert [row.name for row in inventory.rows()] == ["web1"]


def test_unknown_and_malformed_messages_are_counted_and_ignored() -> None:
    h = FakePublisher("node07")
    inventory = applied(
        h.domain(WEB, "web1", "added"),
        h.publisher("capabilities", backends={}),
        h.publisher("backend", "connected", backend=h.backend),
        h.publisher("backend", "disconnected", backend=h.backend),
        h.publisher("snapshot", "aborted", backend=h.backend),
        h.publisher("network", "created"),  # an entity of a future version
    )

    def bad_data(**changes: Any) -> Message:
        key, body = h.domain(WEB, "web1", "started", "booted")
        return key, {**body, "data": {**body["data"], **changes}}

    key, body = FakePublisher("node07").domain(WEB, "web1", "started", "booted")
    malformed: list[Message] = [
        bad_data(state="running"),
        bad_data(persistent="yes"),
        bad_data(domain={"uuid": WEB}),
        bad_data(detail=5),
        bad_data(seq=None),
        h.publisher("snapshot", "begin", snapshot_id="s1"),  # no backend
        ("not-a-routing-key", body),
        ("v1..domain.started.booted", body),
        (key.replace("v1.", "v2.", 1), body),
        (key, {**body, "id": 7}),
        (key, {k: v for k, v in body.items() if k != "sequence"}),
        (key, {**body, "sequence": True}),
    ]
    for routing_key, bad in malformed:
        inventory.apply(routing_key, bad)
    inventory.apply_raw(key, b"{not json")
    inventory.apply_raw(key, b"[1, 2]")
    assert summary(inventory) == [("node07", "web1", "running", True, "added")]
    assert counters(inventory) == {
        "messages": 20,
        "gaps": 0,
        "duplicates": 0,
        "rejected": 14,
        "ignored": 5,
    }


def test_render_table_aligns_columns_and_reports_counters() -> None:
    h = FakePublisher("node07")
    inventory = applied(
        h.domain(WEB, "web1", "added", state="shutoff"),
        h.domain(DB, "database", "started", "booted", persistent=False),
    )
    lines = render_table(inventory).splitlines()
    assert lines[0].split("  ")[0] == "HOST"
    assert lines[0].index("DOMAIN") == lines[1].index("database") == lines[2].index("web1")
    assert lines[0].index("LAST EVENT") == lines[1].index("started.booted")
    assert lines[1].split() == ["node07", "database", DB, "running", "no", "started.booted"]
    assert lines[2].split() == ["node07", "web1", WEB, "shutoff", "yes", "added"]
    assert lines[3] == (
        "domains 2, hosts 1, messages 2, gaps 0, duplicates 0, rejected 0, ignored 0"
    )
    assert to_json(inventory)["rows"][1] == {
        "host": "node07",
        "uuid": WEB,
        "name": "web1",
        "state": "shutoff",
        "persistent": True,
        "last_event": "added",
        "seq": 1,
    }


# -- against the real broker ------------------------------------------------------------------


def publish(amqp_url: str, exchange: str, messages: list[Message]) -> None:
    """Publishes with confirms and `mandatory`, so each message is known to reach a queue."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    for routing_key, body in messages:
        channel.basic_publish(exchange, routing_key, json.dumps(body).encode(), mandatory=True)
    connection.close()


def fleet() -> tuple[list[Message], list[tuple[str, str, str, bool, str]]]:
    """Two hosts' messages (a snapshot, events, a resend) and the table they should give."""
    h1, h2 = FakePublisher("node07"), FakePublisher("node08")
    messages = [
        h1.publisher("capabilities", backends={}),
        h1.domain(CACHE, "old", "stopped", "destroyed", state="shutoff"),  # undefined unseen
        h1.snapshot_begin("s1"),
        h1.domain(WEB, "web1", "snapshot"),
        h1.domain(DB, "db", "snapshot", state="shutoff"),
        h1.snapshot_end("s1", domains=2),
        h1.domain(WEB, "web1", "suspended", "paused", state="paused"),
    ]
    messages.append(messages[3])  # a resend, which must not undo the pause
    messages += [
        h2.domain(CACHE, "cache", "added", persistent=False),
        h2.domain(CACHE, "cache", "removed", state="shutoff", persistent=False),
        h2.domain(DB, "db", "added", state="shutoff"),
    ]
    expected = [
        ("node07", "db", "shutoff", True, "snapshot"),
        ("node07", "web1", "paused", True, "suspended.paused"),
        ("node08", "db", "shutoff", True, "added"),
    ]
    return messages, expected


@pytest.mark.broker
def test_consume_rebuilds_the_fleet_from_the_exchange(amqp_url: str, topic: str) -> None:
    messages, expected = fleet()
    ready = threading.Event()
    changes: list[int] = []
    result: list[Inventory] = []

    def run() -> None:
        result.append(
            follow(
                BrokerSettings(amqp_urls=(amqp_url,), exchange=topic),
                on_change=lambda inventory: changes.append(len(inventory.rows())),
                idle_timeout=1.0,
                stop=threading.Event(),
                on_ready=lambda _queue: ready.set(),
            )
        )

    thread = threading.Thread(target=run, name="test-inventory", daemon=True)
    thread.start()
    assert ready.wait(10), "the consumer did not bind its queue"
    publish(amqp_url, topic, messages)
    thread.join(15)
    assert not thread.is_alive() and result, "follow did not return after 1 s of silence"
    inventory = result[0]
    assert summary(inventory) == expected
    assert (inventory.messages, inventory.duplicates, inventory.gaps) == (11, 1, 0)
    assert changes and changes[-1] == 3


@pytest.mark.broker
def test_command_reads_a_durable_queue_and_prints_json(amqp_url: str, topic: str) -> None:
    messages, expected = fleet()
    queue = f"virtpub-test-{uuid.uuid4().hex}"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    try:
        channel.queue_bind(queue, topic, routing_key="v1.#")
        publish(amqp_url, topic, messages)
        result = CliRunner().invoke(
            inventory_command, ["--amqp-url", amqp_url, "--queue", queue, "--json", "--idle", "0.5"]
        )
        assert result.exit_code == 0, result.output
        output = json.loads(result.stdout)
        rows = [
            (r["host"], r["name"], r["state"], r["persistent"], r["last_event"])
            for r in output["rows"]
        ]
        assert rows == expected
        assert (output["messages"], output["duplicates"], output["gaps"]) == (11, 1, 0)
        assert channel.queue_declare(queue, passive=True).method.message_count == 0  # acked
    finally:
        channel.queue_delete(queue)
        connection.close()


@pytest.mark.broker
@pytest.mark.parametrize(
    ("url", "queue", "says"),
    [
        ("amqp://guest:wrongsecret@{broker}/%2F", None, "refused the credentials"),
        ("amqp://guest:guest@127.0.0.1:1/%2F", None, "cannot reach the broker"),
        ("{amqp_url}", "virtpub-test-missing", "does not exist"),
    ],
)
def test_command_errors_are_one_line_and_exit_1(
    amqp_url: str, url: str, queue: str | None, says: str
) -> None:
    url = on_test_broker(url, amqp_url)
    args = ["--amqp-url", url, "--idle", "0.5", *(["--queue", queue] if queue else [])]
    result = CliRunner().invoke(inventory_command, args)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtpub inventory: "), result.stderr
    assert says in lines[0]
    assert "wrongsecret" not in lines[0] and "Traceback" not in result.output


@pytest.mark.broker
def test_a_gap_asks_for_a_snapshot_and_carries_on_when_nobody_serves_requests(
    amqp_url: str, topic: str
) -> None:
    """Hand-made messages with a gap in node07's sequence: with no requests exchange the
    inventory says in one line why it cannot ask, and goes on; once the exchange exists,
    the request goes out as `virtpub snapshot` sends it (seen by a queue of the test's own)."""
    lines: list[str] = []

    def run_with_gap() -> Inventory:
        host = FakePublisher("node07")
        messages = [host.publisher("capabilities", backends={})]
        host.sequence += 2
        messages.append(host.domain(WEB, "web1", "added"))
        ready = threading.Event()
        result: list[Inventory] = []

        def run() -> None:
            result.append(
                follow(
                    BrokerSettings(amqp_urls=(amqp_url,), exchange=topic),
                    on_change=lambda _inventory: None,
                    idle_timeout=1.0,
                    stop=threading.Event(),
                    on_ready=lambda _queue: ready.set(),
                    on_snapshot_request=lines.append,
                )
            )

        thread = threading.Thread(target=run, name="test-inventory", daemon=True)
        thread.start()
        assert ready.wait(10), "the consumer did not bind its queue"
        publish(amqp_url, topic, messages)
        thread.join(15)
        assert not thread.is_alive() and result
        return result[0]

    inventory = run_with_gap()
    assert (inventory.gaps, len(inventory.rows())) == (1, 1), "the gap did not stop it"
    assert lines == [
        "gap in the sequence of host 'node07'; cannot request a snapshot: no publisher has"
        f" ever served requests on exchange {topic!r} ({topic}.requests does not exist)"
    ]

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.exchange_declare(f"{topic}.requests", "topic", durable=True)
    requests = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(requests, f"{topic}.requests", "snapshot.#")
    lines.clear()
    run_with_gap()
    (line,) = lines
    assert line.startswith("gap in the sequence of host 'node07'; requested a snapshot (request ")
    method, properties, _body = channel.basic_get(requests, auto_ack=True)
    connection.close()
    assert method is not None and method.routing_key == "snapshot.node07"
    assert line.endswith(f"(request {properties.correlation_id})")


# -- the README's consumer example, run as written --------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE_MARKER = "<!-- example: consumer -->"


def readme_example() -> str:
    """The Python block after the README's consumer marker."""
    text = README.read_text(encoding="utf-8")
    after = text.split(EXAMPLE_MARKER, 1)[1]
    block = after.split("```python\n", 1)[1].split("```", 1)[0]
    assert after.index("```python") < after.index("\n\n"), "the marker must precede the block"
    return block


def replace_once(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the README example should name {old!r} once"
    return code.replace(old, new)


class ExampleProcess:
    """The example as a process of its own; its stdout lines collected by a thread."""

    def __init__(self, code: str) -> None:
        self.lines: list[str] = []
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="example-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, wanted: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not wanted <= set(self.lines) and time.monotonic() < deadline:
            assert self._process.poll() is None, self.stderr()
            time.sleep(0.05)
        assert wanted <= set(self.lines), f"missing {wanted - set(self.lines)}; {self.stderr()}"

    def stderr(self) -> str:
        if self._process.poll() is None:
            return "(still running)"
        assert self._process.stderr is not None
        return self._process.stderr.read()

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)


def publish_once_bound(amqp_url: str, exchange: str, messages: list[Message]) -> None:
    """Publishes once the example's queue is bound: it declares the queue, then binds it, so
    a queue that exists may not be routed to yet. An unroutable first message reached no
    queue, so sending it again duplicates nothing."""
    deadline = time.monotonic() + 20
    while True:
        try:
            publish(amqp_url, exchange, messages[:1])
            break
        except pika.exceptions.UnroutableError:
            assert time.monotonic() < deadline, "the example never bound its queue"
            time.sleep(0.1)
    publish(amqp_url, exchange, messages[1:])


@pytest.mark.broker
def test_the_readme_consumer_example_follows_the_fleet_across_its_own_restart(
    amqp_url: str, topic: str
) -> None:
    """The example declares a durable quorum queue, prints the table as it changes, and
    what is published while it is down is waiting when it starts again."""
    queue = f"virtpub-test-orchestrator-{uuid.uuid4().hex[:10]}"
    code = replace_once(readme_example(), '"amqp://guest:guest@localhost:5672/%2F"', repr(amqp_url))
    code = replace_once(code, '"virt.events"', repr(topic))
    code = replace_once(code, '"orchestrator"', repr(queue))
    messages, expected = fleet()
    rows = {f"{host} {name} {state} {persistent}" for host, name, state, persistent, _ in expected}
    example = ExampleProcess(code)
    try:
        publish_once_bound(amqp_url, topic, messages)
        example.wait_for(rows)
        example.stop()
        late = FakePublisher("node09").domain(CACHE, "late", "added", state="running")
        publish(amqp_url, topic, [late])  # nobody is reading: the durable queue keeps it
        example = ExampleProcess(code)
        example.wait_for({"node09 late running True"})
    finally:
        example.stop()
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().queue_delete(queue)
        connection.close()
