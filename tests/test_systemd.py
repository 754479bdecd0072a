"""The sd_notify client against a real AF_UNIX datagram socket standing in for systemd.

The socket receives exactly what systemd's would, with the sender's credentials
(SO_PASSCRED), so the tests see what `NotifyAccess=main` would attribute to us.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtpub.daemon.systemd import Notifier

UCRED = struct.Struct("3i")  # pid, uid, gid


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Manager:
    """The receiving end of NOTIFY_SOCKET, as systemd sets it up."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def receive(self) -> tuple[list[str], int]:
        """One datagram's lines and the pid the kernel says sent it."""
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        pids = [
            UCRED.unpack(payload[: UCRED.size])[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1
        return data.decode().split("\n"), pids[0]

    def lines(self) -> list[str]:
        return self.receive()[0]

    def nothing_more(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


@pytest.fixture
def path_manager(tmp_path: Path) -> Iterator[tuple[str, Manager]]:
    path = str(tmp_path / "notify")
    manager = Manager(path)
    yield path, manager
    manager.sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[tuple[str, Manager]]:
    name = f"virtpub-test-notify-{secrets.token_hex(6)}"
    manager = Manager(b"\0" + name.encode())
    yield "@" + name, manager
    manager.sock.close()


def test_outside_systemd_every_call_does_nothing() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    notifier.ready("up")
    notifier.status("fine")
    notifier.watchdog()
    notifier.stopping()


def test_ready_with_a_status_is_one_datagram_from_this_process(
    path_manager: tuple[str, Manager],
) -> None:
    address, manager = path_manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    notifier.ready("publishing to exchange 'virt.events'")
    lines, pid = manager.receive()
    assert lines == ["READY=1", "STATUS=publishing to exchange 'virt.events'"]
    assert pid == os.getpid()


def test_an_abstract_address_reaches_the_abstract_namespace(
    abstract_manager: tuple[str, Manager],
) -> None:
    address, manager = abstract_manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
    notifier.ready()
    notifier.status("still here")
    notifier.stopping()
    assert manager.lines() == ["READY=1"]
    assert manager.lines() == ["STATUS=still here"]
    assert manager.lines() == ["STOPPING=1"]
    assert manager.nothing_more()


def test_a_status_cannot_smuggle_in_another_assignment(path_manager: tuple[str, Manager]) -> None:
    address, manager = path_manager
    Notifier(address).status("spool full\nREADY=1\r\nWATCHDOG=trigger")
    assert manager.lines() == ["STATUS=spool full READY=1 WATCHDOG=trigger"]


def test_watchdog_interval_is_half_of_watchdog_usec_and_pings_are_spaced_by_it(
    path_manager: tuple[str, Manager],
) -> None:
    address, manager = path_manager
    clock = FakeClock()
    notifier = Notifier(address, 30_000_000, clock=clock)
    assert notifier.watchdog_interval() == 15.0
    notifier.watchdog()
    assert manager.lines() == ["WATCHDOG=1"]
    clock.now += 14.9
    notifier.watchdog()
    assert manager.nothing_more()
    clock.now += 0.1
    notifier.watchdog()
    assert manager.lines() == ["WATCHDOG=1"]


def test_watchdog_from_the_environment_only_for_the_process_it_names(
    path_manager: tuple[str, Manager],
) -> None:
    address, manager = path_manager
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
    assert Notifier.from_environment(env).watchdog_interval() == 1.0
    mine = Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval() == 1.0
    inherited = Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert inherited.watchdog_interval() is None
    inherited.watchdog()
    assert manager.nothing_more()


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "30000000"},  # nowhere to send the pings
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "0"},
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "thirty seconds"},
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"},
    ],
)
def test_no_watchdog_without_a_usable_setting(env: dict[str, str]) -> None:
    assert Notifier.from_environment(env, pid=42).watchdog_interval() is None


def test_failures_never_raise_and_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"), 2_000_000)
    with caplog.at_level(logging.WARNING, logger="virtpub.daemon.systemd"):
        notifier.ready("up")
        notifier.watchdog()
        notifier.status("fine")
        notifier.stopping()
    assert len(caplog.records) == 1
    assert "nobody-listens" in caplog.records[0].getMessage()


def test_an_address_that_is_neither_path_nor_abstract_is_refused_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="virtpub.daemon.systemd"):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "relative/notify"})
        notifier.ready()
    assert not notifier.enabled
    assert len(caplog.records) == 1


def test_a_failed_ping_is_retried_at_the_next_call(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    clock = FakeClock()
    notifier = Notifier(address, 30_000_000, clock=clock)
    notifier.watchdog()  # systemd's socket is not there yet
    manager = Manager(address)
    try:
        clock.now += 1.0
        notifier.watchdog()
        assert manager.lines() == ["WATCHDOG=1"]
    finally:
        manager.sock.close()
