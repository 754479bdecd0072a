"""libvirt domain events, through libvirt-python.

libvirt runs callbacks on its event-loop thread, after the API call that caused
them has returned: the domain may already be gone, so a callback only copies
the UUID, name and id (local reads, no RPC) and its primitive arguments into an
immutable event and hands it off. It never blocks and never raises.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import quote

import libvirt

from virtpub.core import retry
from virtpub.core.capabilities import BackendCapabilities
from virtpub.core.driver import DriverError, Emit
from virtpub.core.event import GONE, BackendChange, DomainFacts, DomainRef
from virtpub.core.redact import redact_url
from virtpub.drivers.libvirt import capability_map
from virtpub.drivers.libvirt.capabilities import Probe, plan
from virtpub.drivers.libvirt.events import (
    LIFECYCLE_ID,
    SUPERSEDED_BY,
    BindingVersion,
    Catalog,
    Enum,
    EventIdSpec,
    normalize,
)

log = logging.getLogger(__name__)

CapabilityLookup = Callable[[str, int], capability_map.DriverRow | None]
"""conn.getType() and conn.getLibVersion() to what that driver emits; None: trust the probe."""

KEEPALIVE_INTERVAL_S = 3
KEEPALIVE_COUNT = 2
"""A libvirtd that answers no keepalive for about interval x (count + 1) = 9 s is taken for
lost. Keepalives are answered by libvirtd's event loop, not its workers, so a busy daemon
still answers; a hung one (SIGSTOP, a stuck loop) does not, and any call waiting on it
fails then instead of hanging the daemon thread."""

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


def binding_version() -> BindingVersion | None:
    """libvirt-python's own release, from its package metadata (pip's and Debian's alike).

    libvirt.getVersion() is the C library's, which says nothing about the wrappers the
    binding compiled; None when no metadata names it, which withholds every ID with a
    known binding defect.
    """
    try:
        text = importlib.metadata.version("libvirt-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def version_string(packed: int) -> str:
    """libvirt packs versions as major * 1,000,000 + minor * 1,000 + release."""
    return f"{packed // 1_000_000}.{packed // 1000 % 1000}.{packed % 1000}"


def source_uri(host_id: str, uri: str) -> str:
    return f"virtpub://{host_id}/libvirt/{quote(redact_url(uri), safe='')}"


class LibvirtDomainDriver:
    """Subscribes to every domain event ID the connection accepts, and keeps it connected.

    A close callback (and keepalive, where the driver has it) notices a lost
    libvirtd; a reconnect thread then opens the connection again with tenacity's
    exponential backoff and jitter and registers every callback again. Both
    changes are reported to the daemon, which announces them and resyncs.
    """

    def __init__(
        self,
        uri: str,
        host_id: str,
        *,
        catalog: Catalog | None = None,
        capability_lookup: CapabilityLookup = capability_map.lookup,
        poll_interval: float = 10.0,
    ) -> None:
        self.uri = uri
        self._backend = source_uri(host_id, uri)
        self._catalog = catalog or Catalog(vars(libvirt), binding_version())
        self._capability_lookup = capability_lookup
        self._poll_interval = poll_interval
        self._conn: Any = None
        self._emit: Emit | None = None
        self._callback_ids: list[int] = []
        self._refused: dict[str, str] = {}
        self._subscribed: list[EventIdSpec] = []
        self._polled: frozenset[str] = frozenset()
        self._superseded_types: frozenset[str] = frozenset()
        self._failures = 0
        self._superseded = 0
        self._capabilities: BackendCapabilities | None = None
        self._lock = threading.Lock()
        self._lost = threading.Event()
        self._stopping = threading.Event()
        self._reconnector: threading.Thread | None = None

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def connection(self) -> Any:
        """The open libvirt connection (the demo workload drives `test:///default` through it)."""
        return self._conn

    @property
    def polled(self) -> frozenset[str]:
        """Lifecycle event types this backend cannot emit, so the daemon polls for them."""
        return self._polled

    @property
    def poll_interval(self) -> float:
        return self._poll_interval

    def start(self, emit: Emit) -> None:
        ensure_event_loop()
        self._emit = emit
        try:
            self._connect()
        except libvirt.libvirtError as err:
            raise DriverError(
                f"libvirt: cannot open {redact_url(self.uri)!r}: {_one_line(err)}"
            ) from err
        self._reconnector = threading.Thread(
            target=self._keep_connected, name=f"libvirt-reconnect {self.uri}", daemon=True
        )
        self._reconnector.start()

    def _connect(self) -> None:
        """Opens the connection, watches it for loss, subscribes, and describes what it emits."""
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
        except libvirt.libvirtError as err:
            log.debug("libvirt %s has no keepalive: %s", self.uri, err)
        conn.registerCloseCallback(self._on_close, None)
        with self._lock:
            self._conn = conn
            self._callback_ids.clear()
            self._refused.clear()
            self._subscribed.clear()
        self._subscribe()
        self._capabilities = self._describe()

    def _on_close(self, _conn: object, reason: int, _opaque: object) -> None:
        """Runs on libvirt's event-loop thread: only records the loss and wakes the reconnector."""
        try:
            if self._stopping.is_set():
                return
            why = self._catalog.name(_CLOSE_REASON, reason)
            log.warning("libvirt %s: connection lost (%s)", redact_url(self.uri), why)
            if self._emit is not None:
                self._emit(BackendChange(self._backend, False, why, time.time()))
            self._lost.set()
        except Exception:  # never raise into libvirt's loop
            self._failures += 1
            log.exception("libvirt close callback failed")

    def _keep_connected(self) -> None:
        while not self._stopping.is_set():
            self._lost.wait()
            if self._stopping.is_set():
                return
            self._lost.clear()
            self._discard_connection()
            try:
                what = f"libvirt {redact_url(self.uri)}"
                for attempt in retry.until_stopped(libvirt.libvirtError, self._stopping, what, log):
                    with attempt:
                        self._connect()
            except libvirt.libvirtError:
                return  # stopping
            log.info("libvirt %s: reconnected", redact_url(self.uri))
            if self._emit is not None:
                self._emit(BackendChange(self._backend, True, None, time.time()))

    def _subscribe(self) -> None:
        self._refused.update(self._catalog.withheld)
        subscribed: set[str] = set()
        for spec in self._catalog.subscriptions():
            successor = SUPERSEDED_BY.get(spec.constant)
            if successor is not None and successor in subscribed:
                continue
            try:
                cb_id = self._conn.domainEventRegisterAny(
                    None, spec.code, self._callback(spec), None
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

    def _callback(self, spec: EventIdSpec) -> Callable[..., None]:
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
                event = normalize(
                    catalog,
                    spec,
                    backend=backend,
                    domain=ref,
                    args=rest[:-1],
                    received_at=received_at,
                )
                if event.event in self._superseded_types:
                    self._superseded += 1  # polling owns this type; publishing both would repeat it
                    return
                if self._emit is not None:
                    self._emit(event)
            except Exception:  # never raise into libvirt's loop: count and log
                self._failures += 1
                log.exception("dropped a libvirt %s callback that could not be read", spec.constant)

        return on_event

    def _describe(self) -> BackendCapabilities:
        conn = self._conn
        accepted = frozenset(spec.event_type for spec in self._subscribed)
        refused = {
            spec.event_type: self._refused[spec.constant]
            for spec in self._catalog.ids
            if spec.constant in self._refused and spec.event_type not in accepted
        }
        driver_type = _optional(conn.getType) or "unknown"
        lib_version = conn.getLibVersion()
        probe = Probe(
            driver_type=driver_type,
            libvirt_version=lib_version,
            lifecycle_types=self._catalog.lifecycle_types,
            event_ids=tuple(
                dict.fromkeys(s.event_type for s in self._catalog.ids if s.constant != LIFECYCLE_ID)
            ),
            accepted=accepted,
            refused=refused,
        )
        row = self._capability_lookup(driver_type, lib_version)
        decided = plan(probe, row, self._poll_interval)
        self._polled = decided.polled
        self._superseded_types = decided.superseded
        return BackendCapabilities(
            driver="libvirt",
            source=self._backend,
            uri=redact_url(conn.getURI()),
            hypervisor_type=driver_type,
            hypervisor_version=_optional(lambda: version_string(conn.getVersion())),
            libvirt_version=version_string(lib_version),
            events=decided.events,
        )

    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise RuntimeError("capabilities are known only after start()")
        return self._capabilities

    # -- the daemon thread's reads --------------------------------------------------------------

    def list_domains(self) -> list[DomainFacts]:
        """Every domain with its persistence and state: three calls, whatever the count.

        Raises DriverError while the connection is down.
        """
        conn = self._live_connection()
        try:
            persistent = {
                d.UUIDString()
                for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
            }
            stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
        except libvirt.libvirtError as err:
            raise DriverError(
                f"libvirt {redact_url(self.uri)}: listing failed: {_one_line(err)}"
            ) from err
        facts = []
        for dom, values in stats:
            dom_id = dom.ID()
            uuid = dom.UUIDString()
            facts.append(
                DomainFacts(
                    uuid=uuid,
                    name=dom.name(),
                    id=dom_id if dom_id >= 0 else None,
                    persistent=uuid in persistent,
                    state=self._catalog.domain_state(
                        int(values.get("state.state", 0)), int(values.get("state.reason", 0))
                    ),
                )
            )
        return facts

    def lookup(self, uuid: str) -> DomainFacts | Literal["gone"] | None:
        """One domain by UUID: GONE if libvirt says there is none, None if it cannot say."""
        try:
            conn = self._live_connection()
            dom = conn.lookupByUUIDString(uuid)
            state, reason = dom.state()
            dom_id = dom.ID()
            return DomainFacts(
                uuid=uuid,
                name=dom.name(),
                id=dom_id if dom_id >= 0 else None,
                persistent=bool(dom.isPersistent()),
                state=self._catalog.domain_state(state, reason),
            )
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return GONE
            log.debug("libvirt %s: lookup of %s failed: %s", self.uri, uuid, err)
            return None
        except DriverError:
            return None

    def _live_connection(self) -> Any:
        conn = self._conn
        if conn is None or self._lost.is_set():
            raise DriverError(f"libvirt {redact_url(self.uri)}: not connected")
        return conn

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._lost.set()  # wakes the reconnector so it can see it must stop
        self._discard_connection()
        if self._reconnector is not None:
            self._reconnector.join(5)
        if self._failures or self._superseded:
            log.warning(
                "libvirt %s: %d callback(s) could not be read, %d event(s) left to polling",
                redact_url(self.uri),
                self._failures,
                self._superseded,
            )

    def _discard_connection(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            callback_ids = list(self._callback_ids)
            self._callback_ids.clear()
        if conn is None:
            return
        for cb_id in callback_ids:
            try:
                conn.domainEventDeregisterAny(cb_id)
            except libvirt.libvirtError as err:
                log.debug("deregistering callback %d failed: %s", cb_id, err)
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError as err:
            log.debug("unregistering the close callback failed: %s", err)
        try:
            conn.close()
        except libvirt.libvirtError as err:
            log.debug("closing %s failed: %s", self.uri, err)


_CLOSE_REASON = Enum("VIR_CONNECT_CLOSE_REASON_")


def _optional(read: Callable[[], Any]) -> str | None:
    """Some drivers do not implement every info call; absence is an answer, not an error."""
    try:
        value = read()
    except libvirt.libvirtError:
        return None
    return None if value is None else str(value)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
