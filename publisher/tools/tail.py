"""`virtpub tail`: the exchange live, one line per message, for an operator at a terminal.

It reads a queue of its own (exclusive, auto-delete, named by the broker), so it takes nothing
from other consumers and leaves nothing behind. It never declares the exchange: a tail must not
need configure rights on it, and a typo in --exchange must not create an exchange nobody
publishes to. The broker helpers here (the broker options, the session with its one-line
errors, clean stop on signals) are shared with `virtpub archive`, `inventory`,
`capabilities` and `snapshot`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click
import pika
import pika.exceptions
from rich.console import Console
from rich.text import Text

from virtpub.amqp.connection import (
    BrokerError,
    BrokerUnavailableError,
    connection_parameters,
    one_line,
    open_error,
)
from virtpub.config import (
    DEFAULTS,
    TLS_KEYS,
    BrokerSettings,
    ConfigError,
    read_config_file,
    resolve_broker,
)
from virtpub.contract.routing import RoutingKey
from virtpub.core.redact import redact_url

# Unacked deliveries held at once: a slow terminal slows the broker's pushes instead of
# growing this process.
PREFETCH = 200
# A tail nobody reads (a stopped terminal) must not fill the broker: past this many waiting
# messages the oldest are dropped. A live view can afford that; an archive cannot.
MAX_QUEUE_LENGTH = 10_000
# How long one wait for messages lasts: how soon a signal or --count ends the command.
POLL_S = 0.25
# Exit code of a tool that cannot go on (broker, configuration).
EXIT_FAILURE = 1

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

CONNECTION_OPTIONS: list[Decorator] = [
    click.option(
        "--amqp-url",
        "amqp_url",
        multiple=True,
        metavar="URL",
        help="RabbitMQ URL, amqp:// or amqps://; repeat for cluster nodes, tried in turn."
        f" [default: {DEFAULTS['amqp_url'][0]}]",  # type: ignore[index]
    ),
    click.option(
        "--amqp-ca-file",
        "amqp_ca_file",
        metavar="FILE",
        help="CA certificates to verify an amqps:// broker by (the host name is always"
        " verified). [default: the system's CAs]",
    ),
    click.option(
        "--amqp-cert-file",
        "amqp_cert_file",
        metavar="FILE",
        help="Client certificate for amqps://; with no password in --amqp-url, virtpub"
        " logs in by SASL EXTERNAL (the broker takes the user from the certificate).",
    ),
    click.option(
        "--amqp-key-file",
        "amqp_key_file",
        metavar="FILE",
        help="The client certificate's private key.",
    ),
]
"""How every command reaches the broker, `virtpub run` included: one definition each."""

_BROKER_OPTIONS: list[Decorator] = [
    click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="VIRTPUB_CONFIG",
        help="TOML file with the broker settings below (amqp_url, amqp_ca_file, amqp_cert_file,"
        " amqp_key_file, exchange); the daemon's file will do, its other settings are ignored."
        " Each can also be a VIRTPUB_<NAME> variable (VIRTPUB_AMQP_URL: several separated by"
        " spaces); flags win over the environment, which wins over the file.",
    ),
    *CONNECTION_OPTIONS,
    click.option(
        "--exchange",
        help="The publishers' topic exchange; it must exist (publishers declare it)."
        f" [default: {DEFAULTS['exchange']}]",
    ),
]
_BROKER_KEYS = ("amqp_url", *TLS_KEYS, "exchange")


def amqp_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The broker options of every command that talks to the publishers' broker: --config,
    --amqp-url (repeatable), the TLS files and --exchange, from the same TOML file and
    VIRTPUB_* variables as `virtpub run`, with the same precedence and checks.

    The command receives them as one argument, `broker` (a BrokerSettings). Invalid ones
    end the command before it connects, one line each, exit code 1. A group whose
    subcommand runs instead (`archive verify`) receives None: its subcommands need no broker.
    """

    @functools.wraps(func)
    def with_broker(*args: Any, config_path: Path | None, **kwargs: Any) -> Any:
        flags = {key: kwargs.pop(key) for key in _BROKER_KEYS}
        context = click.get_current_context()
        broker = None if context.invoked_subcommand else _broker_settings(config_path, flags)
        return func(*args, broker=broker, **kwargs)

    command: Callable[..., Any] = with_broker
    for option in reversed(_BROKER_OPTIONS):
        command = option(command)
    return command


def _broker_settings(config_path: Path | None, flags: dict[str, Any]) -> BrokerSettings:
    try:
        file_values = read_config_file(config_path) if config_path else None
        return resolve_broker(flags, os.environ, file_values)
    except ConfigError as err:
        command = click.get_current_context().command.name
        for problem in err.problems:
            click.echo(f"virtpub {command}: invalid configuration: {problem}", err=True)
        sys.exit(EXIT_FAILURE)


def connect_any(broker: BrokerSettings, connection_name: str) -> tuple[Any, str]:
    """A blocking connection to the first broker that answers, and its URL without password.

    An unreachable broker passes to the next URL; a refusal (credentials, access, a
    certificate that does not verify) ends the attempt at once.
    """
    for url in broker.amqp_urls[:-1]:
        try:
            return connect(url, broker, connection_name)
        except BrokerUnavailableError:
            continue
    return connect(broker.amqp_urls[-1], broker, connection_name)


def connect(url: str, broker: BrokerSettings, connection_name: str) -> tuple[Any, str]:
    where = redact_url(url)
    params = connection_parameters(url, connection_name, broker)
    try:
        return pika.BlockingConnection(params), where
    except (pika.exceptions.AMQPError, OSError) as err:  # a failed TLS handshake is an OSError
        raise open_error(err, where) from None


@contextlib.contextmanager
def missing_means(explanation: str) -> Iterator[None]:
    """A passive declare of something missing fails with a bare 404; this says what is
    missing and why. Used inside `session`, which turns any other refusal into one line."""
    try:
        yield
    except pika.exceptions.ChannelClosedByBroker as err:
        if err.reply_code != 404:
            raise
        raise BrokerError(explanation) from None


def check_exchange(channel: Any, exchange: str, where: str) -> None:
    with missing_means(
        f"exchange {exchange!r} does not exist at {where}; no publisher has declared it"
        " yet, or --exchange is wrong"
    ):
        channel.exchange_declare(exchange, passive=True)


def on_cancel_raise(channel: Any, queue: str) -> None:
    """A consumer the broker cancels (its queue was deleted) would otherwise wait forever."""

    def cancelled(_frame: Any) -> None:
        raise BrokerError(f"the broker cancelled the consumer of queue {queue!r} (deleted?)")

    channel.add_on_cancel_callback(cancelled)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM end the command cleanly (exit 0), not with a traceback."""

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


@contextlib.contextmanager
def session(broker: BrokerSettings, connection_name: str) -> Iterator[tuple[Any, str]]:
    """A connection to the first broker that answers, and where it is; pika's errors inside
    become one-line BrokerErrors, and the connection is closed whatever happens.

    `connection_name` names the connection in the broker's management UI."""
    connection, where = connect_any(broker, connection_name)
    try:
        yield connection, where
    except pika.exceptions.ChannelClosedByBroker as err:
        raise BrokerError(f"the broker at {where} refused: {err.reply_text}") from None
    except pika.exceptions.AMQPError as err:
        raise BrokerError(f"lost the broker at {where}: {one_line(err)}") from None
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            if connection.is_open:
                connection.close()


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
