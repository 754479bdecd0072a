"""`virtpub demo`: a workload on libvirt's test driver and a printout of confirmed messages."""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid

import click
import libvirt

from virtpub.contract.envelope import OutgoingMessage
from virtpub.daemon.service import Daemon
from virtpub.drivers.libvirt.domain import LibvirtDomainDriver

log = logging.getLogger(__name__)

_DOMAIN_XML = """<domain type='test'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


class ConfirmedPrinter(threading.Thread):
    """Prints each message once the broker confirmed it. `on_confirmed` runs on the AMQP
    I/O thread, so it only enqueues; this thread does the formatting and writing."""

    def __init__(self) -> None:
        super().__init__(name="demo-printer", daemon=True)
        self._queue: queue.SimpleQueue[OutgoingMessage] = queue.SimpleQueue()

    def on_confirmed(self, messages: list[OutgoingMessage]) -> None:
        for message in messages:
            self._queue.put(message)

    def run(self) -> None:
        while True:
            message = self._queue.get()
            body = json.loads(message.body)
            data = body["data"]
            who = data.get("domain", {}).get("name") or data.get("host_id", "")
            click.echo(
                f"{body['time']}  seq={body['sequence']:<5} "
                f"{click.style(message.routing_key, fg='cyan', bold=True)}  {who}"
            )


class Workload(threading.Thread):
    """Drives domains through the same connection the driver watches: every
    `test:///default` connection is a separate in-memory host."""

    def __init__(self, daemon: Daemon, cycles: int, pause: float, stop: threading.Event) -> None:
        super().__init__(name="demo-workload", daemon=True)
        self._daemon = daemon
        self._cycles = cycles
        self._pause = pause
        self._stop = stop

    def run(self) -> None:
        self._daemon.started.wait()
        driver = self._daemon.drivers[0]
        if not isinstance(driver, LibvirtDomainDriver):
            return
        conn = driver.connection
        cycle = 0
        try:
            while not self._stop.is_set() and (self._cycles == 0 or cycle < self._cycles):
                cycle += 1
                self._cycle(conn, cycle)
        except libvirt.libvirtError as err:
            log.error("demo workload stopped: %s", err)
        if self._cycles:
            self._stop.wait(1.0)  # let the last confirms print
            self._stop.set()

    def _step(self) -> bool:
        return not self._stop.wait(self._pause)

    def _cycle(self, conn: libvirt.virConnect, cycle: int) -> None:
        persistent = conn.defineXML(_DOMAIN_XML.format(name=f"demo-{cycle}", uuid=uuid.uuid4()))
        for operation in (
            persistent.create,
            persistent.suspend,
            persistent.resume,
            persistent.destroy,
            persistent.undefine,
        ):
            if not self._step():
                return
            operation()
        if not self._step():
            return
        transient = conn.createXML(
            _DOMAIN_XML.format(name=f"demo-transient-{cycle}", uuid=uuid.uuid4()), 0
        )
        if self._step():
            transient.destroy()
