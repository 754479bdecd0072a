"""Following the exchange: the inventory rules fed from RabbitMQ, for an orchestrator's loop.

`follow` is the blocking runner around `Inventory`: it reads a queue bound with
`BINDINGS`, applies each message (a durable queue's message is acked only once applied,
so a crash re-delivers it and the dedupe skips what was applied), and on a gap in a
host's `sequence` asks that host's publisher for a snapshot, whose bracket marks and
sweeps the host's rows consistent again. `virtpub inventory` is built on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from virtpub.amqp.connection import BrokerError
from virtpub.amqp.session import SnapshotRequester, check_exchange, missing_means, session
from virtpub.config import BrokerSettings
from virtpub.consumer.inventory import BINDINGS, Inventory
from virtpub.contract.routing import DEFAULT_EXCHANGE

log = logging.getLogger(__name__)

PREFETCH = 500
"""Unacked deliveries of a durable queue held at once: enough to stream, bounded in memory."""
POLL_S = 0.25
"""How long one wait for messages lasts: how soon `stop` and the idle timeout are noticed,
and how long the queue must be quiet before `on_change` runs."""
MAX_CHANGE_DELAY_S = 1.0
"""During a steady stream `on_change` still runs this often, so a live view never freezes."""
SNAPSHOT_REQUEST_INTERVAL_S = 10.0
"""A host whose sequence has gaps is asked for a snapshot at most this often: its bracket
needs time to arrive, and one that keeps losing messages must not be asked in a loop."""


def follow(
    broker: BrokerSettings | str,
    on_change: Callable[[Inventory], None],
    *,
    exchange: str = DEFAULT_EXCHANGE,
    queue: str | None = None,
    declare: bool = False,
    queue_arguments: Mapping[str, Any] | None = None,
    request_snapshots: bool = True,
    idle_timeout: float | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    on_snapshot_request: Callable[[str], None] | None = None,
) -> Inventory:
    """Applies the exchange's messages to an `Inventory` until `stop` is set, or until
    `idle_timeout` seconds pass without a message; returns it. Raises BrokerError.

    `broker` is the tools' settings or one AMQP URL (then `exchange` names the exchange).
    Without `queue`, reads an exclusive server-named queue bound with `BINDINGS`, which the
    broker deletes when the connection closes: it sees only what is published after it
    exists. With `queue`, reads that queue and acks each message once applied, so the queue
    must be this consumer's own; `declare` declares it durable and binds it with `BINDINGS`
    (the exchange must exist; `queue_arguments` such as `{"x-queue-type": "quorum"}` go to
    that declare), otherwise it must exist already.

    `on_change(inventory)` runs on this thread after the table changed and the queue went
    quiet for `POLL_S`, or at least every `MAX_CHANGE_DELAY_S` during a steady stream.
    With `request_snapshots`, a gap in a host's `sequence` asks that host's publisher for a
    snapshot, at most once per `SNAPSHOT_REQUEST_INTERVAL_S`; `on_snapshot_request` gets one
    line saying so, or why no request could be sent (logged as a warning without it).
    `on_ready(queue name)` runs once messages will be received.
    """
    settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings((broker,), exchange)
    stop = stop if stop is not None else threading.Event()
    report = on_snapshot_request if on_snapshot_request is not None else log.warning
    inventory = Inventory()
    last_message = time.monotonic()

    def on_message(channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        nonlocal last_message
        inventory.apply_raw(method.routing_key, body)
        if queue is not None:
            channel.basic_ack(method.delivery_tag)
        last_message = time.monotonic()

    with session(settings, "virtpub consumer") as (connection, where):
        channel = connection.channel()
        declared = dict(queue_arguments or {}) if declare else None
        name = _open_queue(channel, settings.exchange, queue, declared, where)
        channel.basic_consume(name, on_message, auto_ack=queue is None)
        if on_ready is not None:
            on_ready(name)
        requester = SnapshotRequester(connection, settings.exchange, SNAPSHOT_REQUEST_INTERVAL_S)
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
            gapped = inventory.take_gapped_hosts()
            if request_snapshots:
                for host in gapped:
                    line = _request_snapshot(requester, host)
                    if line is not None:
                        report(line)
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


def _open_queue(
    channel: Any, exchange: str, queue: str | None, declared: dict[str, Any] | None, where: str
) -> str:
    """The queue to read: `queue` (declared durable with the `declared` arguments and bound
    first, unless None), else a fresh exclusive one bound to `exchange`."""
    if queue is None or declared is not None:
        check_exchange(channel, exchange, where)
    if queue is None:
        name: str = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for binding in BINDINGS:
            channel.queue_bind(name, exchange, routing_key=binding)
        return name
    if declared is not None:
        channel.queue_declare(queue, durable=True, arguments=declared)
        for binding in BINDINGS:
            channel.queue_bind(queue, exchange, routing_key=binding)
    else:
        with missing_means(
            f"queue {queue!r} does not exist at {where}; declare it and bind it to the"
            " exchange first"
        ):
            channel.queue_declare(queue, passive=True)
    channel.basic_qos(prefetch_count=PREFETCH)
    return queue
