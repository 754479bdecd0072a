"""The reference consumer: the fleet's domains (host, domain, state, persistent) rebuilt from
messages alone, the proof that a consumer never needs to poll libvirt.

Every domain message carries the domain's name, state and persistence after the event, so
the view is a table keyed by (host, domain UUID) that each message overwrites and `removed`
deletes. A queue only sees messages published after it exists; the publisher's snapshot (at
startup and on each reconnect to libvirt) fills the table in, and its mark and sweep drops the rows
of domains that vanished while nobody was listening. A gap in a host's `sequence` means the table
may be wrong about that host: in --watch, the inventory then asks that host's publisher for a
snapshot (`virtpub snapshot`'s request), whose bracket marks and sweeps it consistent again.

The rules (`Inventory`, pure, testable message by message) live in `virtpub.consumer`; here
`consume` feeds them from RabbitMQ and `inventory_command` is the `virtpub inventory` command line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import click

from virtpub.amqp.connection import BrokerError
from virtpub.amqp.session import check_exchange, missing_means, session
from virtpub.config import BrokerSettings
from virtpub.consumer import BINDINGS, Inventory
from virtpub.tools.ask import SnapshotRequester
from virtpub.tools.options import EXIT_FAILURE, amqp_options, stop_on_signals

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
