"""Asking the running publishers through `<exchange>.requests`: `virtpub capabilities`
(what they can emit, tabulated) and `virtpub snapshot` (a fresh snapshot bracket now).

Both go through the broker session the other tools use (`virtpub.amqp.session`), with
the same broker options (`virtpub.tools.options.amqp_options`); the
request format is described in `virtpub.amqp.requests`.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click
import orjson
import pika
import pika.exceptions

from virtpub.amqp.connection import BrokerError
from virtpub.amqp.requests import ALL_HOSTS, REPLY_PREFIX, requests_exchange
from virtpub.amqp.session import (
    check_exchange,
    check_requests_exchange,
    request_snapshot,
    send_request,
    session,
)
from virtpub.config import BrokerSettings
from virtpub.contract import schemas
from virtpub.contract.routing import RoutingKey
from virtpub.tools.options import EXIT_FAILURE, amqp_options, stop_on_signals

MARK = {"native": "native", "derived": "derived", "polled": "polled",
        "filesystem": "files", "unsupported": "-"}  # fmt: skip
POLL_S = 0.05
"""How long one wait for replies lasts: how soon the last awaited one ends the wait."""


def ask(broker: BrokerSettings, hosts: Sequence[str], timeout: float) -> list[dict[str, Any]]:
    """The capabilities messages of the publishers that answered within `timeout`.

    Asks through the first of the broker's URLs that answers; raises BrokerError.
    """
    with session(broker, "virtpub capabilities") as (connection, _where):
        return ask_capabilities(connection, broker.exchange, hosts, timeout)


def ask_capabilities(
    connection: Any, exchange: str, hosts: Sequence[str], timeout: float
) -> list[dict[str, Any]]:
    """`ask` on an open connection, sorted by host id.

    With no hosts named, every publisher is asked and all answers within the
    timeout are kept; with hosts named, it returns as soon as each has answered.
    """
    correlation = str(uuid.uuid4())
    replies: dict[str, dict[str, Any]] = {}
    channel = connection.channel()
    check_requests_exchange(channel, exchange)
    reply_to = f"{REPLY_PREFIX}{correlation}"
    queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(queue, requests_exchange(exchange), reply_to)

    def on_reply(_ch: Any, _method: Any, properties: Any, body: bytes) -> None:
        if properties.correlation_id != correlation:
            return
        try:
            message = orjson.loads(body)
            replies[str(message["data"]["host_id"])] = message
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return  # not a capabilities message: ignore it

    channel.basic_consume(queue, on_reply, auto_ack=True)
    properties = pika.BasicProperties(reply_to=reply_to, correlation_id=correlation)
    for host in hosts or [ALL_HOSTS]:
        send_request(channel, exchange, "capabilities", host, properties)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (hosts and set(hosts) <= set(replies)):
        connection.process_data_events(time_limit=POLL_S)
    channel.close()
    return [replies[host] for host in sorted(replies)]


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    asked: list[str]
    """The hosts whose publishers were asked for a snapshot."""
    unanswered: list[str]
    """Hosts named that did not answer the capabilities request."""
    missing: list[tuple[str, str]]
    """(host, backend) whose `end` did not arrive in time."""


@dataclass(frozen=True, slots=True)
class Bracket:
    """A requested snapshot's `end` as it arrived: which host and backend, how many domains."""

    host: str
    backend: str
    domains: int


def snapshot(
    broker: BrokerSettings,
    hosts: Sequence[str],
    *,
    discovery_timeout: float,
    timeout: float,
    on_end: Callable[[Bracket], None],
    stop: threading.Event,
) -> SnapshotOutcome:
    """Asks for a fresh snapshot and waits for every asked backend's `end`.

    The publishers to ask, and their backends, come from a capabilities request first
    (`ask_capabilities` with `hosts`, or every publisher that answers within
    `discovery_timeout`); an `end` counts if it carries this request's id and arrives within
    `timeout` of the request (or before `stop`). Raises BrokerError.
    """
    request_id = str(uuid.uuid4())
    exchange = broker.exchange
    with session(broker, "virtpub snapshot") as (connection, where):
        answers = ask_capabilities(connection, exchange, hosts, discovery_timeout)
        unanswered = sorted(set(hosts) - {str(a["data"]["host_id"]) for a in answers})
        waiting = {
            (str(a["data"]["host_id"]), str(backend["source"]))
            for a in answers
            for backend in a["data"]["backends"]
        }
        asked = sorted({host for host, _backend in waiting})
        if not waiting:
            return SnapshotOutcome(asked, unanswered, [])
        channel = connection.channel()
        check_exchange(channel, exchange, where)
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        major = schemas.info(schemas.PUBLISHER_SNAPSHOT).major
        for host in asked:
            end_key = str(RoutingKey(major, host, "publisher", "snapshot", "end"))
            channel.queue_bind(queue, exchange, end_key)

        def on_message(_ch: Any, method: Any, _properties: Any, body: bytes) -> None:
            try:
                data = orjson.loads(body)["data"]
                if data["request_id"] != request_id:
                    return
                parsed = RoutingKey.parse(str(method.routing_key))
                if parsed is None:
                    return
                key = (parsed.host_id, str(data["backend"]))
                domains = int(data["domains"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
                return  # another request's bracket, or not a snapshot end: not ours
            if key in waiting:
                waiting.discard(key)
                on_end(Bracket(key[0], key[1], domains))

        channel.basic_consume(queue, on_message, auto_ack=True)
        for host in asked:
            request_snapshot(channel, exchange, host, request_id)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline and not stop.is_set():
            connection.process_data_events(time_limit=POLL_S)
    return SnapshotOutcome(asked, unanswered, sorted(waiting))


def table(answers: Sequence[dict[str, Any]]) -> str:
    """Event type down, one column per host and backend: where each event comes from."""
    columns: list[tuple[str, dict[str, Any]]] = []
    for answer in answers:
        for backend in answer["data"]["backends"]:
            label = f"{answer['data']['host_id']}/{backend['driver']}"
            columns.append((label, backend["events"]))
    names = sorted({name for _, events in columns for name in events})
    width = max([len("event type"), *map(len, names)])
    widths = [max(len(label), 7) for label, _ in columns]
    header = "  ".join(
        [
            f"{'event type':<{width}}",
            *(f"{lbl:<{w}}" for (lbl, _), w in zip(columns, widths, strict=True)),
        ]
    )
    lines = [header.rstrip()]
    for name in names:
        cells = [
            f"{MARK.get(events.get(name, {}).get('status', 'unsupported'), '?'):<{w}}"
            for (_, events), w in zip(columns, widths, strict=True)
        ]
        lines.append("  ".join([f"{name:<{width}}", *cells]).rstrip())
    return "\n".join(lines)


@click.command("snapshot")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Ask this host's publisher; repeat for several. [default: every publisher that"
    " answers a capabilities request within --discovery-timeout]",
)
@amqp_options
@click.option(
    "--discovery-timeout",
    type=click.FloatRange(min=0.1, max=300),
    default=2.0,
    show_default=True,
    help="Seconds to wait for the capabilities answers that tell which publishers and"
    " backends to wait for (with --host: at most this long, for the hosts named).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=3600),
    default=30.0,
    show_default=True,
    help="Seconds to wait, after the request, for every backend's snapshot end.",
)
def snapshot_command(
    *,
    hosts: tuple[str, ...],
    broker: BrokerSettings,
    discovery_timeout: float,
    timeout: float,
) -> None:
    """Ask running publishers to publish a fresh snapshot bracket now, and wait until it
    has been published.

    Each asked publisher lists its backends and publishes, on the exchange, for each
    backend: publisher.snapshot.begin, one domain.snapshot per domain, then
    publisher.snapshot.end, with reason `requested` and this command's request id. Every
    consumer bound to the exchange receives it: after a gap in a host's `sequence`, a
    consumer can mark and sweep without waiting for the next snapshot.

    Which publishers to wait for: the command first asks for capabilities, as `virtpub
    capabilities` does (the named hosts, or every publisher that answers within
    --discovery-timeout), and then waits for the end of each backend those answers list.
    It prints one line per backend as its end arrives. A backend its publisher cannot
    list at that moment (its hypervisor unreachable) sends no bracket: it is reported
    missing once --timeout has passed.

    Exit codes: 0 every asked backend's end arrived, 1 a host did not answer, an end did
    not arrive within --timeout, no publisher answered, invalid broker settings, or the
    broker failed.
    """
    stop = threading.Event()

    def show(bracket: Bracket) -> None:
        click.echo(f"{bracket.host}  {bracket.backend}  {bracket.domains} domain(s)")

    try:
        with stop_on_signals(stop):
            outcome = snapshot(
                broker,
                hosts,
                discovery_timeout=discovery_timeout,
                timeout=timeout,
                on_end=show,
                stop=stop,
            )
    except BrokerError as err:
        click.echo(f"virtpub snapshot: {err}", err=True)
        sys.exit(EXIT_FAILURE)
    for host in outcome.unanswered:
        click.echo(
            f"virtpub snapshot: no answer from host {host!r} within {discovery_timeout:g} s",
            err=True,
        )
    for host, backend in outcome.missing:
        click.echo(
            f"virtpub snapshot: no snapshot end from host {host!r}, backend {backend}"
            f" within {timeout:g} s",
            err=True,
        )
    if not hosts and not outcome.asked:
        click.echo(
            f"virtpub snapshot: no publisher answered within {discovery_timeout:g} s", err=True
        )
    sys.exit(EXIT_FAILURE if outcome.unanswered or outcome.missing or not outcome.asked else 0)
