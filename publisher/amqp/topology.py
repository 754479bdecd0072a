"""Declaring an exchange, or using the one that exists: the rule for every exchange virtpub
declares (the events exchange, its unroutable exchange and the requests exchange).

virtpub declares plainly (durable, no arguments), because a broker refuses a
declaration whose settings differ from the exchange's, in either direction: an
orchestrator that declared `virt.events` first, the way Nova-style consumers do,
must not keep virtpub from starting, and a consumer that declares it plainly
after virtpub did must not be refused either. Anything extra (an alternate
exchange, say) belongs in a policy, which can change without deleting the
exchange.

When the exchange exists with other settings, the broker closes the channel with
406 `inequivalent arg '<setting>'`; a passive declare on a fresh channel then
confirms it exists, and it is used as it is, with one line in the log. Only a
different `type` (RabbitMQ checks it first) is refused for good: messages routed
by another kind of exchange would not reach the consumers' topic bindings.

One `ExchangeSetup` runs on the pika I/O thread for one declaration on one
connection: setup_exchange -> on_channel_open -> on_exchange_declareok, or, on a
406, on_declare_channel_closed -> on_passive_channel_open ->
on_exchange_passive_declareok. The caller gets the channel the exchange was
confirmed on, open, and carries on with it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from virtpub.amqp.connection import one_line

log = logging.getLogger(__name__)

ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406
_INEQUIVALENT = re.compile(r"inequivalent arg '(?P<setting>[^']+)'")
_CURRENT = re.compile(r"current is '(?P<value>[^']*)'")

Ready = Callable[[Any], None]
"""Called with the open channel the exchange was declared (or found) on."""
Refused = Callable[[str], None]
"""Called with one line for the operator."""


def inequivalent_setting(reply_text: str) -> str | None:
    """The setting a 406 names (`type`, `durable`, `alternate-exchange`...), or None when
    the refusal is not about an existing exchange's settings."""
    match = _INEQUIVALENT.search(reply_text)
    return match.group("setting") if match else None


class ExchangeSetup:
    """Declares `exchange` of `exchange_type`, durable, without arguments, on a channel of
    its own, and reports one of three outcomes, once:

    - `on_ready(channel)`: the exchange is there (declared, or found with other settings);
    - `on_refused(line)`: retrying cannot help (another type, or no permission);
    - `on_failed(line)`: anything else the broker closed the channel for; worth a retry.

    Nothing is reported when the connection itself goes away: its own close callback
    deals with that.
    """

    def __init__(
        self,
        connection: Any,
        exchange: str,
        exchange_type: str,
        *,
        on_ready: Ready,
        on_refused: Refused,
        on_failed: Refused,
    ) -> None:
        self._connection = connection
        self._exchange = exchange
        self._type = exchange_type
        self._on_ready = on_ready
        self._on_refused = on_refused
        self._on_failed = on_failed
        self._channel: Any = None
        self._differs = ""
        self._done = False

    def setup_exchange(self) -> None:
        self._connection.channel(on_open_callback=self.on_channel_open)

    def on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self.on_declare_channel_closed)
        channel.exchange_declare(
            exchange=self._exchange,
            exchange_type=self._type,
            durable=True,
            callback=self.on_exchange_declareok,
        )

    def on_exchange_declareok(self, _frame: Any) -> None:
        self._finish(self._on_ready, self._channel)

    def on_declare_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if self._done or not self._connection.is_open:
            return
        code = getattr(reason, "reply_code", None)
        text = str(getattr(reason, "reply_text", "")) or str(reason)
        setting = inequivalent_setting(text) if code == PRECONDITION_FAILED else None
        if setting == "type":
            current = _CURRENT.search(text)
            found = f"a {current.group('value')} exchange" if current else f"another type ({text})"
            self._finish(
                self._on_refused,
                f"exchange {self._exchange!r} exists as {found}, not {self._type}:"
                f" delete it or choose another --exchange",
            )
        elif setting is not None:
            self._differs = setting
            self._connection.channel(on_open_callback=self.on_passive_channel_open)
        else:
            self._report_closed(code, text)

    def on_passive_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self.on_passive_channel_closed)
        channel.exchange_declare(
            exchange=self._exchange, passive=True, callback=self.on_exchange_passive_declareok
        )

    def on_exchange_passive_declareok(self, _frame: Any) -> None:
        log.info(
            "exchange %r exists with a different %r setting from virtpub's: using it as it is",
            self._exchange,
            self._differs,
        )
        self._finish(self._on_ready, self._channel)

    def on_passive_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if self._done or not self._connection.is_open:
            return
        code = getattr(reason, "reply_code", None)
        self._report_closed(code, str(getattr(reason, "reply_text", "")) or str(reason))

    def _report_closed(self, code: int | None, text: str) -> None:
        line = f"exchange {self._exchange!r} not declared: ({code}) {text}"
        if code in (ACCESS_REFUSED, PRECONDITION_FAILED):
            self._finish(self._on_refused, line)
        else:  # 404: deleted between the two declarations, say
            self._finish(self._on_failed, line)

    def _finish(self, outcome: Callable[[Any], None], value: Any) -> None:
        if not self._done:
            self._done = True
            outcome(value)


class Topology:
    """The publishing session's topology, in named steps on the I/O thread: the alternate
    exchange `<exchange>.unroutable` and its queue, then the events exchange, whose channel
    becomes the publishing channel (`on_ready`).

    The alternate exchange itself comes from a policy (an argument on the events
    exchange would make every other declaration of it fail), but virtpub still declares
    what the policy points at: then the one `rabbitmqctl set_policy` line is all an
    operator adds, and a policy never names a missing exchange (the broker would return
    every unroutable message instead). Without a policy they sit unused. Publishing does
    not depend on them: a refusal there is logged and the events exchange is next. A
    refusal of the events exchange is `on_refused` (fatal), a failure `on_failed`.
    """

    def __init__(
        self,
        connection: Any,
        exchange: str,
        unroutable: str,
        *,
        on_ready: Callable[[Any], None],
        on_refused: Callable[[str], None],
        on_failed: Callable[[str], None],
    ) -> None:
        self._connection = connection
        self._exchange = exchange
        self._unroutable = unroutable
        self._on_ready = on_ready
        self._on_refused = on_refused
        self._on_failed = on_failed
        self._setup_channel: Any = None

    def setup_unroutable_exchange(self) -> None:
        ExchangeSetup(
            self._connection,
            self._unroutable,
            "fanout",
            on_ready=self.on_unroutable_exchange_ready,
            on_refused=self.on_unroutable_exchange_refused,
            on_failed=self.on_unroutable_exchange_refused,
        ).setup_exchange()

    def on_unroutable_exchange_refused(self, line: str) -> None:
        log.warning("%s; unroutable messages come back as returns", line)
        self.setup_exchange()

    def on_unroutable_exchange_ready(self, channel: Any) -> None:
        """The alternate exchange's queue, on the channel its exchange was declared on, which
        is closed afterwards: publishing never waits for it again, nor fails with it.

        A quorum queue, so it survives the loss of a cluster node (a classic queue is
        unreachable while its home node is down, and could not even be declared again).
        Where it exists already with other settings (a classic queue from an older setup),
        the broker refuses the declaration: it is kept as it is. While it is missing,
        unroutable messages come back as returns and are kept in the spool.
        """
        self._setup_channel = channel
        channel.add_on_close_callback(self.on_unroutable_channel_closed)
        channel.queue_declare(
            queue=self._unroutable,
            durable=True,
            arguments={"x-queue-type": "quorum"},
            callback=self.on_unroutable_queue_declareok,
        )

    def on_unroutable_queue_declareok(self, _frame: Any) -> None:
        self._setup_channel.queue_bind(
            queue=self._unroutable, exchange=self._unroutable, callback=self.on_unroutable_bindok
        )

    def on_unroutable_bindok(self, _frame: Any) -> None:
        self._setup_channel.close()

    def on_unroutable_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        """Closed after the binding, or by a refusal: either way the events exchange is next,
        unless the connection itself is going away."""
        self._setup_channel = None
        if not self._connection.is_open:
            return
        code = getattr(reason, "reply_code", None)
        if code not in (0, 200):
            log.warning("alternate-exchange queue %r not declared: %s", self._unroutable,
                        one_line(reason))  # fmt: skip
        self.setup_exchange()

    def setup_exchange(self) -> None:
        """The events exchange: topic, durable, no arguments, or the one that exists."""
        ExchangeSetup(
            self._connection,
            self._exchange,
            "topic",
            on_ready=self._on_ready,
            on_refused=self._on_refused,
            on_failed=self._on_failed,
        ).setup_exchange()
