"""The reference consumer: the fleet's domains (host, domain, state, persistent) rebuilt from
messages alone, the proof that a consumer never needs to poll libvirt.

Every domain message carries the domain's name, state and persistence after the event, so
the view is a table keyed by (host, domain UUID) that each message overwrites and `removed`
deletes. A queue only sees messages published after it exists; the publisher's snapshot (at
startup and on each reconnect to libvirt) fills the table in, and its mark and sweep drops the rows
of domains that vanished while nobody was listening. A gap in a host's `sequence` means the table
may be wrong about that host: in --watch, the inventory then asks that host's publisher for a
snapshot (`virtpub snapshot`'s request), whose bracket marks and sweeps it consistent again.

`Inventory` is pure (no I/O) so the rules are testable message by message; `consume` feeds it
from RabbitMQ and `inventory_command` is the `virtpub inventory` command line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import click

from virtpub.amqp.connection import BrokerError
from virtpub.amqp.session import check_exchange, missing_means, session
from virtpub.config import BrokerSettings
from virtpub.contract import schemas
from virtpub.contract.routing import RoutingKey
from virtpub.tools.ask import SnapshotRequester
from virtpub.tools.options import EXIT_FAILURE, amqp_options, stop_on_signals

BINDINGS = ("v1.*.domain.#", "v1.*.publisher.#", "v1.*.config.#")
"""Every message a publisher sends, so that a gap in `sequence` always means a lost one."""
_DOMAIN_EVENT_MAJOR = schemas.info(schemas.DOMAIN_EVENT).major

# Resends after a lost confirm are at most the publisher's in-flight window (1,000) apart
# from the original; remembering far more ids than that keeps memory bounded in --watch.
DEDUP_WINDOW = 100_000
# Unacked deliveries of a durable queue held at once: enough to stream, bounded in memory.
PREFETCH = 500
# How long one wait for messages lasts: how soon `stop` and the idle timeout are noticed,
# and how long the queue must be quiet before `on_change` runs.
POLL_S = 0.25
# During a steady stream `on_change` still runs this often, so --watch never freezes.
MAX_CHANGE_DELAY_S = 1.0
# A host whose sequence has gaps is asked for a snapshot at most this often: its bracket
# needs time to arrive, and one that keeps losing messages must not be asked in a loop.
SNAPSHOT_REQUEST_INTERVAL_S = 10.0

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Row:
    """One domain as its latest message describes it; `last_event` is `event[.detail]`."""

    host: str
    uuid: str
    name: str
    state: str
    persistent: bool
    last_event: str
    seq: int


class _MalformedError(Exception):
    """A body that breaks the message contract; the message is counted and skipped."""


@dataclass(frozen=True, slots=True)
class _Envelope:
    host: str
    entity: str
    event: str
    detail: str | None
    id: str
    sequence: int


@dataclass(frozen=True, slots=True)
class _DomainMessage:
    source: str
    uuid: str
    name: str
    event: str
    detail: str | None
    state: str
    persistent: bool
    seq: int


@dataclass(slots=True)
class _Snapshot:
    """An open begin..end window of one backend of one host."""

    snapshot_id: str
    seen: set[str] = dataclasses.field(default_factory=set)
    snapshotted: set[str] = dataclasses.field(default_factory=set)


class Inventory:
    """The fleet view, rebuilt from messages in the order the queue delivers them.

    Counters: `messages` every message given to `apply`; of those, `duplicates` were resends
    of an id already applied, `rejected` broke the contract, `ignored` were well-formed but say
    nothing about the table (capabilities, backend connections, unknown entities). `gaps`
    counts discontinuities, each of which means at least one missed message: a publisher's
    `sequence` not one more than its previous one, or a domain's `data.seq` not one more than
    its previous one (or not 1 on `added`). `changes` grows whenever `rows()` changes.
    """

    def __init__(self) -> None:
        self.messages = 0
        self.duplicates = 0
        self.rejected = 0
        self.ignored = 0
        self.gaps = 0
        self.changes = 0
        self._rows: dict[Key, Row] = {}
        self._backends: dict[Key, str] = {}
        self._sequences: dict[str, int] = {}
        self._snapshots: dict[Key, _Snapshot] = {}
        self._seen_ids: set[str] = set()
        self._seen_order: collections.deque[str] = collections.deque()
        self._gapped: dict[str, None] = {}
        """Hosts, in the order their gaps came: one entry per host, however many gaps."""

    def take_gapped_hosts(self) -> list[str]:
        """The hosts whose `sequence` had a gap since the last call, each once."""
        hosts, self._gapped = list(self._gapped), {}
        return hosts

    def rows(self) -> list[Row]:
        return sorted(self._rows.values(), key=lambda row: (row.host, row.name, row.uuid))

    def apply_raw(self, routing_key: str, raw: bytes) -> None:
        """`apply` for an undecoded body; a body that is not a JSON object is rejected."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, Mapping):
            self.messages += 1
            self.rejected += 1
            return
        self.apply(routing_key, body)

    def apply(self, routing_key: str, body: Mapping[str, Any]) -> None:
        self.messages += 1
        try:
            envelope = _parse_envelope(routing_key, body)
        except _MalformedError:
            self.rejected += 1
            return
        if envelope.id in self._seen_ids:
            self.duplicates += 1
            return
        self._remember(envelope.id)
        self._check_sequence(envelope.host, envelope.sequence)
        try:
            if envelope.entity == "domain":
                self._apply_domain(envelope.host, _parse_domain(body))
            elif envelope.entity == "publisher" and envelope.event == "snapshot":
                self._apply_snapshot(envelope, _mapping(body, "data"))
            else:
                self.ignored += 1
        except _MalformedError:
            self.rejected += 1

    def _remember(self, message_id: str) -> None:
        self._seen_ids.add(message_id)
        self._seen_order.append(message_id)
        if len(self._seen_order) > DEDUP_WINDOW:
            self._seen_ids.discard(self._seen_order.popleft())

    def _check_sequence(self, host: str, sequence: int) -> None:
        previous = self._sequences.get(host)
        if previous is not None and sequence != previous + 1:
            self.gaps += 1
            self._gapped[host] = None
        self._sequences[host] = sequence

    def _apply_domain(self, host: str, message: _DomainMessage) -> None:
        key = (host, message.uuid)
        previous = self._rows.get(key)
        if message.event == "added":
            expected: int | None = 1
        else:
            expected = previous.seq + 1 if previous is not None else None
        if expected is not None and message.seq != expected:
            self.gaps += 1
        snapshot = self._snapshots.get((host, message.source))
        if snapshot is not None:
            snapshot.seen.add(message.uuid)
            if message.event == "snapshot":
                snapshot.snapshotted.add(message.uuid)
        if message.event == "removed":
            self._delete(key)
            return
        row = Row(
            host=host,
            uuid=message.uuid,
            name=message.name,
            state=message.state,
            persistent=message.persistent,
            last_event=f"{message.event}.{message.detail}" if message.detail else message.event,
            seq=message.seq,
        )
        self._backends[key] = message.source
        if row != previous:
            self._rows[key] = row
            self.changes += 1

    def _apply_snapshot(self, envelope: _Envelope, data: Mapping[str, Any]) -> None:
        if envelope.detail not in ("begin", "end"):
            self.ignored += 1
            return
        backend = _str(data, "backend")
        snapshot_id = _str(data, "snapshot_id")
        key = (envelope.host, backend)
        if envelope.detail == "begin":
            self._snapshots[key] = _Snapshot(snapshot_id)
        else:
            domains = _int(data, "domains")
            snapshot = self._snapshots.get(key)
            if snapshot is None or snapshot.snapshot_id != snapshot_id:
                return  # its begin came before this queue existed: nothing to sweep by
            del self._snapshots[key]
            if len(snapshot.snapshotted) != domains:
                return  # a snapshot message was lost: sweeping would drop a live domain
            for row_key, row_backend in list(self._backends.items()):
                if (
                    row_key[0] == envelope.host
                    and row_backend == backend
                    and row_key[1] not in snapshot.seen
                ):
                    self._delete(row_key)

    def _delete(self, key: Key) -> None:
        self._backends.pop(key, None)
        if self._rows.pop(key, None) is not None:
            self.changes += 1


def _parse_envelope(routing_key: str, body: Mapping[str, Any]) -> _Envelope:
    key = RoutingKey.parse(routing_key)
    if key is None or key.major != _DOMAIN_EVENT_MAJOR:
        raise _MalformedError("routing key")
    return _Envelope(
        host=key.host_id,
        entity=key.entity,
        event=key.event,
        detail=key.detail,
        id=_str(body, "id"),
        sequence=_int(body, "sequence"),
    )


def _parse_domain(body: Mapping[str, Any]) -> _DomainMessage:
    data = _mapping(body, "data")
    domain = _mapping(data, "domain")
    detail = data.get("detail")
    if detail is not None and not isinstance(detail, str):
        raise _MalformedError("detail")
    persistent = data.get("persistent")
    if not isinstance(persistent, bool):
        raise _MalformedError("persistent")
    return _DomainMessage(
        source=_str(body, "source"),
        uuid=_str(domain, "uuid"),
        name=_str(domain, "name"),
        event=_str(data, "event"),
        detail=detail,
        state=_str(_mapping(data, "state"), "state"),
        persistent=persistent,
        seq=_int(data, "seq"),
    )


def _mapping(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if not isinstance(value, Mapping):
        raise _MalformedError(key)
    return value


def _str(parent: Mapping[str, Any], key: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or not value:
        raise _MalformedError(key)
    return value


def _int(parent: Mapping[str, Any], key: str) -> int:
    value = parent.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _MalformedError(key)
    return value


# -- rendering ---------------------------------------------------------------------------------

_HEADERS = ("HOST", "DOMAIN", "UUID", "STATE", "PERSISTENT", "LAST EVENT")
_COUNTERS = ("messages", "gaps", "duplicates", "rejected", "ignored")


def render_table(inventory: Inventory) -> str:
    """Aligned plain-text columns, then one line of counters (gaps mean missed messages)."""
    rows = inventory.rows()
    lines = [_HEADERS] + [
        (r.host, r.name, r.uuid, r.state, "yes" if r.persistent else "no", r.last_event)
        for r in rows
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(_HEADERS))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    counters = ", ".join(f"{name} {getattr(inventory, name)}" for name in _COUNTERS)
    hosts = len({row.host for row in rows})
    text.append(f"domains {len(rows)}, hosts {hosts}, {counters}")
    return "\n".join(text)


def to_json(inventory: Inventory) -> dict[str, Any]:
    result: dict[str, Any] = {"rows": [dataclasses.asdict(row) for row in inventory.rows()]}
    result.update((name, getattr(inventory, name)) for name in _COUNTERS)
    return result


# -- consuming ---------------------------------------------------------------------------------


def consume(
    broker: BrokerSettings,
    *,
    on_change: Callable[[Inventory], None],
    idle_timeout: float | None,
    stop: threading.Event,
    queue: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    on_snapshot_request: Callable[[str], None] | None = None,
) -> Inventory:
    """Applies messages until `idle_timeout` seconds pass without one (None: until `stop`).

    Without `queue`, reads an exclusive server-named queue bound to the exchange with
    `BINDINGS`, which the broker deletes when the connection closes. With `queue`, reads
    that existing queue (never declaring or binding it) and acks each message once applied,
    so the queue must be the inventory's own. `on_ready(queue name)` runs once messages
    will be received; `on_change` runs after the table changed and the queue went quiet
    for `POLL_S`, or at least every `MAX_CHANGE_DELAY_S` during a steady stream.

    With `on_snapshot_request`, a gap in a host's `sequence` asks that host's publisher for a
    snapshot (at most once per `SNAPSHOT_REQUEST_INTERVAL_S`), and `on_snapshot_request` gets
    one line saying so, or why no request could be sent.

    Reads from the first of the broker's URLs that answers; raises BrokerError.
    """
    inventory = Inventory()
    last_message = time.monotonic()

    def on_message(channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        nonlocal last_message
        inventory.apply_raw(method.routing_key, body)
        if queue is not None:
            channel.basic_ack(method.delivery_tag)
        last_message = time.monotonic()

    exchange = broker.exchange
    with session(broker, "virtpub inventory") as (connection, where):
        channel = connection.channel()
        name = _open_queue(channel, exchange, queue, where)
        channel.basic_consume(name, on_message, auto_ack=queue is None)
        if on_ready is not None:
            on_ready(name)
        requester = SnapshotRequester(connection, exchange, SNAPSHOT_REQUEST_INTERVAL_S)
        notified, notified_at = inventory.changes, time.monotonic()
        while not stop.is_set():
            limit = POLL_S
            if idle_timeout is not None:
                remaining = idle_timeout - (time.monotonic() - last_message)
                if remaining <= 0:
                    break
                limit = min(limit, remaining)
            received = inventory.messages
            connection.process_data_events(time_limit=limit)
            quiet = inventory.messages == received
            if on_snapshot_request is not None:
                for host in inventory.take_gapped_hosts():
                    line = _request_snapshot(requester, host)
                    if line is not None:
                        on_snapshot_request(line)
            if inventory.changes != notified and (
                quiet or time.monotonic() - notified_at >= MAX_CHANGE_DELAY_S
            ):
                on_change(inventory)
                notified, notified_at = inventory.changes, time.monotonic()
    return inventory


def _request_snapshot(requester: SnapshotRequester, host: str) -> str | None:
    """Asks for `host`'s snapshot; one line for the operator, or None if asked just now."""
    try:
        request_id = requester.request(host)
    except BrokerError as err:
        return f"gap in the sequence of host {host!r}; cannot request a snapshot: {err}"
    if request_id is None:
        return None
    return f"gap in the sequence of host {host!r}; requested a snapshot (request {request_id})"


def _open_queue(channel: Any, exchange: str, queue: str | None, where: str) -> str:
    """The queue to read: `queue` if it exists, else a fresh one bound to `exchange`."""
    if queue is None:
        check_exchange(channel, exchange, where)
        name: str = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for binding in BINDINGS:
            channel.queue_bind(name, exchange, routing_key=binding)
        return name
    with missing_means(
        f"queue {queue!r} does not exist at {where}; declare it and bind it to the exchange first"
    ):
        channel.queue_declare(queue, passive=True)
    channel.basic_qos(prefetch_count=PREFETCH)
    return queue


# -- command line ------------------------------------------------------------------------------


@click.command("inventory")
@amqp_options
@click.option(
    "--queue",
    help="Read this existing queue instead of a temporary one bound to --exchange. Messages"
    " are removed from it as they are applied, so give the inventory a queue of its own.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (one object per line with --watch)."
)
@click.option(
    "--watch",
    is_flag=True,
    help="Stay live and reprint on every change until Ctrl-C; on a gap in a host's sequence,"
    " ask that host for a snapshot.",
)
@click.option(
    "--idle",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    show_default=True,
    help="Without --watch: print once no message has come for this many seconds.",
)
def inventory_command(
    *,
    broker: BrokerSettings,
    queue: str | None,
    as_json: bool,
    watch: bool,
    idle: float,
) -> None:
    """Show every domain of the fleet (host, name, UUID, state, persistence, last event),
    rebuilt from the publishers' messages alone, without asking any host.

    A temporary queue only receives what is published after it exists, so the table fills
    in with each publisher's next snapshot, which a publisher sends when it starts and
    whenever it reconnects to its hypervisor; until then it shows only domains that had an event.
    To start from a complete table, keep a durable queue bound to the exchange with
    `v1.*.domain.#`, `v1.*.publisher.#` and `v1.*.config.#` and read it with --queue.

    The last line counts messages, gaps (missed messages: the table may be stale until the
    next snapshot), duplicates (resends, skipped), rejected (unreadable) and ignored ones.
    With --watch, a gap in a host's sequence asks that host's publisher for a snapshot at
    once (as `virtpub snapshot --host` does, at most every 10 s per host; one line on
    stderr says so), and its bracket makes the table consistent again.

    Exit codes: 0 done, 1 invalid broker settings, broker unreachable, login refused, a
    certificate that does not verify, or queue or exchange missing.
    """
    stop = threading.Event()

    def show(inventory: Inventory) -> None:
        if as_json:
            click.echo(json.dumps(to_json(inventory), separators=(",", ":")))
        else:
            click.clear()
            click.echo(render_table(inventory))

    def report(line: str) -> None:
        click.echo(f"virtpub inventory: {line}", err=True)

    try:
        with stop_on_signals(stop):
            inventory = consume(
                broker,
                on_change=show if watch else lambda _inventory: None,
                idle_timeout=None if watch else idle,
                stop=stop,
                queue=queue,
                on_snapshot_request=report if watch else None,
            )
    except BrokerError as err:
        click.echo(f"virtpub inventory: {err}", err=True)
        sys.exit(EXIT_FAILURE)
    if watch:
        return
    if as_json:
        click.echo(json.dumps(to_json(inventory), indent=2))
    else:
        click.echo(render_table(inventory))
    if inventory.messages == 0 and queue is None:
        click.echo(
            f"virtpub inventory: no message within {idle:g} s; the table fills in with each"
            " publisher's next snapshot (at its start or reconnect), or use --queue",
            err=True,
        )
