"""The connection to RabbitMQ: one dedicated I/O thread, URL rotation, failover.

A pika connection belongs to one thread; other threads only append to the
confirm window's queue (`amqp.window`) and wake the I/O loop with
`add_callback_threadsafe`, pika's one thread-safe call. This module runs the
connection: it opens it (topology in `amqp.topology`), watches that it is alive,
holds publishing while the broker blocks it, and hands the window's confirms and
returns on. A message leaves the spool only when the broker acks it; when a
connection or channel is lost, every unconfirmed message goes back to the front
of the queue in its original order and is resent with the same id.

Whether to retry is decided by exception class: a broker that cannot be
reached is retried with tenacity's exponential backoff and jitter, while
refused credentials, a denied vhost or an exchange of another type stop the
publisher with one line for the operator. An exchange that exists with other
settings is used as it is (publisher.topology).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import pika
import pika.exceptions
import pika.spec

from virtpub.amqp import frames
from virtpub.amqp.connection import (
    BrokerFatalError,
    BrokerUnavailableError,
    connection_parameters,
    open_error,
)
from virtpub.amqp.connection import one_line as _one_line
from virtpub.amqp.requests import CapabilityResponder
from virtpub.amqp.topology import Topology
from virtpub.amqp.window import DEFAULT_SIZE, ConfirmWindow
from virtpub.config import Settings
from virtpub.contract.envelope import APP_ID, OutgoingMessage
from virtpub.core import retry
from virtpub.core.latency import LatencyHistogram
from virtpub.core.redact import redact_url

log = logging.getLogger(__name__)

NACK_RECONNECT_AFTER = 3
"""Refusals in a row, no ack between, after which the connection is replaced: a channel
can keep refusing where a fresh one is served (a quorum queue whose leader moved)."""
CONFIRM_STALL_S = 5.0
"""Messages in flight and not one confirm for this long: the connection is taken for dead."""
WATCH_INTERVAL_S = 0.5
CLOSE_GRACE_S = 1.0
"""How long a clean close of a dead connection may take before its transport is aborted."""
_FATAL_REPLY_CODES = frozenset({403, 406})  # ACCESS_REFUSED, PRECONDITION_FAILED

Confirmed = Callable[[list[OutgoingMessage]], None]


class SettledMessages(Protocol):
    """Where the I/O thread hands what the broker settled: the spool, which forgets a
    confirmed message and keeps a returned one. Both calls return at once."""

    def remove(self, messages: Iterable[OutgoingMessage]) -> None: ...

    def keep_returned(self, message: OutgoingMessage, reply_code: int, reply_text: str) -> None: ...


class Broker:
    def __init__(
        self,
        settings: Settings,
        spool: SettledMessages,
        *,
        on_confirmed: Confirmed | None = None,
        on_reconnected: Callable[[], None] | None = None,
        window: int = DEFAULT_SIZE,
        connection_name: str = APP_ID,
        responder: CapabilityResponder | None = None,
    ) -> None:
        self._settings = settings
        self._urls = settings.amqp_urls
        self._exchange = settings.exchange
        self._unroutable = settings.unroutable_exchange
        self._spool = spool
        self._on_confirmed = on_confirmed
        self._on_reconnected = on_reconnected
        self._connection_name = connection_name
        self._window = ConfirmWindow(window)
        self._responder = responder
        self._stop = threading.Event()
        self._fatal: str | None = None

        # Owned by the I/O thread.
        self._connection: Any = None
        self._channel: Any = None
        """The channel the alternate exchange's queue is declared on, until it closes."""
        self._blocked = False
        self._pump_scheduled = False
        self._session_error: BaseException | None = None
        self._url_index = 0
        self._url = ""
        self._session_ready = False
        self._connected_before = False
        """Owned by the I/O thread: a later connection is a reconnect, to be announced."""
        self._first_attempt_done = threading.Event()
        self._resend_pending = False
        """A resend after a nack waits out its backoff: nothing is published meanwhile."""
        self._heard_bytes = 0
        self._heard_at = 0.0

        self.returned = 0
        self._warned_unroutable = False
        """Whether the first return has been explained in the log (once per process)."""
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="amqp-io", daemon=True)

    # -- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_first_attempt(self, timeout: float) -> None:
        """Waits for the first connection attempt to conclude.

        Refused credentials raise BrokerFatalError here, before anything else starts; an
        unreachable broker does not: events are spooled while it is retried.
        """
        self._first_attempt_done.wait(timeout)
        if self._fatal is not None:
            raise BrokerFatalError(self._fatal)

    @property
    def fatal(self) -> str | None:
        return self._fatal

    def submit(self, messages: Iterable[OutgoingMessage]) -> None:
        self._window.submit(messages)
        self._wake()

    def withdraw(self) -> int | None:
        """See ConfirmWindow.withdraw."""
        return self._window.withdraw()

    @property
    def ready(self) -> bool:
        """Connected, in confirm mode and not blocked by a resource alarm."""
        return self._session_ready and not self._blocked

    @property
    def published(self) -> int:
        return self._window.published

    @property
    def confirmed(self) -> int:
        return self._window.confirmed

    @property
    def nacked(self) -> int:
        return self._window.nacked

    @property
    def latency(self) -> LatencyHistogram:
        """From an event's reception to its confirm."""
        return self._window.latency

    def counts(self) -> dict[str, int]:
        return {
            "published": self.published,
            "confirmed": self.confirmed,
            "nacked": self.nacked,
            "returned": self.returned,
            "reconnects": self.reconnects,
        }

    def unconfirmed(self) -> int:
        return self._window.unconfirmed()

    def drain(self, timeout: float) -> bool:
        """Waits until every submitted message is confirmed; False if time ran out."""
        if not self._thread.is_alive():
            return self.unconfirmed() == 0
        return self._window.wait_settled(timeout, given_up=lambda: self._fatal is not None)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._call_soon(self._close_connection)
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        self._call_soon(self._pump)

    def _call_soon(self, callback: Callable[[], None]) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            connection.ioloop.add_callback_threadsafe(callback)
        except (pika.exceptions.AMQPError, RuntimeError, AttributeError) as err:
            log.debug("I/O loop not accepting callbacks: %s", err)

    # -- I/O thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for attempt in retry.until_stopped(
                    BrokerUnavailableError, self._stop, "broker", log
                ):
                    with attempt:
                        self._session(self._next_url())
            except BrokerFatalError as err:
                self._fatal = str(err)
                self._window.wake_waiters()
                return
            except BrokerUnavailableError:
                return  # stop was requested during backoff
            finally:
                self._first_attempt_done.set()

    def _next_url(self) -> str:
        url = self._urls[self._url_index % len(self._urls)]
        self._url_index += 1
        return url

    def _session(self, url: str) -> None:
        """Runs one connection until it closes. Returns normally if it was usable for a while,
        so the next outage starts its backoff afresh."""
        self._session_error = None
        self._url = redact_url(url)
        self._connection = pika.SelectConnection(
            connection_parameters(url, self._connection_name, self._settings),
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self._connection.ioloop.start()
        self._first_attempt_done.set()
        error, self._session_error = self._session_error, None
        if isinstance(error, BrokerFatalError):
            raise error
        if isinstance(error, BrokerUnavailableError) and not self._session_ready:
            raise error
        if error is not None and not self._stop.is_set():
            self.reconnects += 1
            log.warning("lost the broker at %s: %s; reconnecting", self._url, error)

    def _on_connection_open(self, connection: Any) -> None:
        self._session_ready = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        Topology(
            connection,
            self._exchange,
            self._unroutable,
            on_ready=self._on_channel_open,
            on_refused=self.on_exchange_refused,
            on_failed=self.on_exchange_failed,
        ).setup_unroutable_exchange()

    def _on_connection_open_error(self, connection: Any, err: BaseException) -> None:
        self._session_ready = False
        self._session_error = open_error(err, self._url)
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        self._channel = None
        self._window.requeue()
        if self._session_error is None and not self._stop.is_set():
            self._session_error = BrokerUnavailableError(_one_line(reason))
        connection.ioloop.stop()

    def on_exchange_refused(self, line: str) -> None:
        self._session_error = BrokerFatalError(f"broker at {self._url}: {line}")
        self._connection.close()

    def on_exchange_failed(self, line: str) -> None:
        self._session_error = BrokerUnavailableError(f"{self._url}: {line}")
        self._connection.close()

    def _on_channel_open(self, channel: Any) -> None:
        """The channel the events exchange was confirmed on becomes the publishing channel."""
        self._channel = channel
        self._window.new_channel()
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        self._session_ready = True
        log.info("connected to broker %s, exchange %r", self._url, self._exchange)
        if self._connected_before and self._on_reconnected is not None:
            self._on_reconnected()
        self._connected_before = True
        if self._responder is not None:
            self._responder.attach(self._connection)
        self._first_attempt_done.set()
        self._resend_pending = False
        self._heard_bytes, self._heard_at = self._connection.bytes_received, time.monotonic()
        self._connection.ioloop.call_later(WATCH_INTERVAL_S, self._watch_connection)
        self._pump()

    def _watch_connection(self) -> None:
        """Every WATCH_INTERVAL_S on the I/O thread: is the broker still there?

        A partition that drops packets closes nothing, and pika's own heartbeat check
        takes up to twice the heartbeat plus 5 s to notice. Confirms that stop coming
        while messages are in flight (and the broker has not blocked us) are the
        fastest sign; on an idle connection, a heartbeat's worth of silence is (the
        broker sends one every half heartbeat).
        """
        connection = self._connection
        if connection is None or not connection.is_open or not self._session_ready:
            return
        now = time.monotonic()
        if connection.bytes_received != self._heard_bytes:
            self._heard_bytes, self._heard_at = connection.bytes_received, now
        heartbeat = connection.params.heartbeat or 0
        overdue = self._window.overdue_s()
        if not self._blocked and overdue > CONFIRM_STALL_S:
            self._abandon(f"no confirm for {overdue:.1f} s with"
                          f" {self._window.awaiting} message(s) in flight")  # fmt: skip
        elif heartbeat > 0 and now - self._heard_at > heartbeat:
            self._abandon(
                f"nothing heard for {now - self._heard_at:.1f} s (heartbeat {heartbeat} s)"
            )
        else:
            connection.ioloop.call_later(WATCH_INTERVAL_S, self._watch_connection)

    def _abandon(self, why: str) -> None:
        """Takes a silent connection for dead: closes it, and aborts its transport if the
        close is not done within CLOSE_GRACE_S (a dead peer never answers Connection.Close,
        and TCP's own timeouts take minutes). Unconfirmed messages go back to the queue."""
        connection = self._connection
        log.warning("broker %s is silent: %s; failing over", self._url, why)
        self._session_error = BrokerUnavailableError(f"silent broker: {why}")
        connection.close(reply_text=f"virtpub: {why}")
        connection.ioloop.call_later(CLOSE_GRACE_S, functools.partial(self._abort, connection, why))

    def _abort(self, connection: Any, why: str) -> None:
        if connection is self._connection and not connection.is_closed:
            log.warning(
                "broker %s: clean close did not complete; aborting the connection", self._url
            )
            frames.abort(connection, why)

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if self._channel is channel:
            self._channel = None
        self._window.requeue()
        code = getattr(reason, "reply_code", None)
        if code in _FATAL_REPLY_CODES and not self._session_ready:
            self._session_error = BrokerFatalError(
                f"broker at {self._url} refused the topology for exchange {self._exchange!r}:"
                f" {_one_line(reason)}"
            )
        elif self._session_error is None and not self._stop.is_set():
            self._session_error = BrokerUnavailableError(f"channel closed: {_one_line(reason)}")
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_blocked(self, _connection: Any, _frame: Any) -> None:
        self._blocked = True
        log.warning("broker %s blocked publishing (resource alarm); holding messages", self._url)

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        self._blocked = False
        self._window.restart_stall_clock()
        log.info("broker %s unblocked publishing", self._url)
        self._pump()

    def _pump(self) -> None:
        channel = self._channel
        # Not before confirm mode is on: delivery tags count from confirm.select, and a
        # message published earlier would never be acked.
        if channel is None or not channel.is_open or self._blocked or not self._session_ready:
            return
        if self._resend_pending:
            return
        batch = self._window.take()
        if batch:
            # One write for the batch, frames encoded here rather than by basic_publish:
            # pika's frame objects cost more than everything else on this thread.
            frames.write_publishes(self._connection, channel.channel_number, self._exchange, batch)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Ack):
            if self._window.nack(method.delivery_tag, method.multiple):
                self._resend_refused()
            return
        settled = self._window.ack(method.delivery_tag, method.multiple)
        self._spool.remove(settled)
        if self._on_confirmed is not None:
            self._on_confirmed(settled)
        self._window.wake_waiters()
        self._resend_refused()
        self._pump()

    def _resend_refused(self) -> None:
        """Once no confirm is due any more, the refused messages are back in front (see
        ConfirmWindow.nack); the pump resumes after a backoff that grows with each
        refusal, and a channel that keeps refusing is replaced."""
        if self._resend_pending:
            return
        count = self._window.resend_refused()
        if not count:
            return
        streak = self._window.nack_streak
        if streak % NACK_RECONNECT_AFTER == 0:
            log.warning("broker refused %d message(s) (nack), %d times in a row; resending in"
                        " order on a new connection", count, streak)  # fmt: skip
            self._session_ready = False  # so the reconnect waits out a backoff
            self._session_error = BrokerUnavailableError("the broker keeps refusing (nack)")
            self._close_connection()
            return
        delay = retry.backoff_s(streak - 1)
        log.warning("broker refused %d message(s) (nack); resending in order in %.1f s",
                    count, delay)  # fmt: skip
        self._resend_pending = True
        self._connection.ioloop.call_later(delay, self._on_resend_due)

    def _on_resend_due(self) -> None:
        self._resend_pending = False
        self._pump()

    def _on_return(self, _channel: Any, method: Any, props: Any, _body: bytes) -> None:
        """A message no binding matched and no alternate exchange took (no policy sets one,
        or its queue was deleted) comes back before its ack, which would otherwise delete
        the one copy: it is kept in the spool's returned table and counted.

        The first return says why; later ones are only counted
        (`virtpub_messages_returned`): without a policy every unmatched message comes
        back, and a line each would bury the log.
        """
        self.returned += 1
        message = self._window.in_flight(props.message_id)
        if message is None:
            log.warning("broker returned message %s, which is not in flight", props.message_id)
            return
        self._spool.keep_returned(message, method.reply_code, method.reply_text)
        if self._warned_unroutable:
            return
        self._warned_unroutable = True
        log.warning(
            "broker returned message %s as unroutable (routing key %s, %s): no binding matched"
            " and no alternate exchange took it (set one with a policy on %r, see the README);"
            " kept in the spool's returned table, later returns are only counted",
            props.message_id,
            method.routing_key,
            method.reply_text,
            self._exchange,
        )

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()
            why = "stopping"
            connection.ioloop.call_later(
                CLOSE_GRACE_S, functools.partial(self._abort, connection, why)
            )
        elif connection is not None and not connection.is_closing:
            connection.ioloop.stop()
