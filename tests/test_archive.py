"""`virtpub archive` and `virtpub archive verify` against the real RabbitMQ: the archiver runs as
a process (so it can be killed), on crafted messages or the in-process publisher's."""

from __future__ import annotations

import base64
import collections
import gzip
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from click.testing import CliRunner

from tests.conftest import HOST_ID, RunningPublisher, on_test_broker
from tests.test_publish_test_driver import domain_xml, run_lifecycle
from tests.test_tail import Message, finish, publish, start
from virtpub.tools.archive import ArchiveError, ArchiveWriter, MemberReader, archive_group

ARCHIVE = (
    "from virtpub.tools.archive import archive_group; archive_group(prog_name='virtpub archive')"
)


class Host:
    """Crafted messages of one publisher: consecutive `sequence` whatever their source, a fresh
    id each."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sequence = 0

    def message(
        self, event: str = "started", detail: str = "booted", entity: str = "domain", **data: Any
    ) -> Message:
        self.sequence += 1
        source = "publisher" if entity == "publisher" else "libvirt/test%3A%2F%2F%2Fdefault"
        body = {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": f"virtpub://{self.name}/{source}",
            "type": f"org.virtpub.{entity}.{event}",
            "subject": self.name,
            "time": "2026-11-27T09:48:53.003457Z",
            "sequence": self.sequence,
            "data": {"event": event, "detail": detail, "origin": "libvirt", **data},
        }
        return f"v1.{self.name}.{entity}.{event}.{detail}", json.dumps(body).encode()

    def messages(self, count: int) -> list[Message]:
        return [self.message() for _ in range(count)]


def body_id(message: Message) -> str:
    return str(json.loads(message[1])["id"])


@pytest.fixture
def queue(amqp_url: str) -> Iterator[str]:
    name = f"virtpub-test-archive-{uuid.uuid4().hex[:8]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().queue_delete(name)
    connection.close()


def start_archiver(amqp_url: str, exchange: str, queue: str, directory: Path, *args: str) -> Any:
    return start_archiver_saying(amqp_url, exchange, queue, directory, *args)[0]


def start_archiver_saying(
    amqp_url: str, exchange: str, queue: str, directory: Path, *args: str
) -> tuple[Any, str]:
    """The archiver, once its queue is bound, and the line that said so."""
    return start(
        ARCHIVE,
        *("--amqp-url", amqp_url, "--exchange", exchange, "--queue", queue),
        *("--dir", str(directory), *args),
        ready="virtpub archive: archiving",
    )


def stop(archiver: Any) -> str:
    """SIGTERM, then the archiver's last words; it must exit 0."""
    archiver.send_signal(signal.SIGTERM)
    code, _out, err = finish(archiver)
    assert code == 0, err
    return err


def records(directory: Path) -> list[dict[str, Any]]:
    """Every line of every complete batch, as the reader that tolerates a crash sees them."""
    return [
        json.loads(line)
        for path in sorted(directory.glob("events-*.jsonl.gz"))
        for line in MemberReader(path).lines()
    ]


def ids(directory: Path) -> list[str]:
    return [r["message"]["id"] for r in records(directory) if "message" in r]


def wait_for(what: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)


def ready_count(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
    connection.close()
    return count


def declare_queue(amqp_url: str, exchange: str, queue: str) -> None:
    """The archive's queue made before the archiver runs, as its first start would."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(queue, exchange, routing_key="#")
    connection.close()


def verify(directory: Path) -> tuple[int, list[str]]:
    result = CliRunner().invoke(archive_group, ["verify", str(directory)])
    return result.exit_code, result.stdout.splitlines()


@pytest.mark.broker
def test_writes_gzip_json_lines_and_acks_what_it_wrote(
    amqp_url: str, topic: str, queue: str, tmp_path: Path
) -> None:
    archiver = start_archiver(amqp_url, topic, queue, tmp_path, "--batch", "50", "--batch-ms", "50")
    hv01, hv02 = Host("hv01"), Host("hv02")
    messages = [
        m for pair in zip(hv01.messages(200), hv02.messages(200), strict=True) for m in pair
    ]
    messages.append(("v1.hv01.domain.mystery", b"\x00not json"))
    publish(amqp_url, topic, messages)
    wait_for(lambda: len(records(tmp_path)) == len(messages))
    assert "401 messages written" in stop(archiver)

    files = sorted(tmp_path.glob("events-*.jsonl.gz"))
    assert [f.name for f in files] == [f"events-{datetime.now(UTC).date()}-0001.jsonl.gz"]
    with gzip.open(files[0], "rt") as text:  # any gzip reader will do
        lines = [json.loads(line) for line in text]
    assert lines[:-1] == [
        {"routing_key": key, "message": json.loads(body)} for key, body in messages[:-1]
    ]
    assert lines[-1] == {
        "routing_key": "v1.hv01.domain.mystery",
        "body_base64": base64.b64encode(b"\x00not json").decode(),
    }
    assert ready_count(amqp_url, queue) == 0  # all acked: nothing came back when it stopped
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-queue-type"):
        connection.channel().queue_declare(queue, durable=True)  # it is a quorum queue
    connection.close()
    code, report = verify(tmp_path)
    assert code == 0, report
    assert report[1:3] == [
        "host hv01: sequence 1..200, messages 200, duplicates 0, missing none",
        "host hv02: sequence 1..200, messages 200, duplicates 0, missing none",
    ]


@pytest.mark.broker
def test_kill_9_mid_stream_then_restart_keeps_every_message_once(
    amqp_url: str, topic: str, queue: str, tmp_path: Path
) -> None:
    declare_queue(amqp_url, topic, queue)
    messages = Host("hv01").messages(3000)
    publish(amqp_url, topic, messages)
    archiver = start_archiver(amqp_url, topic, queue, tmp_path, "--batch", "20")
    wait_for(lambda: len(records(tmp_path)) >= 300)
    archiver.send_signal(signal.SIGKILL)
    finish(archiver)
    on_disk = len(ids(tmp_path))
    assert on_disk < len(messages), "killed too late to prove anything"
    # Whatever was acked is on disk: the queue still holds all the rest.
    wait_for(lambda: ready_count(amqp_url, queue) + on_disk >= len(messages), timeout=5)

    archiver = start_archiver(amqp_url, topic, queue, tmp_path, "--batch", "20")
    wait_for(lambda: len(set(ids(tmp_path))) == len(messages))
    stop(archiver)
    counts = collections.Counter(ids(tmp_path))
    assert set(counts) == {body_id(m) for m in messages}
    assert set(counts.values()) == {1}
    assert len(list(tmp_path.glob("events-*.jsonl.gz"))) == 2  # a new file per run
    assert ready_count(amqp_url, queue) == 0
    code, report = verify(tmp_path)
    assert code == 0 and "missing none" in report[1], report


@pytest.mark.broker
def test_redeliveries_are_dropped_against_the_days_files(
    amqp_url: str, topic: str, queue: str, tmp_path: Path
) -> None:
    host = Host("hv01")
    first = host.messages(100)
    archiver = start_archiver(amqp_url, topic, queue, tmp_path)
    publish(amqp_url, topic, first)
    wait_for(lambda: len(records(tmp_path)) == 100)
    stop(archiver)

    later = host.messages(10)
    publish(amqp_url, topic, first + later)  # a publisher resending after a lost confirm
    archiver = start_archiver(amqp_url, topic, queue, tmp_path)
    wait_for(lambda: ready_count(amqp_url, queue) == 0)
    last_words = stop(archiver)
    assert "10 messages written" in last_words and "100 duplicates dropped" in last_words
    assert ready_count(amqp_url, queue) == 0
    assert sorted(ids(tmp_path)) == sorted(body_id(m) for m in first + later)


@pytest.mark.broker
def test_rotates_by_size(amqp_url: str, topic: str, queue: str, tmp_path: Path) -> None:
    archiver = start_archiver(
        amqp_url, topic, queue, tmp_path, "--max-bytes", "4KiB", "--batch", "10"
    )
    messages = Host("hv01").messages(600)
    publish(amqp_url, topic, messages)
    wait_for(lambda: len(records(tmp_path)) == len(messages))
    stop(archiver)
    files = sorted(tmp_path.glob("events-*.jsonl.gz"))
    today = datetime.now(UTC).date()
    assert len(files) >= 3
    assert [f.name for f in files] == [
        f"events-{today}-{n:04d}.jsonl.gz" for n in range(1, len(files) + 1)
    ]
    assert all(f.stat().st_size >= 4096 for f in files[:-1])
    read = []
    for path in files:
        with gzip.open(path, "rt") as text:  # each file stands alone
            read += [json.loads(line)["message"]["id"] for line in text]
    assert read == [body_id(m) for m in messages]


@pytest.mark.broker
def test_a_real_publishers_archive_verifies_until_lines_go_missing(
    publisher_factory: Callable[..., RunningPublisher], queue: str, tmp_path: Path
) -> None:
    publisher = publisher_factory()  # declares the exchange
    url, exchange = publisher.settings.amqp_urls[0], publisher.settings.exchange
    archiver = start_archiver(url, exchange, queue, tmp_path, "--batch-ms", "20")
    uuids = []
    for name in ("vm-a", "vm-b", "vm-c"):
        xml, dom_uuid = domain_xml(name)
        uuids.append(dom_uuid)
        run_lifecycle(publisher.conn, xml)

    def ended() -> bool:
        keys = {(r["message"]["subject"], r["routing_key"]) for r in records(tmp_path)}
        return all((u, f"v1.{HOST_ID}.domain.removed.undefined") in keys for u in uuids)

    wait_for(ended)
    stop(archiver)
    code, report = verify(tmp_path)
    assert code == 0, report
    assert report[1].startswith(f"host {HOST_ID}: ") and "missing none" in report[1]
    sequences = sorted(r["message"]["sequence"] for r in records(tmp_path))
    assert len(sequences) == 24 and sequences == list(range(sequences[0], sequences[0] + 24))

    # Rewrite the file without two messages in the middle: verify names them.
    path = next(tmp_path.glob("events-*.jsonl.gz"))
    lost = {sequences[10], sequences[11]}
    kept = [r for r in records(tmp_path) if r["message"]["sequence"] not in lost]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in kept).encode()))
    code, report = verify(tmp_path)
    assert code == 1
    assert f"missing {sequences[10]}..{sequences[11]} (2)" in report[1], report
    assert report[-1] == "result: missing 2, duplicates 0, hosts 1, hosts with gaps 1"

    # A batch archived twice (the same ids) is reported as duplicates.
    with path.open("ab") as file:
        file.write(gzip.compress("".join(json.dumps(r) + "\n" for r in kept[:3]).encode()))
    code, report = verify(tmp_path)
    assert code == 1 and "duplicates 3" in report[1], report


def write_archive(directory: Path, name: str, messages: list[Message]) -> Path:
    """An archive file as the format says, written without the archiver."""
    lines = "".join(
        json.dumps({"routing_key": key, "message": json.loads(body)}) + "\n"
        for key, body in messages
    )
    path = directory / name
    path.write_bytes(gzip.compress(lines.encode()))
    return path


@pytest.mark.parametrize(
    ("announced", "code", "says"),
    [
        ((4, 6), 0, "missing none, dropped (announced) 4..6 (3)"),
        ((4, 5), 1, "missing 6 (1), dropped (announced) 4..5 (2)"),
        ((2, 5), 1, "missing 6 (1), dropped (announced) 4..5 (2)"),
    ],
)
def test_verify_counts_announced_drops_apart_from_gaps(
    tmp_path: Path, announced: tuple[int, int], code: int, says: str
) -> None:
    hv01, hv02 = Host("hv01"), Host("hv02")
    messages = hv01.messages(3)
    hv01.sequence += 3  # 4..6 never archived
    first, last = announced
    drop = hv01.message(
        "dropped", "spool_full", "publisher", first_sequence=first, last_sequence=last
    )
    messages += [drop, *hv01.messages(3)]
    messages += hv02.messages(5)
    write_archive(tmp_path, "events-2026-11-27-0001.jsonl.gz", messages)
    result, report = verify(tmp_path)
    assert result == code, report
    assert report[1] == f"host hv01: sequence 1..10, messages 7, duplicates 0, {says}"
    assert report[2] == "host hv02: sequence 1..5, messages 5, duplicates 0, missing none"


@pytest.mark.broker
def test_an_unfinished_batch_is_skipped_and_its_message_archived_again(
    amqp_url: str, topic: str, queue: str, tmp_path: Path
) -> None:
    """A crash while writing leaves half a gzip member; its messages were never acked, so
    readers must not count them, nor the archiver take their redelivery for a duplicate."""
    host = Host("hv01")
    messages = host.messages(20)
    path = write_archive(tmp_path, f"events-{datetime.now(UTC).date()}-0001.jsonl.gz", messages)
    redelivered = host.message()
    line = json.dumps({"routing_key": redelivered[0], "message": json.loads(redelivered[1])})
    with path.open("ab") as file:
        file.write(gzip.compress((line + "\n").encode())[:-8])  # all but the CRC and size

    code, report = verify(tmp_path)
    assert code == 0, report
    assert f"note: {path.name} ends with " in "\n".join(report)
    assert report[1] == "host hv01: sequence 1..20, messages 20, duplicates 0, missing none"

    archiver, said = start_archiver_saying(amqp_url, topic, queue, tmp_path)
    assert "today's files hold 20 ids" in said
    publish(amqp_url, topic, [redelivered])
    wait_for(lambda: body_id(redelivered) in ids(tmp_path))
    assert "1 messages written" in stop(archiver)
    code, report = verify(tmp_path)
    assert code == 0 and "sequence 1..21, messages 21" in report[1], report


def test_a_new_utc_day_starts_a_new_file_and_a_new_set_of_ids(tmp_path: Path) -> None:
    now = [datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC)]
    writer = ArchiveWriter(tmp_path, 1 << 20, clock=lambda: now[0])
    host = Host("hv01")
    late, resent = host.message(), host.message()
    writer.write([late, resent])
    now[0] = datetime(2026, 11, 28, 0, 0, 1, tzinfo=UTC)
    writer.write([resent, host.message()])  # yesterday's ids are not today's
    writer.write([resent])  # but today's are
    writer.close()
    assert sorted(p.name for p in tmp_path.glob("events-*")) == [
        "events-2026-11-27-0001.jsonl.gz",
        "events-2026-11-28-0001.jsonl.gz",
    ]
    assert (writer.stats.written, writer.stats.duplicates) == (4, 1)


def test_one_archiver_per_directory(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path, 1 << 20)
    try:
        with pytest.raises(ArchiveError, match="another archiver is writing"):
            ArchiveWriter(tmp_path, 1 << 20)
    finally:
        writer.close()
    ArchiveWriter(tmp_path, 1 << 20).close()  # free again once the first has gone


ERRORS = [
    ({"--amqp-url": "amqp://guest:wrongsecret@{broker}/%2F"}, "refused the credentials"),
    ({"--amqp-url": "amqp://guest:guest@127.0.0.1:1/%2F"}, "cannot reach the broker"),
    ({"--exchange": "virtpub-test-missing"}, "exchange 'virtpub-test-missing' does not exist"),
    ({}, "inequivalent arg 'x-queue-type'"),  # the queue exists, as a classic queue
]


@pytest.mark.broker
@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line_and_exit_1(
    amqp_url: str, topic: str, queue: str, tmp_path: Path, case: tuple[dict[str, str], str]
) -> None:
    override, says = case
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().queue_declare(queue, durable=True)
    connection.close()
    options = {"--amqp-url": amqp_url, "--exchange": topic, "--queue": queue}
    chosen = {**options, **override}
    chosen["--amqp-url"] = on_test_broker(chosen["--amqp-url"], amqp_url)
    argv = [item for pair in chosen.items() for item in pair]
    result = CliRunner().invoke(archive_group, [*argv, "--dir", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtpub archive: "), result.stderr
    assert says in lines[0]
    assert "wrongsecret" not in result.output and "Traceback" not in result.output


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert CliRunner().invoke(archive_group, ["--dir", str(tmp_path)]).exit_code == 2
    result = CliRunner().invoke(archive_group, ["--queue", "q", "--dir", "x", "--max-bytes", "1X"])
    assert result.exit_code == 2 and "is not a size" in result.stderr
