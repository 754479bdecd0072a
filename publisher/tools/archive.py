"""`virtpub archive`: every message of the exchange kept on disk for audit, and
`virtpub archive verify`, which proves from the files alone that none is missing.

Files: `<dir>/events-<YYYY-MM-DD>-<NNNN>.jsonl.gz`, the UTC day the lines were written and a
number counting up within that day. A file is gzip, one member per batch (concatenated
members are one valid gzip stream: zcat and gzip.open read them). Each line is one message:

    {"routing_key": "v1.hv01.domain.stopped.destroyed", "message": {...the body as published...}}

or, for a body that is not a JSON object, `{"routing_key": ..., "body_base64": "..."}`.

A message is acked only once its batch is written and fsynced (and, for a new file, the
directory too), so a crash loses nothing: what was not acked is redelivered. Each run and each
rotation starts a new file, never appending to an old one, so the only damage a crash can
leave is an unfinished member at the end of a file; readers skip it, which is right because its
messages were never acked. Redeliveries are dropped by CloudEvents `id` against every id in the
current day's files (rebuilt from them at start), so the memory this takes is bounded by a
day's archive.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import itertools
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from virtpub.amqp.connection import BrokerError
from virtpub.amqp.session import check_exchange, on_cancel_raise, session
from virtpub.config import BrokerSettings
from virtpub.contract.routing import RoutingKey
from virtpub.tools.options import EXIT_FAILURE, amqp_options, stop_on_signals

_FILE_NAME = re.compile(r"events-(\d{4}-\d{2}-\d{2})-(\d+)\.jsonl\.gz")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_READ_CHUNK = 1 << 20
# How long one wait for messages lasts when no batch is open: how soon a signal is noticed.
POLL_S = 0.25


class ArchiveError(Exception):
    """The archive cannot be written; one line for the operator."""


# -- files -------------------------------------------------------------------------------------


def file_name(day: date, number: int) -> str:
    return f"events-{day.isoformat()}-{number:04d}.jsonl.gz"


def archive_files(directory: Path, day: date | None = None) -> list[Path]:
    """The archive's files (of one day, if given) in the order they were written."""
    found: list[tuple[str, int, Path]] = []
    for path in directory.iterdir():
        match = _FILE_NAME.fullmatch(path.name)
        if match and (day is None or match[1] == day.isoformat()):
            found.append((match[1], int(match[2]), path))
    return [path for _day, _number, path in sorted(found)]


class MemberReader:
    """The lines of a file's complete gzip members.

    Reading stops at the first member that is unfinished or damaged; `unread` then holds the
    bytes left after the last complete member (0 for a file a run closed cleanly).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unread = 0

    def lines(self) -> Iterator[bytes]:
        complete_end = 0  # file offset just past the last complete member
        offset = 0
        decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        member: list[bytes] = []
        with self.path.open("rb") as file:
            while chunk := file.read(_READ_CHUNK):
                data = chunk
                while data:
                    try:
                        member.append(decompressor.decompress(data))
                    except zlib.error:
                        self.unread = self.path.stat().st_size - complete_end
                        return
                    if not decompressor.eof:
                        offset += len(data)
                        break
                    offset += len(data) - len(decompressor.unused_data)
                    complete_end = offset
                    yield from b"".join(member).splitlines()
                    member.clear()
                    data = decompressor.unused_data
                    decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        self.unread = offset - complete_end


def _message_id(line: bytes) -> str | None:
    try:
        record = orjson.loads(line)
        message_id = record["message"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return message_id if isinstance(message_id, str) and message_id else None


def encode(routing_key: str, raw: bytes) -> tuple[bytes, str | None]:
    """The archive line of one message, and its id when it has one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        record = {"routing_key": routing_key, "body_base64": base64.b64encode(raw).decode()}
        return orjson.dumps(record) + b"\n", None
    # The body goes in as published, byte for byte, unless it spans lines.
    message = orjson.dumps(body) if b"\n" in raw or b"\r" in raw else raw.strip()
    message_id = body.get("id")
    line = b'{"routing_key":' + orjson.dumps(routing_key) + b',"message":' + message + b"}\n"
    return line, message_id if isinstance(message_id, str) and message_id else None


@dataclass(slots=True)
class WriterStats:
    written: int = 0
    duplicates: int = 0
    files: int = 0


class ArchiveWriter:
    """Writes batches to the day's current file; `write` returns once they are durable.

    Holds an exclusive lock on `<dir>/.lock`: two archivers in one directory would each keep
    their own ids and write each other's duplicates.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.clock = clock
        self.stats = WriterStats()
        self.known_ids: set[str] = set()
        self._day: date | None = None
        self._file: Any = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock = (directory / ".lock").open("w")
        except OSError as err:
            raise ArchiveError(f"cannot use {directory}: {err.strerror or err}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ArchiveError(f"another archiver is writing {directory}") from None
        self._start_day(clock().date())

    def write(self, messages: list[tuple[str, bytes]]) -> None:
        """Appends one gzip member with the messages whose id is new today, then fsyncs."""
        today = self.clock().date()
        if today != self._day:
            self._close_file()
            self._start_day(today)
        lines: list[bytes] = []
        fresh: set[str] = set()  # known only once on disk
        for routing_key, raw in messages:
            line, message_id = encode(routing_key, raw)
            if message_id is not None:
                if message_id in self.known_ids or message_id in fresh:
                    self.stats.duplicates += 1
                    continue
                fresh.add(message_id)
            lines.append(line)
        if not lines:
            return
        try:
            if self._file is None:
                self._open_file()
            self._file.write(gzip.compress(b"".join(lines), compresslevel=6, mtime=0))
            self._file.flush()
            os.fsync(self._file.fileno())
            if self._file.tell() >= self.max_bytes:
                self._close_file()
        except OSError as err:
            raise ArchiveError(f"cannot write to {self.directory}: {err.strerror or err}") from None
        self.known_ids |= fresh
        self.stats.written += len(lines)

    def close(self) -> None:
        self._close_file()
        self._lock.close()

    def _start_day(self, day: date) -> None:
        """The day's ids, from the day's files: what a redelivery is checked against."""
        self._day = day
        self.known_ids = set()
        try:
            for path in archive_files(self.directory, self._day):
                reader = MemberReader(path)
                self.known_ids.update(filter(None, map(_message_id, reader.lines())))
        except OSError as err:
            raise ArchiveError(f"cannot read {self.directory}: {err.strerror or err}") from None

    def _open_file(self) -> None:
        assert self._day is not None
        existing = archive_files(self.directory, self._day)
        match = _FILE_NAME.fullmatch(existing[-1].name) if existing else None
        number = int(match[2]) + 1 if match else 1
        self._file = (self.directory / file_name(self._day, number)).open("xb")
        self.stats.files += 1
        # The new name must be durable before any message in the file is acked.
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- consuming ---------------------------------------------------------------------------------


def run_archiver(
    broker: BrokerSettings,
    *,
    queue: str,
    bindings: tuple[str, ...],
    writer: ArchiveWriter,
    batch: int,
    batch_s: float,
    stop: threading.Event,
    on_ready: Callable[[str], None],
) -> None:
    """Archives `queue` until `stop` is set: up to `batch` messages or `batch_s` seconds per
    write, then one ack (multiple) for all of them. The last batch is written before return.

    Raises BrokerError and ArchiveError.
    """
    pending: list[tuple[str, bytes]] = []
    last_tag = 0
    opened_at = 0.0

    def deliver(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        nonlocal last_tag, opened_at
        if not pending:
            opened_at = time.monotonic()
        pending.append((method.routing_key, body))
        last_tag = method.delivery_tag

    with session(broker, "virtpub archive") as (connection, where):
        channel = connection.channel()
        check_exchange(channel, broker.exchange, where)
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        for binding in bindings:
            channel.queue_bind(queue, broker.exchange, routing_key=binding)
        # Twice a batch, so the next batch arrives while this one is written.
        channel.basic_qos(prefetch_count=2 * batch)
        on_cancel_raise(channel, queue)
        channel.basic_consume(queue, deliver)
        on_ready(where)
        while not stop.is_set():
            wait = max(0.0, opened_at + batch_s - time.monotonic()) if pending else POLL_S
            connection.process_data_events(time_limit=wait)
            if pending and (len(pending) >= batch or time.monotonic() - opened_at >= batch_s):
                writer.write(pending)
                channel.basic_ack(last_tag, multiple=True)
                pending.clear()
        if pending:
            writer.write(pending)
            channel.basic_ack(last_tag, multiple=True)


# -- verifying ---------------------------------------------------------------------------------

Span = tuple[int, int]


@dataclass(slots=True)
class HostRecord:
    """One publisher's messages in the archive, by `sequence` (shared by all its sources)."""

    ids: dict[int, str] = field(default_factory=dict)
    duplicates: int = 0
    conflicts: int = 0
    announced: list[Span] = field(default_factory=list)

    def missing(self) -> tuple[list[Span], list[Span]]:
        """Holes between the first and last sequence seen: (gaps, announced drops)."""
        gaps: list[Span] = []
        dropped: list[Span] = []
        seen = sorted(self.ids)
        announced = sorted(self.announced)
        for before, after in itertools.pairwise(seen):
            if after - before > 1:
                _split(before + 1, after - 1, announced, gaps, dropped)
        return gaps, dropped


def _split(
    low: int, high: int, announced: list[Span], gaps: list[Span], dropped: list[Span]
) -> None:
    """Sorts low..high into the parts a `publisher.dropped` named (`announced`, sorted, may
    overlap) and those none did."""
    for first, last in announced:
        if last < low or first > high:
            continue
        if first > low:
            gaps.append((low, first - 1))
        dropped.append((max(first, low), min(last, high)))
        low = max(low, last + 1)
        if low > high:
            return
    gaps.append((low, high))


@dataclass(slots=True)
class Verification:
    files: int = 0
    lines: int = 0
    unsequenced: int = 0
    unreadable: int = 0
    unfinished: list[tuple[Path, int]] = field(default_factory=list)
    hosts: dict[str, HostRecord] = field(default_factory=dict)

    def add(self, line: bytes) -> None:
        self.lines += 1
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.unreadable += 1
            return
        routing_key = record.get("routing_key") if isinstance(record, dict) else None
        if not isinstance(routing_key, str):
            self.unreadable += 1
            return
        message = record.get("message")
        sequence = message.get("sequence") if isinstance(message, dict) else None
        message_id = message.get("id") if isinstance(message, dict) else None
        key = RoutingKey.parse(routing_key)
        if (
            key is None
            or not isinstance(sequence, int)
            or isinstance(sequence, bool)
            or not isinstance(message_id, str)
        ):
            self.unsequenced += 1
            return
        host = self.hosts.setdefault(key.host_id, HostRecord())
        previous = host.ids.get(sequence)
        if previous is None:
            host.ids[sequence] = message_id
            if (key.entity, key.event) == ("publisher", "dropped"):
                _announce(host, message)
        elif previous == message_id:
            host.duplicates += 1
        else:
            host.conflicts += 1


def _announce(host: HostRecord, message: dict[str, Any]) -> None:
    data = message.get("data")
    if not isinstance(data, dict):
        return
    first, last = data.get("first_sequence"), data.get("last_sequence")
    if isinstance(first, int) and isinstance(last, int) and first <= last:
        host.announced.append((first, last))


def verify(directory: Path) -> Verification:
    result = Verification()
    for path in archive_files(directory):
        reader = MemberReader(path)
        for line in reader.lines():
            result.add(line)
        result.files += 1
        if reader.unread:
            result.unfinished.append((path, reader.unread))
    return result


def _spans(spans: list[Span]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in spans)


def _count(spans: list[Span]) -> int:
    return sum(b - a + 1 for a, b in spans)


def report(result: Verification) -> tuple[list[str], bool]:
    """The summary lines, and whether any sequence is missing without a drop announcing it."""
    lines = [
        f"files {result.files}, lines {result.lines}, without a sequence {result.unsequenced},"
        f" unreadable {result.unreadable}"
    ]
    missing = gapped = 0
    for name, host in sorted(result.hosts.items()):
        gaps, dropped = host.missing()
        missing += _count(gaps)
        gapped += bool(gaps)
        line = (
            f"host {name}: sequence {min(host.ids)}..{max(host.ids)}, messages {len(host.ids)},"
            f" duplicates {host.duplicates}, missing "
            + (f"{_spans(gaps)} ({_count(gaps)})" if gaps else "none")
        )
        if dropped:
            line += f", dropped (announced) {_spans(dropped)} ({_count(dropped)})"
        if host.conflicts:
            line += f", sequences reused by other ids {host.conflicts} (was its state reset?)"
        lines.append(line)
    lines.extend(
        f"note: {path.name} ends with {unread} bytes of an unfinished batch (a crash while"
        " writing; its messages were not acked, so the broker delivers them again)"
        for path, unread in result.unfinished
    )
    duplicates = sum(host.duplicates for host in result.hosts.values())
    lines.append(
        f"result: missing {missing}, duplicates {duplicates}, hosts {len(result.hosts)},"
        f" hosts with gaps {gapped}"
    )
    return lines, missing > 0


# -- command line ------------------------------------------------------------------------------


def _size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    """Bytes, or with a binary unit (64MiB, 1GiB), as the daemon's --spool-max-bytes."""
    match = _SIZE.fullmatch(value.strip())
    if match is None or int(match[1]) == 0:
        raise click.BadParameter(f"{value!r} is not a size (bytes, or with a unit: 64MiB, 1GiB)")
    return int(match[1]) * _SIZE_UNITS[match[2].upper()]


@click.group("archive", invoke_without_command=True)
@amqp_options
@click.option("--queue", help="The archive's durable quorum queue; declared if missing.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the files go; created if missing.",
)
@click.option(
    "--binding",
    "bindings",
    multiple=True,
    default=("#",),
    show_default=True,
    help="Routing-key pattern to bind the queue with; repeatable. Bindings are added to the"
    " queue's, never removed.",
)
@click.option(
    "--max-bytes",
    callback=_size,
    default="64MiB",
    metavar="SIZE",
    show_default=True,
    help="Start a new file once one reaches this size (compressed).",
)
@click.option(
    "--batch",
    type=click.IntRange(1, 30_000),
    default=1000,
    show_default=True,
    help="Messages written (one fsync, one ack) at most at once.",
)
@click.option(
    "--batch-ms",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Write a batch once its first message has waited this long.",
)
@click.pass_context
def archive_group(
    ctx: click.Context,
    *,
    broker: BrokerSettings | None,
    queue: str | None,
    directory: Path | None,
    bindings: tuple[str, ...],
    max_bytes: int,
    batch: int,
    batch_ms: int,
) -> None:
    """Archive every message of the exchange to compressed JSON Lines files, for audit.

    \b
      virtpub archive --queue audit --dir /var/lib/virtpub-archive
      virtpub archive verify /var/lib/virtpub-archive

    Files are DIR/events-<UTC date>-<NNNN>.jsonl.gz, a new one each day, each run, and
    whenever one reaches --max-bytes. Each line is one message:
    {"routing_key": "...", "message": {<the CloudEvent as published>}}. A message is acked
    only once written and fsynced, and redeliveries are dropped by CloudEvents id against
    the day's files, so the archive holds each message once.

    The queue keeps what arrives while the archiver is down; it only receives messages
    once it exists, so start the archiver before the publishers to archive from their
    first message. On RabbitMQ 4, a quorum queue drops (or dead-letters) a message once it
    has been delivered 20 times without an ack, its default delivery limit: an archiver
    failing in a loop loses messages there. A policy can raise the limit.

    Exit codes: 0 stopped (SIGTERM, Ctrl-C), 1 invalid broker settings, broker or disk
    error, 2 bad usage.
    """
    if ctx.invoked_subcommand is not None or broker is None:
        return
    if queue is None or directory is None:
        raise click.UsageError("--queue and --dir are required (or use: archive verify DIR)")
    stop = threading.Event()
    try:
        writer = ArchiveWriter(directory, max_bytes)
    except ArchiveError as err:
        click.echo(f"virtpub archive: {err}", err=True)
        sys.exit(EXIT_FAILURE)

    def ready(where: str) -> None:
        click.echo(
            f"virtpub archive: archiving queue {queue!r} ({' '.join(bindings)} on"
            f" {broker.exchange!r}"
            f" at {where}) into {directory}; today's files hold {len(writer.known_ids)} ids",
            err=True,
        )

    try:
        with stop_on_signals(stop):
            run_archiver(
                broker,
                queue=queue,
                bindings=bindings,
                writer=writer,
                batch=batch,
                batch_s=batch_ms / 1000,
                stop=stop,
                on_ready=ready,
            )
    except (BrokerError, ArchiveError) as err:
        click.echo(f"virtpub archive: {err}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        writer.close()
    stats = writer.stats
    click.echo(
        f"virtpub archive: stopped; {stats.written} messages written to {stats.files} new"
        f" files, {stats.duplicates} duplicates dropped",
        err=True,
    )


@archive_group.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify_command(directory: Path) -> None:
    """Report the messages missing from an archive, and the duplicates.

    Per host (the routing key's second segment), every gap in the publisher's `sequence`
    between the first and the last archived; ranges a publisher.dropped message announced
    are listed apart as dropped (announced), not as gaps.

    Exit codes: 0 nothing missing, 1 a gap (or no archive file in DIRECTORY).
    """
    try:
        result = verify(directory)
    except OSError as err:
        click.echo(f"virtpub archive verify: cannot read {directory}: {err}", err=True)
        sys.exit(1)
    if result.files == 0:
        click.echo(f"virtpub archive verify: no archive file in {directory}", err=True)
        sys.exit(1)
    lines, gaps = report(result)
    for line in lines:
        click.echo(line)
    sys.exit(1 if gaps else 0)
