"""From publications to the broker: numbers messages, spools them, hands them over in order.

The daemon thread alone owns the sequence counter, the domain trackers and the spool
writes, so message order is the order signals were accepted.

A batch goes to the broker while its spool commit runs, so the commit's fsync is not on
the latency path. Nothing the spool-first order kept is lost: an accepted message is
lost only if virtpub dies before both its commit and its confirm, and the spool lets a
row go only once it is both (`daemon.spool`). Only sequences an earlier commit reserved
go out before their own commit: after an unclean stop the next run starts above the
reservation and says which numbers may be missing (`unclean_stop`), so no number is
ever given to two messages.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from typing import NamedTuple

from virtpub.contract.envelope import Envelope, OutgoingMessage
from virtpub.contract.messages import Message
from virtpub.core.event import ConfigRejected
from virtpub.core.tracker import Publication, Tracker
from virtpub.daemon.overflow import Overflow
from virtpub.daemon.ports import Publisher, SpoolStore
from virtpub.daemon.spool import DomainChanges, SpoolDiskFullError

log = logging.getLogger(__name__)

BROKER_BACKLOG = 2_000
"""Messages held in memory for the broker (queued and in flight); the rest stay in the spool."""
READY_LIMIT = 10_000
"""Messages just spooled and kept in memory for the broker, beyond BROKER_BACKLOG: a
startup snapshot of 10,000 domains goes out without reading the spool back (about
12 MB of bodies and properties)."""
RESERVE_AHEAD = 1_000
"""Sequences each commit reserves for the next batch, which goes out before its own commit.
Bigger batches send the rest after their commit; an unclean stop leaves at most this
many numbers unaccounted for (and says so)."""


class UncleanStop(NamedTuple):
    """The sequences the last run may have published without committing them, first..last."""

    first: int
    last: int

    @property
    def span(self) -> int:
        return self.last - self.first + 1


class Pipeline:
    def __init__(
        self, envelope: Envelope, spool: SpoolStore, publisher: Publisher, overflow: Overflow
    ) -> None:
        self._envelope = envelope
        self._spool = spool
        self._publisher = publisher
        self._overflow = overflow
        self.trackers: dict[str, Tracker] = {}
        self._sequence = 0
        self._handed = 0
        """The sequence of the last message handed to the broker."""
        self._pending: list[OutgoingMessage] = []
        self._unspooled: tuple[list[OutgoingMessage], DomainChanges] | None = None
        """Messages (and the domain records they lead to) a full disk kept out of the spool."""
        self._ready: collections.deque[OutgoingMessage] = collections.deque()
        """Spooled messages not yet handed to the broker, kept so they need not be read back."""
        self.unclean_stop: UncleanStop | None = None
        """Set by `resume` when the last run did not stop cleanly."""

    def resume(self, backends: Iterable[str]) -> None:
        """Carries on from what the spool holds: its sequence, its records, its unsent messages."""
        spool = self._spool
        self._sequence = spool.last_sequence()
        known = spool.domains()
        self.trackers = {b: Tracker(b, known.get(b)) for b in backends}
        reserved = spool.reserved_sequence()
        if reserved > self._sequence:
            self.unclean_stop = UncleanStop(self._sequence + 1, reserved)
            log.warning(
                "the last run did not stop cleanly: sequences %d-%d may have been published"
                " without being spooled; continuing after them",
                *self.unclean_stop,
            )
            for tracker in self.trackers.values():
                tracker.skip_seqs(self.unclean_stop.span)
            self._sequence = reserved
        leftovers = spool.count()
        if leftovers:
            log.info("resending %d message(s) left in the spool", leftovers)
        self._handed = spool.first_sequence() - 1 if leftovers else self._sequence

    @property
    def behind(self) -> bool:
        """Whether some spooled message has not been handed to the broker yet."""
        return self._handed < self._sequence

    @property
    def holding(self) -> bool:
        """Whether a full disk holds messages out of the spool."""
        return self._unspooled is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add_domain(self, publications: list[Publication]) -> None:
        for publication in publications:
            self._sequence += 1
            self._pending.append(self._envelope.domain_event(publication, self._sequence))

    def add_publisher(self, message: Message, received_at: float) -> OutgoingMessage:
        self._sequence += 1
        outgoing = self._envelope.publisher_message(message, self._sequence, received_at)
        self._pending.append(outgoing)
        return outgoing

    def add_config_invalid(self, signal: ConfigRejected) -> None:
        self._sequence += 1
        self._pending.append(self._envelope.config_invalid(signal, self._sequence))

    def settle(self, now: float) -> None:
        """What the trackers held back (debounced transitions) and is now due."""
        for tracker in self.trackers.values():
            self.add_domain(tracker.settle(now))

    def commit(self) -> None:
        """Spools the pending messages with the domain records they lead to, in one transaction."""
        if self._unspooled is not None:
            messages, changes = self._unspooled
        elif self._pending:
            messages, self._pending = self._pending, []
            changes = {backend: t.take_changes() for backend, t in self.trackers.items()}
        else:
            return
        excess = self._overflow.excess(self._spool.used_bytes, messages)
        early = self._hand_early(messages) if excess <= 0 else 0
        try:
            self._make_room(excess)
            self._spool.append(messages, changes, reserve=RESERVE_AHEAD)
        except SpoolDiskFullError as err:
            if self._unspooled is None:
                log.error(
                    "%s; holding %d message(s) and taking no new events until there is room",
                    err,
                    len(messages),
                )
            self._unspooled = messages, changes
            return
        if self._unspooled is not None:
            self._unspooled = None
            log.info("spool: room again; %d held message(s) spooled", len(messages))
        self.feed(messages[early:])

    def _hand_early(self, messages: list[OutgoingMessage]) -> int:
        """Hands the broker, before their commit, as many of `messages` as an earlier commit
        reserved sequences for, if nothing spooled waits before them and it has room;
        returns how many."""
        if messages[0].sequence != self._handed + 1:
            return 0
        room = BROKER_BACKLOG - self._publisher.unconfirmed()
        reserved = self._spool.reserved_sequence()
        count = 0
        for message in messages[:room]:
            if message.sequence > reserved:
                break
            count += 1
        if count:
            self._publisher.submit(messages[:count])
            self._handed = messages[count - 1].sequence
        return count

    def release(self) -> None:
        """At a clean stop, every accepted message spooled: the reservation is given back."""
        self._spool.release_reservation()

    def commit_held(self) -> bool:
        """At shutdown: spools what a full disk held back; False if the disk is still full."""
        self.commit()
        if self._unspooled is not None:
            log.error(
                "could not spool %d held message(s) at shutdown: the disk is still full",
                len(self._unspooled[0]),
            )
            return False
        return True

    def _make_room(self, excess: int) -> None:
        """Under `drop-oldest`: drops the oldest messages not yet sent to the broker, until
        `excess` bytes are free.

        Messages in flight stay: the broker may have them already.
        """
        if excess <= 0:
            return
        unsent = self._publisher.withdraw()
        if unsent is not None:
            self._handed = unsent - 1
        self._ready.clear()  # some of it may be dropped now
        self._overflow.note_dropped(self._spool.drop_oldest(self._handed, excess))

    def feed(self, fresh: list[OutgoingMessage] | None = None) -> None:
        """Hands the broker what the spool holds and it has not seen, while it has room, up
        to what is committed or reserved (the rest goes once the spool says it moved).

        The spool is the buffer: in a burst or an outage memory holds at most
        BROKER_BACKLOG messages for the broker and READY_LIMIT just spooled (so the
        common case reads nothing back); the rest waits on disk and is read back in
        order, once what memory holds has gone.
        """
        ready = self._ready
        if fresh:
            last = ready[-1].sequence if ready else self._handed
            if fresh[0].sequence == last + 1:
                ready.extend(fresh[: READY_LIMIT - len(ready)])
        room = BROKER_BACKLOG - self._publisher.unconfirmed()
        sendable = self._spool.reserved_sequence()  # committed, or within a reservation
        if room <= 0 or self._handed >= min(self._sequence, sendable):
            return
        if ready and ready[0].sequence == self._handed + 1:
            batch: list[OutgoingMessage] = []
            while ready and len(batch) < room and ready[0].sequence <= sendable:
                batch.append(ready.popleft())
        else:
            ready.clear()
            batch = [m for m in self._spool.after(self._handed, room) if m.sequence <= sendable]
        if batch:
            self._publisher.submit(batch)
            self._handed = batch[-1].sequence
