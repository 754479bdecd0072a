"""The publisher-confirm window: what virtpub owes the broker and what the broker owes back.

The rules of pipelined confirms, with no socket in sight, so they can be tested message
by message: which messages go out next and under which delivery tag, which ones an ack
or a nack settles, and how unconfirmed messages go back to the front of the queue in
their original order when a channel is lost or a refusal is to be resent.

Threads. `submit`, `withdraw`, `unconfirmed` and `wait_settled` are safe on any thread;
every other method belongs to the thread that owns the connection (`amqp.broker`'s I/O
thread). The condition guards the queues the other threads read; counters are written by
the I/O thread only and read anywhere.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from virtpub.contract.envelope import OutgoingMessage
from virtpub.core.latency import LatencyHistogram

DEFAULT_SIZE = 1000
NACK_CAREFUL_S = 10.0
"""One message at a time for this long after a nack: none overtakes a refused one."""

Entry = tuple[int, OutgoingMessage]
"""(delivery tag, message)."""


class ConfirmWindow:
    def __init__(
        self, size: int = DEFAULT_SIZE, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.size = size
        self._monotonic = monotonic
        self._lock = threading.Condition()
        self._outbound: collections.deque[OutgoingMessage] = collections.deque()
        self._in_flight: collections.deque[Entry] = collections.deque()
        """Tags ascending: acks settle from the left."""
        self._refused: list[Entry] = []
        """Nacked on the current channel, waiting for every confirm still due."""
        self._next_tag = 0
        self._careful_until = 0.0
        self._stalled_since = 0.0
        """When the oldest confirm still awaited became due (a publish or the last confirm)."""
        self.nack_streak = 0
        """Resends after a refusal with no ack between them."""
        self.published = 0
        self.confirmed = 0
        self.nacked = 0
        self.latency = LatencyHistogram()

    # -- any thread ---------------------------------------------------------------------------

    def submit(self, messages: Iterable[OutgoingMessage]) -> None:
        with self._lock:
            self._outbound.extend(messages)

    def withdraw(self) -> int | None:
        """Takes back every message not yet published; returns the first one's sequence.

        Lets the drop-oldest policy drop messages handed over during an outage: the
        spool still has them, and they are handed over again (or dropped) from there.
        """
        with self._lock:
            if not self._outbound:
                return None
            first = self._outbound[0].sequence
            self._outbound.clear()
            return first

    def unconfirmed(self) -> int:
        with self._lock:
            return len(self._outbound) + len(self._in_flight) + len(self._refused)

    def wait_settled(self, timeout: float, given_up: Callable[[], bool]) -> bool:
        """Waits until every submitted message is confirmed, or until `given_up()`; True only
        in the first case."""
        with self._lock:
            settled = self._lock.wait_for(
                lambda: not (self._outbound or self._in_flight or self._refused) or given_up(),
                timeout,
            )
        return settled and not given_up()

    def wake_waiters(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- the connection's thread --------------------------------------------------------------

    def new_channel(self) -> None:
        """Delivery tags count from 1 again on a channel put in confirm mode."""
        self._next_tag = 0

    def take(self) -> list[OutgoingMessage]:
        """The next messages to publish, now tagged as in flight: as many as the window has
        room for, one at a time while careful after a nack, none while a refusal waits."""
        if self._refused:
            return []
        size = 1 if self._monotonic() < self._careful_until else self.size
        room = size - len(self._in_flight)
        if room <= 0:
            return []
        with self._lock:
            batch = [self._outbound.popleft() for _ in range(min(room, len(self._outbound)))]
        if not batch:
            return batch
        if not self._in_flight:
            self._stalled_since = self._monotonic()
        for message in batch:
            self._next_tag += 1
            self._in_flight.append((self._next_tag, message))
        self.published += len(batch)
        return batch

    def ack(self, tag: int, multiple: bool) -> list[OutgoingMessage]:
        """The messages an ack settles. Acks of messages routed to different queues may
        come out of order, so a single ack is looked for beyond the oldest."""
        self._stalled_since = self._monotonic()
        self.nack_streak = 0
        in_flight = self._in_flight
        settled: list[OutgoingMessage] = []
        if multiple:
            while in_flight and in_flight[0][0] <= tag:
                settled.append(in_flight.popleft()[1])
        elif in_flight and in_flight[0][0] == tag:
            settled.append(in_flight.popleft()[1])
        else:
            entry = next((e for e in in_flight if e[0] == tag), None)
            if entry is not None:
                in_flight.remove(entry)
                settled.append(entry[1])
        self.confirmed += len(settled)
        now = time.time()
        for message in settled:
            if message.received_at:
                self.latency.observe(now - message.received_at)
        return settled

    def nack(self, tag: int, multiple: bool) -> int:
        """Sets the refused messages aside and returns how many. They are resent first, once
        every confirm due before them has come (`resend_refused`), and one message at a
        time for NACK_CAREFUL_S, so no later message reaches a queue before a refused one.
        Messages already in flight at the first nack are the broker's to take or refuse."""
        self._stalled_since = self._monotonic()
        refused = [e for e in self._in_flight if (e[0] <= tag if multiple else e[0] == tag)]
        if not refused:
            return 0
        with self._lock:
            for entry in refused:
                self._in_flight.remove(entry)
            self._refused.extend(refused)
        self.nacked += len(refused)
        self._careful_until = self._monotonic() + NACK_CAREFUL_S
        return len(refused)

    def resend_refused(self) -> int:
        """Once no confirm is due any more, puts the refused messages back in front, in their
        order, counts one more refusal in the streak and returns how many; else 0."""
        if not self._refused or self._in_flight:
            return 0
        count = len(self._refused)
        self.requeue()
        self.nack_streak += 1
        return count

    def requeue(self) -> None:
        """Every unconfirmed message, refused or in flight, back in front in its order: the
        channel they were published on is gone, or a refusal is to be resent."""
        if not self._in_flight and not self._refused:
            return
        with self._lock:
            pending = sorted([*self._refused, *self._in_flight], key=lambda e: e[0])
            self._refused.clear()
            self._in_flight.clear()
            self._outbound.extendleft(reversed([m for _, m in pending]))

    def in_flight(self, message_id: str) -> OutgoingMessage | None:
        return next((m for _, m in self._in_flight if m.id == message_id), None)

    @property
    def awaiting(self) -> int:
        """Messages published and not yet confirmed or refused."""
        return len(self._in_flight)

    def overdue_s(self) -> float:
        """How long the oldest confirm due has been awaited; 0 with nothing in flight."""
        if not self._in_flight:
            return 0.0
        return self._monotonic() - self._stalled_since

    def restart_stall_clock(self) -> None:
        """Confirms were not due while the broker blocked publishing."""
        self._stalled_since = self._monotonic()
