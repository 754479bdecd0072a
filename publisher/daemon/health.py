"""The /healthz checks: each backend connected, the broker publishing, the spool not full."""

from __future__ import annotations

from virtpub.daemon.ports import Publisher, SpoolStore
from virtpub.daemon.status import Status

Checks = dict[str, tuple[bool, str]]


def health_checks(
    backend_up: dict[str, bool], broker_ready: bool, used_bytes: int, max_bytes: int
) -> Checks:
    """Pure: what /healthz reports, from the values read at request time."""
    checks = {
        f"backend {backend}": (up, "connected" if up else "disconnected")
        for backend, up in backend_up.items()
    }
    checks["broker"] = (
        broker_ready,
        "publishing" if broker_ready else "not connected, or blocked by a resource alarm",
    )
    room = max_bytes - used_bytes
    checks["spool"] = (room > 0, f"{used_bytes} of {max_bytes} bytes")
    return checks


class Health:
    """Reads the live parts when /healthz is asked (on the metrics server's thread)."""

    def __init__(
        self, status: Status, publisher: Publisher, spool: SpoolStore, max_bytes: int
    ) -> None:
        self._status = status
        self._publisher = publisher
        self._spool = spool
        self._max_bytes = max_bytes

    def __call__(self) -> Checks:
        return health_checks(
            dict(self._status.backend_up),
            self._publisher.ready,
            self._spool.used_bytes,
            self._max_bytes,
        )
