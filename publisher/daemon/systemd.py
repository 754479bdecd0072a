"""Tells systemd how the daemon is doing (the sd_notify protocol), without libsystemd.

Under a `Type=notify` unit systemd sets NOTIFY_SOCKET: each notification is one
datagram of newline-separated `KEY=VALUE` lines sent to that AF_UNIX socket, a
path or, with a leading '@', a name in Linux's abstract namespace. The kernel
attaches the sender's pid, which is how `NotifyAccess=main` knows it is ours.
With `WatchdogSec=` systemd also sets WATCHDOG_USEC (and WATCHDOG_PID, the
process it expects the pings from) and kills a service that stays silent longer.

Outside systemd every call does nothing. A notification is never worth stopping
the daemon for, so nothing here raises: the first failure is logged and later
ones are not, and systemd then sees the daemon as it would without
notifications (a missing READY=1 times the start out, missing pings trip the
watchdog, and the unit's Restart= takes over).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """One service's channel to systemd; all calls are meant for one thread."""

    def __init__(
        self,
        notify_socket: str | None,
        watchdog_usec: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._complained = False
        self._address = self._parse_address(notify_socket) if notify_socket else None
        self._interval = (
            watchdog_usec / 2_000_000
            if watchdog_usec is not None and watchdog_usec > 0 and self._address is not None
            else None
        )
        self._clock = clock
        self._last_ping: float | None = None

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """Reads what systemd set for this process (`pid`, by default the current one).

        Pings are due only when WATCHDOG_PID is unset or names this process: a
        child that inherited the variables must not keep its parent alive.
        """
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        return cls(env.get("NOTIFY_SOCKET") or None, _watchdog_usec(env, pid))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        """Startup is complete: a `Type=notify` unit counts as started from here."""
        self._send(["READY=1", *self._status_line(status)])

    def status(self, text: str) -> None:
        """A one-line state for `systemctl status`."""
        self._send(self._status_line(text))

    def watchdog(self) -> None:
        """Keeps the watchdog fed; cheap enough to call on every turn of a healthy loop.

        Sends at most once per `watchdog_interval()`; a ping that failed is tried
        again on the next call rather than an interval later.
        """
        if self._interval is None:
            return
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self._interval:
            return
        if self._send(["WATCHDOG=1"]):
            self._last_ping = now

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC, as systemd recommends); None: off."""
        return self._interval

    def stopping(self) -> None:
        """Shutdown has begun: systemd shows the unit as deactivating, not as hung."""
        self._send(["STOPPING=1"])

    @staticmethod
    def _status_line(text: str | None) -> list[str]:
        # A newline would end STATUS= and start another assignment (READY=1, say).
        return [] if text is None else ["STATUS=" + " ".join(text.splitlines())]

    def _parse_address(self, notify_socket: str) -> str | bytes | None:
        if notify_socket.startswith("@"):
            return b"\0" + os.fsencode(notify_socket[1:])
        if notify_socket.startswith("/"):
            return notify_socket
        self._complain(f"NOTIFY_SOCKET {notify_socket!r} is neither a path nor an abstract name")
        return None

    def _send(self, lines: list[str]) -> bool:
        if self._address is None:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            # A socket per message, as libsystemd does: nothing to hold open or close.
            # Non-blocking: a full queue on systemd's side must not stall the daemon.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except (OSError, ValueError) as err:
            self._complain(f"cannot notify systemd at {self._printable_address()}: {err}")
            return False
        return True

    def _printable_address(self) -> str:
        address = self._address
        if isinstance(address, bytes):
            return "@" + os.fsdecode(address[1:])
        return str(address)

    def _complain(self, problem: str) -> None:
        if not self._complained:
            self._complained = True
            log.warning("%s; further notification failures are not logged", problem)


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid and raw_pid.strip() != str(pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
