"""Capabilities on request: a running publisher answers whoever asks, at any time.

Consumers that start after a publisher announced itself (or lost the message)
ask instead of waiting for the next announcement: a request goes to the topic
exchange `<exchange>.requests` with routing key `capabilities.<host_id>` or
`capabilities.all` and `reply_to` set to `reply.<anything>`; each publisher
answers with its latest capabilities message, published to that same exchange
with the `reply_to` as routing key, where the asker has bound a queue. (Direct
reply-to would need virtpub to write to the default exchange, that is, to any
queue: replies through its own exchange keep its permissions to its own names.)
Requests and replies use a channel of their own, outside confirm mode, so they
never touch the publishing channel's delivery tags; if the broker refuses that
channel (permissions), publishing goes on and the refusal is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import pika
import pika.spec

from publisher.envelope import CONTENT_TYPE
from publisher.topology import ExchangeSetup

log = logging.getLogger(__name__)

ALL_HOSTS = "all"
REPLY_PREFIX = "reply."


def requests_exchange(exchange: str) -> str:
    return f"{exchange}.requests"


def request_key(host_id: str) -> str:
    return f"capabilities.{host_id}"


class CapabilityResponder:
    """Lives on the broker's I/O thread; `answer` is set from the daemon thread."""

    def __init__(self, exchange: str, host_id: str) -> None:
        self._exchange = requests_exchange(exchange)
        self._queue = f"{self._exchange}.{host_id}"
        self._keys = (request_key(host_id), request_key(ALL_HOSTS))
        self._channel: Any = None
        self.answer: bytes | None = None
        """The latest capabilities message body; replaced whole, so reading it needs no lock."""
        self.answered = 0

    def attach(self, connection: Any) -> None:
        """Declares the requests exchange, or uses the one that exists, on a fresh connection
        (I/O thread); a refusal is logged and publishing goes on."""
        ExchangeSetup(
            connection,
            self._exchange,
            "topic",
            on_ready=self._on_channel_open,
            on_refused=self._on_exchange_refused,
            on_failed=self._on_exchange_refused,
        ).setup_exchange()

    def _on_exchange_refused(self, line: str) -> None:
        log.warning("capabilities requests are not served: %s", line)

    def _on_channel_open(self, channel: Any) -> None:
        """The channel the exchange was confirmed on; the request queue is exclusive."""
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.queue_declare(
            queue=self._queue, exclusive=True, auto_delete=True, callback=self._bind
        )

    def _bind(self, _frame: Any, remaining: int = 0) -> None:
        channel = self._channel
        if remaining < len(self._keys):
            channel.queue_bind(
                queue=self._queue,
                exchange=self._exchange,
                routing_key=self._keys[remaining],
                callback=lambda f: self._bind(f, remaining + 1),
            )
            return
        channel.basic_consume(self._queue, self._on_request, auto_ack=True)

    def _on_request(
        self, channel: Any, _method: Any, properties: pika.spec.BasicProperties, _body: bytes
    ) -> None:
        answer = self.answer
        reply_to = properties.reply_to or ""
        if not reply_to.startswith(REPLY_PREFIX) or answer is None:
            return
        try:
            channel.basic_publish(
                exchange=self._exchange,
                routing_key=reply_to,
                body=answer,
                properties=pika.BasicProperties(
                    content_type=CONTENT_TYPE, correlation_id=properties.correlation_id
                ),
            )
            self.answered += 1
        except Exception:  # an I/O-thread callback must not raise into pika
            log.exception("could not answer a capabilities request")

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        self._channel = None
        code = getattr(reason, "reply_code", None)
        if code not in (None, 0, 200, 320):  # not a normal close, nor the connection's
            log.warning("capabilities requests are not served: %s", reason)
