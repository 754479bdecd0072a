"""Listings turned into messages: resync after a gap, snapshots on request, polling.

The daemon thread alone talks to a backend outside callbacks; these are its listings.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence

from virtpub.core.driver import Driver, DriverError
from virtpub.core.event import DomainFacts
from virtpub.daemon.announcements import SnapshotReason, snapshot_begin
from virtpub.daemon.clock import Clock
from virtpub.daemon.pipeline import Pipeline

log = logging.getLogger(__name__)

_EXISTENCE_BY_POLL = frozenset({"defined", "undefined", "started", "stopped"})


class Resync:
    def __init__(
        self,
        drivers: Sequence[Driver],
        pipeline: Pipeline,
        take_queued: Callable[[], None],
        clock: Clock,
    ) -> None:
        self._drivers = drivers
        self._pipeline = pipeline
        self._take_queued = take_queued
        """Handles every queued signal first, so records are current before a listing."""
        self._clock = clock
        self._next_poll: dict[str, float] = {}

    @staticmethod
    def listing(driver: Driver) -> list[DomainFacts] | None:
        try:
            return driver.list_domains()
        except DriverError as err:
            log.warning("%s; resync waits for the backend to come back", err)
            return None

    def after_gap(self, driver: Driver, reason: SnapshotReason) -> None:
        """Resyncs `driver` from a fresh listing, unless it cannot list now."""
        listing = self.listing(driver)
        if listing is not None:
            self.resync(driver, reason, listing)

    def resync(
        self,
        driver: Driver,
        reason: SnapshotReason,
        listing: list[DomainFacts],
        request_id: str | None = None,
    ) -> None:
        """After a blind gap: publishes the transitions missed, then a snapshot of every domain.
        On request, the same: the bracket then carries the request's id.

        The listing is taken right after the backend subscribed, and applied before
        any event queued since: records kept from before the gap are stale, and an
        event applied to a stale record could remove a domain that still exists.
        An event the listing already reflects is then published once more, with
        existence still right.
        """
        now = self._clock.wall()
        pipeline = self._pipeline
        tracker = pipeline.trackers[driver.backend]
        pipeline.add_domain(tracker.reconcile(listing, "resync", now))
        begin = snapshot_begin(driver.backend, str(uuid.uuid4()), reason, request_id)
        pipeline.add_publisher(begin, now)
        entries = tracker.snapshot(listing, now)
        pipeline.add_domain(entries)
        pipeline.add_publisher(dataclasses.replace(begin, phase="end", domains=len(entries)), now)
        self._next_poll[driver.backend] = self._clock.monotonic() + driver.poll_interval

    def serve_request(self, request_id: str) -> None:
        """A bracket of every backend, from fresh listings, for one consumer's request.

        Records are current here (not stale as after a gap): queued events first, so the
        listing is compared with what they already told.
        """
        self._take_queued()
        log.info("snapshot requested (request %s)", request_id)
        for driver in self._drivers:
            listing = self.listing(driver)
            if listing is not None:
                self.resync(driver, "requested", listing, request_id)

    def poll_due(self, now: float) -> None:
        """Lists each polled backend whose interval has passed; publishes what changed."""
        for driver in self._drivers:
            if not driver.polled or now < self._next_poll.get(driver.backend, 0.0):
                continue
            self._next_poll[driver.backend] = now + driver.poll_interval
            # Records are current here (not stale as after a gap): queued events first, so
            # the listing is compared with what they already told.
            self._take_queued()
            try:
                listing = driver.list_domains()
            except DriverError as err:
                log.debug("poll skipped: %s", err)
                continue
            allowed = driver.polled
            if allowed & _EXISTENCE_BY_POLL:
                allowed |= {"added", "removed"}
            tracker = self._pipeline.trackers[driver.backend]
            found = tracker.reconcile(listing, "poll", self._clock.wall(), allowed)
            self._pipeline.add_domain(found)
