"""Requests on demand: a running publisher answers whoever asks, at any time.

Consumers that start after a publisher announced itself (or lost the message)
ask instead of waiting for the next announcement: a request goes to the topic
exchange `<exchange>.requests` with routing key `<kind>.<host_id>` or
`<kind>.all`, where the kind is one of:

- `capabilities`, with `reply_to` set to `reply.<anything>`: each publisher
  answers with its latest capabilities message, published to that same exchange
  with the `reply_to` as routing key, where the asker has bound a queue. (Direct
  reply-to would need virtpub to write to the default exchange, that is, to any
  queue: replies through its own exchange keep its permissions to its own names.)
- `snapshot`, with `correlation_id` set to a UUID, the request's id: each
  publisher publishes a fresh snapshot bracket of every backend on the events
  exchange, with reason `requested` and that id on `begin` and `end`. A consumer
  that found a gap in a host's `sequence` asks this instead of waiting for the
  next snapshot.

Requests and replies use a channel of their own, outside confirm mode, so they
never touch the publishing channel's delivery tags; if the broker refuses that
channel (permissions), publishing goes on and the refusal is logged. The queue is
exclusive: after a failover, the dead connection may still hold it until the
broker notices, so a RESOURCE_LOCKED refusal is retried with a bounded backoff.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, Literal

import pika
import pika.spec

from virtpub.amqp.topology import ExchangeSetup
from virtpub.contract.envelope import CONTENT_TYPE

log = logging.getLogger(__name__)

ALL_HOSTS = "all"
REPLY_PREFIX = "reply."
Kind = Literal["capabilities", "snapshot"]
KINDS: tuple[Kind, ...] = ("capabilities", "snapshot")
RESOURCE_LOCKED = 405
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 10.0
"""A refused queue is declared again after 1, 2, 4, 8, then every 10 s: an exclusive queue
left by a dead connection goes once the broker misses its heartbeats (about 30-45 s)."""
_NORMAL_CLOSE_CODES = (None, 0, 200, 320)  # a normal close, or the connection's

SnapshotRequested = Callable[[str], bool]
"""Hands a snapshot request's id to the daemon thread: False if it cannot take more now."""


def requests_exchange(exchange: str) -> str:
    return f"{exchange}.requests"


def request_key(kind: Kind, host_id: str) -> str:
    return f"{kind}.{host_id}"


def request_id(correlation_id: str | None) -> str | None:
    """A snapshot request's id in canonical form, or None if it is not a UUID."""
    try:
        return str(uuid.UUID(correlation_id or ""))
    except ValueError:
        return None


class CapabilityResponder:
    """Serves capabilities and snapshot requests on the broker's I/O thread.

    Each AMQP step is a method: the exchange declared or found (`ExchangeSetup`) ->
    on_exchange_ready -> declare queue -> on_queue_declareok -> bind each key -> on_bindok
    -> consume -> on_consumeok. The channel may close between two steps (its connection closing, a
    refusal), so each step first checks that the channel it continues is still open.
    `answer` is set from the daemon thread.
    """

    def __init__(
        self, exchange: str, host_id: str, on_snapshot_request: SnapshotRequested | None = None
    ) -> None:
        self._exchange = requests_exchange(exchange)
        self._queue = f"{self._exchange}.{host_id}"
        self._keys = tuple(
            request_key(kind, host) for kind in KINDS for host in (host_id, ALL_HOSTS)
        )
        self._on_snapshot_request = on_snapshot_request
        self._connection: Any = None
        self._channel: Any = None
        self._bound = 0
        self._retries = 0
        self.answer: bytes | None = None
        """The latest capabilities message body; replaced whole, so reading it needs no lock."""
        self.answered = 0
        self.snapshots_requested = 0
        self.rejected = 0
        """Requests not served: no valid id, an unknown kind, or too many waiting."""
        self.serving = False

    def counts(self) -> dict[str, int]:
        """Requests served and refused, for the metrics (read from any thread)."""
        return {
            "capabilities_answered": self.answered,
            "snapshot_accepted": self.snapshots_requested,
            "rejected": self.rejected,
        }

    def attach(self, connection: Any) -> None:
        """Starts serving on a fresh connection (I/O thread)."""
        self._connection = connection
        self._retries = 0
        self.open_channel()

    def open_channel(self) -> None:
        """Declares the requests exchange, or uses the one that exists; a refusal is logged
        and publishing goes on."""
        connection = self._connection
        if connection is None or not connection.is_open:
            return
        ExchangeSetup(
            connection,
            self._exchange,
            "topic",
            on_ready=self.on_exchange_ready,
            on_refused=self.on_exchange_refused,
            on_failed=self.on_exchange_refused,
        ).setup_exchange()

    def on_exchange_refused(self, line: str) -> None:
        log.warning("capabilities and snapshot requests are not served: %s", line)

    def on_exchange_ready(self, channel: Any) -> None:
        """The channel the exchange was confirmed on; the request queue is exclusive."""
        self._channel = channel
        self._bound = 0
        channel.add_on_close_callback(self.on_channel_closed)
        channel.queue_declare(
            queue=self._queue,
            exclusive=True,
            auto_delete=True,
            callback=self.on_queue_declareok,
        )

    def on_queue_declareok(self, frame: Any) -> None:
        self.bind_next(self._open_channel_of(frame))

    def bind_next(self, channel: Any) -> None:
        """Binds the next routing key; once all are bound, starts consuming."""
        if channel is None:
            return
        if self._bound < len(self._keys):
            channel.queue_bind(
                queue=self._queue,
                exchange=self._exchange,
                routing_key=self._keys[self._bound],
                callback=self.on_bindok,
            )
        else:
            channel.basic_consume(
                self._queue, self.on_request, auto_ack=True, callback=self.on_consumeok
            )

    def on_bindok(self, frame: Any) -> None:
        self._bound += 1
        self.bind_next(self._open_channel_of(frame))

    def on_consumeok(self, frame: Any) -> None:
        if self._open_channel_of(frame) is None:
            return
        if self._retries:
            log.info("capabilities and snapshot requests are served again")
        self._retries = 0
        self.serving = True

    def _open_channel_of(self, frame: Any) -> Any:
        """The request channel if `frame` is its own and it is still open, else None."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return None
        if getattr(frame, "channel_number", channel.channel_number) != channel.channel_number:
            return None
        return channel

    def on_request(
        self, channel: Any, method: Any, properties: pika.spec.BasicProperties, _body: bytes
    ) -> None:
        try:
            kind = str(method.routing_key).partition(".")[0]
            if kind == "capabilities":
                self.answer_capabilities(channel, properties)
            elif kind == "snapshot":
                self.hand_off_snapshot(properties)
            else:
                self.reject(f"unknown request {method.routing_key!r}")
        except Exception:  # an I/O-thread callback must not raise into pika
            log.exception("could not serve a request")

    def answer_capabilities(self, channel: Any, properties: pika.spec.BasicProperties) -> None:
        answer = self.answer
        reply_to = properties.reply_to or ""
        if not reply_to.startswith(REPLY_PREFIX) or answer is None or not channel.is_open:
            return
        channel.basic_publish(
            exchange=self._exchange,
            routing_key=reply_to,
            body=answer,
            properties=pika.BasicProperties(
                content_type=CONTENT_TYPE, correlation_id=properties.correlation_id
            ),
        )
        self.answered += 1

    def hand_off_snapshot(self, properties: pika.spec.BasicProperties) -> None:
        """Only hands the id over: the daemon thread lists the backends and spools the bracket."""
        identifier = request_id(properties.correlation_id)
        if identifier is None:
            self.reject(
                f"snapshot request without a UUID correlation_id: {properties.correlation_id!r}"
            )
        elif self._on_snapshot_request is None or not self._on_snapshot_request(identifier):
            self.reject(f"snapshot request {identifier} refused: too many requests waiting")
        else:
            self.snapshots_requested += 1

    def reject(self, why: str) -> None:
        self.rejected += 1
        log.warning("%s (%d request(s) rejected so far)", why, self.rejected)

    def on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self.serving = False
        code = getattr(reason, "reply_code", None)
        if code == RESOURCE_LOCKED:
            self.retry_later(reason)
        elif code not in _NORMAL_CLOSE_CODES:
            log.warning("capabilities and snapshot requests are not served: %s", reason)

    def retry_later(self, reason: BaseException) -> None:
        """The queue is still held, by the connection this one replaced: try again soon."""
        connection = self._connection
        if connection is None or not connection.is_open:
            return
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2**self._retries)
        level = logging.WARNING if self._retries == 0 else logging.DEBUG
        log.log(level, "capabilities and snapshot requests are not served yet: %s;"
                " retrying every %g s at most", reason, RETRY_MAX_S)  # fmt: skip
        self._retries += 1
        connection.ioloop.call_later(delay, self.open_channel)
