"""libvirt domain events, through libvirt-python.

libvirt runs callbacks on its event-loop thread, after the API call that caused
them has returned: the domain may already be gone, so a callback only copies
the UUID, name and id (local reads, no RPC) and its primitive arguments into an
immutable event and hands it off. It never blocks and never raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import libvirt

from drivers.libvirt_events import LIFECYCLE_ID, SUPERSEDED_BY, Catalog, EventIdSpec, normalize
from publisher.capabilities import BackendCapabilities, EventSupport
from publisher.driver import DriverError, Emit
from publisher.event import DomainRef
from publisher.redact import redact_url

log = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop_started = False


def ensure_event_loop() -> None:
    """Registers libvirt's default event loop once per process and runs it on a daemon thread.

    It must be registered before the first `libvirt.open()`: a connection opened
    earlier never delivers events.
    """
    global _loop_started  # noqa: PLW0603 - libvirt's event loop is process-wide by design
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        libvirt.registerErrorHandler(_silence_default_error_printer, None)
        thread = threading.Thread(target=_run_event_loop, name="libvirt-event-loop", daemon=True)
        thread.start()
        _loop_started = True


def _silence_default_error_printer(_ctx: object, _error: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and reported once."""


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # the loop thread must survive anything a run raises
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)


def version_string(packed: int) -> str:
    """libvirt packs versions as major * 1,000,000 + minor * 1,000 + release."""
    return f"{packed // 1_000_000}.{packed // 1000 % 1000}.{packed % 1000}"


def source_uri(host_id: str, uri: str) -> str:
    return f"virtpub://{host_id}/libvirt/{quote(redact_url(uri), safe='')}"


class LibvirtDomainDriver:
    """Subscribes to every domain event ID the connection accepts."""

    def __init__(self, uri: str, host_id: str, catalog: Catalog | None = None) -> None:
        self.uri = uri
        self._backend = source_uri(host_id, uri)
        self._catalog = catalog or Catalog(vars(libvirt))
        self._conn: Any = None
        self._callback_ids: list[int] = []
        self._refused: dict[str, str] = {}
        self._subscribed: list[EventIdSpec] = []
        self._failures = 0
        self._capabilities: BackendCapabilities | None = None

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def connection(self) -> Any:
        """The open libvirt connection (the demo workload drives `test:///default` through it)."""
        return self._conn

    @property
    def callback_failures(self) -> int:
        return self._failures

    def start(self, emit: Emit) -> None:
        ensure_event_loop()
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            raise DriverError(
                f"libvirt: cannot open {redact_url(self.uri)!r}: {_one_line(err)}"
            ) from err
        self._subscribe(emit)
        self._capabilities = self._describe()

    def _subscribe(self, emit: Emit) -> None:
        subscribed: set[str] = set()
        for spec in self._catalog.subscriptions():
            successor = SUPERSEDED_BY.get(spec.constant)
            if successor is not None and successor in subscribed:
                continue
            try:
                cb_id = self._conn.domainEventRegisterAny(
                    None, spec.code, self._callback(spec, emit), None
                )
            except libvirt.libvirtError as err:
                self._refused[spec.constant] = _one_line(err)
                log.debug("libvirt %s refused event %s: %s", self.uri, spec.constant, err)
                continue
            self._callback_ids.append(cb_id)
            self._subscribed.append(spec)
            subscribed.add(spec.constant)
        log.info(
            "libvirt %s: subscribed to %d event IDs, %d refused",
            redact_url(self.uri),
            len(self._subscribed),
            len(self._refused),
        )

    def _callback(self, spec: EventIdSpec, emit: Emit) -> Callable[..., None]:
        catalog, backend = self._catalog, self._backend

        def on_event(_conn: object, dom: Any, *rest: object) -> None:
            try:
                received_at = time.time()
                dom_id = dom.ID()
                ref = DomainRef(
                    uuid=dom.UUIDString(),
                    name=dom.name(),
                    id=dom_id if dom_id >= 0 else None,
                )
                emit(
                    normalize(
                        catalog,
                        spec,
                        backend=backend,
                        domain=ref,
                        args=rest[:-1],
                        received_at=received_at,
                    )
                )
            except Exception:  # never raise into libvirt's loop: count and log
                self._failures += 1
                log.exception("dropped a libvirt %s callback that could not be read", spec.constant)

        return on_event

    def _describe(self) -> BackendCapabilities:
        conn = self._conn
        subscribed_types = {s.event_type for s in self._subscribed}
        events: dict[str, EventSupport] = {}
        lifecycle_ok = any(s.constant == LIFECYCLE_ID for s in self._subscribed)
        for name in self._catalog.lifecycle_types:
            events[name] = (
                EventSupport("native")
                if lifecycle_ok
                else EventSupport("unsupported", self._refused.get(LIFECYCLE_ID))
            )
        for spec in self._catalog.ids:
            if spec.constant == LIFECYCLE_ID or spec.event_type in events:
                continue
            if spec.event_type in subscribed_types:
                events[spec.event_type] = EventSupport("native")
            else:
                events[spec.event_type] = EventSupport(
                    "unsupported", self._refused.get(spec.constant)
                )
        return BackendCapabilities(
            driver="libvirt",
            source=self._backend,
            uri=redact_url(conn.getURI()),
            hypervisor_type=_optional(conn.getType),
            hypervisor_version=_optional(lambda: version_string(conn.getVersion())),
            libvirt_version=_optional(lambda: version_string(conn.getLibVersion())),
            events=events,
        )

    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise RuntimeError("capabilities are known only after start()")
        return self._capabilities

    def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cb_id in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(cb_id)
            except libvirt.libvirtError as err:
                log.debug("deregistering callback %d failed: %s", cb_id, err)
        self._callback_ids.clear()
        try:
            conn.close()
        except libvirt.libvirtError as err:
            log.debug("closing %s failed: %s", self.uri, err)


def _optional(read: Callable[[], Any]) -> str | None:
    """Some drivers do not implement every info call; absence is an answer, not an error."""
    try:
        value = read()
    except libvirt.libvirtError:
        return None
    return None if value is None else str(value)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
