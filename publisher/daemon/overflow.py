"""The spool-full policies and what they lost: `block` stops taking signals, `drop-oldest`
drops the oldest unsent messages; each loss is told once, at a bounded rate."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from virtpub.contract.envelope import OutgoingMessage
from virtpub.core.drops import Tally
from virtpub.daemon.announcements import DropReason
from virtpub.daemon.spool import DroppedRange, stored_size
from virtpub.daemon.status import Status

log = logging.getLogger(__name__)

DROP_REPORT_INTERVAL_S = 1.0
"""At most one publisher.dropped (and the snapshot after it) per interval under sustained loss."""


@dataclass(frozen=True, slots=True)
class DropReport:
    reason: DropReason
    lost: Tally
    sequences: DroppedRange | None
    """The spooled messages dropped, for a full spool; None for a full queue."""


class Overflow:
    """Decides, from the spool's size alone, whether to block or what to drop; keeps the drops."""

    def __init__(
        self, policy: str, max_bytes: int, status: Status, backends: frozenset[str]
    ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self._status = status
        self._backends = backends
        self._spool_drops: list[DroppedRange] = []
        self._next_report = 0.0

    def blocks(self, used_bytes: int) -> bool:
        """Under `block`, whether to stop taking signals; `drop-oldest` makes room instead."""
        return self.policy == "block" and used_bytes >= self.max_bytes

    def excess(self, used_bytes: int, incoming: Iterable[OutgoingMessage]) -> int:
        """Under `drop-oldest`, the bytes to drop before `incoming` fits (0: none)."""
        if self.policy != "drop-oldest":
            return 0
        return max(0, used_bytes + sum(map(stored_size, incoming)) - self.max_bytes)

    def note_dropped(self, dropped: list[DroppedRange]) -> None:
        for span in dropped:
            log.error(
                "spool full: dropped %d unsent message(s), sequences %d-%d",
                span.count,
                span.first,
                span.last,
            )
        self._spool_drops = DroppedRange.merge([*self._spool_drops, *dropped])
        self._status.spool_dropped += sum(span.count for span in dropped)

    def due_reports(self, now: float, used_bytes: int) -> list[DropReport]:
        """At most once an interval: every loss not yet told.

        Drops from a full spool are told once it has drained to half: told earlier, the
        report and its snapshot would only push out more messages, and be told again.
        """
        if now < self._next_report:
            return []
        reports: list[DropReport] = []
        queued = self._status.queue_drops.take()
        if queued is not None:
            reports.append(DropReport("queue_full", queued, None))
        if used_bytes < self.max_bytes // 2:
            for span in self._spool_drops:
                tally = Tally(span.count, dict(span.types), self._backends, span.at)
                reports.append(DropReport("spool_full", tally, span))
            self._spool_drops = []
        if reports:
            self._next_report = now + DROP_REPORT_INTERVAL_S
        return reports
