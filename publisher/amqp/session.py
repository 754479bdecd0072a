"""The blocking broker session the tools share: connect to the first broker that answers,
and turn pika's errors into one-line BrokerErrors.

The daemon's connection is asynchronous (publisher/amqp/broker.py); the tools (tail,
archive, inventory, capabilities, snapshot) and consumers block, one connection each.
"""

from __future__ import annotations

import contextlib
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
