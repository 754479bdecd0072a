"""A libvirtd that hangs (SIGSTOP) rather than dies: keepalive notices, SIGCONT brings it back.

The shared libvirtd must not be stopped (other tests use it), so this test starts
a libvirtd of its own, unprivileged (user `nobody`, session mode): its socket,
pid file, configuration and every runtime directory live in a temp dir, and its
drivers' state with them, so nothing of the system daemon's is touched. virtpub
reaches its test driver through the remote driver (`test+unix:///default?socket=`):
keepalive applies to remote connections only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import Consumer, Received, RunningPublisher
from tests.test_faults import spooled_sequence
from virtpub.drivers.libvirt.domain import KEEPALIVE_COUNT, KEEPALIVE_INTERVAL_S

KEEPALIVE_BOUND_S = KEEPALIVE_INTERVAL_S * (KEEPALIVE_COUNT + 1)


class PrivateLibvirtd:
    """libvirtd as `nobody`, everything under one temp dir; `stop()` kills it and removes it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="virtpub-libvirtd-"))
        self.dir.chmod(0o755)
        for sub in ("run", "config", "cache", "home"):
            (self.dir / sub).mkdir()
        self.socket = self.dir / "run" / "libvirt-sock"
        self.pid_file = self.dir / "libvirtd.pid"
        config = self.dir / "libvirtd.conf"
        config.write_text(
            f'unix_sock_dir = "{self.dir / "run"}"\n'
            'unix_sock_rw_perms = "0777"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
        )
        nobody = pwd.getpwnam("nobody")
        for path in (self.dir, *self.dir.iterdir()):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        env = {
            "PATH": "/usr/sbin:/usr/bin",
            "HOME": str(self.dir / "home"),
            "XDG_RUNTIME_DIR": str(self.dir / "run"),
            "XDG_CONFIG_HOME": str(self.dir / "config"),
            "XDG_CACHE_HOME": str(self.dir / "cache"),
        }
        self._log = (self.dir / "libvirtd.log").open("w")
        self.process = subprocess.Popen(
            ["libvirtd", "--config", str(config), "--pid-file", str(self.pid_file)],
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], env=env, cwd=self.dir,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.uri = f"test+unix:///default?socket={self.socket}"
        deadline = time.monotonic() + 30
        while True:
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError as err:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"private libvirtd did not start: {err}")
                time.sleep(0.2)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def libvirtd() -> Iterator[PrivateLibvirtd]:
    daemon = PrivateLibvirtd()
    try:
        yield daemon
    finally:
        daemon.stop()


def publisher_event(messages: list[Received], event: str, **data: object) -> Received | None:
    for message in messages:
        body = message.body
        if body["type"] == f"org.virtpub.publisher.{event}" and all(
            body["data"].get(k) == v for k, v in data.items()
        ):
            return message
    return None


def test_a_hung_libvirtd_is_noticed_by_keepalive_and_resynced_after_sigcont(
    libvirtd: PrivateLibvirtd,
    consumer_factory: Callable[..., Consumer],
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    consumer = consumer_factory("#")
    publisher = publisher_factory(libvirtd.uri)
    consumer.collect(lambda m: publisher_event(m, "snapshot", phase="end") is not None)

    libvirtd.process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        consumer.collect(
            lambda m: publisher_event(m, "backend", connected=False) is not None,
            timeout=KEEPALIVE_BOUND_S + 10,
        )
        detected = time.monotonic() - stopped
    finally:
        libvirtd.process.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    messages = consumer.collect(
        lambda m: publisher_event(m, "snapshot", phase="end", reason="reconnect") is not None,
        timeout=30,
    )
    resynced = time.monotonic() - resumed
    lost = publisher_event(messages, "backend", connected=False)
    assert lost is not None and lost.body["data"]["reason"] == "keepalive"
    back = publisher_event(messages, "backend", connected=True)
    assert back is not None and back.body["sequence"] > lost.body["sequence"]
    broker = publisher.daemon.broker
    assert broker is not None
    deadline = time.monotonic() + 10
    while broker.unconfirmed() and time.monotonic() < deadline:
        time.sleep(0.05)
    accepted = spooled_sequence(publisher.settings.state_dir)
    delivered = {m.body["sequence"] for m in consumer.quiet(0.5)}
    print(
        f"\nlibvirtd SIGSTOP: accepted {accepted}, delivered {len(delivered)},"
        f" missing {accepted - len(delivered)}, detected after {detected:.1f} s"
        f" (keepalive {KEEPALIVE_INTERVAL_S} s x {KEEPALIVE_COUNT}), resynced {resynced:.2f} s"
        " after SIGCONT"
    )
    assert detected < KEEPALIVE_BOUND_S + 2
    assert delivered == set(range(1, accepted + 1))
