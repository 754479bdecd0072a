"""The blocking broker session the tools and consumers share: connect to the first broker
that answers, turn pika's errors into one-line BrokerErrors, and send publishers requests
(capabilities, snapshots) on `<exchange>.requests`.

The daemon's connection is asynchronous (publisher/amqp/broker.py); the tools (tail,
archive, inventory, capabilities, snapshot) and consumers block, one connection each.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions

from virtpub.amqp.connection import (
    BrokerError,
    BrokerUnavailableError,
    connection_parameters,
    one_line,
    open_error,
)
from virtpub.amqp.requests import Kind, request_key, requests_exchange
from virtpub.config import BrokerSettings
from virtpub.core.redact import redact_url


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


def check_requests_exchange(channel: Any, exchange: str) -> None:
    """A request published to a missing exchange would close the channel with a bare 404."""
    with missing_means(
        f"no publisher has ever served requests on exchange {exchange!r}"
        f" ({requests_exchange(exchange)} does not exist)"
    ):
        channel.exchange_declare(requests_exchange(exchange), passive=True)


def send_request(
    channel: Any, exchange: str, kind: Kind, host: str, properties: pika.BasicProperties
) -> None:
    channel.basic_publish(requests_exchange(exchange), request_key(kind, host), b"", properties)


def request_snapshot(channel: Any, exchange: str, host: str, request_id: str) -> None:
    """Asks `host`'s publisher (or every one, for ALL_HOSTS) for a fresh snapshot bracket
    carrying `request_id`."""
    properties = pika.BasicProperties(correlation_id=request_id)
    send_request(channel, exchange, "snapshot", host, properties)


class SnapshotRequester:
    """Asks for a snapshot of a host at most once per `interval` seconds, on a channel of its
    own: a refusal closes only that channel, which the next request opens again."""

    def __init__(self, connection: Any, exchange: str, interval: float) -> None:
        self._connection = connection
        self._exchange = exchange
        self._interval = interval
        self._channel: Any = None
        self._asked: dict[str, float] = {}

    def request(self, host: str) -> str | None:
        """The new request's id, or None if `host` was asked less than `interval` ago.

        Raises BrokerError if no publisher serves requests on the exchange, or the broker
        refuses this user the requests exchange; the reading channel is not affected.
        """
        now = time.monotonic()
        if now - self._asked.get(host, -self._interval) < self._interval:
            return None
        self._asked[host] = now
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
        try:
            check_requests_exchange(self._channel, self._exchange)
        except pika.exceptions.ChannelClosedByBroker as err:
            raise BrokerError(f"the broker refused: {err.reply_text}") from None
        request_id = str(uuid.uuid4())
        request_snapshot(self._channel, self._exchange, host, request_id)
        return request_id
