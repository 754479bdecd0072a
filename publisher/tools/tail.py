"""`virtpub tail`: the exchange live, one line per message, for an operator at a terminal.

It reads a queue of its own (exclusive, auto-delete, named by the broker), so it takes nothing
from other consumers and leaves nothing behind. It never declares the exchange: a tail must not
need configure rights on it, and a typo in --exchange must not create an exchange nobody
publishes to. The broker helpers here (the broker options, the session with its one-line
errors, clean stop on signals) are shared with `virtpub archive`, `inventory`,
`capabilities` and `snapshot`.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from virtpub.amqp.connection import (
    BrokerError,
)
from virtpub.amqp.session import check_exchange, on_cancel_raise, session
from virtpub.config import (
    BrokerSettings,
)
from virtpub.contract.routing import RoutingKey
from virtpub.tools.options import EXIT_FAILURE, amqp_options, stop_on_signals

# Unacked deliveries held at once: a slow terminal slows the broker's pushes instead of
# growing this process.
PREFETCH = 200
# A tail nobody reads (a stopped terminal) must not fill the broker: past this many waiting
# messages the oldest are dropped. A live view can afford that; an archive cannot.
MAX_QUEUE_LENGTH = 10_000
# How long one wait for messages lasts: how soon a signal or --count ends the command.
POLL_S = 0.25
# -- one message, one line ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """What a line shows of a message: from the routing key, and from the body when it parses."""

    host: str
    entity: str
    event: str
    detail: str | None
    body: Mapping[str, Any] | None

    @classmethod
    def parse(cls, routing_key: str, raw: bytes) -> Seen:
        key = RoutingKey.parse(routing_key) or RoutingKey(0, "", "", "")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return cls(
            host=key.host_id,
            entity=key.entity,
            event=key.event,
            detail=key.detail,
            body=body if isinstance(body, Mapping) else None,
        )

    @property
    def data(self) -> Mapping[str, Any]:
        return _mapping(self.body or {}, "data")

    @property
    def domain(self) -> Mapping[str, Any]:
        return _mapping(self.data, "domain")

    @property
    def what(self) -> str:
        """`event[.detail]`, prefixed by the entity when it is not a domain."""
        what = f"{self.event}.{self.detail}" if self.detail else self.event
        return what if self.entity == "domain" else f"{self.entity}.{what}"


def _mapping(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, Mapping) else {}


def _text(parent: Mapping[str, Any], key: str) -> str:
    value = parent.get(key)
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class Filters:
    """Each option is repeatable; a message must match one value of every option given.

    A domain is named by its name (case matters, as in libvirt) or its UUID (any case).
    """

    hosts: frozenset[str]
    domains: frozenset[str]
    events: frozenset[str]

    def match(self, seen: Seen) -> bool:
        if self.hosts and seen.host not in self.hosts:
            return False
        if self.events and not (
            seen.event in self.events or f"{seen.event}.{seen.detail}" in self.events
        ):
            return False
        if self.domains:
            name, uuid = _text(seen.domain, "name"), _text(seen.domain, "uuid")
            return (bool(name) and name in self.domains) or (
                bool(uuid) and uuid.lower() in {d.lower() for d in self.domains}
            )
        return True


_EVENT_STYLES = {
    "added": "green",
    "defined": "green",
    "started": "green",
    "resumed": "green",
    "suspended": "yellow",
    "pmsuspended": "yellow",
    "shutdown": "yellow",
    "stopped": "red",
    "crashed": "bold red",
    "undefined": "red",
    "removed": "red",
    "dropped": "bold red",
}
_ENTITY_STYLES = {"publisher": "magenta", "config": "bold red"}


def render(seen: Seen) -> Text:
    """Time, host, domain (or the subject), event, origin; fixed widths keep a stream aligned."""
    if seen.body is None:
        return Text.assemble(
            ("-".ljust(28), "dim"),
            (seen.host.ljust(12), "bold"),
            "?".ljust(24),
            (seen.what.ljust(28), "bold red"),
            "(body is not a JSON object)",
        )
    subject = (
        _text(seen.domain, "name") or _text(seen.domain, "uuid") or _text(seen.body, "subject")
    )
    if seen.event == "dropped":
        style = _EVENT_STYLES["dropped"]
    else:
        style = _ENTITY_STYLES.get(seen.entity) or _EVENT_STYLES.get(seen.event, "blue")
    line = Text.assemble(
        ((_text(seen.body, "time") or "-").ljust(28), "dim"),
        (seen.host.ljust(12), "bold"),
        (subject.ljust(24), "cyan"),
        (seen.what.ljust(28), style),
        (_text(seen.data, "origin"), "dim"),
    )
    line.rstrip()
    return line


def json_line(raw: bytes, body: Mapping[str, Any]) -> str:
    """The body exactly as published when it is one line of UTF-8, else re-encoded on one."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return json.dumps(body)
    return json.dumps(body) if "\n" in text or "\r" in text else text


# -- consuming ---------------------------------------------------------------------------------


def follow(
    broker: BrokerSettings,
    *,
    bindings: tuple[str, ...],
    on_message: Callable[[str, bytes], None],
    stop: threading.Event,
    on_ready: Callable[[str], None],
) -> None:
    """Calls `on_message(routing key, body)` for each message until `stop` is set.

    Raises BrokerError.
    """

    def deliver(channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        if not stop.is_set():
            on_message(method.routing_key, body)
        channel.basic_ack(method.delivery_tag)

    with session(broker, "virtpub tail") as (connection, where):
        channel = connection.channel()
        check_exchange(channel, broker.exchange, where)
        queue: str = channel.queue_declare(
            "", exclusive=True, auto_delete=True, arguments={"x-max-length": MAX_QUEUE_LENGTH}
        ).method.queue
        for binding in bindings:
            channel.queue_bind(queue, broker.exchange, routing_key=binding)
        channel.basic_qos(prefetch_count=PREFETCH)
        on_cancel_raise(channel, queue)
        channel.basic_consume(queue, deliver)
        on_ready(where)
        while not stop.is_set():
            connection.process_data_events(time_limit=POLL_S)


# -- command line ------------------------------------------------------------------------------


@click.command("tail")
@click.argument("bindings", nargs=-1, metavar="[BINDING]...")
@amqp_options
@click.option("--host", "hosts", multiple=True, help="Only this host id; repeatable.")
@click.option(
    "--domain", "domains", multiple=True, help="Only this domain, by name or UUID; repeatable."
)
@click.option(
    "--event",
    "events",
    multiple=True,
    help="Only this event (stopped) or event.detail (stopped.destroyed); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print each message body as one JSON line.")
@click.option(
    "--color/--no-color",
    default=None,
    help="Colour the lines. [default: only when writing to a terminal]",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Exit after printing this many messages.",
)
def tail_command(
    *,
    bindings: tuple[str, ...],
    broker: BrokerSettings,
    hosts: tuple[str, ...],
    domains: tuple[str, ...],
    events: tuple[str, ...],
    as_json: bool,
    color: bool | None,
    count: int | None,
) -> None:
    """Print the publishers' messages as they are published, one line each: time, host,
    domain (or the publisher's subject), event[.detail] and origin.

    BINDING is a topic pattern on routing keys v1.<host>.<entity>.<event>[.<detail>]
    (default: #, everything), e.g. 'v1.*.domain.stopped.#' or 'v1.hv01.#'. The filters
    below apply on top; each is repeatable and a message must match every filter given.

    The queue is temporary: messages published before the command starts are not shown,
    and if the output falls more than 10,000 messages behind the oldest are skipped.

    Exit codes: 0 stopped (Ctrl-C, SIGTERM, --count reached), 1 invalid broker settings,
    broker unreachable, login refused, a certificate that does not verify, exchange
    missing, or the output closed (`virtpub tail | head`).
    """
    bindings = bindings or ("#",)
    filters = Filters(frozenset(hosts), frozenset(domains), frozenset(events))
    console = Console(
        force_terminal=color, highlight=False, markup=False, emoji=False, soft_wrap=True
    )
    stop = threading.Event()
    printed = 0

    def show(routing_key: str, raw: bytes) -> None:
        nonlocal printed
        seen = Seen.parse(routing_key, raw)
        if not filters.match(seen):
            return
        if as_json:
            if seen.body is None:
                click.echo(f"virtpub tail: skipped {routing_key}: not a JSON object", err=True)
                return
            click.echo(json_line(raw, seen.body))
        else:
            console.print(render(seen))
        printed += 1
        if count is not None and printed >= count:
            stop.set()

    def ready(where: str) -> None:
        click.echo(
            f"virtpub tail: following {broker.exchange!r} at {where} ({' '.join(bindings)});"
            " Ctrl-C to stop",
            err=True,
        )

    try:
        with stop_on_signals(stop):
            follow(broker, bindings=bindings, on_message=show, stop=stop, on_ready=ready)
    except BrokerError as err:
        click.echo(f"virtpub tail: {err}", err=True)
        sys.exit(EXIT_FAILURE)
