"""Builds the daemon from settings: the real spool, broker and metrics server, wired.

The one place these parts are made (the CLI, the bench and the test fixtures call it),
so the daemon itself only gets them and can be given doubles instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from virtpub.amqp.broker import Broker, Confirmed
from virtpub.amqp.requests import CapabilityResponder
from virtpub.config import Settings
from virtpub.core.driver import Driver
from virtpub.daemon.health import Health
from virtpub.daemon.metrics import Counters, MetricsServer
from virtpub.daemon.service import Daemon
from virtpub.daemon.spool import Spool, SpoolError
from virtpub.daemon.status import BrokerHandoff, Status
from virtpub.daemon.systemd import Notifier

log = logging.getLogger(__name__)


def assemble(
    settings: Settings,
    drivers: Sequence[Driver],
    on_confirmed: Confirmed | None = None,
    notifier: Notifier | None = None,
) -> Daemon | None:
    """The daemon with its parts, the metrics server already listening; None (the reason
    logged) when the spool cannot be opened or the metrics port cannot be had."""
    try:
        spool = Spool(settings.state_dir / "spool.sqlite3")
    except SpoolError as err:
        log.error("%s", err)
        return None
    status = Status(driver.backend for driver in drivers)
    handoff = BrokerHandoff()
    responder = CapabilityResponder(
        settings.exchange, settings.host_id, handoff.snapshot_requests.offer
    )
    broker = Broker(
        settings,
        spool,
        responder=responder,
        on_confirmed=on_confirmed,
        on_reconnected=handoff.reconnected.set,
        connection_name=f"virtpub {settings.host_id} pid {os.getpid()}",
    )
    try:
        metrics = _serve_metrics(settings, status, spool, broker, responder)
    except OSError as err:
        log.error("metrics: cannot listen on %s:%d: %s", *settings.metrics_listen or (), err)
        spool.close()
        return None
    return Daemon(
        settings,
        drivers,
        spool=spool,
        publisher=broker,
        responder=responder,
        handoff=handoff,
        status=status,
        metrics=metrics,
        notifier=notifier,
    )


def _serve_metrics(
    settings: Settings,
    status: Status,
    spool: Spool,
    broker: Broker,
    responder: CapabilityResponder,
) -> MetricsServer | None:
    address = settings.metrics_listen
    if address is None:
        return None
    counters = Counters(
        received=lambda: dict(status.received),
        broker=broker.counts,
        dropped=status.dropped,
        spool=lambda: (spool.count(), spool.used_bytes),
        backend_reconnects=lambda: status.backend_reconnects,
        requests=responder.counts,
        latency=broker.latency,
    )
    server = MetricsServer(
        address, counters, Health(status, broker, spool, settings.spool_max_bytes)
    )
    server.start()
    return server
